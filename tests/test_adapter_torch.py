"""The PyTorch adapter against independent references.

* ``collect(...)``'s blocks equal the exact Fisher block built from ``torch.func`` per-sample
  gradients (float64, rtol 1e-10) for the "exact" and "empirical" types, sum and mean
  reductions, cross-entropy and MSE, Linear and Conv2d layers with and without bias,
  stride / padding / dilation / a non-zero padding mode, and an in-place activation;
* ``kfac`` of those blocks equals curvlinops' ``KFACLinearOperator`` factors (skipped when
  curvlinops-for-pytorch is not installed);
* ``precondition`` equals a dense solve of the damped Kronecker approximation.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch adapter needs torch")

from torch import nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

import kronsum as ks  # noqa: E402
from kronsum.adapters import torch as kt  # noqa: E402

DT = torch.float64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 6, bias=False), nn.Tanh(),
        nn.Linear(6, 3),
    ).to(DT)


def _cnn(padding_mode="circular"):
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(3, 2, 2, dilation=2, padding=1, bias=False, padding_mode=padding_mode), nn.Tanh(),
        nn.Flatten(), nn.Linear(2 * 4 * 4, 3),
    ).to(DT)


def _data(model_name, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn((n, 5) if model_name == "mlp" else (n, 2, 7, 7), generator=g, dtype=DT)
    y_cls = torch.randint(0, 3, (n,), generator=g)
    y_reg = torch.randn(n, 3, generator=g, dtype=DT)
    return X, y_cls, y_reg


MODELS = {"mlp": _mlp, "cnn": _cnn}
LOSSES = {
    "ce-sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "ce-mean": lambda: nn.CrossEntropyLoss(),
    "mse-sum": lambda: nn.MSELoss(reduction="sum"),
    "mse-mean": lambda: nn.MSELoss(),
}


# -- the independent reference: per-sample gradients with torch.func -----------------------


def _per_sample(model, X, targets, scalar_fn):
    """vmap(grad(scalar_fn(model(x_n), t_n))) over the batch: {param name: (N, *shape)}."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, x, t):
        return scalar_fn(functional_call(model, p, (x[None],))[0], t)

    return vmap(grad(one), in_dims=(None, 0, 0))(params, X, targets)


def _layer_vecs(grads, name):
    """Per-sample vec(∇W | ∇b) of one layer, weight viewed (out, in·kh·kw), bias last column."""
    W = grads[name + ".weight"]
    M = W.reshape(W.shape[0], W.shape[1], -1)
    if name + ".bias" in grads:
        M = torch.cat([M, grads[name + ".bias"][:, :, None]], dim=2)
    return M.reshape(M.shape[0], -1)


def exact_fisher_blocks(model, loss_name, fisher, X, y):
    """{layer: dense Fisher block} of the loss as defined, from per-sample gradients."""
    N = X.shape[0]
    ce = loss_name.startswith("ce")
    C = 3
    c = 1.0 if loss_name.endswith("sum") else 1.0 / (N if ce else N * C)
    nll = (lambda f, t: nn.functional.cross_entropy(f[None], t[None], reduction="sum")) if ce \
        else (lambda f, t: ((f - t) ** 2).sum())
    if fisher == "empirical":
        runs = [(_per_sample(model, X, y, nll), torch.full((N,), c, dtype=DT))]
    elif ce:  # Σ_j p_j ∇ℓ(f, j)∇ℓ(f, j)ᵀ
        p = torch.softmax(model(X).detach(), dim=1)
        runs = [(_per_sample(model, X, torch.full((N,), j), nll), c * p[:, j]) for j in range(C)]
    else:  # GGN 2 Σ_j ∇f_j ∇f_jᵀ
        runs = [(_per_sample(model, X, torch.zeros(N), lambda f, t, j=j: f[j]),
                 torch.full((N,), 2 * c, dtype=DT)) for j in range(C)]
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    out = {}
    for name in names:
        out[name] = sum(
            (Z.mT * w) @ Z for Z, w in ((_layer_vecs(g, name), w) for g, w in runs)
        )
    return out


