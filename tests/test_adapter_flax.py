"""Flax linen models through flax_apply: unchanged outputs, every Dense/Conv block equal to
the empirical Fisher from per-sample gradients (jax.vmap(jax.grad)), nested names, layers
left to Flax reported, and the optax preconditioner on Flax variables."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

from kronsum.adapters.jax import PLAIN, Preconditioner, collect, flax_apply  # noqa: E402


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.tanh(nn.Dense(6, name="inner")(x))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = Block(name="block")(x)
        h = nn.Dense(5, use_bias=False)(h)
        return nn.Dense(3)(nn.tanh(h))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME")(x))
        h = nn.relu(nn.Conv(3, (2, 2), padding="VALID", use_bias=False)(h))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


class CNN1D(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3,), strides=2, padding="SAME")(x))
        h = nn.relu(nn.Conv(3, 2, padding="VALID", kernel_dilation=2, use_bias=False)(h))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


class CNN3D(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Conv(3, (2, 2, 2), strides=(1, 2, 1), padding=((1, 0), (0, 1), 1))(x))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


class PaddedCNN(nn.Module):
    """Flax's input paddings: circular (2-D, dilated), reflect (2-D, strided), causal (1-D)."""
    @nn.compact
    def __call__(self, x):  # (N, 5, 6, 2)
        h = nn.tanh(nn.Conv(4, (3, 2), padding="CIRCULAR", kernel_dilation=(1, 2))(x))
        h = nn.tanh(nn.Conv(4, (2, 3), strides=2, padding="REFLECT")(h))
        h = jnp.reshape(h, (h.shape[0], -1, 4))  # (N, 6, 4): a sequence
        h = nn.tanh(nn.Conv(3, (3,), padding="CAUSAL", kernel_dilation=2)(h))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


def _setup(model, shape, n=12, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    X = jax.random.normal(k1, (n,) + shape, dtype=jnp.float64)
    y = jax.random.randint(k2, (n,), 0, 3)
    variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), model.init(k3, X))
    return X, y, variables


def _per_sample_fisher(model, variables, X, y, path):
    """``Σ_n vec(∇W_n) vec(∇W_n)ᵀ`` of the summed cross-entropy for the layer at ``path``,
    ``∇W_n`` the (out, in[·kh·kw]) view with the bias last."""
    def loss(v, x, t):
        logits = model.apply(v, x[None])[0]
        return -jax.nn.log_softmax(logits)[t]

    g = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(variables, X, y)
    layer = g["params"]
    for k in path:
        layer = layer[k]
    K = layer["kernel"]
    d = K.ndim - 3  # spatial axes of a conv kernel (N, k…, in, out); 0 for dense (N, in, out)
    V = jnp.reshape(jnp.transpose(K, (0, d + 2, d + 1, *range(1, d + 1))), (K.shape[0], K.shape[-1], -1))
    if "bias" in layer:
        V = jnp.concatenate([V, layer["bias"][..., None]], axis=-1)
    V = jnp.reshape(V, (V.shape[0], -1))
    return V.T @ V


