"""Transformer layers of Flax models through flax_apply / nnx_apply and the tape: embeddings,
LayerNorm / RMSNorm affine parameters, general dense layers (attention's q/k/v and out
projections). Every block equals the Fisher from per-sample gradients (jax.vmap(jax.grad)),
empirical and exact; every parameter of the models gets a block; tied embeddings are refused;
the optax preconditioner finds and rewrites each layout; bad tape input gets clear errors."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

from kronsum.adapters.jax import PLAIN, Preconditioner, collect, flax_apply, nnx_apply  # noqa: E402

VOCAB, D, T, C = 11, 8, 5, 3
F64 = dict(param_dtype=jnp.float64)


class LinenLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(VOCAB, D, **F64)(ids)
        h = nn.LayerNorm(**F64)(h)
        h = h + nn.MultiHeadDotProductAttention(num_heads=2, **F64)(h)
        h = nn.RMSNorm(**F64)(h)
        h = nn.DenseGeneral((2, 3), **F64)(h)
        h = nn.DenseGeneral(C, axis=(-2, -1), **F64)(jnp.tanh(h))
        return jnp.mean(h, axis=1)


def _attention64(query, key, value, bias=None, mask=None, **kwargs):
    """Softmax attention in the inputs' dtype: NNX's default goes through
    ``jax.nn.dot_product_attention``, whose softmax runs in float32, so its float64 gradients
    agree only to float32 rounding between batched and per-sample evaluation."""
    s = jnp.einsum("...qhd,...khd->...hqk", query, key) / jnp.sqrt(query.shape[-1])
    return jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(s, axis=-1), value)


class NnxLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs, **F64)
        self.ln = nnx.LayerNorm(D, rngs=rngs, **F64)
        self.attn = nnx.MultiHeadAttention(2, D, decode=False, attention_fn=_attention64,
                                           rngs=rngs, **F64)
        self.rms = nnx.RMSNorm(D, rngs=rngs, **F64)
        self.up = nnx.LinearGeneral(D, (2, 3), rngs=rngs, **F64)
        self.head = nnx.LinearGeneral((2, 3), C, axis=(-2, -1), rngs=rngs, **F64)

    def __call__(self, ids):
        h = self.ln(self.embed(ids))
        h = h + self.attn(h)
        h = self.up(self.rms(h))
        return jnp.mean(self.head(jnp.tanh(h)), axis=1)


def _data(n=7, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.randint(k1, (n, T), 0, VOCAB), jax.random.randint(k2, (n,), 0, C)


def _linen():
    ids, y = _data()
    model = LinenLM()
    variables = model.init(jax.random.PRNGKey(1), ids)
    apply = flax_apply(model)
    return apply, variables, ids, y, lambda v, x: model.apply(v, x), variables["params"]


def _nnx():
    ids, y = _data()
    model = NnxLM(nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return (nnx_apply(model), params, ids, y,
            lambda p, x: nnx.merge(graphdef, p, rest)(x), nnx.to_pure_dict(params))


def _layer_matrix(g, F):
    """Per-sample gradient matrices ``(N, m, n)`` of one layer's parameter dict ``g`` in the
    block's layout (``F`` gives ``m``)."""
    m = F.m
    if "embedding" in g:
        return jnp.swapaxes(g["embedding"], 1, 2)
    if "kernel" in g:
        K = g["kernel"]
        V = jnp.swapaxes(jnp.reshape(K, (K.shape[0], -1, m)), 1, 2)
        if "bias" in g:
            V = jnp.concatenate([V, jnp.reshape(g["bias"], (K.shape[0], m, 1))], axis=2)
        return V
    return jnp.stack([g[k] for k in ("scale", "bias") if k in g], axis=2)


def _sub(tree, name):
    for k in name.split("/"):
        tree = tree[int(k) if isinstance(tree, list) else k]
    return tree


