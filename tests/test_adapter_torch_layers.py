"""The PyTorch adapter's layers beyond Linear/Conv2d, and its losses with positions and bad targets.

Every block is checked against the exact Fisher built from per-sample Jacobians of the *unhooked*
model (``torch.func.jacrev`` one sample at a time), float64, rtol 1e-10: attention (packed
self-attention, packed cross-attention, separate projections with ``bias_k``/``bias_v``,
``add_zero_attn``, masks, sequence-first layout), grouped and depthwise ``Conv1d/2d/3d`` with
``"same"``/reflect padding, stride and dilation, ``Embedding`` with ``padding_idx``, a custom
layer registered by the user, cross-entropy over positions (``class_dim=-1``) with
``ignore_index``, and MSE of any output shape.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch adapter needs torch")

from torch import nn  # noqa: E402
from torch.func import functional_call, jacrev  # noqa: E402

import kronsum as ks  # noqa: E402
from kronsum.adapters import torch as kt  # noqa: E402

DT = torch.float64
# jacrev's vmap has no batching rule for attention's CPU backward: slower, same numbers
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


# -- independent reference -------------------------------------------------------------------


def _jacobians(model, X):
    """Per sample: {param: (D, *shape)} Jacobian of the flattened output (D entries)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = []
    for x in X:
        def f(p, x=x):
            return functional_call(model, p, (x[None],))[0].reshape(-1)
        out.append(jacrev(f)(params))
    return out


def _rows(J, W, b=None, rows=None, brows=None, transpose=False, vector=False):
    """(D, m·n): the Jacobian of a block matrix (weight rows, bias last column), row-major."""
    JW = J[W]
    D = JW.shape[0]
    if vector:
        M = JW.reshape(D, -1, 1)
    elif transpose:
        M = JW.transpose(1, 2)
    else:
        M = JW if rows is None else JW[:, rows[0]:rows[1]]
    M = M.reshape(D, M.shape[1], -1)
    if b is not None:
        Jb = J[b]
        r = brows if brows is not None else rows
        Jb = Jb if r is None else Jb[:, r[0]:r[1]]
        M = torch.cat([M, Jb[:, :, None]], dim=2)
    return M.reshape(D, -1)


def _ce_hessians(logits, y, class_dim, ignore, reduction):
    """Per sample: the Hessian (D, D) of the cross-entropy wrt the flattened logits."""
    f = torch.movedim(logits.detach(), class_dim, -1)
    N, C = f.shape[0], f.shape[-1]
    shape = f.shape
    p = torch.softmax(f.reshape(N, -1, C), -1)
    keep = torch.ones(p.shape[:2], dtype=DT) if y is None else (y.reshape(N, -1) != ignore).to(DT)
    c = 1.0 if reduction == "sum" else 1.0 / float(keep.sum())
    H = []
    for n in range(N):
        Hp = torch.zeros(p.shape[1], C, p.shape[1], C, dtype=DT)
        for t in range(p.shape[1]):
            Hp[t, :, t, :] = keep[n, t] * (torch.diag(p[n, t]) - torch.outer(p[n, t], p[n, t]))
        Hp = Hp.reshape(shape[1:] + shape[1:])  # (..., C, ..., C) in the moved layout
        k = len(shape) - 1
        perm = list(range(k))
        perm.insert(class_dim - 1 if class_dim > 0 else k - 1, perm.pop(k - 1))
        Hp = Hp.permute(perm + [k + i for i in perm])  # back to the output's layout
        D = int(np.prod(shape[1:]))
        H.append(c * Hp.reshape(D, D))
    return H


def exact_blocks(model, X, keys, hessians=None, grads=None):
    """{key: dense block} = Σ_n J_nᵀ H_n J_n (exact), or Σ_n g_n g_nᵀ with g_n = J_nᵀ r_n."""
    Js = _jacobians(model, X)
    out = {}
    for key, how in keys.items():
        B = 0
        for n, J in enumerate(Js):
            R = _rows(J, **how)
            if hessians is not None:
                B = B + R.T @ hessians[n] @ R
            else:
                g = R.T @ grads[n]
                B = B + torch.outer(g, g)
        out[key] = B
    return out


def _close(a, b, rtol=1e-10):
    a, b = np.asarray(a.detach()), np.asarray(b.detach())
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


# -- models ----------------------------------------------------------------------------------