@pytest.mark.parametrize("model,shape,paths", [
    (MLP(), (4,), {"block/inner": ("block", "inner"), "Dense_0": ("Dense_0",), "Dense_1": ("Dense_1",)}),
    (CNN(), (6, 6, 2), {"Conv_0": ("Conv_0",), "Conv_1": ("Conv_1",), "Dense_0": ("Dense_0",)}),
    (CNN1D(), (11, 2), {"Conv_0": ("Conv_0",), "Conv_1": ("Conv_1",), "Dense_0": ("Dense_0",)}),
    (CNN3D(), (3, 4, 3, 2), {"Conv_0": ("Conv_0",), "Dense_0": ("Dense_0",)}),
    (PaddedCNN(), (5, 6, 2), {"Conv_0": ("Conv_0",), "Conv_1": ("Conv_1",), "Conv_2": ("Conv_2",),
                              "Dense_0": ("Dense_0",)}),
])
def test_blocks_are_the_per_sample_fisher(model, shape, paths):
    X, y, variables = _setup(model, shape)
    apply = flax_apply(model)
    np.testing.assert_allclose(apply(variables, X, PLAIN), model.apply(variables, X), rtol=1e-12)
    blocks = collect(apply, variables, X, y, fisher="empirical", reduction="sum")
    assert set(blocks) == set(paths)
    for name, path in paths.items():
        ref = _per_sample_fisher(model, variables, X, y, path)
        np.testing.assert_allclose(np.asarray(blocks[name].to_dense()), np.asarray(ref),
                                   rtol=1e-10, atol=1e-12 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("model,shape", [(CNN1D(), (11, 2)), (CNN3D(), (3, 4, 3, 2))])
def test_preconditioner_rewrites_1d_and_3d_conv_kernels(model, shape):
    X, y, variables = _setup(model, shape, n=16)
    pre = Preconditioner(flax_apply(model), estimator="kfac", fisher="exact")
    pre.refresh(variables, X, y)
    g = jax.tree_util.tree_map(lambda a: jax.random.normal(jax.random.PRNGKey(a.size), a.shape, a.dtype),
                               variables)
    tx = pre.transform(0.1)
    out, _ = tx.update(g, tx.init(variables), curvature=pre.curvature())
    K, b, Ko = (g["params"]["Conv_0"]["kernel"], g["params"]["Conv_0"]["bias"],
                out["params"]["Conv_0"]["kernel"])
    d = K.ndim - 2

    def view(kernel):  # (k…, in, out) → (out, in·∏k), input channel major
        return jnp.reshape(jnp.transpose(kernel, (d + 1, d, *range(d))), (kernel.shape[-1], -1))

    V = jnp.concatenate([view(K), b[:, None]], axis=1)
    P = pre.estimates["Conv_0"].solve(V, 0.1)
    np.testing.assert_allclose(view(Ko), P[:, :-1], rtol=1e-9)
    np.testing.assert_allclose(out["params"]["Conv_0"]["bias"], P[:, -1], rtol=1e-9)


class Grouped(nn.Module):
    @nn.compact
    def __call__(self, x):  # x (N, 5, 5, 4)
        h = nn.relu(nn.Conv(6, (3, 3), feature_group_count=2, padding="SAME")(x))
        h = nn.tanh(nn.Conv(6, (2,), feature_group_count=6, use_bias=False)(h.reshape(h.shape[0], 25, 6)))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))  # depthwise 1-D conv above


def _group_fisher(model, variables, X, y, layer_name, i, groups):
    """The per-sample Fisher of group ``i`` of a grouped conv: its output channels' kernel
    slice viewed (out/groups, in/groups·∏k), its bias slice last."""
    def loss(v, x, t):
        return -jax.nn.log_softmax(model.apply(v, x[None])[0])[t]

    layer = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(variables, X, y)["params"][layer_name]
    K = layer["kernel"]
    og = K.shape[-1] // groups
    K = K[..., i * og:(i + 1) * og]
    d = K.ndim - 3
    V = jnp.reshape(jnp.transpose(K, (0, d + 2, d + 1, *range(1, d + 1))), (K.shape[0], og, -1))
    if "bias" in layer:
        V = jnp.concatenate([V, layer["bias"][:, i * og:(i + 1) * og, None]], axis=-1)
    V = jnp.reshape(V, (V.shape[0], -1))
    return V.T @ V


