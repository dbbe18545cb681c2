"""Equinox models through equinox_apply and the tape: Linear (scalar features too), 1-/2-/3-D
Conv with stride, padding, dilation, groups and padding modes, Embedding and LayerNorm. Every
block equals the Fisher from per-sample gradients (jax.vmap(jax.grad) of the model itself),
empirical and exact, also for a transformer whose layers are mapped over positions inside the
model (eqx.nn.MultiheadAttention included); layers left to Equinox are named in one warning; a
layer under lax.scan or nested maps gets a clear error."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
eqx = pytest.importorskip("equinox")
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

from kronsum.adapters.jax import PLAIN, collect, equinox_apply  # noqa: E402

C = 3


def _keys(n, seed=0):
    return jax.random.split(jax.random.PRNGKey(seed), n)


class CNN(eqx.Module):
    """2-D conv (stride, padding), grouped 2-D conv, 1-D conv (reflect padding, dilation),
    3-D conv, LayerNorm and a Linear head: every parameter in a routed layer."""
    c1: eqx.nn.Conv2d
    c2: eqx.nn.Conv2d
    c3: eqx.nn.Conv1d
    c4: eqx.nn.Conv3d
    ln: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 6)
        f = dict(dtype=jnp.float64)
        self.c1 = eqx.nn.Conv2d(2, 4, 3, stride=2, padding=1, key=k[0], **f)
        self.c2 = eqx.nn.Conv2d(4, 4, 2, groups=2, key=k[1], **f)
        self.c3 = eqx.nn.Conv1d(4, 3, 2, dilation=2, padding=1, padding_mode="REFLECT", key=k[2], **f)
        self.c4 = eqx.nn.Conv3d(1, 2, (1, 2, 2), use_bias=False, key=k[3], **f)
        self.ln = eqx.nn.LayerNorm(6, **f)
        self.head = eqx.nn.Linear(6, C, key=k[4], **f)

    def __call__(self, x):  # x (2, 6, 6)
        h = jnp.tanh(self.c1(x))  # (4, 3, 3)
        h = jnp.tanh(self.c2(h))  # (4, 2, 2)
        h = jnp.tanh(self.c3(jnp.reshape(h, (4, 4))))  # (3, 3)
        h = jnp.tanh(self.c4(jnp.reshape(h[:, :2], (1, 1, 3, 2))))  # (2, 1, 2, 1)
        h = self.ln(jnp.concatenate([jnp.ravel(h), jnp.ravel(h[:, 0, 0, 0])]))
        return self.head(h)


class Scalars(eqx.Module):
    """An embedding of one index per sample, and Linear layers with scalar features."""
    emb: eqx.nn.Embedding
    up: eqx.nn.Linear
    out: eqx.nn.Linear
    to_scalar: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 4)
        self.emb = eqx.nn.Embedding(5, 4, key=k[0], dtype=jnp.float64)
        self.up = eqx.nn.Linear("scalar", 4, key=k[1], dtype=jnp.float64)
        self.out = eqx.nn.Linear(4, C, key=k[2], dtype=jnp.float64)
        self.to_scalar = eqx.nn.Linear(4, "scalar", key=k[3], dtype=jnp.float64)

    def __call__(self, x):  # x = (index, value)
        h = jnp.tanh(self.emb(x[0].astype(jnp.int32)) + self.up(x[1]))
        return self.out(h).at[0].add(self.to_scalar(h))  # a scalar output feeding one class


class Transformer(eqx.Module):
    """A token-sequence classifier written as Equinox models are: the embedding, the LayerNorms
    and the feed-forward MLP mapped over positions with ``jax.vmap`` inside the model, and
    ``eqx.nn.MultiheadAttention``, which maps its own projections over positions."""
    emb: eqx.nn.Embedding
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    ff: eqx.nn.MLP
    head: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 4)
        f, D = dict(dtype=jnp.float64), 4
        self.emb = eqx.nn.Embedding(7, D, key=k[0], **f)
        self.ln1 = eqx.nn.LayerNorm(D, **f)
        self.attn = eqx.nn.MultiheadAttention(2, D, use_query_bias=True, use_output_bias=True, key=k[1], **f)
        self.ln2 = eqx.nn.LayerNorm(D, **f)
        self.ff = eqx.nn.MLP(D, D, width_size=6, depth=1, activation=jnp.tanh, key=k[2], **f)
        self.head = eqx.nn.Linear(D, C, key=k[3], **f)

    def __call__(self, tokens):  # (T,) integer tokens
        h = jax.vmap(self.emb)(tokens)
        a = jax.vmap(self.ln1)(h)
        h = h + self.attn(a, a, a)
        h = h + jax.vmap(self.ff)(jax.vmap(self.ln2)(h))
        return self.head(jnp.mean(h, axis=0))


class Norms(eqx.Module):
    """GroupNorm on a conv's channels (channel-first, spatial positions) and RMSNorm."""
    conv: eqx.nn.Conv2d
    gn: eqx.nn.GroupNorm
    rms: eqx.nn.RMSNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 2)
        f = dict(dtype=jnp.float64)
        self.conv = eqx.nn.Conv2d(2, 4, 2, key=k[0], **f)
        self.gn = eqx.nn.GroupNorm(2, 4, **f)
        self.rms = eqx.nn.RMSNorm(8, use_bias=True, **f)
        self.head = eqx.nn.Linear(8, C, key=k[1], **f)

    def __call__(self, x):  # x (2, 3, 3)
        h = jnp.tanh(self.gn(self.conv(x)))  # (4, 2, 2)
        return self.head(jnp.tanh(self.rms(jnp.reshape(h, (2, 8))[0] + h[1, 0, 0])))


