"""The optax preconditioner of the JAX adapter: every preconditioned block equals the damped
solve with the running estimate (dense check), under jit as eagerly; layouts of dense and conv
kernels and biases; damping schedules, KL clipping, uncovered leaves, custom paths, errors."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

from kronsum.adapters.jax import PLAIN, Preconditioner  # noqa: E402


def _apply_mlp(params, x, tape):
    h = jnp.tanh(tape.dense("hidden", x, params["hidden"]["kernel"], params["hidden"]["bias"]))
    return tape.dense("out", h, params["out"]["kernel"])


def _apply_cnn(params, x, tape):
    h = jax.nn.relu(tape.conv2d("conv", x, params["conv"]["kernel"], params["conv"]["bias"], padding=1))
    return tape.dense("out", jnp.reshape(h, (h.shape[0], -1)), params["out"]["kernel"], params["out"]["bias"])


def _params(kind, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    if kind == "mlp":
        return {"hidden": {"kernel": jax.random.normal(k[0], (5, 6)) / 2, "bias": 0.1 * jax.random.normal(k[1], (6,))},
                "out": {"kernel": jax.random.normal(k[2], (6, 3)) / 2},
                "temperature": jnp.ones(())}  # a leaf no layer covers
    return {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 3)) / 3, "bias": 0.1 * jax.random.normal(k[1], (3,))},
            "out": {"kernel": jax.random.normal(k[2], (3 * 4 * 4, 3)) / 5, "bias": jnp.zeros(3)}}


def _data(kind, n=24, seed=1):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    X = jax.random.normal(k1, (n, 5) if kind == "mlp" else (n, 4, 4, 2))
    return X, jax.random.randint(k2, (n,), 0, 3)


def _loss(apply):
    def loss(params, X, y):
        logits = apply(params, X, PLAIN) * params.get("temperature", 1.0)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])
    return loss


def _block_view(K, b):
    V = K.T if K.ndim == 2 else jnp.reshape(jnp.transpose(K, (3, 2, 0, 1)), (K.shape[3], -1))
    return V if b is None else jnp.concatenate([V, b[:, None]], axis=1)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("estimator", ["kfac", "kfoc_running", "ekfac"])
def test_update_is_the_damped_solve(kind, estimator):
    apply = _apply_mlp if kind == "mlp" else _apply_cnn
    params, (X, y) = _params(kind), _data(kind)
    pre = Preconditioner(apply, estimator=estimator, fisher="exact")
    for step in range(2):  # two refreshes: the running average enters
        pre.refresh(params, X[step::2], y[step::2])
    grads = jax.grad(_loss(apply))(params, X, y)
    lam = 0.05
    tx = pre.transform(damping=lam)
    state = tx.init(params)
    eager, _ = tx.update(grads, state, params, curvature=pre.curvature())
    jitted, state2 = jax.jit(tx.update)(grads, state, params, curvature=pre.curvature())
    assert int(state2.count) == 1
    for name, est in pre.estimates.items():
        sub = grads[name]
        V = _block_view(sub["kernel"], sub.get("bias"))
        ref = np.linalg.solve(np.asarray(est.to_dense()) + lam * np.eye(V.size), np.asarray(V).reshape(-1))
        for out in (eager, jitted):
            got = _block_view(out[name]["kernel"], out[name].get("bias"))
            np.testing.assert_allclose(np.asarray(got).reshape(-1), ref, rtol=1e-8,
                                       atol=1e-10 * np.abs(ref).max())
            assert out[name]["kernel"].shape == sub["kernel"].shape
    if kind == "mlp":  # leaves no layer covers pass through unchanged
        assert float(eager["temperature"]) == float(grads["temperature"])


def test_training_with_a_chain_schedule_and_kl_clip():
    apply, params = _apply_mlp, _params("mlp")
    X, y = _data("mlp", n=96)
    loss = _loss(apply)
    pre = Preconditioner(apply, estimator="kfoc_running", fisher="mc", decay=0.9)
    lr = 0.1
    tx = optax.chain(pre.transform(damping=lambda count: 0.1 / (1 + count), kl_clip=1e-2,
                                   learning_rate=lr), optax.sgd(lr, momentum=0.9))
    state = tx.init(params)

    @jax.jit
    def step(params, state, curvature, xb, yb):
        g = jax.grad(loss)(params, xb, yb)
        updates, state = tx.update(g, state, params, curvature=curvature)
        return optax.apply_updates(params, updates), state

    first = float(loss(params, X, y))
    for i in range(30):
        xb, yb = X[(i % 3) * 32:(i % 3 + 1) * 32], y[(i % 3) * 32:(i % 3 + 1) * 32]
        if i % 5 == 0:
            pre.refresh(params, xb, yb, key=jax.random.PRNGKey(i))
        params, state = step(params, state, pre.curvature(), xb, yb)
    assert pre.refreshes == 6
    assert float(loss(params, X, y)) < 0.7 * first


def test_kl_clip_scales_every_block():
    apply, params = _apply_mlp, _params("mlp")
    X, y = _data("mlp")
    pre = Preconditioner(apply, estimator="kfac", fisher="exact")
    pre.refresh(params, X, y)
    g = jax.grad(_loss(apply))(params, X, y)
    cur = pre.curvature()
    plain, _ = pre.transform(damping=0.1).update(g, pre.transform(0.1).init(params), curvature=cur)
    kappa, lr = 1e-8, 0.5
    tx = pre.transform(damping=0.1, kl_clip=kappa, learning_rate=lr)
    clipped, _ = tx.update(g, tx.init(params), curvature=cur)
    quad = sum(float(jnp.sum(_block_view(plain[k]["kernel"], plain[k].get("bias"))
                              * _block_view(g[k]["kernel"], g[k].get("bias")))) for k in cur)
    nu = min(1.0, (kappa / (lr ** 2 * quad)) ** 0.5)
    assert nu < 1
    for k in cur:
        np.testing.assert_allclose(clipped[k]["kernel"], nu * plain[k]["kernel"], rtol=1e-10)


def test_custom_paths():
    def apply(params, x, tape):
        return tape.dense("fc", jnp.tanh(tape.dense("h", x, params["w1"], params["b1"])), params["w2"])
    k = jax.random.split(jax.random.PRNGKey(3), 2)
    params = {"w1": jax.random.normal(k[0], (5, 4)), "b1": jnp.zeros(4), "w2": jax.random.normal(k[1], (4, 3))}
    X, y = _data("mlp")
    with pytest.raises(ValueError, match=r"no params\['h'\]\['kernel'\]"):
        Preconditioner(apply).refresh(params, X, y)
    pre = Preconditioner(apply, {"h": (("w1",), ("b1",)), "fc": (("w2",), None)}, estimator="kfac",
                         fisher="exact")
    pre.refresh(params, X, y)
    g = {k: jnp.ones_like(v) for k, v in params.items()}
    out, _ = pre.transform(0.1).update(g, pre.transform(0.1).init(params), curvature=pre.curvature())
    V = jnp.concatenate([g["w1"].T, g["b1"][:, None]], axis=1)
    ref = pre.estimates["h"].solve(V, 0.1)
    np.testing.assert_allclose(jnp.concatenate([out["w1"].T, out["b1"][:, None]], axis=1), ref, rtol=1e-9)
    with pytest.raises(ValueError, match="kernel path"):
        Preconditioner(apply, {"h": "w1"})


def test_flax_variables_layout():
    """Flax's ``{"params": {layer: {"kernel", "bias"}}}`` is found without a mapping."""
    params = _params("mlp")
    X, y = _data("mlp")
    variables = {"params": {"hidden": params["hidden"], "out": params["out"]}}

    def apply(v, x, tape):
        return _apply_mlp(v["params"], x, tape)

    pre = Preconditioner(apply, estimator="kfac", fisher="exact")
    pre.refresh(variables, X, y)
    g = jax.tree_util.tree_map(jnp.ones_like, variables)
    out, _ = pre.transform(0.1).update(g, pre.transform(0.1).init(variables), curvature=pre.curvature())
    V = jnp.concatenate([g["params"]["hidden"]["kernel"].T, g["params"]["hidden"]["bias"][:, None]], axis=1)
    got = jnp.concatenate([out["params"]["hidden"]["kernel"].T, out["params"]["hidden"]["bias"][:, None]], axis=1)
    np.testing.assert_allclose(got, pre.estimates["hidden"].solve(V, 0.1), rtol=1e-9)


