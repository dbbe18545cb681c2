r"""A Kronecker-factored Laplace approximation with kronsum alone.

The recipe, for a trained PyTorch classifier ``f(x; θ*)`` of Linear and Conv layers and the
summed cross-entropy loss ``ℒ(θ) = Σ_n −log p(y_n | f(x_n; θ))``:

1. per layer, the exact GGN block ``F_l`` of the parameters ``θ_l = [W_l  b_l]`` (the bias as
   the last column, kronsum's convention) from :func:`kronsum.adapters.torch.collect`, and its
   Kronecker estimate ``σ_l L_l ⊗ R_l`` (``kfac``, ``tkfac`` or ``kfoc``);
2. a Gaussian prior ``N(0, δ⁻¹ I)``; the posterior precision is block-diagonal over layers,
   ``H_l = σ_l L_l ⊗ R_l + δ I``;
3. the log marginal likelihood of the Laplace approximation,

   ``log Z(δ) = −ℒ(θ*) − ½ δ ‖θ*‖² + ½ P log δ − ½ Σ_l log det H_l``

   (``P`` parameters; ``log det H_l`` from :meth:`kronsum.Kron.logdet`, every ``δ`` reusing the
   factors' eigendecompositions through ``KronInverse.with_damping``), maximised over ``δ``;
4. the linearised (GLM) predictive: logits ``N(f(x; θ*), Σ(x))`` with
   ``Σ(x) = Σ_l J_l(x) H_l⁻¹ J_l(x)ᵀ`` (``J_l`` the Jacobian of the logits with respect to
   ``θ_l``, one ``KronInverse.solve`` per layer), through the probit approximation
   ``softmax(f / √(1 + π/8 · diag Σ))``;
5. the sampling predictive: the mean of ``softmax(f(x; θ*+ε))`` over draws ``ε_l ~ N(0, H_l⁻¹)``
   (:meth:`kronsum.KronInverse.sample`).

Run ``python examples/laplace_recipe.py`` (scikit-learn's digits, the demo's MLP and CNN; about
20 s on one CPU core); the functions below are the recipe, ``main`` the measurement.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import kronsum as ks  # noqa: E402
from kronsum.adapters.torch import collect  # noqa: E402

ESTIMATORS = {"kfac": ks.kfac, "tkfac": ks.tkfac, "kfoc": ks.kfoc}


@dataclass
class LayerPosterior:
    """One layer's Gaussian factor: the mean ``theta`` (``(m, n)``, bias last column), the
    Kronecker estimate of its GGN block, and the module's parameter names."""

    theta: torch.Tensor
    estimate: ks.Kron
    weight: str
    bias: str | None


