"""The Laplace recipe with kronsum alone (examples/laplace_recipe.py): its log marginal
likelihood, prior tuning and GLM covariance against dense computations, and against
laplace-torch where the conventions agree."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

_PATH = os.path.join(os.path.dirname(__file__), "..", "examples", "laplace_recipe.py")
_spec = importlib.util.spec_from_file_location("laplace_recipe", _PATH)
recipe = importlib.util.module_from_spec(_spec)
sys.modules["laplace_recipe"] = recipe  # dataclasses look their module up there
_spec.loader.exec_module(recipe)

DT = torch.float64


def _mlp(bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias)).to(DT)


def _mlp_norm(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _mlp_norm2d(seed=0):
    """A LayerNorm over a (2, 3) shape: its block is γ and β of all six entries."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Unflatten(1, (2, 3)), nn.LayerNorm((2, 3)), nn.Tanh(),
                         nn.Flatten(), nn.Linear(6, 3)).to(DT)


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * 3 * 3, 3)).to(DT)


def _data(shape, n=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _loss(model, X, y):
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(X), y, reduction="sum"))


def _dense(posts, delta):
    """Per layer the dense ``H_l = σ L ⊗ R + δI`` and the flattened mean (row-major vec)."""
    return {k: (p.estimate.to_dense() + delta * torch.eye(p.theta.numel(), dtype=DT),
                p.theta.reshape(-1)) for k, p in posts.items()}


@pytest.mark.parametrize("make,shape", [(_mlp, (5,)), (_mlp_norm, (5,)), (_mlp_norm2d, (5,)),
                                        (_cnn, (1, 3, 3))])
@pytest.mark.parametrize("estimator", ["kfac", "tkfac", "kfoc"])
def test_against_dense(make, shape, estimator):
    model = make()
    X, y = _data(shape)
    posts = recipe.layer_posteriors(model, X, y, estimator)
    loss, delta = _loss(model, X, y), 0.7
    dense = _dense(posts, delta)
    P = sum(t.numel() for _, t in dense.values())
    assert P == sum(p.numel() for p in model.parameters())
    lml = (-loss - 0.5 * delta * sum(float(t @ t) for _, t in dense.values())
           + 0.5 * P * math.log(delta) - 0.5 * sum(float(torch.logdet(H)) for H, _ in dense.values()))
    assert recipe.log_marginal_likelihood(posts, loss, delta) == pytest.approx(lml, rel=1e-10)
    # GLM: Σ(x) = J H⁻¹ Jᵀ with the Jacobian of the logits by finite-free autograd, densely
    Xt = X[:4]
    J = recipe._layer_jacobians(model, posts, Xt)
    cov = sum(torch.einsum("ncp,pq,ndq->ncd", J[k].flatten(2), torch.linalg.inv(H), J[k].flatten(2))
              for k, (H, _) in dense.items())
    torch.testing.assert_close(recipe.glm_logit_covariance(model, posts, Xt, delta), cov,
                               rtol=1e-9, atol=1e-12)
    probs = recipe.glm_predictive(model, posts, Xt, delta)
    torch.testing.assert_close(probs.sum(1), torch.ones(4, dtype=DT))


def test_jacobians_are_the_logits_derivatives():
    """``J_l`` is the derivative of the logits along a perturbation of ``θ_l`` (bias last)."""
    model = _mlp(seed=3)
    X, y = _data((5,), n=3)
    posts = recipe.layer_posteriors(model, X, y, "kfac")
    J = recipe._layer_jacobians(model, posts, X)
    g = torch.Generator().manual_seed(0)
    for name, post in posts.items():
        V = torch.randn(post.theta.shape, generator=g, dtype=DT)
        mod = model.get_submodule(name)
        h = 1e-5
        with torch.no_grad():
            mod.weight -= h * V[:, :-1]
            mod.bias -= h * V[:, -1]
            f0 = model(X)
            mod.weight += 2 * h * V[:, :-1]
            mod.bias += 2 * h * V[:, -1]
            f1 = model(X)
            mod.weight -= h * V[:, :-1]
            mod.bias -= h * V[:, -1]
        torch.testing.assert_close(torch.einsum("ncij,ij->nc", J[name], V), (f1 - f0) / (2 * h),
                                   rtol=1e-7, atol=1e-8)


