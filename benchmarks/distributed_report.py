"""K-FAC, TKFAC and K-FOC of a sum split over torch.distributed ranks, against one process.

    python benchmarks/distributed_report.py [--world 2] [--rounds 5] [--json FILE] [--quick]

For each case and data family the per-sample statistics are split evenly over ``--world``
gloo processes (CPU, one BLAS thread each); ``kronsum.adapters.distributed`` computes each
estimate with all-reduced factors. The single-process baseline is ``kronsum.kfac`` /
``kronsum.tkfac`` / ``kronsum.kfoc(method="lanczos", tol, accuracy=None)`` — the same solver
and stop — on the gathered statistics in one process. Reported per estimator: the median wall
time (the slowest rank's, after a barrier), the median CPU time per rank, the number of
all-reduces, the bytes each rank sent into them and the wall time spent inside them, and the
relative difference from the single-process estimate.
"""

from __future__ import annotations

import os

# one BLAS thread in this process and in the spawned ranks (set before NumPy loads OpenBLAS;
# the ranks inherit the environment): two ranks on two cores must not oversubscribe them
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import json
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "benchmarks"))
from common import conv_family, outer_family  # noqa: E402

CASES = {
    "outer 4096×128×128": ("outer", dict(K=4096, m=128, n=128)),
    "conv 32×64×64×576": ("conv", dict(K=32, T=64, m=64, n=576)),
}
QUICK = {
    "outer 512×32×32": ("outer", dict(K=512, m=32, n=32)),
    "conv 8×16×16×72": ("conv", dict(K=8, T=16, m=16, n=72)),
}
FAMILIES = ("gaussian", "heavy")
TOL = 1e-10


def _data(form, shape, family):
    if form == "outer":
        return outer_family(family, shape["K"], shape["m"], shape["n"])
    return conv_family(family, shape["K"], shape["T"], shape["m"], shape["n"])


def _sum(form, G, A):
    import kronsum as ks

    return (ks.KronSum.from_outer if form == "outer" else ks.KronSum.from_conv)(G, A)


def _estimators(ks_mod, dist_mod=None):
    if dist_mod is None:
        return {"kfac": ks_mod.kfac, "tkfac": ks_mod.tkfac,
                "kfoc": lambda F: ks_mod.kfoc(F, method="lanczos", tol=TOL, accuracy=None)}
    return {"kfac": dist_mod.kfac, "tkfac": dist_mod.tkfac,
            "kfoc": lambda F: dist_mod.kfoc(F, tol=TOL)}


def _timed(fns, F, rounds, barrier=None):
    """Interleaved rounds; per call CPU time, wall time and the all-reduce log."""
    out = {k: {"cpu": [], "wall": []} for k in fns}
    for fn in fns.values():
        fn(F)
    for _ in range(rounds):
        for k, fn in fns.items():
            if barrier:
                barrier()
            c0, w0 = time.process_time(), time.perf_counter()
            fn(F)
            if barrier:
                barrier()
            out[k]["cpu"].append(time.process_time() - c0)
            out[k]["wall"].append(time.perf_counter() - w0)
    return {k: {"cpu_s": statistics.median(v["cpu"]), "wall_s": statistics.median(v["wall"])}
            for k, v in out.items()}


def _diff(est, ref) -> float:
    """The largest relative difference of the scale and of each factor (every estimator here
    fixes the split of the magnitude, so equal estimates have equal factors); the dense
    matrices would not fit in memory for the conv case."""
    import torch

    d = [abs(float(est.scale) - float(ref.scale)) / abs(float(ref.scale))]
    for a, b in ((est.left, ref.left), (est.right, ref.right)):
        d.append(float((a - b).abs().max() / b.abs().max()))
    return max(d)


def _worker(rank, world, path, cases, rounds, queue):
    try:
        _run(rank, world, path, cases, rounds, queue)
    except BaseException as exc:  # reported by the parent instead of a silent hang
        queue.put((rank, repr(exc)))
        raise


