"""K-FOC against the other ways to compute the same optimum, on every layer of the digits MLP
and CNN: the table of docs/benchmarks.md's "K-FOC against its peers" section.

    python benchmarks/kfoc_vs_peers.py [--samples 256] [--rounds 5] [--json FILE]

Blocks: ``kronsum.adapters.torch.collect(model, CrossEntropyLoss(), X, y, fisher="exact")`` of
the demo's two networks (``kronsum.demo.run.make_mlp`` / ``make_cnn``, random initialisation,
seed 0) on the first ``--samples`` images of scikit-learn's digits, float64. Methods, each
timed by CPU time (``time.process_time``, medians of interleaved rounds, one BLAS thread):

* ``kfoc``: ``kronsum.kfoc(F)``, the default call;
* ``authors-power``: the K-FOC paper's power method as its authors run it — per-sample
  gradients ``X_k = G_kᵀA_k`` formed once (conv) or the outer products' quadratic forms
  (linear), a random PSD start, alternating half-steps until ``‖ΔL‖ < 1e-5`` or 100 iterations;
* ``scipy-svds``: ``scipy.sparse.linalg.svds(k=1)`` on the rearrangement as a
  ``LinearOperator`` (``KronSum.contract_left`` / ``contract_right``), default tolerance;
* ``kfac``: for scale.

``gap`` is ``(‖F − F̂‖ − optimal error)/‖F‖`` with the optimum from ``nearest_kronecker``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kronsum as ks  # noqa: E402
from benchmarks.common import blas_threads, interleaved  # noqa: E402


def authors_power(F: ks.KronSum, seed: int = 0, tol: float = 1e-5, iterations: int = 100) -> ks.Kron:
    """The paper's Algorithm 1/2 with its stopping rule (NumPy, the sum's own statistics)."""
    rng = np.random.default_rng(seed)
    w = np.asarray(F.weights)
    B = rng.standard_normal((F.m, F.m))
    L = B @ B.T
    L /= np.linalg.norm(L)
    if F.form == "conv":
        X = np.einsum("kti,ktj->kij", np.asarray(F.G), np.asarray(F.A))  # per-sample gradients
        right = lambda L: np.einsum("k,kia,ij,kjb->ab", w, X, L, X, optimize=True)  # noqa: E731
        left = lambda R: np.einsum("k,kia,ab,kjb->ij", w, X, R, X, optimize=True)  # noqa: E731
    else:
        G, A = np.asarray(F.G), np.asarray(F.A)
        right = lambda L: (A * (w * np.einsum("ki,ij,kj->k", G, L, G))[:, None]).T @ A  # noqa: E731
        left = lambda R: (G * (w * np.einsum("ki,ij,kj->k", A, R, A))[:, None]).T @ G  # noqa: E731
    for _ in range(iterations):
        R = right(L)
        R /= np.linalg.norm(R)
        L_new = left(R)
        s = np.linalg.norm(L_new)
        L_new /= s
        done = np.linalg.norm(L_new - L) < tol
        L = L_new
        if done:
            break
    R = right(L)
    s = np.linalg.norm(R)
    return ks.Kron(L, R / s, s)


def scipy_svds(F: ks.KronSum) -> ks.Kron:
    from scipy.sparse.linalg import LinearOperator, svds

    m, n = F.m, F.n
    op = LinearOperator((m * m, n * n), dtype=np.float64,
                        matvec=lambda v: F.contract_right(np.reshape(v, (n, n))).reshape(-1),
                        rmatvec=lambda u: F.contract_left(np.reshape(u, (m, m))).reshape(-1))
    U, s, Vt = svds(op, k=1, random_state=0)
    L, R = U[:, 0].reshape(m, m), Vt[0].reshape(n, n)
    if np.trace(L) < 0:
        L, R = -L, -R
    return ks.Kron(L, R, float(s[0]))


def layers(samples: int):
    import torch
    from sklearn.datasets import load_digits

    from kronsum.adapters.torch import collect
    from kronsum.demo.run import make_cnn, make_mlp

    d = load_digits()
    X = torch.tensor(d.data[:samples] / 16.0, dtype=torch.float64)
    y = torch.tensor(d.target[:samples], dtype=torch.long)
    out = []
    for net, make in (("mlp", make_mlp), ("cnn", make_cnn)):
        torch.manual_seed(0)
        blocks = collect(make(), torch.nn.CrossEntropyLoss(), X, y, fisher="exact")
        for name, F in blocks.items():
            out.append((net, name, F._map(lambda a: a.numpy(), np) if hasattr(F.weights, "numpy") else F))
    return out


def run(samples: int, rounds: int):
    records = []
    with blas_threads(1), ks.config(torch_cpu_via_numpy=False):
        for net, name, F in layers(samples):
            opt = float(ks.frobenius_error(F, ks.nearest_kronecker(F)))
            normF = float(F.frobenius_norm())
            fns = {"kfac": lambda: ks.kfac(F), "kfoc": lambda: ks.kfoc(F),
                   "authors-power": lambda: authors_power(F), "scipy-svds": lambda: scipy_svds(F)}
            t = interleaved(fns, rounds)
            rec = {"network": net, "layer": name, "form": F.form, "K": F.num_terms,
                   "T": F.num_positions if F.form == "conv" else 1, "m": F.m, "n": F.n,
                   "kfoc_method": ks.kfoc(F).info.method}
            for k, fn in fns.items():
                rec[f"{k}_cpu_s"] = t[k]["cpu_s"]
                if k != "kfac":
                    rec[f"{k}_gap"] = (float(ks.frobenius_error(F, fn())) - opt) / normF
            records.append(rec)
            print(_row(rec), flush=True)
    return records


HEADER = ("| layer | form K (T) m n | kfac ms | kfoc ms (solver) | authors' power ms | SciPy svds ms "
          "| kfoc × power | kfoc × svds | gap kfoc / power / svds |\n|---|---|---:|---:|---:|---:|---:|---:|---|")


def _row(r) -> str:
    T = f" T={r['T']}" if r["form"] == "conv" else ""
    return (f"| {r['network']} {r['layer']} | {r['form']} K={r['K']}{T} {r['m']}×{r['n']} "
            f"| {1e3 * r['kfac_cpu_s']:.2f} | {1e3 * r['kfoc_cpu_s']:.2f} ({r['kfoc_method'][5:]}) "
            f"| {1e3 * r['authors-power_cpu_s']:.2f} | {1e3 * r['scipy-svds_cpu_s']:.2f} "
            f"| {r['kfoc_cpu_s'] / r['authors-power_cpu_s']:.2f} | {r['kfoc_cpu_s'] / r['scipy-svds_cpu_s']:.2f} "
            f"| {r['kfoc_gap']:.1e} / {r['authors-power_gap']:.1e} / {r['scipy-svds_gap']:.1e} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256, help="digits images in the exact Fisher (default 256)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--json", metavar="FILE", help="write the records as JSON")
    args = ap.parse_args(argv)
    print(HEADER)
    records = run(args.samples, args.rounds)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(records, fh, indent=1)
    return records


if __name__ == "__main__":
    main()
