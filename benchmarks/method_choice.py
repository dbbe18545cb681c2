"""Does ``choose_method`` pick the faster K-FOC solver? A sweep over block shapes and data families.

    python benchmarks/method_choice.py [--quick] [--rounds N] [--json FILE] [--families a,b]

One process, one BLAS thread, float64 and float32 inputs, the default call (the accuracy rule).
For each shape and family ``kfoc(F, method="gram")`` and ``kfoc(F, method="lanczos")`` run
interleaved (``--rounds`` rounds after a warm-up; medians of CPU time, ``time.process_time``),
beside ``kfac(F)`` for scale. The table gives both solvers' times as multiples of K-FAC's,
their operator applications, the model's choice (``choose_method(F, explain=True)``), and
the cost of that choice over the faster solver's (1.00: it picked the faster one). The shapes
are those of fully-connected layers (outer form) and convolutions (conv form, its Gram solver
on per-sample T×T coefficients against Lanczos on the contractions), from a few samples of a
wide layer to many samples of a narrow one.
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
from benchmarks.common import blas_threads, conv_family, interleaved, outer_family  # noqa: E402

OUTER_SHAPES = [(128, 64, 64), (256, 1024, 1024), (512, 128, 128), (1024, 64, 64), (1024, 512, 513),
                (1797, 256, 257), (2560, 10, 129), (4096, 128, 128), (4096, 32, 32), (8192, 64, 64)]
CONV_SHAPES = [(64, 4, 256, 2304), (64, 16, 128, 1152), (128, 4, 64, 576), (32, 64, 64, 576),
               (256, 16, 32, 288), (64, 9, 64, 64)]
QUICK_OUTER = [(64, 16, 16), (512, 8, 33)]
QUICK_CONV = [(8, 4, 16, 72)]
FAMILIES = ("gaussian", "heavy")


def _sum(form, shape, family, dtype):
    if form == "outer":
        return ks.KronSum.from_outer(*outer_family(family, *shape, dtype=dtype))
    return ks.KronSum.from_conv(*conv_family(family, *shape, dtype=dtype))


def run(quick: bool, rounds: int, families=FAMILIES, dtypes=("float64", "float32")):
    records = []
    cases = ([("outer", s) for s in (QUICK_OUTER if quick else OUTER_SHAPES)]
             + [("conv", s) for s in (QUICK_CONV if quick else CONV_SHAPES)])
    with blas_threads(1):
        for dtype in dtypes:
            for form, shape in cases:
                for family in families:
                    F = _sum(form, shape, family, np.dtype(dtype))
                    t = interleaved({"kfac": lambda: ks.kfac(F),
                                     "gram": lambda: ks.kfoc(F, method="gram"),
                                     "lanczos": lambda: ks.kfoc(F, method="lanczos")}, rounds)
                    apps = {m: ks.kfoc(F, method=m).info.iterations for m in ("gram", "lanczos")}
                    choice = ks.choose_method(F, explain=True)
                    best = min(("gram", "lanczos"), key=lambda m: t[m]["cpu_s"])
                    rec = {"form": form, "shape": list(shape), "dtype": dtype, "family": family,
                           "kfac_cpu_s": t["kfac"]["cpu_s"], "gram_cpu_s": t["gram"]["cpu_s"],
                           "lanczos_cpu_s": t["lanczos"]["cpu_s"],
                           "gram_applications": apps["gram"], "lanczos_applications": apps["lanczos"],
                           "chosen": choice.method, "faster": best,
                           "chosen_over_faster": t[choice.method]["cpu_s"] / t[best]["cpu_s"],
                           "modelled": choice.costs}
                    records.append(rec)
                    print(_row(rec), flush=True)
    return records


HEADER = ("| form | K, (T,) m, n | dtype | family | gram × kfac | lanczos × kfac | applications (gram, lanczos) "
          "| chosen | chosen / faster |\n|---|---|---|---|---:|---:|---|---|---:|")


def _row(r) -> str:
    k = r["kfac_cpu_s"]
    return (f"| {r['form']} | {', '.join(map(str, r['shape']))} | {r['dtype']} | {r['family']} "
            f"| {r['gram_cpu_s'] / k:.1f} | {r['lanczos_cpu_s'] / k:.1f} "
            f"| {r['gram_applications']}, {r['lanczos_applications']} | {r['chosen']} "
            f"| {r['chosen_over_faster']:.2f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, 1 quick)")
    ap.add_argument("--json", metavar="FILE", help="write the records as JSON")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated data families")
    ap.add_argument("--dtypes", default="float64,float32", help="comma-separated input dtypes")
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    print(f"kronsum {ks.__version__} | numpy {np.__version__} | {platform.processor() or platform.machine()} "
          f"| {os.cpu_count()} cores | 1 BLAS thread | numba: {ks.get_config()['use_numba']} | {rounds} rounds")
    print(HEADER)
    records = run(args.quick, rounds, tuple(args.families.split(",")), tuple(args.dtypes.split(",")))
    worst = max(r["chosen_over_faster"] for r in records)
    picked = sum(r["chosen"] == r["faster"] for r in records)
    print(f"\nthe model picked the faster solver in {picked} of {len(records)} cases; "
          f"worst choice {worst:.2f}× the faster solver's time")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(records, fh, indent=1)
    return records


if __name__ == "__main__":
    main()