class TinyLM(nn.Module):
    def __init__(self, vocab=7, d=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.block = nn.TransformerEncoderLayer(d, 2, 6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        return self.head(self.block(self.emb(x)))


class CrossAttn(nn.Module):
    """Sequence-first cross-attention with separate or packed projections, masks, bias_k/v."""

    def __init__(self, separate):
        super().__init__()
        kw = dict(kdim=3, vdim=5, add_bias_kv=True, add_zero_attn=True) if separate else {}
        self.mem_k = nn.Linear(4, 3 if separate else 4)
        self.mem_v = nn.Linear(4, 5 if separate else 4)
        self.att = nn.MultiheadAttention(4, 2, **kw)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x (N, L, 4)
        q = x.transpose(0, 1)
        k, v = torch.tanh(self.mem_k(q)), torch.tanh(self.mem_v(q))
        L = q.shape[0]
        mask = torch.ones(L, L, dtype=torch.bool).triu(1)
        pad = torch.zeros(x.shape[0], L, dtype=torch.bool)
        pad[:, -1] = True
        y, _ = self.att(q, k, v, attn_mask=mask, key_padding_mask=pad)
        return self.head(y.mean(0))


def _keys_lm(prefix=""):
    b = f"{prefix}block"
    return {
        "emb": dict(W="emb.weight", transpose=True),
        f"{b}.self_attn.in_proj": dict(W=f"{b}.self_attn.in_proj_weight", b=f"{b}.self_attn.in_proj_bias"),
        f"{b}.self_attn.out_proj": dict(W=f"{b}.self_attn.out_proj.weight", b=f"{b}.self_attn.out_proj.bias"),
        f"{b}.linear1": dict(W=f"{b}.linear1.weight", b=f"{b}.linear1.bias"),
        f"{b}.linear2": dict(W=f"{b}.linear2.weight", b=f"{b}.linear2.bias"),
        f"{b}.norm1": dict(W=f"{b}.norm1.weight", b=f"{b}.norm1.bias", vector=True),
        f"{b}.norm2": dict(W=f"{b}.norm2.weight", b=f"{b}.norm2.bias", vector=True),
        "head": dict(W="head.weight", b="head.bias"),
    }


def _lm_data(N=3, T=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, 7, (N, T), generator=g)
    y = torch.randint(0, 7, (N, T), generator=g)
    y[0, 1] = -100  # ignored
    return X, y


def _quiet_collect(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kt.UncoveredParametersWarning)
        return kt.collect(*args, **kwargs)


# -- attention, embedding, cross-entropy over positions --------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_transformer_lm_blocks_equal_exact_fisher(fisher, reduction):
    torch.manual_seed(0)
    model = TinyLM().to(DT).eval()
    X, y = _lm_data()
    loss = nn.CrossEntropyLoss(reduction=reduction)
    blocks = _quiet_collect(model, loss, X, y, fisher=fisher, class_dim=-1, weight_sharing="sample")
    keys = _keys_lm()
    assert sorted(blocks) == sorted(keys)
    logits = model(X).detach()
    if fisher == "exact":
        ref = exact_blocks(model, X, keys, hessians=_ce_hessians(logits, y, 2, -100, reduction))
    else:
        yy = y.clone()
        keep = yy != -100
        yy[~keep] = 0
        p = torch.softmax(logits, -1)
        r = (p - nn.functional.one_hot(yy, 7).to(DT)) * keep[..., None]
        c = 1.0 if reduction == "sum" else 1.0 / float(keep.sum())
        ref = exact_blocks(model, X, keys, grads=[np.sqrt(c) * r[n].reshape(-1) for n in range(3)])
    for key, F in blocks.items():
        assert F.form == "conv"
        _close(F.to_dense(), ref[key])
    assert kt.coverage(model).uncovered == {}


def test_transformer_expand_and_sample_share_kfac_and_mc_converges():
    torch.manual_seed(0)
    model = TinyLM().to(DT).eval()
    X, y = _lm_data()
    loss = nn.CrossEntropyLoss()
    sample = _quiet_collect(model, loss, X, y, fisher="empirical", class_dim=-1, weight_sharing="sample")
    expand = _quiet_collect(model, loss, X, y, fisher="empirical", class_dim=-1)
    for key in sample:
        assert expand[key].form == ("conv" if "norm" in key else "outer")
        _close(ks.kfac(sample[key]).to_dense(), ks.kfac(expand[key]).to_dense())
    g = torch.Generator().manual_seed(1)
    mc = _quiet_collect(model, loss, X, y, fisher="mc", n_samples=600, generator=g, class_dim=-1,
                        weight_sharing="sample")
    ex = _quiet_collect(model, loss, X, y, fisher="exact", class_dim=-1, weight_sharing="sample")
    for key in ex:
        D, E = mc[key].to_dense(), ex[key].to_dense()
        assert float(torch.linalg.norm(D - E) / torch.linalg.norm(E)) < 0.2, key


@pytest.mark.parametrize("separate", [False, True])
def test_cross_attention_blocks_equal_exact_fisher(separate):
    torch.manual_seed(2)
    model = CrossAttn(separate).to(DT).eval()
    X = torch.randn(4, 3, 4, dtype=DT)
    loss = nn.CrossEntropyLoss(reduction="sum")
    blocks = _quiet_collect(model, loss, X, fisher="exact", weight_sharing="sample",
                            layers=["att", "head"])
    E = 4
    if separate:
        keys = {f"att.{s}_proj": dict(W=f"att.{s}_proj_weight", b="att.in_proj_bias",
                                      brows=(i * E, (i + 1) * E)) for i, s in enumerate("qkv")}
    else:
        keys = {f"att.in_proj[{s}]": dict(W="att.in_proj_weight", b="att.in_proj_bias",
                                          rows=(i * E, (i + 1) * E)) for i, s in enumerate("qkv")}
    keys["att.out_proj"] = dict(W="att.out_proj.weight", b="att.out_proj.bias")
    keys["head"] = dict(W="head.weight", b="head.bias")
    assert sorted(blocks) == sorted(keys)
    ref = exact_blocks(model, X, keys, hessians=_ce_hessians(model(X), None, 1, -100, "sum"))
    for key, F in blocks.items():
        _close(F.to_dense(), ref[key])
    cov = kt.coverage(model)
    assert ("att.bias_k" in cov.uncovered) == separate
    # the sequence-first Linear layers: expand works, per-sample blocks need the batch axis first
    assert _quiet_collect(model, loss, X, fisher="mc", layers=["mem_k"])["mem_k"].num_terms == 12
    with pytest.raises(ValueError, match="batch-first"):
        _quiet_collect(model, loss, X, fisher="mc", layers=["mem_k"], weight_sharing="sample")


class SelfAttn(nn.Module):
    """``att(h, h, h)`` on one tensor, batch first or sequence first (PyTorch's default)."""

    def __init__(self, layout):
        super().__init__()
        self.layout = layout
        self.att = nn.MultiheadAttention(4, 2, batch_first=layout == "batch_first")
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x (N, L, 4)
        h = x if self.layout == "batch_first" else x.transpose(0, 1)
        y = self.att(h, h, h)[0]
        return self.head(y.mean(1 if self.layout == "batch_first" else 0))


@pytest.mark.parametrize("layout", ["batch_first", "sequence_first"])
def test_self_attention_keeps_the_packed_block_in_every_layout(layout):
    """One tensor as query, key and value is self-attention whatever the layout: the packed
    ``in_proj`` block (with the q/k/v coupling), not three split blocks. Sequence first it had
    been split, because the layout change made three views of the tensor. The block (per
    sample) is the batch-first model's and the exact Fisher's."""
    torch.manual_seed(4)
    ref_model = SelfAttn("batch_first").to(DT).eval()
    model = SelfAttn(layout).to(DT).eval()
    model.load_state_dict(ref_model.state_dict())
    X = torch.randn(4, 3, 4, dtype=DT)
    y = torch.randint(0, 3, (4,))
    loss = nn.CrossEntropyLoss(reduction="sum")
    blocks = _quiet_collect(model, loss, X, y, fisher="exact", layers=["att"], weight_sharing="sample")
    assert sorted(blocks) == ["att.in_proj", "att.out_proj"]
    want = _quiet_collect(ref_model, loss, X, y, fisher="exact", layers=["att"], weight_sharing="sample")
    for key in blocks:
        _close(blocks[key].to_dense(), want[key].to_dense())
    keys = {"att.in_proj": dict(W="att.in_proj_weight", b="att.in_proj_bias")}
    ref = exact_blocks(model, X, keys, hessians=_ce_hessians(model(X), None, 1, -100, "sum"))
    _close(blocks["att.in_proj"].to_dense(), ref["att.in_proj"])


@pytest.mark.parametrize("need_weights, average", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_replacement_equals_the_module(need_weights, average, batch_first):
    """During collect the module's forward is replaced; it must give the module's outputs."""
    from kronsum.adapters._torch_layers import _mha_forward, _mha_specs

    torch.manual_seed(3)
    for kw in ({}, dict(kdim=3, vdim=5), dict(add_bias_kv=True, add_zero_attn=True), dict(bias=False)):
        mod = nn.MultiheadAttention(4, 2, batch_first=batch_first, **kw).to(DT).eval()
        q = torch.randn(2, 3, 4, dtype=DT)
        k = torch.randn(2, 5, kw.get("kdim", 4), dtype=DT)
        v = torch.randn(2, 5, kw.get("vdim", 4), dtype=DT)
        if not batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        mask = torch.ones(3, 5, dtype=torch.bool).triu(1)
        pad = torch.tensor([[False] * 4 + [True], [False] * 5])
        want = mod(q, k, v, attn_mask=mask, key_padding_mask=pad, need_weights=need_weights,
                   average_attn_weights=average)
        got = _mha_forward("", mod, _mha_specs("", mod), lambda cap: None, q, k, v,
                           attn_mask=mask, key_padding_mask=pad, need_weights=need_weights,
                           average_attn_weights=average)
        _close(got[0], want[0], rtol=1e-12)
        assert (got[1] is None) == (want[1] is None)
        if want[1] is not None:
            _close(got[1], want[1], rtol=1e-12)


# -- convolutions ----------------------------------------------------------------------------


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, groups=2, padding="same", padding_mode="reflect")
        self.c2 = nn.Conv2d(4, 4, 2, groups=4, stride=2, dilation=1, padding=1, bias=False)
        self.c3 = nn.Conv3d(4, 6, (2, 1, 2), groups=2, dilation=(1, 1, 2), padding="same")
        self.head = nn.Linear(6 * 1 * 2 * 2, 2)

    def forward(self, x):  # x (N, 2, 9)
        h = torch.tanh(self.c1(x))  # (N, 4, 9)
        h = torch.tanh(self.c2(h.reshape(-1, 4, 3, 3)))  # (N, 4, 2, 2)
        h = self.c3(h.reshape(-1, 4, 1, 2, 2))  # (N, 6, 1, 2, 2)
        return self.head(torch.tanh(h).flatten(1))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
def test_grouped_and_nd_convolutions_equal_exact_fisher():
    torch.manual_seed(4)
    model = Convs().to(DT)
    X = torch.randn(3, 2, 9, dtype=DT)
    blocks = kt.collect(model, nn.MSELoss(), X, fisher="exact")
    keys = {}
    for name, mod in (("c1", model.c1), ("c2", model.c2), ("c3", model.c3)):
        og = mod.out_channels // mod.groups
        for g in range(mod.groups):
            keys[f"{name}[{g}]"] = dict(W=f"{name}.weight", rows=(g * og, (g + 1) * og),
                                        b=f"{name}.bias" if mod.bias is not None else None)
    keys["head"] = dict(W="head.weight", b="head.bias")
    assert list(blocks) == list(keys)
    D = 2
    H = [2.0 / (3 * D) * torch.eye(D, dtype=DT)] * 3
    ref = exact_blocks(model, X, keys, hessians=H)
    for key, F in blocks.items():
        assert F.form == ("outer" if key == "head" else "conv")
        _close(F.to_dense(), ref[key])
    assert (blocks["c2[0]"].m, blocks["c2[0]"].n) == (1, 4)  # depthwise: 1 output, 2×2 taps


def test_precondition_on_new_blocks_matches_dense_solve():
    torch.manual_seed(5)
    model = CrossAttn(separate=True).to(DT).eval()
    X = torch.randn(4, 3, 4, dtype=DT)
    y = torch.tensor([0, 1, 2, 0])
    blocks = _quiet_collect(model, nn.CrossEntropyLoss(), X, y, fisher="exact")
    est = {k: ks.kfac(F) for k, F in blocks.items() if k.startswith("att.")}
    nn.functional.cross_entropy(model(X), y).backward()
    before = {k: p.grad.clone() for k, p in model.named_parameters()}
    lam = 0.1
    kt.precondition(model, est, damping=lam)
    for i, s in enumerate("qkv"):
        e = est[f"att.{s}_proj"]
        V = torch.cat([before[f"att.{s}_proj_weight"], before["att.in_proj_bias"][4 * i:4 * i + 4, None]], 1)
        want = torch.linalg.solve(e.to_dense() + lam * torch.eye(e.m * e.n, dtype=DT), V.reshape(-1))
        got = torch.cat([model.att.get_parameter(f"{s}_proj_weight").grad,
                         model.att.in_proj_bias.grad[4 * i:4 * i + 4, None]], 1)
        _close(got.reshape(-1), want, rtol=1e-9)
    _close(model.head.weight.grad, before["head.weight"], rtol=0)  # not in estimates


def test_embedding_and_grouped_precondition_roundtrip():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(5, 3, padding_idx=1), nn.Flatten(), nn.Linear(6, 2)).to(DT)
    X = torch.tensor([[0, 1], [2, 4], [3, 3]])
    y = torch.tensor([0, 1, 1])
    blocks = kt.collect(model, nn.CrossEntropyLoss(), X, y, fisher="exact")
    assert (blocks["0"].m, blocks["0"].n) == (3, 5)
    nn.functional.cross_entropy(model(X), y).backward()
    G = model[0].weight.grad.clone()
    e = ks.kfac(blocks["0"])
    kt.precondition(model, {"0": e}, damping=0.5)
    want = torch.linalg.solve(e.to_dense() + 0.5 * torch.eye(15, dtype=DT), G.T.reshape(-1))
    _close(model[0].weight.grad.T.reshape(-1), want, rtol=1e-9)


def test_custom_layer_registration():
    class Affine(nn.Module):  # y = W (x²) + b, positions along axis 1
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4, dtype=DT))
            self.bias = nn.Parameter(torch.randn(3, dtype=DT))

        def forward(self, x):
            return (x ** 2) @ self.weight.T + self.bias

    model = nn.Sequential(Affine(), nn.Flatten(), nn.Linear(6, 2)).to(DT)
    X = torch.randn(4, 2, 4, dtype=DT)
    with pytest.warns(kt.UncoveredParametersWarning, match="0.weight"):
        kt.collect(model, nn.MSELoss(), X, fisher="exact")
    kt.register_layer(Affine, lambda mod, args, out: args[0] ** 2)
    try:
        blocks = kt.collect(model, nn.MSELoss(reduction="sum"), X, fisher="exact",
                            weight_sharing="sample")
    finally:
        kt.unregister_layer(Affine)
    keys = {"0": dict(W="0.weight", b="0.bias"), "2": dict(W="2.weight", b="2.bias")}
    ref = exact_blocks(model, X, keys, hessians=[2 * torch.eye(2, dtype=DT)] * 4)
    for key in keys:
        _close(blocks[key].to_dense(), ref[key])
    assert "0" not in kt.coverage(model).layers


