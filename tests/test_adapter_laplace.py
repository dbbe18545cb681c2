"""The laplace-torch backend: K-FAC equal to laplace-torch's own, every block against the dense
GGN that laplace-torch computes itself, K-FOC optimal, conventions of biases, convolutions and
embeddings, errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the laplace-torch backend needs torch")
laplace = pytest.importorskip("laplace", reason="the laplace-torch backend needs laplace-torch")

from laplace import Laplace  # noqa: E402
from laplace.curvature import CurvlinopsGGN  # noqa: E402
from torch import nn  # noqa: E402

from kronsum.adapters.laplace import KronsumGGN  # noqa: E402

DT = torch.float64

# laplace-torch's optimize_prior_precision always warns about link_approx
pytestmark = pytest.mark.filterwarnings("ignore:By default `link_approx`:UserWarning")


def _loader(X, y, batch_size):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=batch_size)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3)).to(DT)


def _data(shape, classes=3, n=24, seed=1, regression=False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *shape, generator=g, dtype=DT)
    y = torch.randn(n, classes, generator=g, dtype=DT) if regression else \
        torch.randint(0, classes, (n,), generator=g)
    return X, y


def _dense_ggn(model, likelihood, X, y):
    """The exact GGN of laplace-torch's loss (``factor ×`` summed cross-entropy or squared
    error), dense, in parameter order: ``Σ_k J_kᵀ H_k J_k`` with ``torch.func`` Jacobians."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: p.detach() for k, p in model.named_parameters()}
    J = vmap(jacrev(lambda ps, x: functional_call(model, ps, (x[None],))[0]), in_dims=(None, 0))(params, X)
    J = torch.cat([J[k].reshape(len(X), -1, params[k].numel()) for k in params], dim=-1)
    if likelihood == "regression":  # 0.5 · Σ‖f − y‖²: the loss Hessian is the identity
        return torch.einsum("kcp,kcq->pq", J, J)
    p = model(X).detach().softmax(-1)
    Hl = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("kcp,kcd,kdq->pq", J, Hl, J)


def _slices(model):
    out, i = [], 0
    for p in model.parameters():
        out.append(slice(i, i + p.numel()))
        i += p.numel()
    return out


def _nearest_kron_error(D, m, n):
    Rm = D.reshape(m, n, m, n).permute(0, 2, 1, 3).reshape(m * m, n * n)
    s = torch.linalg.svdvals(Rm)
    return float(torch.sqrt(torch.sum(s[1:] ** 2)))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("batch_size", [24, 8])
def test_kfac_equals_laplace_torchs_own_kfac(likelihood, batch_size):
    """On an MLP every block (weights and biases) is laplace-torch's own K-FAC, so the whole
    posterior is, over one batch and over several."""
    model = _mlp()
    X, y = _data((5,), regression=likelihood == "regression")
    lml = {}
    for name, backend, kw in (("own", CurvlinopsGGN, {}), ("kronsum", KronsumGGN, {"estimator": "kfac"})):
        la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure="kron",
                     backend=backend, backend_kwargs=kw)
        la.fit(_loader(X, y, batch_size))
        lml[name] = float(la.log_marginal_likelihood(prior_precision=torch.tensor(0.5)))
    assert lml["kronsum"] == pytest.approx(lml["own"], rel=1e-10)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_conv_weight_kfac_equals_laplace_torchs_own(likelihood):
    """A convolution's weight factors are laplace-torch's K-FAC-expand (its bias block is the
    exact one here, K-FAC's there: the two differ)."""
    model = _cnn(1)
    X, y = _data((2, 4, 4), regression=likelihood == "regression", seed=2)
    own = CurvlinopsGGN(model, likelihood).kron(X, y, N=len(X))[1].kfacs
    ours = KronsumGGN(model, likelihood, estimator="kfac").kron(X, y, N=len(X))[1].kfacs
    for i, p in enumerate(model.parameters()):
        if p.ndim > 1:
            torch.testing.assert_close(torch.kron(*ours[i]), torch.kron(*own[i]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_blocks_against_the_dense_ggn(likelihood):
    model = _cnn(2)
    X, y = _data((2, 4, 4), regression=likelihood == "regression", seed=3)
    H = _dense_ggn(model, likelihood, X, y)
    sl = _slices(model)
    params = list(model.parameters())
    facs = {}
    for est in ("kfoc", "kfac", "tkfac"):
        backend = KronsumGGN(model, likelihood, estimator=est)
        loss, kron = backend.kron(X, y, N=len(X))
        facs[est] = kron.kfacs
        assert len(kron.kfacs) == len(params)
    errs = {}
    for i, p in enumerate(params):
        D = H[sl[i], sl[i]]
        if p.ndim == 1:  # a bias: its exact block, whatever the estimator
            for est in facs:
                torch.testing.assert_close(facs[est][i][0], D, rtol=1e-9, atol=1e-12 * float(D.abs().max()))
            continue
        m, n = p.shape[0], p[0].numel()
        opt = _nearest_kron_error(D, m, n)
        for est in facs:
            B, A = facs[est][i]
            assert B.shape == (m, m) and A.shape == (n, n)
            errs[est] = float(torch.linalg.norm(D - torch.kron(B, A)))
        # K-FOC is the Frobenius-nearest Kronecker product of the weight's block
        assert errs["kfoc"] == pytest.approx(opt, rel=1e-6, abs=1e-9 * float(torch.linalg.norm(D)))
        # the optimum, up to rounding (blocks of one output row are exact Kronecker products)
        assert errs["kfoc"] <= min(errs["kfac"], errs["tkfac"]) * (1 + 1e-9) + 1e-12 * float(torch.linalg.norm(D))


def test_kfoc_posterior_and_minibatches():
    model = _mlp(4)
    X, y = _data((5,), n=32, seed=5)
    out = {}
    for est in ("kfac", "kfoc"):
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", backend=KronsumGGN,
                     backend_kwargs={"estimator": est})
        la.fit(_loader(X, y, 32))
        la.optimize_prior_precision(method="marglik", n_steps=20)
        out[est] = float(la.log_marginal_likelihood())
        probs = la(X[:4], pred_type="glm", link_approx="probit")
        assert probs.shape == (4, 3) and torch.allclose(probs.sum(1), torch.ones(4, dtype=DT))
    assert np.isfinite(list(out.values())).all()
    # factor-wise sums over batches (laplace-torch's KronLaplace): K-FAC's are exact (both of
    # its factors are sums over the data), TKFAC's and K-FOC's approximate the one-batch fit
    lml = {}
    for est in ("kfac", "tkfac", "kfoc"):
        for bs in (32, 8):
            la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
                         backend=KronsumGGN, backend_kwargs={"estimator": est})
            la.fit(_loader(X, y, bs))
            lml[est, bs] = float(la.log_marginal_likelihood(prior_precision=torch.tensor(1.0)))
    assert lml["kfac", 8] == pytest.approx(lml["kfac", 32], rel=1e-12)
    for est in ("tkfac", "kfoc"):
        assert lml[est, 8] == pytest.approx(lml[est, 32], rel=1e-2)