def _per_sample_grads(call, params, X, y):
    """Per-sample gradients of the cross-entropy of ``call(params, x)``, as a plain dict of
    the parameters (``"params"`` stripped)."""
    def loss(p, x, t):
        return -jax.nn.log_softmax(call(p, x[None])[0])[t]

    g = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, X, y)
    if not isinstance(g, dict):
        g = nnx.to_pure_dict(g)
    return g.get("params", g)


def _reference(blocks, per_sample_grads, weights=None):
    """``Σ_n w_n vec(V_n) vec(V_n)ᵀ`` for each block from the per-sample gradient pytree."""
    out = {}
    for name, F in blocks.items():
        V = _layer_matrix(_sub(per_sample_grads, name), F)
        V = jnp.reshape(V, (V.shape[0], -1))
        w = jnp.ones(V.shape[0]) if weights is None else weights
        out[name] = (V * w[:, None]).T @ V
    return out


@pytest.mark.parametrize("negative", [False, True], ids=["ids", "negative-ids"])
@pytest.mark.parametrize("build", [_linen, _nnx], ids=["linen", "nnx"])
def test_every_parameter_has_a_block_equal_to_the_per_sample_fisher(build, negative):
    apply, params, ids, y, call, pure = build()
    if negative:  # Flax looks ids up with jnp.take: -VOCAB ≤ id < 0 counts from the end
        ids = jnp.where(ids % 2 == 1, ids - VOCAB, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left to Flax: no warning
        blocks = collect(apply, params, ids, y, fisher="empirical", reduction="sum",
                         weight_sharing="sample")
    np.testing.assert_allclose(apply(params, ids, PLAIN), call(params, ids), rtol=1e-12)
    g = _per_sample_grads(call, params, ids, y)
    # every parameter of the model is in exactly one block
    counted = sum(F.m * F.n for F in blocks.values())
    assert counted == sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(pure))
    kinds = {type(F).__name__ for F in blocks.values()}
    assert kinds == {"KronSum"}
    for name, ref in _reference(blocks, g).items():
        got = np.asarray(blocks[name].to_dense())
        np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-10,
                                   atol=1e-12 * float(jnp.abs(ref).max()), err_msg=name)


def test_exact_fisher_of_embedding_norm_and_attention_blocks():
    apply, variables, ids, y, call, _ = _linen()
    blocks = collect(apply, variables, ids, fisher="exact", reduction="mean", weight_sharing="sample")
    probs = jax.nn.softmax(call(variables, ids), axis=-1)  # (N, C)

    def loss(p, x, t):
        return -jax.nn.log_softmax(call(p, x[None])[0])[t]

    N = ids.shape[0]
    refs = None
    for c in range(C):
        g = jax.vmap(jax.grad(loss), in_axes=(None, 0, None))(variables, ids, c)["params"]
        r = _reference(blocks, g, probs[:, c] / N)
        refs = r if refs is None else {k: refs[k] + r[k] for k in r}
    for name, ref in refs.items():
        np.testing.assert_allclose(np.asarray(blocks[name].to_dense()), np.asarray(ref),
                                   rtol=1e-10, atol=1e-12 * float(jnp.abs(ref).max()), err_msg=name)


def test_block_shapes_and_names():
    apply, variables, ids, y, _, _ = _linen()
    blocks = collect(apply, variables, ids, y, fisher="mc")
    shapes = {k: (F.form, F.m, F.n) for k, F in blocks.items()}
    assert shapes["Embed_0"] == ("outer", D, VOCAB)          # table.T, one-hot inputs
    assert shapes["LayerNorm_0"] == ("conv", D, 2)            # [scale bias]
    assert shapes["RMSNorm_0"] == ("conv", D, 1)              # scale only
    assert shapes["MultiHeadDotProductAttention_0/query"] == ("outer", D, D + 1)
    assert shapes["MultiHeadDotProductAttention_0/out"] == ("outer", D, D + 1)
    assert shapes["DenseGeneral_0"] == ("outer", 6, D + 1)
    assert shapes["DenseGeneral_1"] == ("outer", C, 6 + 1)