# -- coverage and warnings -------------------------------------------------------------------


def test_coverage_reports_every_uncovered_parameter():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ConvTranspose1d(1, 1, 2),
                          nn.Linear(5, 2))
    cov = kt.coverage(model)
    assert list(cov.layers) == ["0", "1", "3"]
    assert set(cov.uncovered) == {"2.weight", "2.bias"}
    assert "transposed" in cov.uncovered["2.weight"]
    n_cov = 3 * 4 + 4 + 8 + 5 * 2 + 2
    assert cov.fraction == pytest.approx(n_cov / (n_cov + 3))
    cov0 = kt.coverage(model, layers=["0"])
    assert cov0.uncovered["3.weight"] == "its layer is not in `layers=`"
    with pytest.raises(KeyError, match="not a layer"):
        kt.coverage(model, layers=["2"])


def test_a_subclass_with_its_own_forward_is_reported_not_blocked():
    """A Linear subclass whose forward scales the output computes another map: the hooks'
    statistics would give a block off by the square of the scale, so it gets no rule and its
    parameters are reported; a subclass that keeps Linear's forward is covered as Linear."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Renamed(nn.Linear):
        pass

    class Twice(nn.Module):
        def forward(self, x):
            return 2 * x

    torch.manual_seed(0)
    model = nn.Sequential(Renamed(3, 4), nn.Tanh(), Scaled(4, 2)).to(DT)
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), Twice()).to(DT)
    plain.load_state_dict(model.state_dict())  # the same function, built from plain layers
    cov = kt.coverage(model)
    assert list(cov.layers) == ["0"] and set(cov.uncovered) == {"2.weight", "2.bias"}
    assert "subclass of Linear with its own forward" in cov.uncovered["2.weight"]
    X = torch.randn(6, 3, dtype=DT)
    with pytest.warns(kt.UncoveredParametersWarning, match="2.weight"):
        got = kt.collect(model, nn.MSELoss(), X, fisher="exact")
    ref = kt.collect(plain, nn.MSELoss(), X, fisher="exact", layers=["0"])
    assert set(got) == {"0"}
    np.testing.assert_allclose(got["0"].to_dense(), ref["0"].to_dense(), rtol=1e-12)
    # attention's out-projection is a Linear subclass that keeps Linear's forward
    assert kt.coverage(nn.MultiheadAttention(4, 2)).uncovered == {}


def test_tied_weights_are_reported_not_blocked():
    """A language model whose output layer holds its embedding's tensor: the gradient of the
    tied weight sums both uses, so neither layer gets a block; both names are in the reason."""

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid = nn.Embedding(7, 4), nn.Linear(4, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.tanh(self.mid(self.emb(x))))

    torch.manual_seed(0)
    model = LM().to(DT)
    cov = kt.coverage(model)
    assert list(cov.layers) == ["mid"]
    assert set(cov.uncovered) == {"emb.weight"} and "head.weight" in cov.uncovered["emb.weight"]
    X, y = torch.randint(0, 7, (5,)), torch.randint(0, 7, (5,))
    with pytest.warns(kt.UncoveredParametersWarning, match="tied"):
        assert set(kt.collect(model, nn.CrossEntropyLoss(), X, y, fisher="empirical")) == {"mid"}
    with pytest.raises(KeyError, match="tied"):
        kt.coverage(model, layers=["head"])


def test_inputs_kronsum_cannot_block_are_refused_or_reported():
    """Each case once gave a block that was not the Fisher, without a word."""
    torch.manual_seed(0)
    X, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,))

    class TempCE(nn.CrossEntropyLoss):  # a loss subclass with its own forward
        def forward(self, out, t):
            return super().forward(out / 2.0, t)

    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    with pytest.raises(TypeError, match="subclass of CrossEntropyLoss with its own forward"):
        kt.collect(mlp, TempCE(), X, y, fisher="empirical")
    emb = nn.Sequential(nn.Embedding(5, 2, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(2, 2)).to(DT)
    with pytest.raises(NotImplementedError, match="scale_grad_by_freq"):
        kt.collect(emb, nn.CrossEntropyLoss(), torch.randint(0, 5, (4, 1)), y, fisher="empirical")
    # a frozen weight with a trainable bias (BitFit), and a parametrized weight: reported
    frozen = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    frozen[0].weight.requires_grad_(False)
    normed = nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(),
                           nn.Linear(4, 2)).to(DT)
    for model, why in ((frozen, "weight is frozen"), (normed, "parametrized")):
        cov = kt.coverage(model)
        assert list(cov.layers) == ["2"] and any(why in r for r in cov.uncovered.values()), cov.uncovered
        with pytest.warns(kt.UncoveredParametersWarning, match=why):
            assert set(kt.collect(model, nn.CrossEntropyLoss(), X, y, fisher="empirical")) == {"2"}
    # dropout in train mode and BatchNorm without running statistics: one random Fisher / coupled samples
    drop = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(DT)
    with pytest.warns(UserWarning, match="dropout layer is in train mode"):
        kt.collect(drop, nn.CrossEntropyLoss(), X, y, fisher="empirical")
    kt.collect(drop.eval(), nn.CrossEntropyLoss(), X, y, fisher="empirical")  # no warning
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)).to(DT)
    with pytest.warns(UserWarning, match="keeps no running statistics"):
        kt.collect(bn.eval(), nn.CrossEntropyLoss(), X, y, fisher="empirical")
    with pytest.raises(ValueError, match="class_dim does not apply"):
        kt.Preconditioner(mlp, nn.CrossEntropyLoss(), class_dim=-1, capture="hooks")
    sparse = nn.Sequential(nn.Embedding(5, 2, sparse=True), nn.Flatten(), nn.Linear(2, 2)).to(DT)
    ids = torch.randint(0, 5, (4, 1))
    est = {k: ks.kfac(F) for k, F in kt.collect(sparse, nn.CrossEntropyLoss(), ids, y, fisher="empirical").items()}
    nn.CrossEntropyLoss()(sparse(ids), y).backward()
    before = sparse[2].weight.grad.clone()
    with pytest.raises(ValueError, match="sparse"):
        kt.precondition(sparse, est, 0.1)
    assert torch.equal(sparse[2].weight.grad, before)  # nothing written


class _PositionalLM(nn.Module):
    """Token and learned positional embeddings; ``ids_shape`` (T,) or (1, T) for the positions."""

    def __init__(self, T, ids_shape):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(7, 4), nn.Embedding(T, 4), nn.Linear(4, 7)
        self.T, self.ids_shape = T, ids_shape

    def forward(self, x):
        pos = self.pos(torch.arange(self.T).reshape(self.ids_shape))
        return self.head(torch.tanh(self.tok(x) + pos))


@pytest.mark.parametrize("T, ids_shape", [(3, (3,)), (4, (1, 4)), (8, (8,))],
                         ids=["T!=N", "T=N,(1,T)", "T=2N"])
@pytest.mark.parametrize("weight_sharing", ["expand", "sample"])
def test_a_layer_without_the_batch_axis_is_refused(T, ids_shape, weight_sharing):
    """A positional embedding of arange(T), broadcast over the samples: its rows are positions
    whose gradients are sums over the batch, not per-sample statistics."""
    torch.manual_seed(0)
    model = _PositionalLM(T, ids_shape).to(DT)
    X, y = torch.randint(0, 7, (4, T)), torch.randint(0, 7, (4, T))
    with pytest.raises(ValueError, match="'pos'.*(neither axis is the batch|needs batch-first)"):
        kt.collect(model, nn.CrossEntropyLoss(), X, y, fisher="empirical", class_dim=-1,
                   weight_sharing=weight_sharing)
    blocks = kt.collect(model, nn.CrossEntropyLoss(), X, y, fisher="empirical", class_dim=-1,
                        weight_sharing=weight_sharing, layers=["tok", "head"])
    assert set(blocks) == {"tok", "head"}


def test_sequence_first_transformer_layers_are_refused_also_when_lengths_match():
    """batch_first=False (PyTorch's default): the norm layers' inputs are (L, N, E); with L = N
    their first axis still is not the batch."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0).to(DT).eval()
    model = nn.Sequential(layer, nn.Linear(8, 3)).to(DT)
    X = torch.randn(4, 4, 8, dtype=DT)  # (L, N, E) with L = N
    with pytest.raises(ValueError, match="batch_first=False"):
        kt.collect(model, nn.MSELoss(), X, torch.randn(4, 4, 3, dtype=DT), fisher="empirical")


def test_train_mode_batchnorm_warns():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2)).to(DT)
    X = torch.randn(5, 3, dtype=DT)
    with pytest.warns(UserWarning, match="train mode"):
        kt.collect(model, nn.MSELoss(), X, fisher="mc")
    model.eval()
    kt.collect(model, nn.MSELoss(), X, fisher="mc")  # no warning (filterwarnings=error)


