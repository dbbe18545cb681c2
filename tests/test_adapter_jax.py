"""The JAX adapter against per-sample gradients from ``jax.vmap(jax.grad(...))`` (CPU, float64)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the JAX adapter needs jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import kronsum as ks  # noqa: E402
from kronsum.adapters.jax import PLAIN, collect  # noqa: E402

C = 3


def _init(seed=0):
    ks_ = jax.random.split(jax.random.PRNGKey(seed), 6)
    f = jnp.float64
    return {
        "conv1": {"kernel": 0.5 * jax.random.normal(ks_[0], (3, 3, 2, 3), f),
                  "bias": 0.1 * jax.random.normal(ks_[1], (3,), f)},
        "conv2": {"kernel": 0.5 * jax.random.normal(ks_[2], (2, 2, 3, 2), f)},
        "dense1": {"kernel": 0.3 * jax.random.normal(ks_[3], (2 * 4 * 4, 5), f),
                   "bias": 0.1 * jax.random.normal(ks_[4], (5,), f)},
        "dense2": {"kernel": 0.5 * jax.random.normal(ks_[5], (5, C), f)},
    }


def apply(params, x, tape):
    """A small CNN in NHWC: conv (stride 2, pad 1, bias), conv (dilation 2, SAME-ish pad, no
    bias), dense (bias), dense (no bias)."""
    h = jax.nn.relu(tape.conv2d("conv1", x, params["conv1"]["kernel"], params["conv1"]["bias"],
                                stride=2, padding=1))
    h = jnp.tanh(tape.conv2d("conv2", h, params["conv2"]["kernel"], dilation=2,
                             padding=((1, 1), (1, 1))))
    h = jnp.reshape(h, (h.shape[0], -1))
    h = jnp.tanh(tape.dense("dense1", h, params["dense1"]["kernel"], params["dense1"]["bias"]))
    return tape.dense("dense2", h, params["dense2"]["kernel"])


def _data(n=6, seed=1):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(k1, (n, 7, 7, 2), jnp.float64), jax.random.randint(k2, (n,), 0, C),
            jax.random.normal(k3, (n, C), jnp.float64))


def _layer_vecs(g, name):
    """Per-sample vec of the weight stored (out, in[·kh·kw]) with the bias as last column."""
    k = g[name]["kernel"]
    if k.ndim == 5:  # (N, kh, kw, in, out) -> (N, out, in·kh·kw), in major
        W = jnp.transpose(k, (0, 4, 3, 1, 2)).reshape(k.shape[0], k.shape[-1], -1)
    else:  # (N, in, out) -> (N, out, in)
        W = jnp.swapaxes(k, 1, 2)
    if "bias" in g[name]:
        W = jnp.concatenate([W, g[name]["bias"][:, :, None]], axis=2)
    return W.reshape(W.shape[0], -1)


def reference_blocks(params, X, y, loss, fisher):
    """{layer: dense block} of the sum-reduced loss, from per-sample gradients."""
    N = X.shape[0]

    def out1(p, x):
        return apply(p, x[None], PLAIN)[0]

    if loss == "cross_entropy":
        def nll(p, x, t):
            f = out1(p, x)
            return jax.nn.logsumexp(f) - f[t]
    else:
        def nll(p, x, t):
            return jnp.sum((out1(p, x) - t) ** 2)

    per_sample = jax.jit(jax.vmap(jax.grad(nll), in_axes=(None, 0, 0)))
    if fisher == "empirical":
        runs = [(per_sample(params, X, y), jnp.ones(N))]
    elif loss == "cross_entropy":
        p = jax.nn.softmax(apply(params, X, PLAIN), axis=1)
        runs = [(per_sample(params, X, jnp.full((N,), j)), p[:, j]) for j in range(C)]
    else:
        jac = jax.jit(jax.vmap(jax.jacrev(out1), in_axes=(None, 0)))(params, X)  # (N, C, ...)
        runs = [(jax.tree_util.tree_map(lambda a, j=j: a[:, j], jac), jnp.full((N,), 2.0))
                for j in range(C)]
    return {name: sum((_layer_vecs(g, name).T * w) @ _layer_vecs(g, name) for g, w in runs)
            for name in ("conv1", "conv2", "dense1", "dense2")}


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_blocks_equal_per_sample_fisher(loss, fisher):
    params = _init()
    X, y_cls, y_reg = _data()
    y = y_cls if loss == "cross_entropy" else y_reg
    ref = reference_blocks(params, X, y, loss, fisher)
    N = X.shape[0]
    for reduction, c in [("sum", 1.0), ("mean", 1.0 / (N if loss == "cross_entropy" else N * C))]:
        blocks = collect(apply, params, X, y, loss=loss, reduction=reduction, fisher=fisher)
        assert list(blocks) == list(ref)
        for name, F in blocks.items():
            assert isinstance(F.weights, jax.Array) and F.dtype == jnp.float64
            assert F.form == ("conv" if name.startswith("conv") else "outer")
            D, R = np.asarray(F.to_dense()), c * np.asarray(ref[name])
            np.testing.assert_allclose(D, R, rtol=1e-10, atol=1e-10 * np.abs(R).max())


def test_mc_converges_to_exact():
    params = _init()
    X, _, _ = _data()
    mc = collect(apply, params, X, fisher="mc", n_samples=200, key=jax.random.PRNGKey(3))
    ex = collect(apply, params, X, fisher="exact")
    for name in ("dense1", "dense2"):  # the dense blocks (conv ones: the same code path)
        assert mc[name].num_terms == 200 * X.shape[0]
        D, E = np.asarray(mc[name].to_dense()), np.asarray(ex[name].to_dense())
        assert np.linalg.norm(D - E) / np.linalg.norm(E) < 0.2


def test_dense_weight_sharing():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(5), 3)
    params = {"w": jax.random.normal(k1, (4, 5), jnp.float64), "b": jnp.zeros(5),
              "v": jax.random.normal(k2, (15, C), jnp.float64)}

    def seq(p, x, tape):
        h = jnp.tanh(tape.dense("tok", x, p["w"], p["b"]))  # (N, 3, 5)
        return tape.dense("head", h.reshape(h.shape[0], -1), p["v"])

    X = jax.random.normal(k3, (6, 3, 4), jnp.float64)
    y = jnp.arange(6) % C
    sample = collect(seq, params, X, y, fisher="empirical", reduction="sum", weight_sharing="sample")
    expand = collect(seq, params, X, y, fisher="empirical", reduction="sum")
    assert sample["tok"].form == "conv" and expand["tok"].num_terms == 18

    def nll(p, x, t):
        f = seq(p, x[None], PLAIN)[0]
        return jax.nn.logsumexp(f) - f[t]

    g = jax.vmap(jax.grad(nll), in_axes=(None, 0, 0))(params, X, y)
    Z = jnp.concatenate([jnp.swapaxes(g["w"], 1, 2), g["b"][:, :, None]], axis=2).reshape(6, -1)
    np.testing.assert_allclose(np.asarray(sample["tok"].to_dense()), np.asarray(Z.T @ Z),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ks.kfac(sample["tok"]).to_dense()),
                               np.asarray(ks.kfac(expand["tok"]).to_dense()), rtol=1e-10, atol=1e-12)


def test_errors():
    params = _init()
    X, _, _ = _data()
    with pytest.raises(ValueError, match="targets"):
        collect(apply, params, X, fisher="empirical")
    with pytest.raises(ValueError, match="loss"):
        collect(apply, params, X, loss="hinge")

    def twice(p, x, tape):
        h = tape.dense("d", x, p)
        return tape.dense("d", h, p)

    with pytest.raises(RuntimeError, match="twice"):
        collect(twice, jnp.eye(3), jnp.ones((2, 3)))


# -- bad targets and batches: clear errors, no silent wrong answer ------------------------------


def _dense_apply(params, x, tape):
    return tape.dense("fc", x, params["w"], params["b"])


@pytest.mark.parametrize("targets, match", [
    ([0, 1, -1, 2], r"\[0, 3\); got -1"),
    ([0, 1, 3, 2], r"\[0, 3\); got 3"),
    ([0, 1, 2], r"shape \(4,\)"),
    ([0.0, 1.0, 2.0, 0.0], "integer class indices"),
])
def test_bad_class_targets_raise(targets, match):
    params = {"w": jnp.ones((5, 3)) / 5, "b": jnp.zeros(3)}
    X = jnp.ones((4, 5))
    with pytest.raises(ValueError, match=match):
        collect(_dense_apply, params, X, jnp.asarray(targets), fisher="empirical")


def test_bad_mse_targets_and_empty_batch_raise():
    params = {"w": jnp.ones((5, 3)) / 5, "b": jnp.zeros(3)}
    X = jnp.ones((4, 5))
    with pytest.raises(ValueError, match=r"output's shape \(4, 3\)"):
        collect(_dense_apply, params, X, jnp.zeros((3, 3)), loss="mse", fisher="empirical")
    with pytest.raises(ValueError, match="empty batch"):
        collect(_dense_apply, params, X[:0], fisher="mc")