def _run(rank, world, path, cases, rounds, queue):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import kronsum as ks
    from kronsum.adapters import distributed as ksd

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    reduce = dist.all_reduce
    log = []

    def logged(t, *a, **k):
        w0 = time.perf_counter()
        r = reduce(t, *a, **k)
        log.append((t.numel() * t.element_size(), time.perf_counter() - w0))
        return r

    dist.all_reduce = logged
    results = {}
    for case, (form, shape) in cases.items():
        for family in FAMILIES:
            G, A = _data(form, shape, family)
            K = G.shape[0]
            part = slice(rank * K // world, (rank + 1) * K // world)
            F = _sum(form, torch.from_numpy(np.ascontiguousarray(G[part])),
                     torch.from_numpy(np.ascontiguousarray(A[part])))
            fns = _estimators(ks, ksd)
            times = _timed(fns, F, rounds, barrier=lambda: dist.barrier())
            full = _sum(form, torch.from_numpy(G), torch.from_numpy(A))
            for name, fn in fns.items():
                log.clear()
                est = fn(F)
                ref = _estimators(ks)[name](full)
                results[case, family, name] = dict(
                    times[name], allreduces=est.info.allreduces,
                    bytes=sum(b for b, _ in log), allreduce_wall_s=sum(s for _, s in log),
                    rel_diff=_diff(est, ref),
                    iterations=est.info.iterations)
    queue.put((rank, results))
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    cases = QUICK if args.quick else CASES
    rounds = 2 if args.quick else args.rounds

    import torch

    torch.set_num_threads(1)
    import kronsum as ks

    base = {}
    for case, (form, shape) in cases.items():
        for family in FAMILIES:
            G, A = _data(form, shape, family)
            F = _sum(form, torch.from_numpy(G), torch.from_numpy(A))
            for name, t in _timed(_estimators(ks), F, rounds).items():
                base[case, family, name] = t

    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    fd, path = tempfile.mkstemp()
    os.close(fd)
    os.remove(path)
    procs = [ctx.Process(target=_worker, args=(r, args.world, path, cases, rounds, queue))
             for r in range(args.world)]
    for p in procs:
        p.start()
    import queue as queue_mod

    ranks = {}
    while len(ranks) < len(procs):
        try:
            r, v = queue.get(timeout=5)
            ranks[r] = v
        except queue_mod.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:  # e.g. killed for memory: nothing was put on the queue
                raise SystemExit(f"a rank exited with code {dead[0]} before reporting")
    for p in procs:
        p.join()
    failed = {r: v for r, v in ranks.items() if not isinstance(v, dict)}
    if failed:
        raise SystemExit(f"ranks failed: {failed}")

    rows = []
    print(f"| case | family | estimator | 1 process wall ms | {args.world} ranks wall ms (slowest) "
          "| CPU ms per rank | all-reduces | KiB sent per rank | in all-reduce ms (incl. waiting) | rel. diff |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, b in base.items():
        per = [ranks[r][key] for r in ranks]
        row = dict(case=key[0], family=key[1], estimator=key[2], single_wall_s=b["wall_s"],
                   single_cpu_s=b["cpu_s"], world=args.world,
                   wall_s=max(p["wall_s"] for p in per),
                   cpu_s_per_rank=statistics.median(p["cpu_s"] for p in per),
                   allreduces=per[0]["allreduces"], bytes_per_rank=per[0]["bytes"],
                   allreduce_wall_s=max(p["allreduce_wall_s"] for p in per),
                   rel_diff=max(p["rel_diff"] for p in per), iterations=per[0]["iterations"])
        rows.append(row)
        print(f"| {row['case']} | {row['family']} | {row['estimator']} | "
              f"{1e3 * row['single_wall_s']:.1f} | {1e3 * row['wall_s']:.1f} | "
              f"{1e3 * row['cpu_s_per_rank']:.1f} | {row['allreduces']} | "
              f"{row['bytes_per_rank'] / 1024:.0f} | {1e3 * row['allreduce_wall_s']:.1f} | "
              f"{row['rel_diff']:.1e} |")
    if args.json:
        meta = dict(date=time.strftime("%Y-%m-%d"), cpus=os.cpu_count(), torch=torch.__version__,
                    threads_per_process=1, rounds=rounds, tol=TOL)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