# -- targets and batches: clear errors, no silent wrong answer --------------------------------


def _net():
    torch.manual_seed(0)
    return nn.Linear(6, 3).to(DT)


@pytest.mark.parametrize("bad", [-1, 3, 7])
def test_out_of_range_class_targets_raise(bad):
    X = torch.randn(8, 6, dtype=DT)
    y = torch.zeros(8, dtype=torch.int64)
    y[3] = bad
    for fisher in ("empirical", "exact", "mc"):
        with pytest.raises(ValueError, match=rf"targets.*\[0, 3\).*got {bad}"):
            kt.collect(_net(), nn.CrossEntropyLoss(), X, y, fisher=fisher)


def test_ignore_index_drops_samples_like_the_loss():
    X = torch.randn(8, 6, dtype=DT)
    y = torch.randint(0, 3, (8,))
    y2 = y.clone()
    y2[:3] = -100
    for reduction in ("sum", "mean"):
        loss = nn.CrossEntropyLoss(reduction=reduction)
        got = kt.collect(_net(), loss, X, y2, fisher="empirical")[""]
        want = kt.collect(_net(), loss, X[3:], y[3:], fisher="empirical")[""]
        _close(got.to_dense(), want.to_dense())
    with pytest.raises(ValueError, match="ignore_index"):
        kt.collect(_net(), nn.CrossEntropyLoss(), X, torch.full((8,), -100), fisher="empirical")


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_ignored_samples_stay_in_the_kfac_split_as_documented(fisher):
    """An ignored sample's output gradients are zero, so the block is the kept batch's, but
    its terms stay: K-FAC's activation-side factor and Σw count its inputs (as curvlinops'
    K-FAC does), in collect's KronSum and in collect_kfac alike."""
    torch.manual_seed(3)
    X = torch.randn(8, 6, dtype=DT)
    X[:3] = 3.0  # padding-like rows
    y = torch.randint(0, 3, (8,))
    y[:3] = -100
    loss = nn.CrossEntropyLoss(reduction="sum")
    net = _net()
    F = kt.collect(net, loss, X, y, fisher=fisher)[""]
    est, direct = ks.kfac(F), kt.collect_kfac(net, loss, X, y, fisher=fisher)[""]
    _close(direct.to_dense(), est.to_dense())
    kept = kt.collect(net, loss, X[3:], y[3:], fisher=fisher)[""]
    _close(F.to_dense(), kept.to_dense())
    A = torch.cat([X, torch.ones(8, 1, dtype=DT)], 1)  # the layer's inputs and the bias column
    _close(est.right, A.T @ A / 8)  # Σ w a aᵀ / Σ w over all 8 samples, the ignored included
    assert float(est.scale) == float(F.weights.sum()) == 8 * (3 if fisher == "exact" else 1)
    assert not torch.allclose(ks.kfac(kept).to_dense(), est.to_dense())


