"""``collect_kfac``: K-FAC accumulated in the hooks equals ``kfac`` of ``collect``'s blocks.

The reference is the library's own :func:`kronsum.kfac` on :func:`collect`'s ``KronSum``, whose
blocks are checked against per-sample Jacobians in ``test_adapter_torch_layers.py``; here the
factors, the scale and their split must agree (rtol 1e-10, float64) for every layer kind, Fisher
type, weight sharing and reduction, and bad input must fail the same way.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="the PyTorch adapter needs torch")

from torch import nn  # noqa: E402

import kronsum as ks  # noqa: E402
from kronsum.adapters import torch as kt  # noqa: E402

from test_adapter_torch_layers import Convs, CrossAttn, Norms, PooledClassifier, TinyLM  # noqa: E402

DT = torch.float64
pytestmark = [pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
              pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
              pytest.mark.filterwarnings("ignore::kronsum.adapters.torch.UncoveredParametersWarning")]


def _same(est, ref, rtol=1e-10):
    for a, b in ((est.left, ref.left), (est.right, ref.right)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())
    np.testing.assert_allclose(float(est.scale), float(ref.scale), rtol=rtol)
    assert est.info.method == "kfac" and est.info.notes == ref.info.notes


def _models():
    g = torch.Generator().manual_seed(0)
    lm_X = torch.randint(0, 7, (3, 4), generator=g)
    lm_y = torch.randint(0, 7, (3, 4), generator=g)
    lm_y[0, 1] = -100
    return {
        "lm": (TinyLM(), lm_X, lm_y, dict(class_dim=-1)),
        "convs": (Convs(), torch.randn(4, 2, 9, generator=g, dtype=DT),
                  torch.randint(0, 2, (4,), generator=g), {}),
        "norms": (Norms(), torch.randn(4, 2, 3, 3, generator=g, dtype=DT),
                  torch.randint(0, 3, (4,), generator=g), {}),
        "cross-attn": (CrossAttn(separate=True), torch.randn(3, 4, 4, generator=g, dtype=DT),
                       torch.randint(0, 3, (3,), generator=g), {}),
        "pooled": (PooledClassifier(), torch.randn(5, 3, 4, generator=g, dtype=DT),
                   torch.randint(0, 3, (5,), generator=g), {}),
    }


@pytest.mark.parametrize("via_numpy", [True, False], ids=["numpy-route", "torch-route"])
@pytest.mark.parametrize("sharing", ["expand", "sample", "reduce"])
@pytest.mark.parametrize("fisher, reduction", [("exact", "sum"), ("empirical", "mean"),
                                               ("mc", "mean")])
@pytest.mark.parametrize("name", ["lm", "convs", "norms", "cross-attn", "pooled"])
def test_collect_kfac_equals_kfac_of_collect(name, fisher, reduction, sharing, via_numpy):
    torch.manual_seed(1)
    model, X, y, kw = _models()[name]
    model = model.to(DT).eval()
    loss = nn.CrossEntropyLoss(reduction=reduction)
    opts = dict(fisher=fisher, weight_sharing=sharing, **kw)
    if fisher == "mc":
        opts["n_samples"] = 3
    X0, y0 = X.clone(), y.clone()
    if name == "cross-attn" and sharing != "expand":  # sequence-first layers: both refuse
        for f in (kt.collect_kfac, kt.collect):
            with pytest.raises(ValueError, match="needs batch-first layers"):
                f(model, loss, X, y, **opts)
        return
    with ks.config(torch_cpu_via_numpy=via_numpy):  # both Gram routes of the CPU dispatch
        est = kt.collect_kfac(model, loss, X, y, generator=torch.Generator().manual_seed(5),
                              **opts)
    blocks = kt.collect(model, loss, X, y, generator=torch.Generator().manual_seed(5), **opts)
    assert est.keys() == blocks.keys()
    for key, F in blocks.items():
        assert isinstance(est[key].left, torch.Tensor) and est[key].left.dtype == DT
        _same(est[key], ks.kfac(F))
    assert torch.equal(X, X0) and torch.equal(y, y0)  # the caller's arrays are left alone


@settings(max_examples=15, deadline=None)
@given(N=st.integers(1, 6), d_in=st.integers(1, 5), hidden=st.integers(1, 6),
       C=st.integers(2, 4), T=st.integers(1, 3), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       bias=st.booleans(), loss_kind=st.sampled_from(["ce", "mse"]), seed=st.integers(0, 99))
def test_collect_kfac_property_over_shapes_and_scales(N, d_in, hidden, C, T, scale, bias,
                                                      loss_kind, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.Tanh(),
                          nn.Linear(hidden, C, bias=bias)).to(DT)
    X = scale * torch.randn(N, T, d_in, dtype=DT)
    if loss_kind == "ce":
        loss, y, kw = nn.CrossEntropyLoss(), torch.randint(0, C, (N, T)), dict(class_dim=-1)
    else:
        loss, y, kw = nn.MSELoss(reduction="sum"), torch.randn(N, T, C, dtype=DT), {}
    for fisher in ("exact", "empirical"):
        est = kt.collect_kfac(model, loss, X, y, fisher=fisher, **kw)
        for key, F in kt.collect(model, loss, X, y, fisher=fisher, **kw).items():
            _same(est[key], ks.kfac(F), rtol=1e-9)


def test_collect_kfac_float32_and_zero_statistics_notes():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # ReLU kills every input of the head: its right factor is
        # the bias column's ones only, and the first layer's output gradients are zero
    X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    est = kt.collect_kfac(model, nn.CrossEntropyLoss(), X, y, fisher="empirical")
    ref = {k: ks.kfac(F) for k, F in
           kt.collect(model, nn.CrossEntropyLoss(), X, y, fisher="empirical").items()}
    assert est["0"].left.dtype == torch.float32
    for key in ref:
        _same(est[key], ref[key], rtol=1e-5)
    assert "left (gradient-side)" in est["0"].info.notes[0]


def test_collect_kfac_bad_input_fails_like_collect():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    Xn = X.clone()
    Xn[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        kt.collect_kfac(model, loss, Xn, y)
    with pytest.raises(ValueError, match="empty batch"):
        kt.collect_kfac(model, loss, X[:0], y[:0])
    with pytest.raises(ValueError, match="targets: 5 rows for a batch of 6"):
        kt.collect_kfac(model, loss, X, y[:5], fisher="empirical")
    with pytest.raises(ValueError, match="fisher must be one of"):
        kt.collect_kfac(model, loss, X, y, fisher="type-2")
    with pytest.raises(ValueError, match="weight_sharing must be one of"):
        kt.collect_kfac(model, loss, X, y, weight_sharing="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kt.collect_kfac(model, loss, X, y)  # fully covered: no warning
    assert all(p.grad is None for p in model.parameters())


def test_half_precision_statistics_are_refused_by_name():
    """Under autocast the output gradients are bfloat16: refused with TypeError naming the
    layer (as collect refuses them), not carried into a factor that eigh cannot take."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"layer '\d': G must be float32 or float64, got torch.bfloat16"):
            kt.collect_kfac(model, nn.CrossEntropyLoss(), X, y, fisher="empirical")
