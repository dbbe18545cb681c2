"""GPU benchmark table: kfac, tkfac and kfoc on CuPy / torch CUDA against the GEMM floor.

    python benchmarks/gpu_report.py [--backends cupy,torch,torch-tf32] [--quick] [--json FILE]

Sizes (issue #8): the outer form with K=1024, m=n=4096 and the conv form with K=128, T=256,
m=256, n=2304, float32, data generated on the device (heavy-tailed per-sample magnitudes
shared by the two sides, correlated channels for conv: the same design as
``benchmarks/common.py``).

For each backend and case the script times, in one process and interleaved:

* ``kfac``, ``tkfac`` and ``kfoc`` (``method="auto"``): median of ``--repeats`` calls (30;
  conv a third) after one warm-up, each call bracketed by a device synchronisation (host
  clock), the methods taking turns round by round;
* torch CUDA, outer case: ``kfoc`` with the option ``cuda_graphs`` too (its first call, the
  capture, is the warm-up);
* the floor: the bare GEMMs K-FAC needs, ``GᵀG`` and ``AᵀA`` on the same arrays
  (conv: on the ``(K·T, ·)`` reshapes), timed the same way;
* the GPU's matrix-multiply throughput in this library and dtype: a 8192³ GEMM.

"achieved" is K-FAC's ``2·K(m² + n²)`` (conv: ``2·K·T(m² + n²)``) flops over its time,
as a fraction of that measured throughput. ``torch-tf32`` is torch with
``torch.backends.cuda.matmul.allow_tf32 = True`` (a user's global choice; kronsum never sets it).
``--backends numpy --quick`` runs the same code on the CPU (the CI smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import kronsum as ks


class Lib:
    """Random numbers, synchronisation and memory statistics of one array library."""

    def __init__(self, name: str):
        self.name = name
        if name == "cupy":
            import cupy as cp

            self.xp, self.mod = cp, cp
            self._rng = cp.random.default_rng(0)
        elif name in ("torch", "torch-tf32"):
            import torch

            self.mod = torch
            self.xp = torch
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            torch.backends.cuda.matmul.allow_tf32 = name == "torch-tf32"
            self._gen = torch.Generator(device=self.device).manual_seed(0)
        elif name == "numpy":
            import numpy as np

            self.xp, self.mod = np, np
            self._rng = np.random.default_rng(0)
        else:
            raise ValueError(f"unknown backend {name!r}; use cupy, torch, torch-tf32 or numpy")

    def randn(self, *shape):
        if self.name.startswith("torch"):
            return self.mod.randn(*shape, generator=self._gen, device=self.device, dtype=self.mod.float32)
        return self._rng.standard_normal(shape, dtype=self.xp.float32)

    def sync(self):
        if self.name == "cupy":
            self.mod.cuda.Device().synchronize()
        elif self.name.startswith("torch") and self.device == "cuda":
            self.mod.cuda.synchronize()

    def reset_peak(self):
        if self.name.startswith("torch") and self.device == "cuda":
            self.mod.cuda.reset_peak_memory_stats()

    def peak_mib(self):
        if self.name.startswith("torch") and self.device == "cuda":
            return self.mod.cuda.max_memory_allocated() / 2**20
        return float("nan")

    def device_name(self):
        if self.name == "cupy":
            return self.mod.cuda.runtime.getDeviceProperties(0)["name"].decode()
        if self.name.startswith("torch") and self.device == "cuda":
            return self.mod.cuda.get_device_name(0)
        return "cpu"


def heavy_scale(lib: Lib, K: int):
    """|Student-t(3)| + 0.1 per sample: z / sqrt(χ²₃ / 3)."""
    z = lib.randn(K)
    chi = lib.randn(K, 3)
    chi = (chi * chi).sum(-1) if hasattr(chi, "sum") else chi
    return abs(z / (chi / 3) ** 0.5) + 0.1


def mixing(lib: Lib, d: int, decay: float = 0.7):
    xp = lib.xp
    U, _ = xp.linalg.qr(lib.randn(d, d))
    V, _ = xp.linalg.qr(lib.randn(d, d))
    if lib.name.startswith("torch"):
        s = (1.0 + lib.mod.arange(d, device=lib.device, dtype=lib.mod.float32)) ** -decay
        return (U * s) @ V.T
    s = (1.0 + xp.arange(d, dtype=xp.float32)) ** -decay
    return (U * s) @ V.T


def outer_case(lib: Lib, K: int, m: int, n: int):
    s = heavy_scale(lib, K)[:, None]
    return s * lib.randn(K, m), s * lib.randn(K, n)


def conv_case(lib: Lib, K: int, T: int, m: int, n: int):
    s = heavy_scale(lib, K)[:, None, None]
    G = s * (lib.randn(K, T, m) @ mixing(lib, m))
    A = lib.randn(K, T, n) @ mixing(lib, n)
    return G, A


def timed(lib: Lib, fn, repeats: int):
    """Median seconds of ``fn()`` over ``repeats`` synchronised calls after one warm-up."""
    out = fn()
    lib.sync()
    times = []
    for _ in range(repeats):
        lib.sync()
        t0 = time.perf_counter()
        out = fn()
        lib.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def interleaved(lib: Lib, fns: dict, repeats: int):
    """Medians of synchronised calls of each function, the functions taking turns in every
    round (so that clock and thermal drift hit them alike); one warm-up call each first."""
    outs = {k: fn() for k, fn in fns.items()}
    lib.sync()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            lib.sync()
            t0 = time.perf_counter()
            fn()
            lib.sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def gemm_peak(lib: Lib, size: int, repeats: int) -> float:
    """Flops per second of a ``size³`` float32 GEMM in this library."""
    a, b = lib.randn(size, size), lib.randn(size, size)
    t, _ = timed(lib, lambda: a @ b, repeats)
    return 2.0 * size**3 / t


def _with_graphs(F):
    with ks.config(cuda_graphs=True):
        return ks.kfoc(F)


def run(names, quick: bool, repeats: int, cases=("outer", "conv")):
    sizes = {"outer": (64, 256, 256), "conv": (8, 16, 16, 144)} if quick else \
        {"outer": (1024, 4096, 4096), "conv": (128, 256, 256, 2304)}
    sizes = {k: v for k, v in sizes.items() if k in cases}
    records = []
    for name in names:
        lib = Lib(name)
        peak = gemm_peak(lib, 512 if quick else 8192, repeats)
        records.append({"backend": name, "case": "gemm", "method": "gemm_peak",
                        "flops_per_s": peak, "device": lib.device_name()})
        print(f"[{name}] {lib.device_name()}: float32 GEMM {peak / 1e12:.1f} TFLOP/s", flush=True)
        for case, dims in sizes.items():
            if case == "outer":
                K, m, n = dims
                G, A = outer_case(lib, K, m, n)
                F = ks.KronSum.from_outer(G, A)
                Gf, Af = G, A
                flops = 2.0 * K * (m * m + n * n)
            else:
                K, T, m, n = dims
                G, A = conv_case(lib, K, T, m, n)
                F = ks.KronSum.from_conv(G, A)
                Gf, Af = lib.xp.reshape(G, (K * T, m)), lib.xp.reshape(A, (K * T, n))
                flops = 2.0 * K * T * (m * m + n * n)
            lib.sync()
            reps = max(3, repeats // 3) if case == "conv" else repeats
            fns = {"floor": lambda: (Gf.T @ Gf, Af.T @ Af),
                   "kfac": lambda: ks.kfac(F), "tkfac": lambda: ks.tkfac(F), "kfoc": lambda: ks.kfoc(F)}
            if name.startswith("torch") and case == "outer" and lib.device == "cuda":
                fns["kfoc_graphs"] = lambda: _with_graphs(F)
            times, ests = interleaved(lib, fns, reps)
            row = {"backend": name, "case": f"{case} {dims}", "floor_s": times["floor"]}
            for method in ("kfac", "tkfac", "kfoc", "kfoc_graphs"):
                if method not in times:
                    continue
                row[f"{method}_s"] = times[method]
                lib.reset_peak()
                fns[method]()
                lib.sync()
                row[f"{method}_peak_mib"] = lib.peak_mib()
            info = ests["kfoc"].info
            row.update(kfoc_method=info.method, kfoc_iterations=info.iterations,
                       kfoc_converged=info.converged,
                       kfac_achieved=flops / row["kfac_s"] / peak,
                       floor_achieved=flops / row["floor_s"] / peak,
                       kfoc_over_kfac=row["kfoc_s"] / row["kfac_s"],
                       kfoc_graphs_over_kfac=row.get("kfoc_graphs_s", math.nan) / row["kfac_s"],
                       kfac_over_floor=row["kfac_s"] / row["floor_s"])
            # relative Frobenius errors (Gram expansion: these errors are far above its floor)
            nF = float(F.frobenius_norm())
            for method, est in ests.items():
                if method in ("floor", "kfoc_graphs"):
                    continue
                row[f"{method}_relerr"] = float(ks.frobenius_error(F, est, method="gram")) / nF
            records.append(row)
            print(json.dumps(row), flush=True)
            ks.clear_cuda_graphs()
            del F, G, A, Gf, Af, ests
    return records


def table(records) -> str:
    lines = ["| backend | case | floor (GEMMs) | kfac | tkfac | kfoc | kfoc / kfac | kfoc, cuda_graphs "
             "(/ kfac) | kfac / floor | K-FAC achieved | kfoc solver, its | "
             "rel. error kfac / tkfac / kfoc |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    peaks = {r["backend"]: r["flops_per_s"] for r in records if r["case"] == "gemm"}
    for r in records:
        if r["case"] == "gemm":
            continue
        ms = lambda k: f"{1e3 * r[k]:.2f} ms"  # noqa: E731
        lines.append(
            f"| {r['backend']} | {r['case']} | {ms('floor_s')} | {ms('kfac_s')} | {ms('tkfac_s')} | "
            f"{ms('kfoc_s')} | {r['kfoc_over_kfac']:.2f}× | "
            + (f"{ms('kfoc_graphs_s')} ({r['kfoc_graphs_over_kfac']:.2f}×)" if "kfoc_graphs_s" in r else "—")
            + f" | {r['kfac_over_floor']:.2f}× | "
            f"{100 * r['kfac_achieved']:.0f} % of {peaks[r['backend']] / 1e12:.1f} TFLOP/s | "
            f"{r['kfoc_method']}, {r['kfoc_iterations']} | "
            f"{r['kfac_relerr']:.4f} / {r['tkfac_relerr']:.4f} / {r['kfoc_relerr']:.4f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="cupy,torch,torch-tf32")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--cases", default="outer,conv")
    p.add_argument("--json", help="write the records to this file")
    args = p.parse_args(argv)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    records = run(names, args.quick, args.repeats, tuple(args.cases.split(",")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    print(table(records))
    return 0 if all(math.isfinite(r.get("kfoc_s", 0.0)) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