@pytest.mark.parametrize("targets, match", [
    (torch.zeros(8), "integer class indices"),
    (torch.zeros(8, dtype=torch.bool), "integer class indices"),
    (torch.zeros(7, dtype=torch.int64), "7 rows for a batch of 8"),
    (torch.zeros(8, 2, dtype=torch.int64), r"shape \(8,\)"),
])
def test_bad_class_targets_name_the_argument(targets, match):
    with pytest.raises(ValueError, match=match):
        kt.collect(_net(), nn.CrossEntropyLoss(), torch.randn(8, 6, dtype=DT), targets,
                   fisher="empirical")


def test_mse_targets_nan_outputs_and_empty_batches():
    X = torch.randn(8, 6, dtype=DT)
    with pytest.raises(ValueError, match=r"7 rows for a batch of 8"):
        kt.collect(_net(), nn.MSELoss(), X, torch.zeros(7, 3, dtype=DT), fisher="empirical")
    for fisher in ("empirical", "exact", "mc"):  # checked where given, whether used or not
        with pytest.raises(ValueError, match=r"targets must have the output's shape \(8, 3\)"):
            kt.collect(_net(), nn.MSELoss(), X, torch.zeros(8, 2, dtype=DT), fisher=fisher)
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\]"):
            kt.collect(_net(), nn.BCEWithLogitsLoss(), X, torch.full((8, 3), 2.0, dtype=DT), fisher=fisher)
    Xn = X.clone()
    Xn[2, 1] = float("nan")
    for fisher in ("mc", "exact", "empirical"):
        with pytest.raises(ValueError, match="NaN or inf"):
            kt.collect(_net(), nn.CrossEntropyLoss(), Xn, torch.zeros(8, dtype=torch.int64),
                       fisher=fisher)
    with pytest.raises(ValueError, match="empty batch"):
        kt.collect(_net(), nn.CrossEntropyLoss(), X[:0], fisher="mc")
    with pytest.raises(ValueError, match="class_dim=1"):  # (N, T, C) logits read as (N, C, T)
        _quiet_collect(TinyLM().to(DT), nn.CrossEntropyLoss(), torch.zeros(2, 3, dtype=torch.int64),
                       torch.zeros(2, 3, dtype=torch.int64), fisher="empirical")