def _close(a, b, rtol=1e-10):
    a, b = np.asarray(a.detach()), np.asarray(b.detach())
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


# -- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_blocks_equal_per_sample_fisher(model_name, loss_name, fisher):
    model = MODELS[model_name]()
    X, y_cls, y_reg = _data(model_name)
    y = y_cls if loss_name.startswith("ce") else y_reg
    blocks = kt.collect(model, LOSSES[loss_name](), X, y, fisher=fisher)
    ref = exact_fisher_blocks(model, loss_name, fisher, X, y)
    assert list(blocks) == list(ref)
    for name, F in blocks.items():
        assert F.dtype == DT and F.form == ("conv" if isinstance(model.get_submodule(name), nn.Conv2d) else "outer")
        _close(F.to_dense(), ref[name])
    assert all(p.grad is None for p in model.parameters())  # .grad never touched


def test_mc_converges_to_exact():
    model = _mlp()
    X, y, _ = _data("mlp")
    g = torch.Generator().manual_seed(0)
    mc = kt.collect(model, nn.CrossEntropyLoss(), X, fisher="mc", n_samples=400, generator=g)
    ex = kt.collect(model, nn.CrossEntropyLoss(), X, fisher="exact")
    for name in ex:
        assert mc[name].num_terms == 400 * X.shape[0]
        D, E = mc[name].to_dense(), ex[name].to_dense()
        assert float(torch.linalg.norm(D - E) / torch.linalg.norm(E)) < 0.15


def test_linear_weight_sharing_sample_is_exact_and_expand_has_same_kfac():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3)).to(DT)
    X = torch.randn(6, 3, 4, dtype=DT)
    y = torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss(reduction="sum")
    sample = kt.collect(model, loss, X, y, fisher="empirical", weight_sharing="sample")
    expand = kt.collect(model, loss, X, y, fisher="empirical")
    assert sample["0"].form == "conv" and sample["0"].num_positions == 3
    assert expand["0"].form == "outer" and expand["0"].num_terms == 18
    ref = exact_fisher_blocks(model, "ce-sum", "empirical", X, y)
    _close(sample["0"].to_dense(), ref["0"])
    _close(ks.kfac(sample["0"]).to_dense(), ks.kfac(expand["0"]).to_dense())


def test_dtype_layers_and_errors():
    model = _cnn().float()
    X, y, _ = _data("cnn")
    blocks = kt.collect(model, nn.CrossEntropyLoss(), X.float(), layers=["2"])
    assert list(blocks) == ["2"] and blocks["2"].dtype == torch.float32
    assert (blocks["2"].m, blocks["2"].n) == (2, 3 * 2 * 2)
    with pytest.raises(KeyError):
        kt.collect(model, nn.CrossEntropyLoss(), X.float(), layers=["1"])
    with pytest.raises(TypeError, match="CrossEntropyLoss, torch.nn.MSELoss, .*NegativeLogLikelihood"):
        kt.collect(model, nn.L1Loss(), X.float())
    with pytest.raises(ValueError, match="targets"):
        kt.collect(model, nn.CrossEntropyLoss(), X.float(), fisher="empirical")
    with pytest.raises(ValueError, match="fisher"):
        kt.collect(model, nn.CrossEntropyLoss(), X.float(), fisher="type-2")
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten())
    blocks = kt.collect(grouped, nn.MSELoss(), torch.randn(2, 2, 5, 5))
    assert {k: (F.m, F.n) for k, F in blocks.items()} == {"0[0]": (2, 10), "0[1]": (2, 10)}


