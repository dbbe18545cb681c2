"""Report: Kronecker-factored Laplace posteriors in laplace-torch, with laplace-torch's own K-FAC
backend against kronsum's ``KronsumGGN`` (``kfac``, ``tkfac``, ``kfoc``).

For the demo's MLP and CNN on scikit-learn's digits (trained with Adam, float64, 70/30 split),
each backend fits ``Laplace(..., subset_of_weights=..., hessian_structure="kron")`` (all weights,
and the last layer alone) on the training set in one batch, then the prior precision is tuned by the marginal likelihood. Per
backend: the CPU time of ``fit`` (``time.process_time``, one thread, interleaved rounds; wall
time beside it), the log marginal likelihood at the tuned prior, the test NLL, accuracy and
expected calibration error of the probit GLM predictive, and the relative Frobenius error
``‖F − B ⊗ A‖/‖F‖`` of each weight's factors against its exact GGN block (``F`` from
``collect(..., fisher="exact", weight_sharing="sample")``, dense).

Run ``python benchmarks/laplace_report.py [--quick] [--rounds R] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from laplace import Laplace  # noqa: E402
from laplace.curvature import CurvlinopsGGN  # noqa: E402

from benchmarks.common import blas_threads, interleaved  # noqa: E402
from kronsum.adapters.laplace import KronsumGGN  # noqa: E402
from kronsum.adapters.torch import collect  # noqa: E402
from kronsum.demo.run import load_data, make_cnn, make_mlp  # noqa: E402

sys.path.insert(0, os.path.join(HERE, "..", "examples"))
from laplace_recipe import expected_calibration_error  # noqa: E402

BACKENDS = {
    "laplace-torch K-FAC": (CurvlinopsGGN, {}),
    "kronsum kfac": (KronsumGGN, {"estimator": "kfac"}),
    "kronsum tkfac": (KronsumGGN, {"estimator": "tkfac"}),
    "kronsum kfoc": (KronsumGGN, {"estimator": "kfoc"}),
}


def _train(make, X, y, steps, seed=0):
    torch.manual_seed(seed)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model


def _weight_errors(model, kfacs, X, y, last_layer=False):
    """Relative Frobenius error of each weight's ``B ⊗ A`` against its exact block (no bias
    column); ``kfacs`` in the model's parameter order (only the last layer's if ``last_layer``)."""
    blocks = collect(model, torch.nn.CrossEntropyLoss(reduction="sum"), X, y, fisher="exact",
                     weight_sharing="sample")
    errs = {}
    params = list(model.named_parameters())
    if last_layer:
        last = list(blocks)[-1]
        blocks = {last: blocks[last]}
        params = [(k, p) for k, p in params if k.startswith(f"{last}.")]
    for key, F in blocks.items():
        D = F.to_dense()
        m, n = F.m, F.n
        n_w = n - 1  # the bias's column of ones is last
        D = D.reshape(m, n, m, n)[:, :n_w, :, :n_w].reshape(m * n_w, m * n_w)
        i = [k for k, _ in params].index(f"{key}.weight")
        B, A = kfacs[i]
        errs[key] = float(torch.linalg.norm(D - torch.kron(B, A)) / torch.linalg.norm(D))
    return errs


def run(quick: bool = False, rounds: int = 3) -> list[dict]:
    X, y = load_data("cpu")
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(X), generator=g)
    n_train = int(0.7 * len(X))
    if quick:
        n_train = 200
    tr, te = perm[:n_train], perm[n_train:n_train + 200 if quick else None]
    Xtr, ytr, Xte, yte = X[tr], y[tr], X[te], y[te]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xtr, ytr),
                                         batch_size=len(Xtr))
    records = []
    for net, make in (("mlp", make_mlp), ("cnn", make_cnn)):
        model = _train(make, Xtr, ytr, 30 if quick else 300)
        with torch.no_grad():
            probs = model(Xte).softmax(-1)
        records.append({"network": net, "subset_of_weights": None, "backend": "MAP (no Laplace)", "fit_cpu_s": None,
                        "fit_wall_s": None, "log_marglik": None, "prior_precision": None,
                        "test_nll": float(torch.nn.functional.nll_loss(probs.log(), yte)),
                        "test_acc": float((probs.argmax(1) == yte).double().mean()),
                        "test_ece": expected_calibration_error(probs, yte), "weight_rel_error": {}})
        for subset in ("all", "last_layer"):
            fits = {}

            def fitter(name, subset=subset):
                backend, kw = BACKENDS[name]

                def fit():
                    la = Laplace(model, "classification", subset_of_weights=subset,
                                 hessian_structure="kron", backend=backend,
                                 backend_kwargs=dict(kw))  # laplace-torch writes into it
                    la.fit(loader)
                    fits[name] = la
                return fit

            with blas_threads(1):
                torch.set_num_threads(1)
                times = interleaved({name: fitter(name) for name in BACKENDS}, rounds)
            for name, la in fits.items():
                la.optimize_prior_precision(method="marglik", n_steps=100)
                with torch.no_grad():
                    probs = torch.cat([la(Xte[i:i + 100], pred_type="glm", link_approx="probit")
                                       for i in range(0, len(Xte), 100)])
                errs = _weight_errors(model, la.H_facs.kfacs, Xtr, ytr, last_layer=subset != "all")
                records.append({
                    "network": net, "subset_of_weights": subset, "backend": name,
                    "fit_cpu_s": times[name]["cpu_s"], "fit_wall_s": times[name]["wall_s"],
                    "log_marglik": float(la.log_marginal_likelihood()),
                    "prior_precision": float(la.prior_precision.mean()),
                    "test_nll": float(torch.nn.functional.nll_loss(probs.clamp_min(1e-300).log(), yte)),
                    "test_acc": float((probs.argmax(1) == yte).double().mean()),
                    "test_ece": expected_calibration_error(probs, yte),
                    "weight_rel_error": errs,
                })
    return records


def format_table(records: list[dict]) -> str:
    lines = ["| network | weights | backend | fit CPU s | fit wall s | log marg. lik. | test NLL | test acc "
             "| test ECE | ‖F − B⊗A‖/‖F‖ per weight |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        errs = ", ".join(f"{k}: {v:.3f}" for k, v in r["weight_rel_error"].items()) or "–"

        def f(v, fmt):
            return "–" if v is None else format(v, fmt)
        lines.append(f"| {r['network']} | {r['subset_of_weights'] or '–'} | {r['backend']} | {f(r['fit_cpu_s'], '.3f')} "
                     f"| {f(r['fit_wall_s'], '.3f')} | {f(r['log_marglik'], '.2f')} "
                     f"| {r['test_nll']:.4f} | {r['test_acc']:.4f} "
                     f"| {r['test_ece']:.4f} | {errs} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="By default `link_approx`")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    records = run(args.quick, args.rounds)
    print(format_table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.platform(), "processor": platform.processor(),
                       "torch": torch.__version__, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