def test_flattened_logits_get_a_clear_error():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 5)

        def forward(self, x):
            return self.lin(x).reshape(-1, 5)

    X = torch.randn(2, 3, 4, dtype=DT)
    with pytest.raises(ValueError, match="class_dim=-1"):
        kt.collect(Flat().to(DT), nn.CrossEntropyLoss(), X, torch.zeros(6, dtype=torch.int64),
                   fisher="empirical")


def test_class_axis_one_with_positions_matches_class_dim_minus_one():
    torch.manual_seed(7)
    lm = TinyLM().to(DT).eval()

    class Channels(nn.Module):  # the same logits as (N, C, T)
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, x):
            return self.lm(x).transpose(1, 2)

    X, y = _lm_data()
    a = _quiet_collect(lm, nn.CrossEntropyLoss(), X, y, fisher="exact", class_dim=-1)
    b = _quiet_collect(Channels(), nn.CrossEntropyLoss(), X, y, fisher="exact")
    for key in a:
        _close(a[key].to_dense(), b["lm." + key].to_dense())


# -- K-FAC-reduce -----------------------------------------------------------------------------


class PooledClassifier(nn.Module):
    """A sequence classifier: position-wise Linear, mean over positions, Linear head."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # (N, T, 4)
        return self.head(torch.tanh(self.proj(x)).mean(1))


def test_reduce_is_exact_for_position_independent_inputs_and_matches_definition():
    torch.manual_seed(8)
    model = PooledClassifier().to(DT)
    X = torch.randn(6, 1, 4, dtype=DT).expand(6, 3, 4).contiguous()  # same input at every position
    y = torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss(reduction="sum")
    red = kt.collect(model, loss, X, y, fisher="exact", weight_sharing="reduce")
    ref = exact_blocks(model, X, {"proj": dict(W="proj.weight", b="proj.bias")},
                       hessians=_ce_hessians(model(X), None, 1, -100, "sum"))
    assert red["proj"].form == "outer" and red["proj"].num_terms == 6 * 3  # N per class pass
    _close(red["proj"].to_dense(), ref["proj"])
    # different inputs per position: Σ_n (Σ_t g_t)(Σ_t g_t)ᵀ ⊗ ā āᵀ, not the exact block
    X = torch.randn(6, 3, 4, dtype=DT)
    red = kt.collect(model, loss, X, y, fisher="empirical", weight_sharing="reduce")["proj"]
    smp = kt.collect(model, loss, X, y, fisher="empirical", weight_sharing="sample")["proj"]
    G = smp.G.sum(1)
    A = smp.A.mean(1)
    want = sum(torch.kron(torch.outer(g, g), torch.outer(a, a)) for g, a in zip(G, A))
    _close(red.to_dense(), want)


@pytest.mark.parametrize("model_name", ["pooled", "conv"])
def test_reduce_kfac_equals_curvlinops(model_name):
    curvlinops = pytest.importorskip("curvlinops", reason="curvlinops-for-pytorch is not installed")
    torch.manual_seed(9)
    if model_name == "pooled":
        model = PooledClassifier().to(DT)
        X = torch.randn(6, 3, 4, dtype=DT)
    else:
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                              nn.Linear(3 * 4 * 4, 3)).to(DT)
        X = torch.randn(6, 2, 4, 4, dtype=DT)
    y = torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    op = curvlinops.KFACLinearOperator(
        model, loss, list(model.parameters()), [(X, y)], fisher_type="type-2",
        kfac_approx="reduce", separate_weight_and_bias=False, check_deterministic=False)
    op.compute_kronecker_factors()
    blocks = kt.collect(model, loss, X, y, fisher="exact", weight_sharing="reduce")
    for name, F in blocks.items():
        A, B = op._input_covariances[name], op._gradient_covariances[name]
        _close(ks.kfac(F).to_dense(), torch.kron(B, A))


# -- binary cross-entropy ----------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_bce_with_logits_equals_exact_fisher(fisher, reduction):
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X = torch.randn(6, 4, dtype=DT)
    y = torch.rand(6, 3, dtype=DT).round()
    loss = nn.BCEWithLogitsLoss(reduction=reduction)
    blocks = kt.collect(model, loss, X, y, fisher=fisher)
    keys = {k: dict(W=f"{k}.weight", b=f"{k}.bias") for k in ("0", "2")}
    c = 1.0 if reduction == "sum" else 1.0 / 18
    s = torch.sigmoid(model(X).detach())
    if fisher == "exact":
        ref = exact_blocks(model, X, keys, hessians=[c * torch.diag(p * (1 - p)) for p in s])
    else:
        ref = exact_blocks(model, X, keys, grads=[np.sqrt(c) * (p - t) for p, t in zip(s, y)])
    for key in keys:
        _close(blocks[key].to_dense(), ref[key])
    g = torch.Generator().manual_seed(0)
    mc = kt.collect(model, loss, X, fisher="mc", n_samples=3000, generator=g)
    ex = kt.collect(model, loss, X, fisher="exact")
    for key in keys:
        D, E = mc[key].to_dense(), ex[key].to_dense()
        assert float(torch.linalg.norm(D - E) / torch.linalg.norm(E)) < 0.1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        kt.collect(model, loss, X, 2 * y, fisher="empirical")
    with pytest.raises(NotImplementedError, match="pos_weight"):
        kt.collect(model, nn.BCEWithLogitsLoss(pos_weight=torch.ones(3, dtype=DT)), X, y)


# -- normalisation layers ------------------------------------------------------------------------


class Norms(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.lin = nn.Linear(4 * 3 * 3, 6)
        self.ln = nn.LayerNorm(6, bias=bias)
        self.rms = nn.RMSNorm([3, 2])
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.inorm(self.gn(torch.tanh(self.bn(self.conv(x)))))
        h = self.ln(self.lin(h.flatten(1)))
        return self.head(torch.tanh(self.rms(h.reshape(-1, 3, 2)).reshape(-1, 6)))


@pytest.mark.parametrize("bias", [True, False])
def test_normalisation_affine_blocks_equal_exact_fisher(bias):
    torch.manual_seed(11)
    model = Norms(bias).to(DT)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        for m in (model.bn, model.gn, model.inorm, model.ln, model.rms):  # noqa: B007
            m.weight.uniform_(0.5, 1.5)
            if getattr(m, "bias", None) is not None:
                m.bias.uniform_(-0.5, 0.5)
    model.eval()
    X = torch.randn(5, 2, 3, 3, dtype=DT)
    y = torch.randint(0, 3, (5,))
    blocks = kt.collect(model, nn.CrossEntropyLoss(), X, y, fisher="exact")
    keys = {}
    for name in ("bn", "gn", "inorm", "ln", "rms"):
        mod = model.get_submodule(name)
        has_b = getattr(mod, "bias", None) is not None
        keys[name] = dict(W=f"{name}.weight", b=f"{name}.bias" if has_b else None, vector=True)
    Js = _jacobians(model, X)
    H = _ce_hessians(model(X), None, 1, -100, "mean")
    for name, how in keys.items():
        F = blocks[name]
        assert F.form == "conv" and F.n == (2 if how["b"] else 1)
        ref = 0
        for J, Hn in zip(Js, H):
            cols = [J[how["W"]].reshape(J[how["W"]].shape[0], -1, 1)]
            if how["b"]:
                cols.append(J[how["b"]].reshape(J[how["b"]].shape[0], -1, 1))
            R = torch.cat(cols, 2).reshape(cols[0].shape[0], -1)
            ref = ref + R.T @ Hn @ R
        _close(F.to_dense(), ref)
    assert kt.coverage(model).uncovered == {}
    # precondition writes [γ β] back
    nn.functional.cross_entropy(model(X), y).backward()
    g = torch.stack([model.ln.weight.grad] + ([model.ln.bias.grad] if bias else []), 1)
    est = ks.kfac(blocks["ln"])
    kt.precondition(model, {"ln": est}, damping=0.3)
    want = torch.linalg.solve(est.to_dense() + 0.3 * torch.eye(est.m * est.n, dtype=DT), g.reshape(-1))
    got = torch.stack([model.ln.weight.grad] + ([model.ln.bias.grad] if bias else []), 1)
    _close(got.reshape(-1), want, rtol=1e-9)


# -- a custom negative log-likelihood ------------------------------------------------------------


class _Poisson(kt.NegativeLogLikelihood):
    """ℓ = e^f − y f per output entry (log-rates f): Fisher wrt f = diag(e^f)."""

    def nll(self, output, targets):
        return (torch.exp(output) - targets * output).sum(dim=1)

    def sample(self, output, generator):
        return torch.poisson(torch.exp(output), generator=generator)

    def fisher_sqrt(self, output):
        D = output.shape[1]
        return torch.exp(output / 2)[None] * torch.eye(D, dtype=output.dtype)[:, None, :]


def _poisson_net():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X = torch.randn(6, 3, dtype=DT)
    y = torch.poisson(torch.exp(net(X).detach()))
    keys = {"0": dict(W="0.weight", b="0.bias"), "2": dict(W="2.weight", b="2.bias")}
    return net, X, y, keys


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_custom_nll_blocks_equal_exact_and_empirical_fisher(reduction):
    net, X, y, keys = _poisson_net()
    loss = _Poisson(reduction)
    c = 1.0 if reduction == "sum" else 1.0 / len(X)
    f = net(X).detach()
    exact = exact_blocks(net, X, keys, hessians=[c * torch.diag(torch.exp(fn)) for fn in f])
    emp = exact_blocks(net, X, keys, grads=[torch.exp(fn) - yn for fn, yn in zip(f, y)])
    got_exact = kt.collect(net, loss, X, fisher="exact")
    got_emp = kt.collect(net, loss, X, y, fisher="empirical")
    for key in keys:
        _close(got_exact[key].to_dense(), exact[key])
        _close(got_emp[key].to_dense(), c * emp[key])
    # the same object is the training loss
    torch.testing.assert_close(loss(net(X), y), c * (torch.exp(f) - y * f).sum())


def test_custom_nll_mc_uses_its_sampler_and_matches_mse_when_it_is_mse():
    net, X, y, keys = _poisson_net()

    class Fixed(_Poisson):  # a "sampler" that returns the data: MC must equal empirical
        def sample(self, output, generator):
            return y

    mc = kt.collect(net, Fixed(), X, fisher="mc", n_samples=3)
    emp = kt.collect(net, Fixed(), X, y, fisher="empirical")
    for key in keys:
        _close(mc[key].to_dense(), emp[key].to_dense())

    class HalfGaussian(kt.NegativeLogLikelihood):  # ‖f − y‖², the NLL of N(f, I/2)
        def nll(self, output, targets):
            return ((output - targets) ** 2).sum(dim=1)

        def fisher_sqrt(self, output):
            D = output.shape[1]
            return (2 ** 0.5) * torch.eye(D, dtype=output.dtype)[:, None, :].expand(D, *output.shape)

    for fisher in ("exact", "empirical"):
        mine = kt.collect(net, HalfGaussian(), X, y, fisher=fisher)
        ref = kt.collect(net, nn.MSELoss(reduction="sum"), X, y, fisher=fisher)
        for key in keys:
            _close(mine[key].to_dense(), ref[key].to_dense())


def test_custom_nll_errors_name_the_method():
    net, X, y, _ = _poisson_net()

    class NoExtras(kt.NegativeLogLikelihood):
        def nll(self, output, targets):
            return (torch.exp(output) - targets * output).sum(dim=1)

    class BadShape(NoExtras):
        def nll(self, output, targets):
            return super().nll(output, targets).sum()

        def fisher_sqrt(self, output):
            return torch.ones_like(output)

    with pytest.raises(NotImplementedError, match="sample"):
        kt.collect(net, NoExtras(), X, fisher="mc")
    with pytest.raises(NotImplementedError, match="fisher_sqrt"):
        kt.collect(net, NoExtras(), X, fisher="exact")
    with pytest.raises(ValueError, match=r"nll must return the per-sample losses, shape \(6,\)"):
        kt.collect(net, BadShape(), X, y, fisher="empirical")
    with pytest.raises(ValueError, match=r"fisher_sqrt must return a tensor of shape \(S, \*output.shape\)"):
        kt.collect(net, BadShape(), X, fisher="exact")
    with pytest.raises(ValueError, match="reduction"):
        NoExtras(reduction="none")
    pre = kt.Preconditioner(net, NoExtras(), fisher="empirical")  # accepted where collect is
    assert pre.steps == 0