def _theta(model: nn.Module, name: str) -> tuple[torch.Tensor, str, str | None]:
    """The block's parameters ``[W b]`` as kronsum's ``(m, n)`` matrix (a normalisation layer's
    ``[γ β]``, ``C × 2``), with their names; a ``ValueError`` for blocks that are not one
    module's ``weight`` in that layout (an Embedding's is ``Wᵀ``; grouped convolutions and
    attention give several blocks per module)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if module is None or isinstance(module, nn.Embedding) or getattr(module, "groups", 1) != 1:
        raise ValueError(f"block {name!r}: this recipe takes Linear, ungrouped Conv and "
                         "normalisation layers (one block per module, weight stored (out, in))")
    # rows: a weight's outputs; a normalisation layer's every affine entry (γ of any shape)
    rows = module.weight.numel() if isinstance(module, _NORMS) else module.weight.shape[0]
    W = module.weight.detach().reshape(rows, -1)
    if getattr(module, "bias", None) is None:
        return W, f"{name}.weight", None
    b = module.bias.detach().reshape(rows, 1)
    return torch.cat([W, b], dim=1), f"{name}.weight", f"{name}.bias"


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)


def layer_posteriors(model: nn.Module, X: torch.Tensor, y: torch.Tensor,
                     estimator: str = "kfoc") -> dict[str, LayerPosterior]:
    """Step 1: the Kronecker estimate of every layer's exact GGN block of the summed
    cross-entropy (``weight_sharing="sample"``: each sample's exact block). Every trainable
    parameter of ``model`` must belong to a Linear, ungrouped Conv or normalisation layer (a
    ``ValueError`` otherwise; freeze the others with ``requires_grad_(False)``)."""
    blocks = collect(model, nn.CrossEntropyLoss(reduction="sum"), X, y, fisher="exact",
                     weight_sharing="sample")
    out = {}
    for name, F in blocks.items():
        theta, w, b = _theta(model, name)
        out[name] = LayerPosterior(theta, ESTIMATORS[estimator](F), w, b)
    covered = {p for post in out.values() for p in (post.weight, post.bias) if p}
    missing = [k for k, p in model.named_parameters() if p.requires_grad and k not in covered]
    if missing:
        raise ValueError(f"parameters without a Kronecker block: {missing}")
    return out


def log_marginal_likelihood(posts: dict[str, LayerPosterior], loss: float,
                            prior_precision: float) -> float:
    """Step 3: ``−ℒ(θ*) − ½δ‖θ*‖² + ½P log δ − ½ Σ_l log det(σ_l L_l ⊗ R_l + δI)``."""
    delta = float(prior_precision)
    P = sum(p.theta.numel() for p in posts.values())
    sq = sum(float((p.theta ** 2).sum()) for p in posts.values())
    logdet = sum(float(p.estimate.logdet(delta)) for p in posts.values())
    return -loss - 0.5 * delta * sq + 0.5 * P * math.log(delta) - 0.5 * logdet


def tune_prior_precision(posts: dict[str, LayerPosterior], loss: float,
                         grid: torch.Tensor | None = None) -> tuple[float, float]:
    """Step 3's maximisation over ``δ`` on a log grid (default ``10^-4 … 10^4``, 161 points),
    then a golden-section refinement of ``log δ`` between the grid neighbours of the best
    point. The factors are decomposed once (``KronInverse.with_damping``). Returns
    ``(δ, log Z(δ))``."""
    grid = torch.logspace(-4, 4, 161, dtype=torch.float64) if grid is None else grid
    inverses = [p.estimate.inverse(1.0) for p in posts.values()]
    P = sum(p.theta.numel() for p in posts.values())
    sq = sum(float((p.theta ** 2).sum()) for p in posts.values())

    def lml(log_delta: float) -> float:
        d = math.exp(log_delta)
        logdet = sum(float(inv.with_damping(d).logdet()) for inv in inverses)
        return -loss - 0.5 * d * sq + 0.5 * P * log_delta - 0.5 * logdet

    logs = [math.log(float(d)) for d in grid]
    vals = [lml(t) for t in logs]
    i = max(range(len(vals)), key=vals.__getitem__)
    lo, hi = logs[max(i - 1, 0)], logs[min(i + 1, len(logs) - 1)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if lml(a) >= lml(b):
            hi = b
        else:
            lo = a
    best = (lo + hi) / 2
    return math.exp(best), lml(best)


def _layer_jacobians(model: nn.Module, posts: dict[str, LayerPosterior], X: torch.Tensor):
    """``{layer: J}`` with ``J`` of shape ``(N, C, m, n)``: the Jacobian of the logits with
    respect to ``θ_l`` (bias last column), per input."""
    params = {k: p.detach() for k, p in model.named_parameters()}

    def f(ps, x):
        return functional_call(model, ps, (x[None],))[0]

    J = vmap(jacrev(f), in_dims=(None, 0))(params, X)
    out = {}
    for name, post in posts.items():
        N, C, m = *J[post.weight].shape[:2], post.theta.shape[0]
        Jw = J[post.weight].reshape(N, C, m, -1)
        out[name] = Jw if post.bias is None else torch.cat([Jw, J[post.bias].reshape(N, C, m, 1)], dim=-1)
    return out


def glm_logit_covariance(model: nn.Module, posts: dict[str, LayerPosterior], X: torch.Tensor,
                         prior_precision: float) -> torch.Tensor:
    """Step 4: ``Σ(x) = Σ_l J_l H_l⁻¹ J_lᵀ`` for every input, shape ``(N, C, C)``."""
    cov = 0.0
    for name, J in _layer_jacobians(model, posts, X).items():
        HinvJ = posts[name].estimate.inverse(prior_precision).solve(J)  # (N, C, m, n)
        cov = cov + torch.einsum("ncij,ndij->ncd", J, HinvJ)
    return cov


def glm_predictive(model: nn.Module, posts: dict[str, LayerPosterior], X: torch.Tensor,
                   prior_precision: float) -> torch.Tensor:
    """Step 4: class probabilities of the linearised model by the probit approximation."""
    with torch.no_grad():
        f = model(X)
    var = torch.diagonal(glm_logit_covariance(model, posts, X, prior_precision), dim1=-2, dim2=-1)
    return torch.softmax(f / torch.sqrt(1 + math.pi / 8 * var), dim=-1)


def sampling_predictive(model: nn.Module, posts: dict[str, LayerPosterior], X: torch.Tensor,
                        prior_precision: float, n_samples: int = 100,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Step 5: the mean over ``n_samples`` posterior draws of the network's class probabilities."""
    base = {k: p.detach() for k, p in model.named_parameters()}
    draws = {name: post.estimate.sample(n_samples, prior_precision, seed=generator)
             for name, post in posts.items()}  # (S, m, n) each
    probs = 0.0
    with torch.no_grad():
        for s in range(n_samples):
            ps = dict(base)
            for name, post in posts.items():
                theta = post.theta + draws[name][s]
                W = base[post.weight]
                if post.bias is None:
                    ps[post.weight] = theta.reshape(W.shape)
                else:
                    ps[post.weight] = theta[:, :-1].reshape(W.shape)
                    ps[post.bias] = theta[:, -1].reshape(base[post.bias].shape)
            probs = probs + torch.softmax(functional_call(model, ps, (X,)), dim=-1)
    return probs / n_samples


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, bins: int = 10) -> float:
    """ECE with ``bins`` equal-width confidence bins."""
    conf, pred = probs.max(1)
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += float(m.double().mean() * ((pred[m] == y[m]).double().mean() - conf[m].mean()).abs())
    return ece