# -- precondition ----------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["kfoc+kfac", "ekfac"])
def test_precondition_matches_dense_solve(estimator):
    model = _cnn()
    X, y, _ = _data("cnn")
    loss = nn.CrossEntropyLoss()
    blocks = kt.collect(model, loss, X, fisher="exact", layers=["0", "5"])
    if estimator == "ekfac":  # eigenvalue-corrected, in K-FOC's basis for one layer
        est = {name: ks.ekfac(F, basis="kfoc" if name == "0" else "kfac") for name, F in blocks.items()}
    else:
        est = {name: ks.kfoc(F) if name == "0" else ks.kfac(F) for name, F in blocks.items()}
    loss(model(X), y).backward()
    before = {k: p.grad.clone() for k, p in model.named_parameters()}
    lam = 1e-2
    kt.precondition(model, est, damping=lam, method="exact")
    for name, e in est.items():
        mod = model.get_submodule(name)
        V = torch.cat([before[name + ".weight"].reshape(e.m, -1), before[name + ".bias"][:, None]], 1)
        ref = torch.linalg.solve(e.to_dense() + lam * torch.eye(e.m * e.n, dtype=DT), V.reshape(-1))
        got = torch.cat([mod.weight.grad.reshape(e.m, -1), mod.bias.grad[:, None]], 1).reshape(-1)
        _close(got, ref, rtol=1e-9)
    _close(model.get_submodule("2").weight.grad, before["2.weight"], rtol=0)  # not covered: untouched


def test_precondition_passes_method_to_kron_solve():
    if not hasattr(ks.Kron, "solve"):
        pytest.skip("Kron.solve is not there yet")
    model = _mlp()
    X, y, _ = _data("mlp")
    est = {n: ks.kfac(F) for n, F in kt.collect(model, nn.CrossEntropyLoss(), X, fisher="exact").items()}
    nn.functional.cross_entropy(model(X), y).backward()
    V = torch.cat([model[4].weight.grad, model[4].bias.grad[:, None]], 1)
    W2 = model[2].weight.grad.clone()
    kt.precondition(model, est, damping=0.1, method="factored")
    _close(torch.cat([model[4].weight.grad, model[4].bias.grad[:, None]], 1),
           est["4"].solve(V, 0.1, method="factored"))
    _close(model[2].weight.grad, est["2"].solve(W2, 0.1, method="factored"))


def test_precondition_errors():
    net = nn.Linear(3, 2).to(DT)
    X = torch.randn(8, 3, dtype=DT)
    F = kt.collect(net, nn.MSELoss(), X, fisher="exact")
    with pytest.raises(ValueError, match="backward"):
        kt.precondition(net, {"": ks.kfac(F[""])}, 0.1)
    nn.functional.mse_loss(net(X), torch.zeros(8, 2, dtype=DT)).backward()
    with pytest.raises(TypeError, match="Kron"):
        kt.precondition(net, F, 0.1)
    wrong = ks.Kron(torch.eye(2, dtype=DT), torch.eye(3, dtype=DT))
    with pytest.raises(ValueError, match="estimate"):
        kt.precondition(net, {"": wrong}, 0.1)


# -- curvlinops ------------------------------------------------------------------------------


@pytest.mark.parametrize("fisher, cl_type", [("exact", "type-2"), ("empirical", "empirical")])
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_kfac_equals_curvlinops(model_name, loss_name, fisher, cl_type):
    curvlinops = pytest.importorskip(
        "curvlinops", reason="curvlinops-for-pytorch is not installed (pip install --no-deps "
        "curvlinops-for-pytorch backpack-for-pytorch einconv linear_operator einops unfoldNd tqdm)")
    # curvlinops unfolds with zero padding whatever the layer's padding_mode: compare on zeros
    model = _cnn("zeros") if model_name == "cnn" else MODELS[model_name]()
    X, y_cls, y_reg = _data(model_name, n=8)
    y = y_cls if loss_name.startswith("ce") else y_reg
    loss = LOSSES[loss_name]()
    op = curvlinops.KFACLinearOperator(
        model, loss, list(model.parameters()), [(X, y)], fisher_type=cl_type,
        separate_weight_and_bias=False, check_deterministic=False,
    )
    op.compute_kronecker_factors()
    blocks = kt.collect(model, loss, X, y, fisher=fisher)
    for name, F in blocks.items():
        # curvlinops: column-major vec, A (input side) ⊗ B (gradient side); here row-major
        # vec, gradient side ⊗ input side: the same matrix is kron(B, A).
        A, B = op._input_covariances[name], op._gradient_covariances[name]
        est = ks.kfac(F)
        _close(est.to_dense(), torch.kron(B, A), rtol=1e-10)
