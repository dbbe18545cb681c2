"""Timing report: ``ekfac`` (K-FAC's eigenbasis) against ``kfac`` on one BLAS thread.

One process, one BLAS thread, interleaved rounds after a warm-up (``benchmarks.common.
interleaved``); medians of CPU time (``time.process_time``, which other jobs on a shared
machine do not inflate) and of wall time for

* ``kfac``: ``kfac(F)``;
* ``eigh``: the two eigendecompositions of K-FAC's factors (the basis's own cost);
* ``correction``: the corrected eigenvalues in a given basis (one pass over the statistics);
* ``ekfac``: ``ekfac(F)``, all of it (``kfac`` + ``eigh`` + ``correction``).

The target is ``ekfac − eigh ≤ 2.5 × kfac``. Run ``python benchmarks/ekfac_report.py
[--quick] [--rounds R] [--json FILE]``.
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
from benchmarks.common import blas_threads, conv_data, interleaved, outer_data  # noqa: E402
from kronsum._ekfac import diag_in_basis  # noqa: E402

CASES = {"outer": ("outer", (256, 1024, 1024)), "conv": ("conv", (32, 64, 64, 576))}
QUICK = {"outer": (32, 48, 40), "conv": (4, 8, 8, 24)}
TARGET = 2.5


def _sum(form, shape):
    if form == "outer":
        return ks.KronSum.from_outer(*outer_data(*shape))
    return ks.KronSum.from_conv(*conv_data(*shape))


def run(quick: bool = False, rounds: int = 5) -> list[dict]:
    records = []
    with blas_threads(1):
        for name, (form, shape) in CASES.items():
            shape = QUICK[name] if quick else shape
            F = _sum(form, shape)
            k = ks.kfac(F)
            _, U = np.linalg.eigh(k.left)
            _, V = np.linalg.eigh(k.right)
            fns = {
                "kfac": lambda: ks.kfac(F),
                "eigh": lambda: (np.linalg.eigh(k.left), np.linalg.eigh(k.right)),
                "correction": lambda: diag_in_basis(F, U, V),
                "ekfac": lambda: ks.ekfac(F),
            }
            t = interleaved(fns, rounds)
            ratio = (t["ekfac"]["cpu_s"] - t["eigh"]["cpu_s"]) / t["kfac"]["cpu_s"]
            records.append({
                "case": name, "form": form, "shape": list(shape),
                **{f"{k}_cpu_s": v["cpu_s"] for k, v in t.items()},
                **{f"{k}_wall_s": v["wall_s"] for k, v in t.items()},
                "ratio_minus_eigh": ratio, "target": TARGET, "met": ratio <= TARGET,
            })
    return records


def table(records: list[dict]) -> str:
    lines = ["| case | shape | kfac | eigh (basis) | correction | ekfac | (ekfac − eigh)/kfac |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        dims = "K, m, n" if r["form"] == "outer" else "K, T, m, n"
        lines.append(
            f"| {r['case']} | ({dims}) = {tuple(r['shape'])} | {r['kfac_cpu_s']:.3f} s | "
            f"{r['eigh_cpu_s']:.3f} s | {r['correction_cpu_s']:.3f} s | {r['ekfac_cpu_s']:.3f} s | "
            f"{r['ratio_minus_eigh']:.2f} (target ≤ {r['target']}) |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="write the records to this file")
    args = p.parse_args(argv)
    records = run(args.quick, args.rounds)
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, NumPy {np.__version__}, 1 BLAS thread; CPU time")
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.platform(), "cpus": os.cpu_count(), "records": records}, f, indent=1)
    return records


if __name__ == "__main__":
    main()