def main(quick: bool = False) -> list[dict]:
    from kronsum.demo.run import load_data, make_cnn, make_mlp

    torch.manual_seed(0)
    X, y = load_data("cpu")
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    n_train = 200 if quick else int(0.7 * len(X))
    tr, te = perm[:n_train], perm[n_train:]
    records = []
    for net, make in (("mlp", make_mlp), ("cnn", make_cnn)):
        torch.manual_seed(0)
        model = make()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(30 if quick else 300):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[tr]), y[tr]).backward()
            opt.step()
        with torch.no_grad():
            loss = float(nn.functional.cross_entropy(model(X[tr]), y[tr], reduction="sum"))
        for est in ESTIMATORS:
            posts = layer_posteriors(model, X[tr], y[tr], est)
            delta, lml = tune_prior_precision(posts, loss)
            row = {"network": net, "estimator": est, "prior_precision": delta, "log_marglik": lml}
            gen = torch.Generator().manual_seed(1)
            for kind, fn in (("glm", lambda: glm_predictive(model, posts, X[te], delta)),
                             ("samples", lambda: sampling_predictive(model, posts, X[te], delta,
                                                                     generator=gen))):
                probs = fn()
                row[f"{kind}_nll"] = float(nn.functional.nll_loss(probs.log(), y[te]))
                row[f"{kind}_acc"] = float((probs.argmax(1) == y[te]).double().mean())
                row[f"{kind}_ece"] = expected_calibration_error(probs, y[te])
            records.append(row)
    print("| network | estimator | δ | log marg. lik. | GLM NLL | GLM acc | GLM ECE "
          "| sampling NLL | sampling acc | sampling ECE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['network']} | {r['estimator']} | {r['prior_precision']:.3g} | {r['log_marglik']:.2f} "
              f"| {r['glm_nll']:.4f} | {r['glm_acc']:.4f} | {r['glm_ece']:.4f} "
              f"| {r['samples_nll']:.4f} | {r['samples_acc']:.4f} | {r['samples_ece']:.4f} |")
    return records


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