def _norms():
    model = Norms(jax.random.PRNGKey(2))
    X = jax.random.normal(jax.random.PRNGKey(3), (7, 2, 3, 3), dtype=jnp.float64)
    return model, X


def _transformer():
    model = Transformer(jax.random.PRNGKey(0))
    X = jax.random.randint(jax.random.PRNGKey(1), (6, 5), 0, 7)
    return model, X


def _cnn():
    model = CNN(jax.random.PRNGKey(0))
    X = jax.random.normal(jax.random.PRNGKey(1), (9, 2, 6, 6), dtype=jnp.float64)
    return model, X


def _scalars():
    model = Scalars(jax.random.PRNGKey(0))
    k1, k2 = _keys(2, 5)
    X = jnp.stack([jax.random.randint(k1, (9,), 0, 5).astype(jnp.float64),
                   jax.random.normal(k2, (9,), dtype=jnp.float64)], axis=1)
    return model, X


def _layer(model, name):
    for part in name.replace("]", "").replace("[", ".").split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def _matrix(layer, g, group=None):
    """Per-sample gradient matrices (N, m, n) of one layer's gradient module ``g`` in the
    block's layout: the weight as Equinox stores it viewed (out, -1), bias last column;
    LayerNorm ``[weight bias]``; an embedding's table transposed."""
    if isinstance(layer, eqx.nn.Embedding):
        return jnp.swapaxes(g.weight, 1, 2)
    if isinstance(layer, (eqx.nn.LayerNorm, eqx.nn.RMSNorm, eqx.nn.GroupNorm)):
        return jnp.stack([v for v in (g.weight, g.bias) if v is not None], axis=2)
    W = g.weight
    N, out = W.shape[0], layer.out_features if isinstance(layer, eqx.nn.Linear) else W.shape[1]
    W = jnp.reshape(W, (N, 1 if out == "scalar" else out, -1))
    b = None if g.bias is None else jnp.reshape(g.bias, (N, W.shape[1], 1))
    if group is not None:
        og = W.shape[1] // layer.groups
        W = W[:, group * og:(group + 1) * og]
        b = None if b is None else b[:, group * og:(group + 1) * og]
    return W if b is None else jnp.concatenate([W, b], axis=2)


def _per_sample(model, X, y):
    def loss(m, x, t):
        return -jax.nn.log_softmax(m(x))[t]

    return jax.vmap(eqx.filter_grad(loss), in_axes=(None, 0, 0))(model, X, y)


def _reference(model, blocks, grads, weights):
    out = {}
    for key in blocks:
        name, group = _split_group(model, key)
        layer = _layer(model, name)
        V = _matrix(layer, _layer(grads, name), group)
        V = jnp.reshape(V, (V.shape[0], -1))
        out[key] = (V * weights[:, None]).T @ V
    return out


def _assert_equal(blocks, refs):
    for key, ref in refs.items():
        np.testing.assert_allclose(np.asarray(blocks[key].to_dense()), np.asarray(ref), rtol=1e-10,
                                   atol=1e-12 * float(jnp.abs(ref).max()), err_msg=key)