def test_mc_fisher_and_last_layer():
    model = _mlp(6)
    X, y = _data((5,), seed=7)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", backend=KronsumGGN,
                 backend_kwargs={"stochastic": True, "num_samples": 4})
    la.fit(_loader(X, y, len(X)))
    assert np.isfinite(float(la.log_marginal_likelihood(prior_precision=torch.tensor(1.0))))
    lml = {}
    for name, backend, kw in (("own", CurvlinopsGGN, {}), ("kronsum", KronsumGGN, {"estimator": "kfac"})):
        la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron",
                     backend=backend, backend_kwargs=kw)
        la.fit(_loader(X, y, len(X)))
        lml[name] = float(la.log_marginal_likelihood(prior_precision=torch.tensor(0.5)))
    assert lml["kronsum"] == pytest.approx(lml["own"], rel=1e-10)


def test_embedding_factors_follow_the_weights_layout():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Linear(3 * 2, 3)).to(DT)
    g = torch.Generator().manual_seed(9)
    X = torch.randint(0, 6, (40, 2), generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    H = _dense_ggn(model, "classification", X, y)
    (B, A), *_ = KronsumGGN(model, "classification", estimator="kfoc").kron(X, y, N=40)[1].kfacs
    assert B.shape == (6, 6) and A.shape == (3, 3)  # (num, num) ⊗ (dim, dim), as laplace-torch
    D = H[:18, :18]
    err = float(torch.linalg.norm(D - torch.kron(B, A)))
    assert err == pytest.approx(_nearest_kron_error(D, 6, 3), rel=1e-6, abs=1e-9 * float(torch.linalg.norm(D)))


def test_last_layer_with_a_frozen_bias_is_refused():
    """laplace-torch's last-layer posterior keeps every last-layer parameter, frozen or not:
    a frozen one would make the evidence silently wrong, so it is refused."""
    model = _mlp(10)
    model[2].bias.requires_grad_(False)
    X, y = _data((5,), seed=11)
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron",
                 backend=KronsumGGN)
    with pytest.raises(ValueError, match=r"frozen last-layer parameters \['2.bias'\]"):
        la.fit(_loader(X, y, len(X)))


def test_errors():
    with pytest.raises(ValueError, match="estimator"):
        KronsumGGN(_mlp(), "classification", estimator="ekfac")
    with pytest.raises(ValueError, match="weight_sharing"):
        KronsumGGN(_mlp(), "classification", weight_sharing="bogus")
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(DT)
    X, y = _data((5,))
    with pytest.raises(ValueError, match=r"one block per parameter.*1\.weight"):
        KronsumGGN(model, "classification").kron(X, y, N=len(X))
    with pytest.raises(TypeError, match="tensor inputs"):
        KronsumGGN(_mlp(), "classification").kron({"input_ids": X}, y, N=len(X))


from hypothesis import given, strategies as st  # noqa: E402


@given(n_in=st.integers(1, 4), hidden=st.integers(1, 5), classes=st.integers(2, 4),
       n=st.integers(1, 9), bias=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       likelihood=st.sampled_from(["classification", "regression"]), seed=st.integers(0, 2**16))
def test_kfoc_is_optimal_on_every_weight_block(n_in, hidden, classes, n, bias, scale, likelihood, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, hidden, bias=bias), nn.Tanh(),
                          nn.Linear(hidden, classes, bias=bias)).to(DT)
    g = torch.Generator().manual_seed(seed)
    X = scale * torch.randn(n, n_in, generator=g, dtype=DT)
    y = torch.randn(n, classes, generator=g, dtype=DT) if likelihood == "regression" else \
        torch.randint(0, classes, (n,), generator=g)
    H = _dense_ggn(model, likelihood, X, y)
    kfacs = KronsumGGN(model, likelihood).kron(X, y, N=n)[1].kfacs
    for i, (p, sl) in enumerate(zip(model.parameters(), _slices(model))):
        D = H[sl, sl]
        tol = 1e-7 * float(torch.linalg.norm(D)) + 1e-300
        if p.ndim == 1:
            assert float(torch.linalg.norm(kfacs[i][0] - D)) <= tol
            continue
        B, A = kfacs[i]
        assert torch.isfinite(B).all() and torch.isfinite(A).all()
        err = float(torch.linalg.norm(D - torch.kron(B, A)))
        assert err <= _nearest_kron_error(D, *p.shape) + tol
