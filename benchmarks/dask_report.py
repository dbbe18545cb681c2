"""K-FAC, TKFAC and K-FOC from 10 million samples on a Dask ``distributed`` cluster.

    python benchmarks/dask_report.py [--samples 10000000] [--m 16] [--n 16] [--chunk 250000]
                                     [--workers 1 2] [--json FILE] [--quick]

The per-sample statistics are generated chunk by chunk on the workers (``map_blocks`` with a
seed per block), so they never exist in the client's memory; ``kfoc`` persists them on the
workers (each Lanczos step is then one map-reduce over the persisted chunks). For each cluster
size it prints the median wall time of each estimator (after one warm-up) and the peak resident
memory of each worker process. The answers' agreement with NumPy is tested in
``tests/test_dask_distributed.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np


def _block(block_info=None, *, width, which, seed):
    loc = block_info[None]["array-location"][0]
    rows = loc[1] - loc[0]
    rng = np.random.default_rng([seed, loc[0]])
    s = np.abs(rng.standard_t(3.0, size=(rows, 1))) + 0.1  # shared per-sample magnitude
    x = rng.standard_normal((rows, width))
    return s * x if which == "G" else np.sqrt(s) * x


def statistics_arrays(K, m, n, chunk, seed=0):
    import dask.array as da

    chunks = ((chunk,) * (K // chunk) + ((K % chunk,) if K % chunk else ()),)
    G = da.map_blocks(_block, dtype=np.float64, chunks=chunks + ((m,),), width=m, which="G", seed=seed)
    A = da.map_blocks(_block, dtype=np.float64, chunks=chunks + ((n,),), width=n, which="A", seed=seed)
    return G, A


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10_000_000)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=250_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="200k samples, 1 repeat (smoke test)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.chunk, args.repeats = 200_000, 50_000, 1
    import distributed

    import kronsum as ks

    records = []
    for nw in args.workers:
        with distributed.LocalCluster(n_workers=nw, threads_per_worker=1, processes=True,
                                      dashboard_address=None, silence_logs=50,
                                      memory_limit="10GiB") as cluster, distributed.Client(cluster) as client:
            G, A = statistics_arrays(args.samples, args.m, args.n, args.chunk)
            F = ks.KronSum.from_outer(G, A, check_finite=False)  # finiteness would cost a pass
            t0 = time.perf_counter()
            F = F.persisted()  # generated chunk by chunk on the workers, kept there
            distributed.wait([F.G, F.A])
            print(f"workers={nw} generated and persisted {args.samples} samples in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            results = {}
            for name, fn in [("kfac", ks.kfac), ("tkfac", ks.tkfac),
                             ("kfoc", lambda F: ks.kfoc(F, tol=1e-8))]:
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    est = fn(F)
                    dense = est.to_dense().compute()
                    times.append(time.perf_counter() - t0)
                results[name] = (est, dense)
                peaks = client.run(peak_rss_mib)
                rec = {"case": f"outer K={args.samples} m={args.m} n={args.n} chunk={args.chunk}",
                       "method": name, "workers": nw, "median_s": statistics.median(times),
                       "peak_mib": max(peaks.values()), "peak_mib_per_worker": sorted(peaks.values()),
                       "iterations": est.info.iterations}
                records.append(rec)
                print(f"workers={nw} {name:6s} median {rec['median_s']:8.2f} s   peak RSS per worker "
                      f"{', '.join(f'{p:.0f}' for p in rec['peak_mib_per_worker'])} MiB   "
                      f"applications {est.info.iterations}", flush=True)
            # ‖F − F̂‖ needs all K² sample pairs (or K·m²·n² work) and is not computed at this K;
            # correctness on Dask is tested against NumPy in tests/test_dask_distributed.py
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(records, fh, indent=1)
    return records


if __name__ == "__main__":
    main()