def _check_empirical(model, X, y, keys=None, warns=None, **options):
    """``apply(PLAIN)`` is the model (while the warning ``warns`` names what Equinox computes),
    and every empirical block (sum reduction) equals the per-sample Fisher; ``keys``: the
    blocks expected."""
    apply, params = equinox_apply(model)
    with pytest.warns(UserWarning, match=warns) if warns else warnings.catch_warnings():
        np.testing.assert_allclose(apply(params, X, PLAIN), jax.vmap(model)(X), rtol=1e-13)
    blocks = collect(apply, params, X, y, fisher="empirical", reduction="sum", **options)
    assert keys is None or set(blocks) == keys
    _assert_equal(blocks, _reference(model, blocks, _per_sample(model, X, y), jnp.ones(len(y))))


@pytest.mark.parametrize("build", [_cnn, _scalars, _norms, _transformer],
                         ids=["cnn", "scalars", "norms", "transformer"])
@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_every_parameter_has_a_block_equal_to_the_per_sample_fisher(build, fisher):
    model, X = build()
    y = jax.random.randint(jax.random.PRNGKey(7), (X.shape[0],), 0, C)
    apply, params = equinox_apply(model)
    np.testing.assert_allclose(apply(params, X, PLAIN), jax.vmap(model)(X), rtol=1e-13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer routed: no warning
        blocks = collect(apply, params, X, y if fisher == "empirical" else None, fisher=fisher,
                         reduction="mean", weight_sharing="sample")
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array)))
    assert sum(F.m * F.n for F in blocks.values()) == n_params
    N = X.shape[0]
    if fisher == "empirical":
        refs = _reference(model, blocks, _per_sample(model, X, y), jnp.full(N, 1.0 / N))
    else:
        probs = jax.nn.softmax(jax.vmap(model)(X), axis=-1)
        refs = None
        for c in range(C):
            r = _reference(model, blocks, _per_sample(model, X, jnp.full(N, c)), probs[:, c] / N)
            refs = r if refs is None else {k: refs[k] + r[k] for k in r}
    _assert_equal(blocks, refs)


def test_names_and_shapes_follow_the_model():
    model, X = _cnn()
    apply, params = equinox_apply(model)
    blocks = collect(apply, params, X, fisher="mc", key=jax.random.PRNGKey(0))
    assert {k: (F.m, F.n) for k, F in blocks.items()} == {
        "c1": (4, 2 * 9 + 1), "c2[0]": (2, 2 * 4 + 1), "c2[1]": (2, 2 * 4 + 1), "c3": (3, 4 * 2 + 1),
        "c4": (2, 4), "ln": (6, 2), "head": (C, 7)}


