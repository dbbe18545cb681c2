"""Timing report: the cost of one ``RunningEstimate.update`` per estimator (docs/streaming.md).

    python benchmarks/running_report.py [--quick] [--json FILE] [--repeat N] [--batches B]

For each case (the fast-solver issue's outer K=256, m=n=256 and conv K=32, T=64, m=64,
n=576; ``--quick``: small sizes) and each estimator (``kfac``, ``tkfac``, ``kfoc_approx``,
``kfoc_running``, decay 0.95), a running estimate is warmed up on three batches (numba
compilation and the cold first solve are not timed); then ``--repeat`` (at least 5) updates,
each with the next batch of a cycle of ``--batches`` distinct ones, are timed one by one and
the median reported. BLAS is pinned to 1 thread (``benchmarks.common.blas_threads``).
``peak_mib`` is the tracemalloc peak of one extra update (NumPy's own allocations).
``iterations`` are the operator applications per timed update (mean, min, max) for the K-FOC
estimators. ``rel_err`` is ``‖S_t − estimate‖/‖S_t‖`` after the last update against the exact
running sum ``S_t`` of every batch that entered, and ``rel_err_optimum`` that of ``kfoc(S_t)``.
``--json`` writes records ``{"case", "method", "median_s", "peak_mib", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kronsum as ks  # noqa: E402
from benchmarks.common import blas_threads, conv_data, outer_data  # noqa: E402

ESTIMATORS = ("kfac", "tkfac", "kfoc_approx", "kfoc_running")
DECAY = 0.95


def cases(quick: bool):
    if quick:
        return {
            "outer K=64 m=n=32": lambda s: ks.KronSum.from_outer(*outer_data(64, 32, 32, seed=s)),
            "conv K=8 T=16 m=16 n=36": lambda s: ks.KronSum.from_conv(*conv_data(8, 16, 16, 36, seed=s)),
        }
    return {
        "outer K=256 m=n=256": lambda s: ks.KronSum.from_outer(*outer_data(256, 256, 256, seed=s)),
        "conv K=32 T=64 m=64 n=576": lambda s: ks.KronSum.from_conv(*conv_data(32, 64, 64, 576, seed=s)),
    }


def run_case(case, make, repeat, n_batches):
    batches = [make(seed) for seed in range(n_batches)]
    records = []
    for name in ESTIMATORS:
        run = ks.RunningEstimate(name, decay=DECAY)
        fed = []

        def update():
            F = batches[len(fed) % n_batches]
            fed.append(F)
            return run.update(F)

        for _ in range(3):  # warm-up
            update()
        times, its = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            est = update()
            times.append(time.perf_counter() - t0)
            its.append(est.info.iterations)
        tracemalloc.start()
        tracemalloc.reset_peak()
        est = update()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        # the exact running sum of every batch that entered, and the errors to it
        S = None
        for t, F in enumerate(fed, 1):
            a, b = run.mixing_weights(t)
            S = F if S is None else a * S + b * F
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ks.AccuracyWarning)
            normS = float(S.frobenius_norm())
            err = float(ks.frobenius_error(S, est)) / normS
            opt = float(ks.frobenius_error(S, ks.kfoc(S))) / normS if name == "kfoc_running" else None
        rec = {"case": case, "method": name, "median_s": statistics.median(times),
               "peak_mib": round(peak, 3), "rel_err": err, "updates": len(fed)}
        if name.startswith("kfoc"):
            rec["iterations"] = {"mean": float(np.mean(its)), "min": int(min(its)), "max": int(max(its))}
        if opt is not None:
            rec["rel_err_optimum"] = opt
        records.append(rec)
        it = rec.get("iterations")
        its_s = f"{it['mean']:5.1f} [{it['min']}-{it['max']}]" if it else "      -     "
        print(f"{case:28s} {name:13s} {rec['median_s'] * 1e3:10.2f} ms {peak:9.2f} MiB  "
              f"its {its_s}  rel_err {err:.4f}" + (f" (optimum {opt:.4f})" if opt is not None else ""),
              flush=True)
    return records


def table(records):
    lines = ["| case | method | median per update | peak MiB | applications per update | ‖S_t − est‖/‖S_t‖ |",
             "|---|---|---:|---:|---|---:|"]
    for r in records:
        it = r.get("iterations")
        its = f"{it['mean']:.1f} ({it['min']}–{it['max']})" if it else "—"
        err = f"{r['rel_err']:.4f}"
        if "rel_err_optimum" in r:
            err += f" (optimum {r['rel_err_optimum']:.4f})"
        lines.append(f"| {r['case']} | `{r['method']}` | {r['median_s'] * 1e3:.2f} ms | "
                     f"{r['peak_mib']:.2f} | {its} | {err} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds; CI smoke test)")
    ap.add_argument("--json", metavar="FILE", help="write the records as a JSON list")
    ap.add_argument("--repeat", type=int, default=7, help="timed updates per estimator (>= 5)")
    ap.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    args = ap.parse_args(argv)
    repeat = max(5, args.repeat)
    print(f"# kronsum {ks.__version__} | python {platform.python_version()} | numpy {np.__version__} | "
          f"{os.cpu_count()} cores | {platform.processor() or platform.machine()} | BLAS 1 thread | "
          f"decay {DECAY}")
    records = []
    with blas_threads(1):
        for case, make in cases(args.quick).items():
            records += run_case(case, make, repeat, max(1, args.batches))
    print(table(records))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(records, fh, indent=1)
    return records


if __name__ == "__main__":
    main()
