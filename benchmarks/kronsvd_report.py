"""Timing report: Kronecker-rank-r approximations against rank 1 (and K-FOC).

For each case, in one process, one warm-up then the median of ``--repeat`` runs (at least 5),
OpenBLAS pinned to one thread (threadpoolctl): ``kfoc(F)`` as the reference, then
``kronecker_svd(F, rank=r)`` for r = 1, 2, 4, 8, with the ratio of its median to rank 1's, the
operator applications (``info.iterations``) and the explained fraction ``Σσ_i²/‖F‖²``. Then the
damped solves of the rank-r results on the outer case: rank 2 exact (factored damping) and CG
(``λ = Σ_{i≥2} σ_i + 0.01 σ_1``, which keeps the truncated sum positive definite).

Cases (the fast-solver benchmarks'): outer K = 256, m = n = 256; conv K = 32, T = 64, m = 64,
n = 576 (``--quick``: outer K = 64, m = n = 64; conv K = 8, T = 16, m = 16, n = 144).
``peak_mib`` is the tracemalloc peak of one extra call (NumPy's own allocations).
Run ``python benchmarks/kronsvd_report.py [--quick] [--json FILE] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import kronsum as ks  # noqa: E402
from benchmarks.common import blas_threads, conv_data, measure, outer_data  # noqa: E402

RANKS = (1, 2, 4, 8)


def _time(fn, repeat):
    median, peak, out = measure(fn, repeat)
    return out, median, peak


def cases(quick):
    if quick:
        return [("outer K=64 m=n=64", ks.KronSum.from_outer(*outer_data(64, 64, 64))),
                ("conv K=8 T=16 m=16 n=144", ks.KronSum.from_conv(*conv_data(8, 16, 16, 144)))]
    return [("outer K=256 m=n=256", ks.KronSum.from_outer(*outer_data(256, 256, 256))),
            ("conv K=32 T=64 m=64 n=576", ks.KronSum.from_conv(*conv_data(32, 64, 64, 576)))]


def run(quick, repeat):
    records = []
    with blas_threads(1):
        for case, F in cases(quick):
            est, med, peak = _time(lambda: ks.kfoc(F), repeat)
            records.append({"case": case, "method": f"kfoc ({est.info.method})", "median_s": med,
                            "peak_mib": round(peak, 3), "iterations": est.info.iterations,
                            "ratio_to_rank1": None, "explained": None})
            base = None
            results = {}
            for r in RANKS:
                B, med, peak = _time(lambda r=r: ks.kronecker_svd(F, rank=r), repeat)
                results[r] = B
                base = med if r == 1 else base
                assert B.info.converged, B.info
                records.append({"case": case, "method": f"kronecker_svd r={r} ({B.info.method})",
                                "median_s": med, "peak_mib": round(peak, 3),
                                "iterations": B.info.iterations, "ratio_to_rank1": med / base,
                                "explained": B.explained})
            if case.startswith("outer"):
                V = np.random.default_rng(0).standard_normal((F.m, F.n))
                for r, kw, label in ((2, dict(damping_method="factored"), "solve r=2 exact (factored)"),
                                     (2, dict(method="cg"), "solve r=2 CG"),
                                     (4, dict(method="cg"), "solve r=4 CG"),
                                     (8, dict(method="cg"), "solve r=8 CG")):
                    B = results[r]
                    s = np.asarray(B.singular_values)
                    lam = float(np.sum(s[1:]) + 1e-2 * s[0])
                    (X, info), med, peak = _time(
                        lambda B=B, lam=lam, kw=kw: B.solve(V, lam, return_info=True, **kw), repeat)
                    records.append({"case": case, "method": label, "median_s": med,
                                    "peak_mib": round(peak, 3), "iterations": info.iterations,
                                    "ratio_to_rank1": None, "explained": None,
                                    "residual": info.residual})
            for rec in records:
                if rec["case"] == case and "printed" not in rec:
                    rec["printed"] = True
                    _print(rec)
    for rec in records:
        rec.pop("printed", None)
    return records


def _print(rec):
    ratio = "" if rec["ratio_to_rank1"] is None else f"{rec['ratio_to_rank1']:.2f}"
    expl = "" if rec["explained"] is None else f"{rec['explained']:.4f}"
    print(f"| {rec['case']} | {rec['method']} | {rec['median_s'] * 1e3:.1f} | {ratio} | "
          f"{rec['iterations']} | {expl} | {rec['peak_mib']:.1f} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small cases only (seconds)")
    ap.add_argument("--json", metavar="FILE", help="write the records as a JSON list")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per case (>= 5)")
    args = ap.parse_args(argv)
    repeat = max(5, args.repeat)
    print(f"# python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; BLAS pinned to 1 thread")
    print("| case | method | median ms | × rank 1 | applications | explained | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    records = run(args.quick, repeat)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)
    return records


if __name__ == "__main__":
    main()
