"""Side-by-side benchmark table for the estimators (the numbers in docs/benchmarks.md).

    python benchmarks/report.py [--quick] [--json FILE] [--threads 1|default|both]

Every case runs in this one process: a warm-up call, then the median of at least 5 timed
runs per method, methods interleaved case by case so that machine noise hits them alike.
Peak memory is the peak of NumPy's allocations during one call (tracemalloc), in MiB.
Ratios are against K-FAC on the same data. ``--json`` writes a list of records
``{"case", "method", "median_s", "peak_mib"}`` (plus ``threads``, ``ratio`` and notes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kronsum as ks  # noqa: E402
from benchmarks.common import (algorithm1_materialised, blas_threads, conv_data,  # noqa: E402
                               materialise_outer, outer_data)
from benchmarks.common import measure as _measure  # noqa: E402


def measure(fn, repeats: int):
    median, peak, _ = _measure(fn, repeats)
    return median, peak


def optimal_check(F, est, ref_err, normF):
    """|err(est) − err(optimum)| / ‖F‖ — the targets ask for at most 1e-8."""
    err = float(ks.frobenius_error(F, est))
    return abs(err - ref_err) / normF


def cases(quick: bool):
    if quick:
        return {
            "outer_large": (64, 128, 128), "outer_mid": (64, 64, 64), "outer_tall": (1024, 32, 32),
            "conv": (8, 16, 16, 144), "small": (5, 64), "gap": (256, 32, 24), "svd": (32, 8, 8),
        }
    return {
        "outer_large": (256, 1024, 1024), "outer_mid": (256, 256, 256), "outer_tall": (4096, 128, 128),
        "conv": (32, 64, 64, 576), "small": (20, 128), "gap": (512, 64, 48), "svd": (64, 16, 16),
    }


def run(quick: bool, threads, repeats: int):
    c = cases(quick)
    records = []

    def add(case, method, t, peak, **extra):
        records.append({"case": case, "method": method, "median_s": t, "peak_mib": peak,
                        "threads": "1" if threads == 1 else "default", **extra})

    with blas_threads(threads):
        # -- outer form: kfac, tkfac, kfoc (auto), kfoc lanczos ------------------------------
        for key in ("outer_large", "outer_tall"):
            K, m, n = c[key]
            F = ks.KronSum.from_outer(*outer_data(K, m, n))
            case = f"outer K={K} m=n={m}"
            ref = ks.kfoc(F, tol=1e-13, max_iter=2000)
            ref_err = float(ks.frobenius_error(F, ref))
            normF = float(F.frobenius_norm())
            for name, fn in [("kfac", lambda: ks.kfac(F)), ("tkfac", lambda: ks.tkfac(F)),
                             ("kfoc", lambda: ks.kfoc(F, tol=1e-6)),
                             ("kfoc-lanczos", lambda: ks.kfoc(F, method="lanczos", tol=1e-6))]:
                t, p = measure(fn, repeats)
                est = fn()
                add(case, name, t, p, info=est.info.method,
                    gap_to_optimum=optimal_check(F, est, ref_err, normF) if name.startswith("kfoc") else None)
        # -- outer form, K=256, m=n=256: kfoc against Algorithm 1 on materialised terms ------
        K, m, n = c["outer_mid"]
        G, A = outer_data(K, m, n)
        F = ks.KronSum.from_outer(G, A)
        case = f"outer K={K} m=n={m}"
        t, p = measure(lambda: ks.kfac(F), repeats)
        add(case, "kfac", t, p)
        t, p = measure(lambda: ks.kfoc(F, tol=1e-6), repeats)
        add(case, "kfoc", t, p, info=ks.kfoc(F).info.method)
        L, R = materialise_outer(G, A)
        t, p = measure(lambda: algorithm1_materialised(L, R, 20), max(3, repeats // 2))
        add(case, "algorithm1-materialised-20it", t, p)
        # -- conv form -------------------------------------------------------------------
        K, T, m, n = c["conv"]
        G, A = conv_data(K, T, m, n)
        F = ks.KronSum.from_conv(G, A)
        case = f"conv K={K} T={T} m={m} n={n}"
        inputs_mib = (G.nbytes + A.nbytes + 8 * (m * m + n * n)) / 2**20
        ref = ks.kfoc(F, tol=1e-13, max_iter=2000)
        ref_err = float(ks.frobenius_error(F, ref, method="gram"))
        normF = float(F.frobenius_norm())
        for name, fn in [("kfac", lambda: ks.kfac(F)), ("tkfac", lambda: ks.tkfac(F)),
                         ("kfoc", lambda: ks.kfoc(F, tol=1e-6)),
                         ("kfoc-power", lambda: ks.kfoc(F, method="power", tol=1e-6))]:
            t, p = measure(fn, repeats)
            est = fn()
            err = abs(float(ks.frobenius_error(F, est, method="gram")) - ref_err) / normF
            add(case, name, t, p, inputs_plus_factors_mib=inputs_mib,
                gap_to_optimum=err if name.startswith("kfoc") else None, info=est.info.method)
        # -- twenty small layers, numba on / off -------------------------------------------
        L_count, K = c["small"]
        rng = np.random.default_rng(0)
        layers = [ks.KronSum.from_outer(*outer_data(K, int(rng.integers(8, 65)), int(rng.integers(8, 65)), seed=i))
                  for i in range(L_count)]
        case = f"{L_count} small layers K={K} m,n<=64"
        for numba in (True, False):
            with ks.config(use_numba=numba):
                for name, f in [("kfac", ks.kfac), ("tkfac", ks.tkfac), ("kfoc", ks.kfoc)]:
                    t, p = measure(lambda: [f(F) for F in layers], repeats)
                    add(case, f"{name} (numba {'on' if numba else 'off'})", t, p)
        # -- small spectral gap: iterations of Lanczos vs the power method -------------------
        K, m, n = c["gap"]
        F = ks.KronSum.from_outer(*outer_data(K, m, n, kind="gap"))
        ref = ks.nearest_kronecker(F) if m * m * n * n <= 2**24 else ks.kfoc(F, tol=1e-13)
        ratio = ref.info.sigma2 / ref.info.sigma1
        case = f"gap sigma2/sigma1={ratio:.2f} K={K} m={m} n={n}"
        for method in ("lanczos", "power"):
            t, p = measure(lambda: ks.kfoc(F, method=method), repeats)
            add(case, f"kfoc-{method}", t, p, iterations=ks.kfoc(F, method=method).info.iterations)
        # -- dense ground truth, small -----------------------------------------------------
        K, m, n = c["svd"]
        F = ks.KronSum.from_outer(*outer_data(K, m, n))
        case = f"outer K={K} m=n={m} (dense SVD size)"
        for name, fn in [("kfac", lambda: ks.kfac(F)), ("kfoc", lambda: ks.kfoc(F)),
                         ("nearest_kronecker-svd", lambda: ks.nearest_kronecker(F))]:
            t, p = measure(fn, repeats)
            add(case, name, t, p)
    # ratios against kfac of the same case
    base = {r["case"]: r for r in records if r["method"] in ("kfac", "kfac (numba on)")}
    for r in records:
        b = base.get(r["case"])
        if b is not None:
            r["ratio"] = r["median_s"] / b["median_s"]
            r["peak_ratio"] = r["peak_mib"] / b["peak_mib"] if b["peak_mib"] > 0 else None
    return records


def table(records) -> str:
    lines = ["| case | method | threads | median s | × kfac | peak MiB | × kfac peak | notes |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in records:
        notes = []
        if r.get("gap_to_optimum") is not None:
            notes.append(f"|err−opt|/‖F‖={r['gap_to_optimum']:.1e}")
        if r.get("iterations") is not None:
            notes.append(f"{r['iterations']} applications")
        if r.get("inputs_plus_factors_mib") is not None:
            notes.append(f"inputs+factors {r['inputs_plus_factors_mib']:.1f} MiB")
        if r.get("info"):
            notes.append(r["info"])
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else ""
        pr = f"{r['peak_ratio']:.2f}" if r.get("peak_ratio") is not None else ""
        lines.append(f"| {r['case']} | {r['method']} | {r['threads']} | {r['median_s']:.4g} | {ratio} | "
                     f"{r['peak_mib']:.1f} | {pr} | {'; '.join(notes)} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 BLAS thread (CI smoke test)")
    ap.add_argument("--json", metavar="FILE", help="write the records as JSON")
    ap.add_argument("--threads", choices=["1", "default", "both"], default=None,
                    help="BLAS threads (default: both, or 1 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per method (>= 5; default 7, 5 quick)")
    args = ap.parse_args(argv)
    repeats = max(5, args.repeats or (5 if args.quick else 7))
    threads_opt = args.threads or ("1" if args.quick else "both")
    settings = {"1": [1], "default": [None], "both": [1, None]}[threads_opt]
    records = []
    for th in settings:
        records += run(args.quick, th, repeats)
    print(f"kronsum {ks.__version__} | numpy {np.__version__} | {platform.processor() or platform.machine()} "
          f"| {os.cpu_count()} cores | numba kernels in use: {ks.get_config()['use_numba']}")
    print(table(records))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(records, fh, indent=1)
    return records


if __name__ == "__main__":
    main()
