"""Timing report: damped Kronecker solves against the dense solve they replace.

Times, side by side in one process (one warm-up, then the median of ``--repeat`` runs,
at least 5), for m = n in ``--sizes``:

* ``eigh(L)+eigh(R)``: the two eigendecompositions alone (``numpy.linalg.eigh``);
* ``inverse(<method>)``: building the cached :class:`kronsum.KronInverse`;
* ``solve/<method>/cached``: ``KronInverse.solve`` with the decomposition cached;
* ``solve/<method>/uncached``: ``Kron.solve`` (decomposes on every call);
* ``logdet/exact/cached`` and ``sample(8)/exact/cached``;
* ``dense numpy.linalg.solve``: ``np.linalg.solve`` of the prebuilt ``(mn, mn)`` matrix
  ``scale·kron(L, R) + λI`` (the build not timed), only at ``--dense-sizes`` where it fits.

each with OpenBLAS pinned to 1 thread and at its default (via threadpoolctl when installed).
``peak_mib`` is the tracemalloc peak of one extra call (NumPy's own allocations; LAPACK
workspace is not counted); for the dense row it includes forming the ``(mn, mn)`` matrix. Run ``python benchmarks/inverse_report.py [--quick] [--json F]``.
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
from benchmarks.common import blas_threads, measure  # noqa: E402

try:
    from threadpoolctl import threadpool_info
except ImportError:  # pragma: no cover - optional
    threadpool_info = None


def _time(fn, repeat, mem_fn=None):
    """Median seconds of ``fn`` and the tracemalloc peak (MiB) of ``mem_fn`` (default ``fn``)."""
    median, peak, _ = measure(fn, repeat)
    if mem_fn is not None:
        peak = measure(mem_fn, 0)[1]
    return median, peak


def _problem(m, seed=0):
    rng = np.random.default_rng(seed)
    X, Y = rng.standard_normal((m, 2 * m)), rng.standard_normal((m, 2 * m))
    L, R = X @ X.T / (2 * m), Y @ Y.T / (2 * m)
    V = rng.standard_normal((m, m))
    return ks.Kron(L, R, scale=3.0), V


def run(sizes, dense_sizes, repeat, lam=1e-2):
    records = []
    settings = [("1 thread", 1), ("default threads", None)]
    for tname, limit in settings:
        with blas_threads(limit):
            for m in sorted(set(sizes) | set(dense_sizes)):
                K, V = _problem(m)
                case = f"m=n={m}, {tname}"
                cases = []
                if m in sizes:
                    cases.append(("eigh(L)+eigh(R)",
                                  lambda: (np.linalg.eigh(K.left), np.linalg.eigh(K.right))))
                    for method in ("exact", "factored"):
                        inv = K.inverse(lam, method)
                        cases.append((f"inverse({method})", lambda method=method: K.inverse(lam, method)))
                        cases.append((f"solve/{method}/cached", lambda inv=inv: inv.solve(V)))
                        cases.append((f"solve/{method}/uncached",
                                      lambda method=method: K.solve(V, lam, method)))
                    inv = K.inverse(lam)
                    cases.append(("logdet/exact/cached", inv.logdet))
                    cases.append(("sample(8)/exact/cached", lambda inv=inv: inv.sample(8, seed=0)))
                if m in dense_sizes:
                    D = K.to_dense() + lam * np.eye(m * m)
                    v = V.reshape(-1)
                    # timed: the solve of the prebuilt D; memory: forming D and solving
                    cases.append(("dense numpy.linalg.solve", lambda D=D, v=v: np.linalg.solve(D, v),
                                  lambda K=K, v=v, m=m: np.linalg.solve(
                                      K.to_dense() + lam * np.eye(m * m), v)))
                    # same answer as the Kronecker route
                    assert np.allclose(np.linalg.solve(D, v), K.solve(V, lam).reshape(-1))
                for name, fn, *mem in cases:
                    med, peak = _time(fn, repeat, *mem)
                    records.append({"case": case, "method": name, "median_s": med,
                                    "peak_mib": round(peak, 3)})
                    print(f"{case:28s} {name:26s} {med * 1e3:12.3f} ms {peak:10.2f} MiB", flush=True)
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes only (seconds)")
    ap.add_argument("--json", metavar="FILE", help="write the records as a JSON list")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per case (>= 5)")
    args = ap.parse_args(argv)
    repeat = max(5, args.repeat)
    if args.quick:
        sizes, dense_sizes = [32, 128], [32]
    else:
        sizes, dense_sizes = [64, 256, 1024], [32, 48, 64]
    print(f"# python {platform.python_version()}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    if threadpool_info is not None:
        print("# BLAS:", [(i["internal_api"], i["num_threads"]) for i in threadpool_info()])
    else:
        print("# threadpoolctl not installed: threads not pinned")
    records = run(sizes, dense_sizes, repeat)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)
    return records


if __name__ == "__main__":
    main()