def test_grouped_and_depthwise_convs_have_one_block_per_group():
    model = Grouped()
    X, y, variables = _setup(model, (5, 5, 4))
    apply = flax_apply(model)
    np.testing.assert_allclose(apply(variables, X, PLAIN), model.apply(variables, X), rtol=1e-12)
    blocks = collect(apply, variables, X, y, fisher="empirical", reduction="sum")
    assert set(blocks) == {"Conv_0[0]", "Conv_0[1]", "Dense_0"} | {f"Conv_1[{i}]" for i in range(6)}
    assert (blocks["Conv_0[1]"].m, blocks["Conv_0[1]"].n) == (3, 2 * 9 + 1)
    assert (blocks["Conv_1[5]"].m, blocks["Conv_1[5]"].n) == (1, 2)
    for layer, groups in (("Conv_0", 2), ("Conv_1", 6)):
        for i in (0, groups - 1):
            ref = _group_fisher(model, variables, X, y, layer, i, groups)
            np.testing.assert_allclose(np.asarray(blocks[f"{layer}[{i}]"].to_dense()), np.asarray(ref),
                                       rtol=1e-10, atol=1e-12 * float(jnp.abs(ref).max()))
    # the optax preconditioner solves each group against its own estimate
    pre = Preconditioner(apply, estimator="kfac", fisher="exact")
    pre.refresh(variables, X, y)
    g = jax.tree_util.tree_map(lambda a: jax.random.normal(jax.random.PRNGKey(a.size), a.shape, a.dtype),
                               variables)
    tx = pre.transform(0.1)
    out, _ = tx.update(g, tx.init(variables), curvature=pre.curvature())
    K, b = g["params"]["Conv_0"]["kernel"], g["params"]["Conv_0"]["bias"]
    Ko, bo = out["params"]["Conv_0"]["kernel"], out["params"]["Conv_0"]["bias"]
    for i in range(2):
        sl = slice(3 * i, 3 * i + 3)
        view = lambda k: jnp.reshape(jnp.transpose(k[..., sl], (3, 2, 0, 1)), (3, -1))  # noqa: E731
        P = pre.estimates[f"Conv_0[{i}]"].solve(jnp.concatenate([view(K), b[sl, None]], axis=1), 0.1)
        np.testing.assert_allclose(view(Ko), P[:, :-1], rtol=1e-9)
        np.testing.assert_allclose(bo[sl], P[:, -1], rtol=1e-9)
    Kd, Kdo = g["params"]["Conv_1"]["kernel"], out["params"]["Conv_1"]["kernel"]  # (2, 1, 6)
    for i in range(6):
        P = pre.estimates[f"Conv_1[{i}]"].solve(Kd[:, 0, i][None, :], 0.1)
        np.testing.assert_allclose(Kdo[:, 0, i], P[0], rtol=1e-9)


def test_tape_conv_rejects_mismatched_shapes_and_options():
    x, k = jnp.ones((2, 5, 3)), jnp.ones((2, 3, 4))
    assert PLAIN.conv("c", x, k).shape == (2, 4, 4)
    with pytest.raises(ValueError, match=r"layer 'c': conv takes x"):
        PLAIN.conv("c", jnp.ones((2, 5, 5, 3)), k)  # 2-D input, 1-D kernel
    with pytest.raises(ValueError, match=r"layer 'c': conv takes x"):
        PLAIN.conv("c", x, jnp.ones((2, 2, 4)))  # 2 input channels in the kernel, 3 in x
    with pytest.raises(ValueError, match=r"stride must be an int or 1 ints"):
        PLAIN.conv("c", x, k, stride=(1, 2))
    with pytest.raises(ValueError, match=r"padding must be a string, an int or 1 ints"):
        PLAIN.conv("c", x, k, padding=((1, 1), (0, 0)))
    with pytest.raises(ValueError, match=r"conv2d takes an HWIO kernel"):
        PLAIN.conv2d("c", x, k)
    with pytest.raises(ValueError, match=r"groups must be an integer >= 1"):
        PLAIN.conv("c", x, k, groups=0)
    with pytest.raises(ValueError, match=r"out divisible by groups = 3"):
        PLAIN.conv("c", x, jnp.ones((2, 1, 4)), groups=3)  # 4 outputs in 3 groups


def test_layers_left_to_flax_are_reported():
    class WithNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.Einsum((5, 5), "nd,de->ne")(nn.Dense(5)(x)))

    model = WithNorm()
    X, y, variables = _setup(model, (4,))
    apply = flax_apply(model)
    with pytest.warns(UserWarning, match=r"no Kronecker block.*Einsum_0 \(Einsum\)"):
        blocks = collect(apply, variables, X, y, fisher="exact")
    assert set(blocks) == {"Dense_0", "Dense_1"}