def test_errors_and_atomic_refresh():
    apply, params = _apply_mlp, _params("mlp")
    X, y = _data("mlp")
    with pytest.raises(ValueError, match="estimator"):
        Preconditioner(apply, estimator="sgd")
    with pytest.raises(ValueError, match="fisher"):
        Preconditioner(apply, fisher="true")
    for kw, what in (({"loss": "nll"}, "loss"), ({"reduction": "none"}, "reduction"),
                     ({"weight_sharing": "reduce"}, "weight_sharing"), ({"n_samples": 0}, "n_samples")):
        with pytest.raises(ValueError, match=what):
            Preconditioner(apply, **kw)
    pre = Preconditioner(apply, estimator="kfac", fisher="exact")
    with pytest.raises(RuntimeError, match="refresh"):
        pre.curvature()
    with pytest.raises(ValueError, match="damping"):
        pre.transform(damping=0.0)
    with pytest.raises(ValueError, match="learning_rate"):
        pre.transform(kl_clip=1e-3)
    pre.refresh(params, X, y)
    before = {k: np.asarray(e.left) for k, e in pre.estimates.items()}
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["out"]["kernel"] = bad["out"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError):
        pre.refresh(bad, X, y)
    assert pre.refreshes == 1
    for k, e in pre.estimates.items():
        np.testing.assert_array_equal(np.asarray(e.left), before[k])
    tx = pre.transform(0.1)
    with pytest.raises(ValueError, match="curvature"):
        tx.update(params, tx.init(params))
    wrong = dict(params, out={"kernel": jnp.ones((7, 3))})
    with pytest.raises(ValueError, match=r"layer 'out'.*\(3, 6\).*\(3, 7\)"):
        tx.update(wrong, tx.init(params), curvature=pre.curvature())
