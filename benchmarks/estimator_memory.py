"""Peak working memory of every estimator on the demo's layers: the memory table of
docs/which-estimator.md.

    python benchmarks/estimator_memory.py [--json FILE]

The demo's two networks (``kronsum.demo``: the MLP 64-20-20-20-10 and the small CNN, at their
seeded initialisation), each layer's exact Fisher block from ``collect(..., fisher="exact")``
on the demo's subset of 256 digits, handed to the estimators as NumPy arrays (float64). For each
estimator the peak of the NumPy allocations during the call (``tracemalloc``, which sees
NumPy's buffers but not PyTorch's) and the size of what it returns; the inputs' size beside
them. Memory does not depend on the training step (the shapes and solver routes are the same),
so the networks are not trained.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tracemalloc

import numpy as np

import kronsum as ks

MIB = 2.0**20


def _numpy_sum(F):
    """The same sum over NumPy copies of its (PyTorch) statistics."""
    w = F.weights.detach().cpu().numpy()
    G, A = F.G.detach().cpu().numpy(), F.A.detach().cpu().numpy()
    make = ks.KronSum.from_conv if F.form == "conv" else ks.KronSum.from_outer
    return make(G, A, w)


def _stored_bytes(est) -> int:
    """Bytes of the arrays an estimate keeps (factors, eigenbases, corrected eigenvalues)."""
    total = 0
    for name in ("left", "right", "lefts", "rights", "U", "V", "S", "eigenvalues", "scale",
                 "scales", "sigmas"):
        a = getattr(est, name, None)
        if a is None:
            continue
        for x in (a if isinstance(a, (list, tuple)) else [a]):
            total += int(getattr(x, "nbytes", 0))
    return total


def _peak(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak


def main() -> None:
    import torch
    from torch import nn

    from kronsum.adapters.torch import collect
    from kronsum.demo.run import NETWORKS, _estimators, load_data

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    args = ap.parse_args()

    X, y = load_data(torch.device("cpu"))
    subset = torch.as_tensor(np.random.default_rng(0).permutation(X.shape[0])[:256])
    estimators = _estimators((2, 3))
    rows = []
    for net in NETWORKS:
        torch.manual_seed(0)
        model = NETWORKS[net][1]()
        blocks = collect(model, nn.CrossEntropyLoss(), X[subset], y[subset], fisher="exact")
        for layer, Ft in blocks.items():
            F = _numpy_sum(Ft)
            inputs = sum(int(a.nbytes) for a in (F.weights, F.G, F.A))
            row = {"network": net, "layer": layer, "form": F.form, "shape": [F.m, F.n],
                   "num_terms": F.num_terms, "positions": F.num_positions if F.form == "conv" else 1,
                   "inputs_mib": inputs / MIB, "peak_mib": {}, "stored_mib": {}}
            for name, est in estimators.items():
                est(F)  # warm: compiled kernels and caches are not the call's memory
                out, peak = _peak(lambda: est(F))
                row["peak_mib"][name] = peak / MIB
                row["stored_mib"][name] = _stored_bytes(out) / MIB
            rows.append(row)

    names = list(estimators)
    print(f"kronsum {ks.__version__} | numpy {np.__version__} | {platform.machine()} | "
          f"numba: {ks.get_config()['use_numba']}")
    print("| layer (block, K terms) | inputs MiB | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for r in rows:
        cells = " | ".join(f"{r['peak_mib'][k]:.2f}" for k in names)
        kind = f"{r['form']}, K={r['num_terms']}" + (f", T={r['positions']}" if r["form"] == "conv" else "")
        print(f"| {r['network']} {r['layer']} ({r['shape'][0]}×{r['shape'][1]}, {kind}) | "
              f"{r['inputs_mib']:.2f} | {cells} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"python": sys.version.split()[0], "numpy": np.__version__,
                       "kronsum": ks.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