def test_preconditioner_on_flax_variables():
    model = MLP()
    X, y, variables = _setup(model, (4,), n=24)
    pre = Preconditioner(flax_apply(model), estimator="kfac", fisher="exact")
    pre.refresh(variables, X, y)
    g = jax.tree_util.tree_map(jnp.ones_like, variables)
    tx = pre.transform(0.1)
    out, _ = tx.update(g, tx.init(variables), curvature=pre.curvature())
    inner_g, inner_o = g["params"]["block"]["inner"], out["params"]["block"]["inner"]
    V = jnp.concatenate([inner_g["kernel"].T, inner_g["bias"][:, None]], axis=1)
    got = jnp.concatenate([inner_o["kernel"].T, inner_o["bias"][:, None]], axis=1)
    np.testing.assert_allclose(got, pre.estimates["block/inner"].solve(V, 0.1), rtol=1e-9)
    np.testing.assert_allclose(out["params"]["Dense_0"]["kernel"].T,
                               pre.estimates["Dense_0"].solve(g["params"]["Dense_0"]["kernel"].T, 0.1),
                               rtol=1e-9)


def test_unchanged_outputs_with_flax_dtype_rules_and_fallbacks():
    """Float32 parameters with float64 inputs, a bfloat16 layer, a 1-D conv with an int kernel
    size (through the tape) and a masked conv: the plain pass is Flax's own, dtype included;
    the layers the tape does not compute are left to Flax and named."""
    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
            h = nn.Conv(3, 3)(h.reshape(h.shape[0], -1, 4))
            h = nn.Conv(2, (1,), mask=jnp.ones((1, 3, 2)))(h)
            h = nn.Dense(5)(h.reshape(h.shape[0], -1))
            return nn.Dense(3, dtype=jnp.bfloat16)(h)

    model = Mixed()
    X = jax.random.normal(jax.random.PRNGKey(0), (5, 6, 6, 2), dtype=jnp.float64)
    variables = model.init(jax.random.PRNGKey(1), X)  # float32 parameters
    apply = flax_apply(model)
    with pytest.warns(UserWarning, match=r"Conv_2 \(Conv\)") as record:
        out = apply(variables, X, PLAIN)
    assert not any("Conv_1" in str(w.message) for w in record)
    ref = model.apply(variables, X)
    assert out.dtype == ref.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    # float32 parameters, float64 inputs: promoted as Flax does, blocks in float64
    plain32 = flax_apply(nn.Sequential([nn.Conv(4, (3, 3)), nn.relu, lambda h: h.reshape(h.shape[0], -1),
                                        nn.Dense(3)]))
    seq = nn.Sequential([nn.Conv(4, (3, 3)), nn.relu, lambda h: h.reshape(h.shape[0], -1), nn.Dense(3)])
    v2 = seq.init(jax.random.PRNGKey(2), X)
    np.testing.assert_allclose(plain32(v2, X, PLAIN), seq.apply(v2, X), rtol=1e-12)
    blocks = collect(plain32, v2, X, jnp.arange(5) % 3, fisher="empirical")
    assert {k: F.dtype for k, F in blocks.items()} == {"layers_0": jnp.float64, "layers_3": jnp.float64}


def test_preconditioner_refreshed_on_variables_updates_bare_params():
    """The usual Flax step differentiates ``params``, not the variables dict."""
    model = MLP()
    X, y, variables = _setup(model, (4,), n=24)
    pre = Preconditioner(flax_apply(model), estimator="kfac", fisher="exact")
    pre.refresh(variables, X, y)
    tx = pre.transform(0.1)
    g = jax.tree_util.tree_map(jnp.ones_like, variables["params"])
    out, _ = tx.update(g, tx.init(variables["params"]), curvature=pre.curvature())
    np.testing.assert_allclose(out["Dense_0"]["kernel"].T,
                               pre.estimates["Dense_0"].solve(g["Dense_0"]["kernel"].T, 0.1), rtol=1e-9)