def test_tuned_prior_precision_maximises_the_evidence():
    model = _mlp(seed=4)
    X, y = _data((5,), n=30, seed=5)
    posts = recipe.layer_posteriors(model, X, y, "kfoc")
    loss = _loss(model, X, y)
    delta, best = recipe.tune_prior_precision(posts, loss)
    assert best == pytest.approx(recipe.log_marginal_likelihood(posts, loss, delta), rel=1e-12)
    for d in torch.logspace(-4, 4, 33, dtype=DT).tolist() + [delta * 1.01, delta / 1.01]:
        assert recipe.log_marginal_likelihood(posts, loss, d) <= best + 1e-9 * abs(best)


def test_sampling_predictive_moments():
    """Draws come from ``N(θ*, H⁻¹)``: with a huge prior precision the predictive is the MAP
    network's; the draws' covariance matches ``H⁻¹`` (checked on the sampler directly)."""
    model = _mlp(seed=6)
    X, y = _data((5,), n=10, seed=7)
    posts = recipe.layer_posteriors(model, X, y, "kfoc")
    with torch.no_grad():
        map_probs = torch.softmax(model(X), -1)
    p = recipe.sampling_predictive(model, posts, X, 1e12, n_samples=5,
                                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p, map_probs, rtol=0, atol=1e-5)
    post = posts["2"]
    S = post.estimate.sample(40000, 0.5, seed=torch.Generator().manual_seed(1)).flatten(1)
    H = post.estimate.to_dense() + 0.5 * torch.eye(S.shape[1], dtype=DT)
    emp = S.T @ S / S.shape[0]
    ref = torch.linalg.inv(H)
    assert float(torch.linalg.norm(emp - ref) / torch.linalg.norm(ref)) < 0.05


def test_agrees_with_laplace_torch_without_biases():
    """Without biases laplace-torch's blocks are the recipe's (K-FAC): the same evidence."""
    laplace = pytest.importorskip("laplace")
    from laplace.curvature import CurvlinopsGGN

    model = _mlp(bias=False, seed=8)
    X, y = _data((5,), n=24, seed=9)
    posts = recipe.layer_posteriors(model, X, y, "kfac")
    la = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
                         backend=CurvlinopsGGN)
    la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=24))
    ref = float(la.log_marginal_likelihood(prior_precision=torch.tensor(0.8, dtype=DT)))
    assert recipe.log_marginal_likelihood(posts, _loss(model, X, y), 0.8) == pytest.approx(ref, rel=1e-10)


def test_uncovered_parameters_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    model.register_parameter("extra", nn.Parameter(torch.zeros(2, dtype=DT)))
    X, y = _data((5,))
    from kronsum.adapters.torch import UncoveredParametersWarning

    with pytest.warns(UncoveredParametersWarning), \
            pytest.raises(ValueError, match="without a Kronecker block.*extra"):
        recipe.layer_posteriors(model, X, y, "kfac")
    model.extra.requires_grad_(False)
    recipe.layer_posteriors(model, X, y, "kfac")  # frozen: fine
    emb = nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Linear(6, 3)).to(DT)
    with pytest.raises(ValueError, match="block '0'"):
        recipe.layer_posteriors(emb, torch.randint(0, 6, (8, 2)), torch.randint(0, 3, (8,)), "kfac")


@pytest.mark.parametrize("make,shape", [(_mlp, (5,)), (_mlp_norm2d, (5,)), (_cnn, (1, 3, 3))])
def test_theta_layout_is_the_blocks(make, shape):
    """The recipe's ``θ_l`` layout is the one of ``collect``'s blocks: the GGN built from the
    recipe's Jacobians, ``Σ_n J_nᵀ (diag p − ppᵀ) J_n``, is the exact block."""
    from kronsum.adapters.torch import collect

    model = make()
    X, y = _data(shape, n=6)
    posts = recipe.layer_posteriors(model, X, y, "kfac")
    J = recipe._layer_jacobians(model, posts, X)
    blocks = collect(model, nn.CrossEntropyLoss(reduction="sum"), X, y, fisher="exact",
                     weight_sharing="sample")
    with torch.no_grad():
        p = torch.softmax(model(X), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    for name, Jl in J.items():
        Jf = Jl.flatten(2)
        ggn = torch.einsum("ncp,ncd,ndq->pq", Jf, H, Jf)
        torch.testing.assert_close(ggn, blocks[name].to_dense(), rtol=1e-9, atol=1e-12)
