"""Flax NNX models through nnx_apply: unchanged outputs, every Linear/Conv block equal to the
empirical Fisher from per-sample gradients (jax.vmap(jax.grad)), attribute-path names (nested
modules, nnx.List indices), layers left to NNX reported, other variables (BatchNorm statistics)
kept, and the optax preconditioner on nnx.State through nnx.Optimizer."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

from kronsum.adapters.jax import PLAIN, Preconditioner, collect, nnx_apply  # noqa: E402

F64 = dict(param_dtype=jnp.float64)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.inner = nnx.Linear(4, 6, rngs=rngs, **F64)

    def __call__(self, x):
        return jnp.tanh(self.inner(x))


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.block = Block(rngs)
        self.layers = nnx.List([nnx.Linear(6, 5, use_bias=False, rngs=rngs, **F64),
                                nnx.Linear(5, 3, rngs=rngs, **F64)])

    def __call__(self, x):
        h = self.block(x)
        return self.layers[1](jnp.tanh(self.layers[0](h)))


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(2, 4, (3, 3), strides=2, padding="SAME", rngs=rngs, **F64)
        self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs, **F64)
        self.c2 = nnx.Conv(4, 3, (2, 2), padding="VALID", use_bias=False, rngs=rngs, **F64)
        self.head = nnx.Linear(3 * 2 * 2, 3, rngs=rngs, **F64)

    def __call__(self, x):
        h = jax.nn.relu(self.bn(self.c1(x)))
        h = jax.nn.relu(self.c2(h))
        return self.head(h.reshape(h.shape[0], -1))


class CNN1D(nnx.Module):  # 1-D and 3-D convolutions route as 2-D ones do
    def __init__(self, rngs):
        self.c1 = nnx.Conv(2, 4, (3,), strides=2, padding="SAME", rngs=rngs, **F64)
        self.c3 = nnx.Conv(1, 2, (2, 2, 2), padding="VALID", kernel_dilation=(1, 2, 1), rngs=rngs, **F64)
        self.head = nnx.Linear(4 * 6 + 2 * 2 * 1 * 2, 3, rngs=rngs, **F64)

    def __call__(self, x):
        h = jax.nn.relu(self.c1(x))  # x (N, 12, 2)
        v = jnp.tanh(self.c3(jnp.reshape(x, (x.shape[0], 3, 4, 2, 1))))  # (N, 2, 2, 1, 2)
        return self.head(jnp.concatenate([h.reshape(h.shape[0], -1), v.reshape(v.shape[0], -1)], axis=1))


class PaddedCNN(nnx.Module):  # NNX's input paddings: circular (2-D, dilated), causal (1-D)
    def __init__(self, rngs):
        self.c1 = nnx.Conv(2, 4, (3, 2), padding="CIRCULAR", kernel_dilation=(1, 2), rngs=rngs, **F64)
        self.c2 = nnx.Conv(4, 3, (3,), padding="CAUSAL", kernel_dilation=2, rngs=rngs, **F64)
        self.head = nnx.Linear(3 * 30, 3, rngs=rngs, **F64)

    def __call__(self, x):  # x (N, 5, 6, 2)
        h = jnp.tanh(self.c1(x))  # (N, 5, 6, 4)
        h = jnp.tanh(self.c2(jnp.reshape(h, (h.shape[0], 30, 4))))  # (N, 30, 3)
        return self.head(h.reshape(h.shape[0], -1))


def _setup(cls, shape, n=12, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    X = jax.random.normal(k1, (n,) + shape, dtype=jnp.float64)
    y = jax.random.randint(k2, (n,), 0, 3)
    model = cls(nnx.Rngs(seed))
    return model, X, y


def _per_sample_fisher(model, X, y, path):
    """``Σ_n vec(∇W_n) vec(∇W_n)ᵀ`` of the summed cross-entropy for the layer at ``path``,
    ``∇W_n`` the (out, in[·kh·kw]) view with the bias last."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, x, t):
        logits = nnx.merge(graphdef, p, rest)(x[None])[0]
        return -jax.nn.log_softmax(logits)[t]

    g = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, X, y)
    layer = g
    for k in path:
        layer = layer[k]
    if "kernel" not in layer:  # a normalisation layer's [scale bias] columns
        V = jnp.stack([layer[k][...] for k in ("scale", "bias") if k in layer], axis=-1)
        V = jnp.reshape(V, (V.shape[0], -1))
        return V.T @ V
    K = layer["kernel"][...]
    d = K.ndim - 3  # spatial axes of a conv kernel (N, k…, in, out); 0 for dense (N, in, out)
    V = jnp.reshape(jnp.transpose(K, (0, d + 2, d + 1, *range(1, d + 1))), (K.shape[0], K.shape[-1], -1))
    if "bias" in layer:
        V = jnp.concatenate([V, layer["bias"][...][..., None]], axis=-1)
    V = jnp.reshape(V, (V.shape[0], -1))
    return V.T @ V