def test_layers_left_to_equinox_are_named_once():
    class WithGRU(eqx.Module):
        cell: eqx.nn.GRUCell
        head: eqx.nn.Linear
        scale: jax.Array

        def __call__(self, x):
            return self.head(self.cell(x, jnp.zeros(4, x.dtype))) * self.scale

    k1, k2 = _keys(2)
    model = WithGRU(eqx.nn.GRUCell(3, 4, key=k1, dtype=jnp.float64),
                    eqx.nn.Linear(4, C, key=k2, dtype=jnp.float64), jnp.ones((), jnp.float64))
    X = jnp.ones((5, 3), jnp.float64)
    apply, params = equinox_apply(model)
    with pytest.warns(UserWarning, match=r"equinox_apply: .*'cell'.*'the model'|equinox_apply: .*'the model'.*'cell'"):
        blocks = collect(apply, params, X, fisher="mc")
    assert set(blocks) == {"head"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same apply function: warned once
        collect(apply, params, X, fisher="mc")


class Tokens(eqx.Module):
    """An embedding looked up directly (one index per sample) or mapped over a sequence."""
    emb: eqx.nn.Embedding
    head: eqx.nn.Linear
    mapped: bool = eqx.field(static=True)

    def __call__(self, x):
        h = jnp.mean(jax.vmap(self.emb)(x), axis=0) if self.mapped else self.emb(x)
        return self.head(jnp.tanh(h))


@pytest.mark.parametrize("mapped", [False, True], ids=["direct", "positions"])
def test_embedding_ids_are_looked_up_as_equinox_looks_them_up(mapped):
    """``weight[x]``: a negative id counts from the end, one out of range is clamped; the
    recorded inputs index the same rows, so the block is the per-sample Fisher's."""
    k1, k2 = _keys(2, 3)
    model = Tokens(eqx.nn.Embedding(5, 3, key=k1, dtype=jnp.float64),
                   eqx.nn.Linear(3, C, key=k2, dtype=jnp.float64), mapped)
    ids = jnp.array([-1, 0, 7, -9, 2, -5, 4, 1])
    X = jnp.stack([ids, jnp.roll(ids, 3), jnp.roll(ids, 5)], axis=1) if mapped else ids
    _check_empirical(model, X, jnp.arange(len(ids)) % C, {"emb", "head"}, weight_sharing="sample")


def test_a_subclass_that_changes_the_call_is_left_to_equinox():
    """A subclass of a routed layer that overrides ``__call__`` or adds parameters computes
    something else: it is left to Equinox and named in the warning, not given the base's
    block; a subclass that only renames the class is routed."""

    class Scaled(eqx.nn.Linear):
        scale: jax.Array

        def __init__(self, i, o, key):
            super().__init__(i, o, key=key, dtype=jnp.float64)
            self.scale = jnp.full((o,), 2.0, jnp.float64)

        def __call__(self, x, *, key=None):
            return super().__call__(x) * self.scale

    class Causal(eqx.nn.Conv1d):
        def __call__(self, x, *, key=None):
            return super().__call__(jnp.pad(x, ((0, 0), (self.kernel_size[0] - 1, 0))))

    class Renamed(eqx.nn.Linear):
        pass

    class Net(eqx.Module):
        conv: Causal
        a: Renamed
        head: Scaled

        def __call__(self, x):  # x (2, 6)
            return self.head(jnp.tanh(self.a(jnp.mean(jnp.tanh(self.conv(x)), axis=1))))

    k = _keys(4, 11)
    model = Net(Causal(2, 4, 3, key=k[0], dtype=jnp.float64), Renamed(4, 4, key=k[1], dtype=jnp.float64),
                Scaled(4, C, k[2]))
    X = jax.random.normal(k[3], (6, 2, 6), jnp.float64)
    _check_empirical(model, X, jnp.arange(6) % C, {"a"}, warns=r"equinox_apply: .*'conv'.*'head'")


def test_transformer_blocks_are_named_by_path_and_expand_is_per_position():
    """The attention's projections get blocks named by their path; with weight_sharing="expand"
    a layer mapped over T positions is an outer-form block of N·T terms (K-FAC-expand)."""
    model, X = _transformer()
    apply, params = equinox_apply(model)
    np.testing.assert_allclose(apply(params, X, PLAIN), jax.vmap(model)(X), rtol=1e-13)
    blocks = collect(apply, params, X, fisher="mc", key=jax.random.PRNGKey(0))
    assert {k: (F.m, F.n, F.form, F.num_terms) for k, F in blocks.items()} == {
        "emb": (4, 7, "outer", 30), "ln1": (4, 2, "conv", 6), "ln2": (4, 2, "conv", 6),
        "attn.query_proj": (4, 5, "outer", 30), "attn.key_proj": (4, 4, "outer", 30),
        "attn.value_proj": (4, 4, "outer", 30), "attn.output_proj": (4, 5, "outer", 30),
        "ff.layers[0]": (6, 5, "outer", 30), "ff.layers[1]": (4, 7, "outer", 30),
        "head": (C, 5, "outer", 6)}


def test_a_layer_under_a_scan_or_nested_maps_is_refused_clearly():
    class Scanned(eqx.Module):
        lin: eqx.nn.Linear

        def __call__(self, x):  # x (T, d): the layer applied by lax.scan over positions
            return jax.lax.scan(lambda c, xt: (c + self.lin(xt), None), jnp.zeros(C, x.dtype), x)[0]

    class Nested(eqx.Module):
        lin: eqx.nn.Linear

        def __call__(self, x):  # x (T, U, d): a map over positions inside a map
            return jnp.mean(jax.vmap(jax.vmap(self.lin))(x), axis=(0, 1))

    class Mapped(eqx.Module):  # jax.lax.map, jit and checkpoint around the layer
        lin: eqx.nn.Linear
        how: str = eqx.field(static=True)

        def __call__(self, x):  # x (T, d)
            if self.how == "lax.map":
                return jnp.mean(jax.lax.map(self.lin, x), axis=0)
            wrap = jax.jit if self.how == "jit" else jax.checkpoint
            return jnp.mean(wrap(jax.vmap(self.lin))(x), axis=0)

    lin = eqx.nn.Linear(3, C, key=jax.random.PRNGKey(0), dtype=jnp.float64)
    cases = [(Scanned(lin), (4, 5, 3)), (Nested(lin), (4, 2, 5, 3))]
    cases += [(Mapped(lin, how), (4, 5, 3)) for how in ("lax.map", "jit", "checkpoint")]
    for model, shape in cases:
        X = jnp.ones(shape, jnp.float64)
        apply, params = equinox_apply(model)
        np.testing.assert_allclose(apply(params, X, PLAIN), jax.vmap(model)(X))
        with pytest.raises(ValueError, match="inside a (JAX )?transformation of (its|the model's) own"):
            collect(apply, params, X, fisher="mc")


def test_parameters_used_outside_their_layer_are_not_blocked():
    """Tied or reparametrised weights: eqx.nn.WeightNorm and eqx.nn.Shared are left to Equinox
    (named in the warning); a model that reads a routed layer's weight itself (manual tying)
    gets a clear error instead of a block that misses that use."""

    class Normed(eqx.Module):
        wn: eqx.nn.WeightNorm
        head: eqx.nn.Linear

        def __call__(self, x):
            return self.head(jnp.tanh(self.wn(x)))

    class Tied(eqx.Module):
        emb: eqx.nn.Embedding
        up: eqx.nn.Linear

        def __call__(self, i):  # reads the configuration (fine) and the table (a tied use)
            h = jnp.tanh(self.up(self.emb(i)))[:self.emb.num_embeddings]
            return h @ self.emb.weight[:, :self.emb.num_embeddings]

    k = _keys(4, 2)
    normed = Normed(eqx.nn.WeightNorm(eqx.nn.Linear(3, 4, key=k[0], dtype=jnp.float64)),
                    eqx.nn.Linear(4, C, key=k[1], dtype=jnp.float64))
    X = jax.random.normal(k[2], (6, 3), jnp.float64)
    _check_empirical(normed, X, jnp.arange(6) % C, {"head"}, warns=r"equinox_apply: .*'wn")
    tied = Tied(eqx.nn.Embedding(C, 4, key=k[0], dtype=jnp.float64),
                eqx.nn.Linear(4, 4, key=k[1], dtype=jnp.float64))
    apply, params = equinox_apply(tied)
    with pytest.raises(AttributeError, match="'emb' is routed through kronsum's tape: its 'weight'"):
        apply(params, jnp.arange(6) % C, PLAIN)


def _split_group(model, key):
    """``(layer name, group)`` of a block key: ``"c2[1]"`` of a grouped Conv is group 1."""
    if key.endswith("]") and isinstance(_layer(model, key[:key.rindex("[")]), eqx.nn.Conv):
        return key[:key.rindex("[")], int(key[key.rindex("[") + 1:-1])
    return key, None


@pytest.mark.parametrize("build, keys", [
    (_cnn, {"c1", "c2[0]", "c2[1]", "c3", "c4", "ln", "head"}),
    (_transformer, {"emb", "ln1", "attn.query_proj", "attn.key_proj", "attn.value_proj",
                    "attn.output_proj", "ln2", "ff.layers[0]", "ff.layers[1]", "head"}),
    (_norms, {"conv", "gn", "rms", "head"}),
], ids=["cnn", "transformer", "norms"])
def test_optax_preconditioner_rewrites_each_equinox_layout(build, keys):
    """Linear, plain and grouped Conv (weights stored (out, ...), conv bias (out, 1, 1)), LayerNorm,
    Embedding, attention projections: each block of the update equals the damped solve with its
    estimate."""
    optax = pytest.importorskip("optax")
    from kronsum.adapters.jax import Preconditioner

    model, X = build()
    y = jax.random.randint(jax.random.PRNGKey(7), (X.shape[0],), 0, C)
    apply, params = equinox_apply(model)
    pre = Preconditioner(apply, estimator="kfac", fisher="empirical")
    pre.refresh(params, X, y)
    g = jax.tree_util.tree_map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape),
                               params)
    tx = optax.chain(pre.transform(0.1))
    out, _ = tx.update(g, tx.init(params), curvature=pre.curvature())
    one = lambda tree: jax.tree_util.tree_map(lambda x: x[None], tree)  # noqa: E731  a batch of one
    assert set(pre.estimates) == keys
    for key, est in pre.estimates.items():
        name, group = _split_group(model, key)
        layer = _layer(model, name)
        V = _matrix(layer, one(_layer(g, name)), group)[0]
        P = _matrix(layer, one(_layer(out, name)), group)[0]
        np.testing.assert_allclose(np.asarray(P), np.asarray(est.solve(V, 0.1)), rtol=1e-9,
                                   atol=1e-12, err_msg=key)
    # every parameter was rewritten (all are in blocks): nothing equals the plain gradient
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(out)):
        assert not np.allclose(np.asarray(a), np.asarray(b))