@pytest.mark.parametrize("flavour", ["linen", "nnx"])
def test_tied_embedding_is_refused(flavour):
    ids, y = _data()
    if flavour == "linen":
        class Tied(nn.Module):
            @nn.compact
            def __call__(self, x):
                e = nn.Embed(VOCAB, D, **F64)
                return jnp.mean(e.attend(jnp.tanh(e(x))), axis=1)

        model = Tied()
        params = model.init(jax.random.PRNGKey(0), ids)
        apply, plain = flax_apply(model), model.apply(params, ids)
    else:
        class Tied(nnx.Module):
            def __init__(self, rngs):
                self.e = nnx.Embed(VOCAB, D, rngs=rngs, **F64)

            def __call__(self, x):
                return jnp.mean(self.e.attend(jnp.tanh(self.e(x))), axis=1)

        model = Tied(nnx.Rngs(0))
        params, plain = nnx.state(model, nnx.Param), model(ids)
        apply = nnx_apply(model)
    np.testing.assert_allclose(apply(params, ids, PLAIN), plain, rtol=1e-12)
    with pytest.raises(RuntimeError, match="tied weights"):
        collect(apply, params, ids, y)


def test_preconditioner_rewrites_embedding_norm_and_general_dense_updates():
    optax = pytest.importorskip("optax")
    apply, variables, ids, y, _, _ = _linen()
    pre = Preconditioner(apply, estimator="kfac", fisher="empirical")
    pre.refresh(variables, ids, y)
    g = jax.tree_util.tree_map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape),
                               variables)
    tx = optax.chain(pre.transform(0.1))
    out, _ = tx.update(g, tx.init(variables), curvature=pre.curvature())
    for name, est in pre.estimates.items():
        F = SimpleNamespace(m=est.left.shape[0])
        V = _layer_matrix(jax.tree_util.tree_map(lambda x: x[None], _sub(g["params"], name)), F)[0]
        P = _layer_matrix(jax.tree_util.tree_map(lambda x: x[None], _sub(out["params"], name)), F)[0]
        np.testing.assert_allclose(np.asarray(P), np.asarray(est.solve(V, 0.1)), rtol=1e-9,
                                   atol=1e-12, err_msg=name)
    assert set(pre.estimates) == {
        "Embed_0", "LayerNorm_0", "RMSNorm_0", "DenseGeneral_0", "DenseGeneral_1",
        *(f"MultiHeadDotProductAttention_0/{p}" for p in ("query", "key", "value", "out"))}