@pytest.mark.parametrize("cls,shape,paths", [
    (MLP, (4,), {"block/inner": ("block", "inner"), "layers/0": ("layers", 0),
                 "layers/1": ("layers", 1)}),
    (CNN, (6, 6, 2), {"c1": ("c1",), "bn": ("bn",), "c2": ("c2",), "head": ("head",)}),
    (CNN1D, (12, 2), {"c1": ("c1",), "c3": ("c3",), "head": ("head",)}),
    (PaddedCNN, (5, 6, 2), {"c1": ("c1",), "c2": ("c2",), "head": ("head",)}),
])
def test_blocks_are_the_per_sample_fisher(cls, shape, paths):
    model, X, y = _setup(cls, shape)
    apply, params = nnx_apply(model), nnx.state(model, nnx.Param)
    with _no_warning():  # every layer routed (the BatchNorm normalises with its running statistics)
        blocks = collect(apply, params, X, y, fisher="empirical", reduction="sum")
    np.testing.assert_allclose(apply(params, X, PLAIN), model(X), rtol=1e-12)
    assert set(blocks) == set(paths)
    for name, path in paths.items():
        ref = _per_sample_fisher(model, X, y, path)
        np.testing.assert_allclose(np.asarray(blocks[name].to_dense()), np.asarray(ref),
                                   rtol=1e-10, atol=1e-12 * float(jnp.abs(ref).max()))
    # the patched calls are restored: NNX's own layers run unchanged afterwards
    assert "routed" not in getattr(nnx.Linear.__call__, "__qualname__", "")


class _no_warning:
    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_layers_left_to_nnx_are_reported_and_options_fall_back():
    class WithNorm(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(4, 5, rngs=rngs, **F64)
            self.ln = nnx.Einsum("nd,de->ne", (5, 5), (5,), rngs=rngs, **F64)
            self.b = nnx.Linear(5, 3, precision=jax.lax.Precision.HIGHEST, rngs=rngs, **F64)

        def __call__(self, x):
            return self.b(self.ln(self.a(x)))

    model, X, y = _setup(WithNorm, (4,))
    apply = nnx_apply(model)
    params = nnx.state(model, nnx.Param)
    with pytest.warns(UserWarning, match=r"no Kronecker block.*'b \(Linear, options.*ln \(Einsum\)"):
        blocks = collect(apply, params, X, y, fisher="exact")
    assert set(blocks) == {"a"}
    np.testing.assert_allclose(apply(params, X, PLAIN), model(X), rtol=1e-12)


def test_preconditioner_with_nnx_optimizer():
    model, X, y = _setup(MLP, (4,), n=24)
    apply = nnx_apply(model)
    pre = Preconditioner(apply, estimator="kfac", fisher="exact")
    pre.refresh(nnx.state(model, nnx.Param), X, y)
    tx = optax.chain(pre.transform(0.1), optax.sgd(1.0))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(X), y).sum()

    before = nnx.state(model, nnx.Param)
    W0 = np.asarray(before["block"]["inner"]["kernel"][...]).copy()
    b0 = np.asarray(before["block"]["inner"]["bias"][...]).copy()
    grads = nnx.grad(loss)(model)
    opt.update(model, grads, curvature=pre.curvature())
    gW, gb = grads["block"]["inner"]["kernel"][...], grads["block"]["inner"]["bias"][...]
    V = jnp.concatenate([gW.T, gb[:, None]], axis=1)
    P = pre.estimates["block/inner"].solve(V, 0.1)
    after = nnx.state(model, nnx.Param)["block"]["inner"]
    np.testing.assert_allclose(W0 - np.asarray(after["kernel"][...]), np.asarray(P[:, :-1].T),
                               rtol=1e-9)
    np.testing.assert_allclose(b0 - np.asarray(after["bias"][...]), np.asarray(P[:, -1]), rtol=1e-9)
    g1 = grads["layers"][0]["kernel"][...]
    W1 = nnx.state(model, nnx.Param)["layers"][0]["kernel"][...]
    assert not np.allclose(W1, before["layers"][0]["kernel"][...] - g1)  # preconditioned too


class GroupedNNX(nnx.Module):
    def __init__(self, rngs):
        self.c = nnx.Conv(4, 6, (3,), feature_group_count=2, padding="SAME", rngs=rngs, **F64)
        self.head = nnx.Linear(6 * 7, 3, rngs=rngs, **F64)

    def __call__(self, x):
        h = jnp.tanh(self.c(x))
        return self.head(h.reshape(h.shape[0], -1))


def test_grouped_conv_one_block_per_group():
    model, X, y = _setup(GroupedNNX, (7, 4))
    apply, params = nnx_apply(model), nnx.state(model, nnx.Param)
    blocks = collect(apply, params, X, y, fisher="empirical", reduction="sum")
    assert set(blocks) == {"c[0]", "c[1]", "head"}
    graphdef, p, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, x, t):
        return -jax.nn.log_softmax(nnx.merge(graphdef, p, rest)(x[None])[0])[t]

    g = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(p, X, y)["c"]
    K, b = g["kernel"][...][..., 3:], g["bias"][...][:, 3:]  # group 1: outputs 3..5, inputs 2..3
    V = jnp.concatenate([jnp.reshape(jnp.transpose(K, (0, 3, 2, 1)), (K.shape[0], 3, -1)), b[..., None]], axis=-1)
    V = jnp.reshape(V, (V.shape[0], -1))
    ref = V.T @ V
    np.testing.assert_allclose(np.asarray(blocks["c[1]"].to_dense()), np.asarray(ref),
                               rtol=1e-10, atol=1e-12 * float(jnp.abs(ref).max()))