def test_layers_kronsum_cannot_block_are_left_to_flax_or_refused():
    """Each case once ran wrong or crashed: a Dense inside nn.WeightNorm sees a kernel computed
    from the stored one (left to Flax, named); an int input_dilation and a LayerNorm without
    parameters crashed even plain evaluation; NNX layers holding one Param (tied) got a block
    each; an embedding of jnp.arange(T) broadcast over the samples has no batch axis."""

    class Normed(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.WeightNorm(nn.Dense(4, **F64))(x)
            h = nn.LayerNorm(use_scale=False, use_bias=False, **F64)(jnp.tanh(h))
            h = nn.Conv(2, (3,), input_dilation=2, padding=1, **F64)(h[..., None])
            return nn.Dense(C, **F64)(jnp.reshape(h, (h.shape[0], -1)))

    X = jax.random.normal(jax.random.PRNGKey(0), (5, 3), jnp.float64)
    y = jnp.arange(5) % C
    model = Normed()
    variables = model.init(jax.random.PRNGKey(1), X)
    apply = flax_apply(model)
    with pytest.warns(UserWarning, match=r"parameters transformed before it"):
        np.testing.assert_allclose(apply(variables, X, PLAIN), model.apply(variables, X), rtol=1e-13)
    blocks = collect(apply, variables, X, y, fisher="empirical", reduction="sum")
    assert set(blocks) == {"Dense_1"}

    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(3, 3, rngs=rngs, **F64)
            self.b = nnx.Linear(3, 3, rngs=rngs, **F64)
            self.b.kernel = self.a.kernel
            self.h = nnx.Linear(3, C, rngs=rngs, **F64)

        def __call__(self, x):
            return self.h(jnp.tanh(self.b(jnp.tanh(self.a(x)))))

    tied = Tied(nnx.Rngs(0))
    _, params, _ = nnx.split(tied, nnx.Param, ...)
    apply = nnx_apply(tied)
    with pytest.warns(UserWarning, match=r"tied"):
        blocks = collect(apply, params, X, y, fisher="empirical", reduction="sum")
    assert set(blocks) == {"h"}

    class Positions(nn.Module):
        @nn.compact
        def __call__(self, ids):
            h = nn.Embed(VOCAB, D, **F64)(ids) + nn.Embed(T, D, name="pos", **F64)(jnp.arange(T))
            return jnp.mean(nn.Dense(C, **F64)(h), axis=1)

    ids, y = _data()
    model = Positions()
    variables = model.init(jax.random.PRNGKey(1), ids)
    with pytest.raises(ValueError, match="'pos'.*first axis is not the batch"):
        collect(flax_apply(model), variables, ids, y, fisher="empirical")


def test_batch_norm_with_float32_statistics_in_a_float64_model_matches_flax():
    """Flax keeps batch_stats in float32 and takes 1/√(var + ε) in that dtype; so does the
    routed BatchNorm (it cast var to float64 first: off by float32 rounding)."""

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(nn.BatchNorm(use_running_average=True, **F64)(nn.Dense(6, **F64)(x)))
            return nn.Dense(C, **F64)(h)

    X = jax.random.normal(jax.random.PRNGKey(0), (4, 3), jnp.float64)
    model = M()
    v = model.init(jax.random.PRNGKey(1), X)
    stats = {"mean": jnp.linspace(-1, 1, 6, dtype=jnp.float32), "var": jnp.linspace(0.3, 2.1, 6, dtype=jnp.float32)}
    v = {"params": v["params"], "batch_stats": {"BatchNorm_0": stats}}
    np.testing.assert_allclose(flax_apply(model)(v, X, PLAIN), model.apply(v, X), rtol=1e-14)


def test_tape_embed_and_norm_reject_bad_input():
    ids, y = _data()

    def embed_floats(p, x, tape):
        return jnp.mean(tape.embed("e", x.astype(jnp.float64), p["t"]), axis=1)

    with pytest.raises(TypeError, match="layer 'e': embed ids must be integers"):
        collect(embed_floats, {"t": jnp.ones((VOCAB, C))}, ids, y)

    def bad_scale(p, x, tape):
        h = jnp.take(p["t"], x, axis=0)
        return jnp.mean(tape.norm("n", h, p["s"]), axis=1)

    with pytest.raises(ValueError, match=r"layer 'n': norm scale must be \(3,\)"):
        collect(bad_scale, {"t": jnp.ones((VOCAB, C)), "s": jnp.ones(4)}, ids, y)

    def no_params(p, x, tape):
        return jnp.mean(tape.norm("n", jnp.take(p["t"], x, axis=0)), axis=1)

    with pytest.raises(ValueError, match="norm needs a scale or a bias"):
        collect(no_params, {"t": jnp.ones((VOCAB, C))}, ids, y)


class LinenNorms(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):  # x (N, 6, 4)
        h = nn.Dense(6)(x)
        h = nn.BatchNorm(use_running_average=not train)(h)
        h = jnp.tanh(nn.GroupNorm(num_groups=3)(h))
        h = nn.BatchNorm(use_scale=False)(h, use_running_average=True)
        return nn.Dense(C)(jnp.mean(h, axis=1))


class NnxNorms(nnx.Module):
    def __init__(self, rngs):
        self.d1 = nnx.Linear(4, 6, rngs=rngs, param_dtype=jnp.float64)
        self.bn = nnx.BatchNorm(6, use_running_average=True, rngs=rngs, param_dtype=jnp.float64)
        self.gn = nnx.GroupNorm(6, num_groups=None, group_size=3, rngs=rngs, param_dtype=jnp.float64)
        self.bn2 = nnx.BatchNorm(6, use_scale=False, rngs=rngs, param_dtype=jnp.float64)
        self.head = nnx.Linear(6, C, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        h = jnp.tanh(self.gn(self.bn(self.d1(x))))
        return self.head(jnp.mean(self.bn2(h, use_running_average=True), axis=1))


def _randomised(tree, seed):
    """Every leaf replaced by random values (positive for variances): non-trivial statistics."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = [jnp.abs(jax.random.normal(k, x.shape, jnp.float64)) + 0.5
           if "var" in jax.tree_util.keystr(p) else jax.random.normal(k, x.shape, jnp.float64)
           for k, (p, x) in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.mark.parametrize("flavour", ["linen", "nnx"])
def test_batch_norm_running_statistics_and_group_norm_blocks(flavour):
    """BatchNorm with its running statistics (a per-sample map) and GroupNorm (per-sample
    statistics): exact [scale bias] blocks equal to the per-sample Fisher."""
    X = jax.random.normal(jax.random.PRNGKey(3), (9, 6, 4), jnp.float64)
    y = jax.random.randint(jax.random.PRNGKey(4), (9,), 0, C)
    if flavour == "linen":
        model = LinenNorms()
        variables = _randomised(model.init(jax.random.PRNGKey(1), X), 5)
        apply, params = flax_apply(model), variables
        call = lambda v, x: model.apply(v, x)  # noqa: E731
        names = {"Dense_0", "BatchNorm_0", "GroupNorm_0", "BatchNorm_1", "Dense_1"}
    else:
        model = NnxNorms(nnx.Rngs(1))
        graphdef, p, rest = nnx.split(model, nnx.Param, ...)
        model = nnx.merge(graphdef, _randomised(p, 5), _randomised(rest, 6))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        apply = nnx_apply(model)
        call = lambda q, x: nnx.merge(graphdef, q, rest)(x)  # noqa: E731
        names = {"d1", "bn", "gn", "bn2", "head"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer routed
        blocks = collect(apply, params, X, y, fisher="empirical", reduction="sum", weight_sharing="sample")
    assert set(blocks) == names
    np.testing.assert_allclose(apply(params, X, PLAIN), call(params, X), rtol=1e-12)
    g = _per_sample_grads(call, params, X, y)
    for name, ref in _reference(blocks, g).items():
        np.testing.assert_allclose(np.asarray(blocks[name].to_dense()), np.asarray(ref), rtol=1e-10,
                                   atol=1e-12 * float(jnp.abs(ref).max()), err_msg=name)
    # the optax preconditioner finds and rewrites the normalisation layers' scale and bias
    pre = Preconditioner(apply, estimator="kfac", fisher="exact")
    pre.refresh(params, X, y)
    upd = jax.tree_util.tree_map(lambda a: jax.random.normal(jax.random.PRNGKey(a.size), a.shape, a.dtype), params)
    tx = pre.transform(0.1)
    out, _ = tx.update(upd, tx.init(params), curvature=pre.curvature())
    bn = "BatchNorm_0" if flavour == "linen" else "bn"
    u, o = _sub(_pure(upd), bn), _sub(_pure(out), bn)
    P = pre.estimates[bn].solve(jnp.stack([u["scale"], u["bias"]], axis=1), 0.1)
    np.testing.assert_allclose(jnp.stack([o["scale"], o["bias"]], axis=1), P, rtol=1e-9)


def _pure(tree):
    """Flax variables' params, or an NNX state as a plain dict."""
    if isinstance(tree, dict):
        return tree.get("params", tree)
    return nnx.to_pure_dict(tree)
