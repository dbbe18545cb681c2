"""Streaming estimates (``RunningEstimate``): EMA of K-FAC/TKFAC/K-FOC factors and K-FOC_running.

The reference everywhere is the exact running sum ``S_t = a_t S_{t−1} + b_t F_t``, built as a
``KronSum`` with ``c * F`` and ``+`` (never densified unless a test says so), and its optimum
``kfoc(S_t)``.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kronsum as ks
from conftest import assert_same_backend, random_inputs

# every test here runs with the numba kernels on and off (see conftest.numba_path)
pytestmark = pytest.mark.usefixtures("numba_path")

ESTIMATORS = ("kfac", "tkfac", "kfoc_approx", "kfoc_running")
BATCH = {"kfac": ks.kfac, "tkfac": ks.tkfac, "kfoc_approx": ks.kfoc, "kfoc_running": ks.kfoc}


def running_sum(batches, run):
    """The exact ``S_t`` of ``run``'s weights, by the recursion, with ``c * F`` and ``+``."""
    S = None
    for t, F in enumerate(batches, 1):
        a, b = run.mixing_weights(t)
        S = b * F if S is None or a == 0 else a * S + b * F
    return S


def psd_terms(K, d, rng):
    X = rng.standard_normal((K, d, d))
    return X @ np.swapaxes(X, 1, 2)


def outer_stream(n_batches, K, m, n, seed, kind="heavy"):
    return [ks.KronSum.from_outer(*random_inputs("outer", K, m, n, seed=1000 * seed + i, kind=kind))
            for i in range(n_batches)]


def conv_stream(n_batches, K, T, m, n, seed, kind="gaussian"):
    return [ks.KronSum.from_conv(*random_inputs("conv", K, m, n, T=T, seed=1000 * seed + i, kind=kind))
            for i in range(n_batches)]


def rel_err(S, est):
    return float(ks.frobenius_error(S, est)) / float(S.frobenius_norm())


# -- backends --------------------------------------------------------------------------------


def test_backend_sweep(backend):
    """Every estimator on every backend: same numbers as NumPy, arrays of the caller's library."""
    rng = np.random.default_rng(0)
    raw = [(rng.standard_normal((5, 2)), rng.standard_normal((5, 3))) for _ in range(2)]
    for name in ESTIMATORS:
        ref = ks.RunningEstimate(name, decay=0.5)
        run = ks.RunningEstimate(name, decay=0.5)
        for G, A in raw:
            Gb, Ab = backend.asarray(G, "float64"), backend.asarray(A, "float64")
            ref_est = ref.update(ks.KronSum.from_outer(G, A))
            est = run.update(ks.KronSum.from_outer(Gb, Ab))
            assert np.array_equal(backend.to_numpy(Gb), G) and np.array_equal(backend.to_numpy(Ab), A)
        assert est.info.method == f"running/{name}"
        for got, want in ((est.left, ref_est.left), (est.right, ref_est.right),
                          (est.scale, ref_est.scale)):
            assert_same_backend(got, Gb, Gb.dtype)
            assert np.allclose(backend.to_numpy(got), want, rtol=1e-9, atol=1e-12)
        state = run.state_dict()
        for key in ("left", "right", "scale"):
            assert_same_backend(state[key], Gb, Gb.dtype)
        again = ks.RunningEstimate.from_state_dict(state)
        assert np.allclose(backend.to_numpy(again.estimate.to_dense()),
                           backend.to_numpy(est.to_dense()), rtol=0, atol=0)


def test_float32_stays_float32():
    G, A = random_inputs("outer", 6, 3, 4, seed=1)
    F = ks.KronSum.from_outer(G.astype(np.float32), A.astype(np.float32))
    for name in ESTIMATORS:
        run = ks.RunningEstimate(name, decay=0.9)
        run.update(F)
        est = run.update(F)
        assert est.left.dtype == est.right.dtype == est.scale.dtype == np.float32


# -- decay 0 is the batch estimator --------------------------------------------------------


@st.composite
def streams(draw):
    m, n = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    batches = []
    for _ in range(draw(st.integers(1, 3))):
        form = draw(st.sampled_from(["terms", "outer", "conv"]))
        K = draw(st.integers(1, 6))
        arrays = random_inputs(form, K, m, n, T=draw(st.integers(1, 3)),
                               seed=draw(st.integers(0, 2**31)))
        if form == "terms":
            arrays = tuple(a @ np.swapaxes(a, 1, 2) for a in arrays)
        batches.append(getattr(ks.KronSum, f"from_{form}")(*arrays))
    return batches


@given(streams(), st.sampled_from(ESTIMATORS), st.booleans())
def test_decay_zero_is_the_batch_estimator(batches, name, bias_correction):
    run = ks.RunningEstimate(name, decay=0.0, bias_correction=bias_correction)
    for F in batches:
        est = run.update(F)
        want = BATCH[name](F)
        assert np.array_equal(est.left, want.left) and np.array_equal(est.right, want.right)
        assert np.array_equal(est.scale, want.scale)
    assert run.batch_weights() == [0.0] * (len(batches) - 1) + [1.0]


def test_identical_batches_give_the_batch_estimate():
    F = ks.KronSum.from_conv(*random_inputs("conv", 4, 3, 5, T=3, seed=3))
    for name in ESTIMATORS:
        tight = {"tol": 1e-12} if name.startswith("kfoc") else {}  # the residual rule: factors compared
        want = BATCH[name](F, **tight).to_dense()
        for bc in (False, True):
            run = ks.RunningEstimate(name, decay=0.9, bias_correction=bc, **({"kfoc_options": tight} if tight else {}))
            for _ in range(4):
                est = run.update(F)
            assert np.allclose(est.to_dense(), want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


# -- the running sum and the EMAs ----------------------------------------------------------


@pytest.mark.parametrize("bias_correction", [False, True])
def test_running_sum_weights(bias_correction):
    run = ks.RunningEstimate("kfac", decay=0.8, bias_correction=bias_correction)
    batches = outer_stream(5, 4, 2, 3, seed=0)
    c = run.batch_weights(5)
    assert np.isclose(sum(c), 1.0) and min(c) > 0
    S = running_sum(batches, run)
    assert np.allclose(S.to_dense(), sum(ci * F.to_dense() for ci, F in zip(c, batches)))
    d = 0.8
    if bias_correction:
        assert np.allclose(c, [(1 - d) * d ** (5 - i) / (1 - d**5) for i in range(1, 6)])
    else:
        assert np.allclose(c, [d**4] + [(1 - d) * d ** (5 - i) for i in range(2, 6)])


@pytest.mark.parametrize("bias_correction", [False, True])
def test_kfac_ema_equals_kfac_of_the_running_sum_for_equal_batch_weights(bias_correction):
    # every batch has Σw = 8: the EMA of the means is then the mean of the running sum
    batches = outer_stream(3, 8, 3, 4, seed=1) + conv_stream(3, 8, 2, 3, 4, seed=1)
    run = ks.RunningEstimate("kfac", decay=0.7, bias_correction=bias_correction)
    for F in batches:
        run.update(F)
    S = running_sum(batches, run)
    assert np.allclose(run.estimate.to_dense(), ks.kfac(S).to_dense(), rtol=1e-10, atol=0)
    # and K-FAC's factors themselves are the EMA of the batch means (papers' Eq. (17)-(18))
    left = None
    for t, F in enumerate(batches, 1):
        a, b = run.mixing_weights(t)
        left = b * ks.kfac(F).left if left is None else a * left + b * ks.kfac(F).left
    assert np.allclose(run.estimate.left, left, rtol=1e-12)


def test_tkfac_ema_keeps_unit_traces_and_the_trace_of_the_running_sum():
    batches = outer_stream(6, 10, 3, 4, seed=2)
    for bc in (False, True):
        run = ks.RunningEstimate("tkfac", decay=0.9, bias_correction=bc)
        for F in batches:
            est = run.update(F)
        S = running_sum(batches, run)
        assert np.isclose(np.trace(est.left), 1.0) and np.isclose(np.trace(est.right), 1.0)
        assert np.isclose(float(est.trace()), float(S.trace()), rtol=1e-12)


def test_kfoc_approx_averages_unit_factors_and_sigma():
    batches = outer_stream(4, 10, 3, 4, seed=3)
    run = ks.RunningEstimate("kfoc_approx", decay=0.6)
    for F in batches:
        est = run.update(F)
    parts = [ks.kfoc(F) for F in batches]
    c = run.batch_weights()
    assert np.allclose(est.left, sum(ci * p.left for ci, p in zip(c, parts)))
    assert np.allclose(est.right, sum(ci * p.right for ci, p in zip(c, parts)))
    assert np.isclose(float(est.scale), sum(ci * float(p.scale) for ci, p in zip(c, parts)))


# -- K-FOC_running ---------------------------------------------------------------------------


@pytest.mark.parametrize("decay,bias_correction", [(0.5, False), (0.9, False), (0.9, True)])
def test_kfoc_running_recovers_a_shared_kronecker_structure(decay, bias_correction):
    """Batches of all three forms that share the left factor ``g gᵀ``: every batch, and so the
    running sum, is exactly Kronecker; only K-FOC_running is exact on it."""
    rng = np.random.default_rng(7)
    m, n = 3, 4
    g = rng.standard_normal(m)
    L0 = np.outer(g, g)
    batches = []
    for i in range(6):
        K = int(rng.integers(2, 7))
        c = np.abs(rng.standard_t(2.0, size=K)) + 0.1  # weights of very different totals
        form = ("terms", "outer", "conv")[i % 3]
        if form == "terms":
            F = ks.KronSum.from_terms(np.repeat(L0[None], K, axis=0), psd_terms(K, n, rng), c)
        elif form == "outer":
            F = ks.KronSum.from_outer(rng.standard_normal((K, 1)) * g, rng.standard_normal((K, n)), c)
        else:  # G_k = u_k gᵀ: X_k = G_kᵀ A_k = g (A_kᵀ u_k)ᵀ, so each term is g gᵀ ⊗ h hᵀ
            T = 3
            G = rng.standard_normal((K, T, 1)) * g
            F = ks.KronSum.from_conv(G, rng.standard_normal((K, T, n)), c)
        batches.append(F)
    runs = {name: ks.RunningEstimate(name, decay, bias_correction=bias_correction)
            for name in ESTIMATORS}
    for t, F in enumerate(batches, 1):
        for run in runs.values():
            run.update(F)
        S = running_sum(batches[:t], runs["kfac"])
        assert rel_err(S, ks.kfoc(S)) < 1e-7  # S_t is a Kronecker product
        est = runs["kfoc_running"].estimate
        assert rel_err(S, est) < 1e-7
        assert np.allclose(est.left, L0 / np.linalg.norm(L0), atol=1e-8)
    # the factor averages are not exact here (batch totals differ), which the test relies on
    assert rel_err(S, runs["kfac"].estimate) > 1e-3
    assert rel_err(S, runs["kfoc_approx"].estimate) > 1e-3


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_kfoc_running_warm_start(method):
    """Each update is ``kfoc(a·P + b·F, init=P)`` and costs a few applications; the warm start
    needs no more than a cold start from TKFAC's factor (at these tiny sizes about as many;
    on the benchmark cases about one fewer, see docs/streaming.md)."""
    batches = outer_stream(10, 24, 5, 6, seed=4)
    run = ks.RunningEstimate("kfoc_running", decay=0.9, kfoc_options={"method": method})
    warm, cold = [], []
    for t, F in enumerate(batches, 1):
        prev = run.estimate if t > 1 else None
        est = run.update(F)
        assert est.info.converged
        if prev is not None:
            a, b = run.mixing_weights(t)
            S = a * ks.KronSum.from_kron(prev) + b * F
            same = ks.kfoc(S, init=prev, method=method)  # what update did, exactly
            assert np.array_equal(same.left, est.left) and same.info.iterations == est.info.iterations
            warm.append(est.info.iterations)
            cold.append(ks.kfoc(S, method=method).info.iterations)
    assert np.mean(warm) <= np.mean(cold) + 0.5  # slack: one application on some BLAS
    if method == "lanczos":
        assert max(warm) <= 12


def _stream_errors(batches, decay):
    runs = {name: ks.RunningEstimate(name, decay) for name in ESTIMATORS}
    for F in batches:
        for run in runs.values():
            run.update(F)
    S = running_sum(batches, runs["kfac"])
    out = {name: rel_err(S, run.estimate) for name, run in runs.items()}
    out["optimum"] = rel_err(S, ks.kfoc(S))
    return out


@pytest.mark.parametrize("kind,make", [
    ("outer-heavy", lambda seed: outer_stream(8, 16, 4, 5, seed, kind="heavy")),
    ("outer-gaussian", lambda seed: outer_stream(8, 16, 4, 5, seed, kind="gaussian")),
    ("conv-gaussian", lambda seed: conv_stream(8, 8, 3, 4, 5, seed, kind="gaussian")),
])
def test_random_streams_kfoc_running_against_the_factor_averages(kind, make, record_property):
    """Relative error to the true running sum S_t after 8 batches (decay 0.9), 6 seeds.

    The optimum kfoc(S_t) is below every estimator in every run; K-FOC_running is better than
    K-FAC's and K-FOC_approx's averages on average (numbers in docs/streaming.md).
    """
    rows = [_stream_errors(make(seed), 0.9) for seed in range(6)]
    for r in rows:
        for name in ESTIMATORS:
            assert r["optimum"] <= r[name] * (1 + 1e-9) + 1e-12
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    record_property("mean_relative_errors", mean)
    print(kind, {k: round(v, 4) for k, v in mean.items()})
    assert mean["kfoc_running"] <= mean["kfac"]
    assert mean["kfoc_running"] <= mean["kfoc_approx"]
    assert mean["kfoc_running"] <= mean["optimum"] * 1.05


# -- update_every -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ESTIMATORS)
def test_update_every_uses_the_batch_of_every_T_th_call(name):
    batches = outer_stream(7, 6, 2, 3, seed=5)
    every = ks.RunningEstimate(name, decay=0.8, update_every=3)
    ref = ks.RunningEstimate(name, decay=0.8)
    for i, F in enumerate(batches):
        before = None if i == 0 else every.estimate.to_dense()
        est = every.update(F)
        if i % 3 == 0:
            want = ref.update(F)
            assert np.array_equal(est.to_dense(), want.to_dense())
        else:
            assert np.array_equal(est.to_dense(), before)
    assert (every.step, every.num_updates) == (7, 3)
    with pytest.raises(ValueError, match="factor sizes"):  # skipped calls are still checked
        every.update(ks.KronSum.from_outer(np.ones((2, 3)), np.ones((2, 3))))


# -- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ESTIMATORS)
def test_state_dict_round_trip_continues_identically(backend, name):
    if backend.name == "dask":
        pytest.skip("slow (every kfoc computes); dask's round trip is in test_backend_sweep")
    batches = [(G, A) for G, A in (random_inputs("outer", 6, 3, 2, seed=s) for s in range(7))]
    mk = lambda G, A: ks.KronSum.from_outer(backend.asarray(G, "float64"), backend.asarray(A, "float64"))
    run = ks.RunningEstimate(name, decay=0.9, update_every=2, bias_correction=True)
    for G, A in batches[:3]:
        run.update(mk(G, A))
    state = run.state_dict()
    assert (state["step"], state["num_updates"]) == (3, 2)
    saved = {k: backend.to_numpy(state[k]).copy() for k in ("left", "right", "scale")}
    restored = ks.RunningEstimate.from_state_dict(state)
    for G, A in batches[3:]:
        applied = run.step % run.update_every == 0
        a, b = run.update(mk(G, A)), restored.update(mk(G, A))
        for x, y in ((a.left, b.left), (a.right, b.right), (a.scale, b.scale)):
            assert np.array_equal(backend.to_numpy(x), backend.to_numpy(y))
        if applied:  # diagnostics are not state: they agree from the next applied update on
            assert a.info == b.info
    # the saved arrays were never written to
    for k, v in saved.items():
        assert np.array_equal(backend.to_numpy(state[k]), v)


def test_state_dict_before_any_update_and_load_into_existing():
    run = ks.RunningEstimate("tkfac", decay=0.5)
    state = run.state_dict()
    assert state["left"] is None and state["num_updates"] == 0
    other = ks.RunningEstimate("tkfac", decay=0.5)
    other.update(ks.KronSum.from_outer(np.ones((2, 2)), np.ones((2, 2))))
    other.load_state_dict(state)
    assert other.num_updates == 0
    with pytest.raises(RuntimeError, match="no estimate yet"):
        other.estimate


def test_load_state_dict_validates():
    run = ks.RunningEstimate("kfoc_running", decay=0.9)
    run.update(ks.KronSum.from_outer(*random_inputs("outer", 5, 2, 3, seed=0)))
    good = run.state_dict()
    fresh = lambda: ks.RunningEstimate("kfoc_running", decay=0.9)
    with pytest.raises(ValueError, match="missing keys"):
        fresh().load_state_dict({k: v for k, v in good.items() if k != "scale"})
    with pytest.raises(ValueError, match="unexpected keys"):
        fresh().load_state_dict(dict(good, extra=1))
    with pytest.raises(ValueError, match="decay"):
        ks.RunningEstimate("kfoc_running", decay=0.8).load_state_dict(good)
    with pytest.raises(ValueError, match="estimator"):
        ks.RunningEstimate("kfac", decay=0.9).load_state_dict(good)
    with pytest.raises(ValueError, match=r"\(m, m\).*\(2, 3\)"):
        fresh().load_state_dict(dict(good, left=np.ones((2, 3))))
    with pytest.raises(ValueError, match="0-d"):
        fresh().load_state_dict(dict(good, scale=np.ones(1)))
    with pytest.raises(ValueError, match="num_updates"):
        fresh().load_state_dict(dict(good, num_updates=3))
    with pytest.raises(TypeError, match="array"):
        fresh().load_state_dict(dict(good, right=[[1.0]]))
    with pytest.raises(TypeError, match="dtype"):
        fresh().load_state_dict(dict(good, scale=np.float32(1.0) * np.ones((), np.float32)))
    with pytest.raises(ValueError, match="NaN"):
        fresh().load_state_dict(dict(good, left=np.full((2, 2), np.nan)))
    with pytest.raises(TypeError, match="mapping"):
        fresh().load_state_dict([1, 2])


# -- input checks ---------------------------------------------------------------------------------


def test_input_errors():
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="decay"):
            ks.RunningEstimate("kfac", decay=bad)
    for bad in (True, "0.9", None):  # not a number: the wrong kind
        with pytest.raises(TypeError, match="decay"):
            ks.RunningEstimate("kfac", decay=bad)
    with pytest.raises(ValueError, match="estimator must be one of"):
        ks.RunningEstimate("kfoc")
    for bad in (0, -1):
        with pytest.raises(ValueError, match="update_every"):
            ks.RunningEstimate("kfac", update_every=bad)
    for bad in (1.5, True):
        with pytest.raises(TypeError, match="update_every"):
            ks.RunningEstimate("kfac", update_every=bad)
    with pytest.raises(TypeError, match="bias_correction"):
        ks.RunningEstimate("kfac", bias_correction="yes")
    with pytest.raises(ValueError, match="init"):
        ks.RunningEstimate("kfoc_running", kfoc_options={"init": "kfac"})
    run = ks.RunningEstimate("kfac")
    with pytest.raises(RuntimeError, match="update"):
        run.estimate
    with pytest.raises(TypeError, match="KronSum"):
        run.update(np.eye(4))
    run.update(ks.KronSum.from_outer(np.ones((2, 2)), np.ones((2, 3))))
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(2, 3\)"):
        run.update(ks.KronSum.from_outer(np.ones((2, 3)), np.ones((2, 3))))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="torch"):
        run.update(ks.KronSum.from_outer(torch.ones((2, 2), dtype=torch.float64),
                                         torch.ones((2, 3), dtype=torch.float64)))
    with pytest.raises(TypeError, match="float32"):
        run.update(ks.KronSum.from_outer(np.ones((2, 2), np.float32), np.ones((2, 3), np.float32)))
    assert run.step == 1  # rejected batches do not count
    with pytest.raises(ValueError, match="t must be"):
        run.mixing_weights(0)


def test_kfoc_options_reach_kfoc():
    batches = outer_stream(3, 8, 3, 4, seed=6)
    run = ks.RunningEstimate("kfoc_running", decay=0.9, kfoc_options={"method": "gram", "tol": 1e-6})
    est = run.update(batches[0])
    assert est.info.method == "running/kfoc_running" and est.info.converged
    for F in batches[1:]:
        est = run.update(F)  # the combination is solved by Lanczos
        assert est.info.converged and est.info.residual <= 1e-6
    approx = ks.RunningEstimate("kfoc_approx", decay=0.9, kfoc_options={"method": "power"})
    approx.update(batches[0])
    assert approx.estimate.info.iterations == ks.kfoc(batches[0], method="power").info.iterations


def test_repr():
    run = ks.RunningEstimate("kfac", decay=0.5)
    assert "num_updates=0" in repr(run)
    run.update(ks.KronSum.from_outer(np.ones((2, 2)), np.ones((2, 3))))
    assert "m=2, n=3" in repr(run)


def test_running_report_quick_writes_records(tmp_path, capsys):
    """Smoke test of benchmarks/running_report.py (the table in docs/streaming.md)."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "running_report.py"
    spec = importlib.util.spec_from_file_location("running_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "running.json"
    mod.main(["--quick", "--repeat", "5", "--json", str(out)])
    records = json.loads(out.read_text())
    assert {r["method"] for r in records} == set(ESTIMATORS)
    assert all({"case", "method", "median_s", "peak_mib"} <= set(r) and r["median_s"] > 0
               for r in records)
    for r in records:
        if r["method"] == "kfoc_running":
            assert r["iterations"]["max"] >= 1
            assert r["rel_err_optimum"] <= r["rel_err"] * (1 + 1e-9) + 1e-12
    assert "| case | method |" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["auto", "lanczos"])  # Lanczos symmetrises when told to
def test_kfoc_running_knows_when_its_estimate_is_symmetric(method):
    """The previous estimate enters kfoc_running flagged symmetric only while every batch was
    symmetric (no scan of its factors); a non-symmetric terms batch, or a restore (unknown:
    scanned), must give the same answer as building the combination by hand."""
    rng = np.random.default_rng(7)
    outer = lambda: ks.KronSum.from_outer(rng.standard_normal((12, 3)), rng.standard_normal((12, 4)))  # noqa: E731
    skew = ks.KronSum.from_terms(rng.standard_normal((5, 3, 3)), rng.standard_normal((5, 4, 4)))
    assert not skew.symmetric
    run = ks.RunningEstimate("kfoc_running", decay=0.6, kfoc_options={"method": method, "tol": 1e-10})
    e1 = run.update(outer())
    assert run._symmetric is True
    for batch, sym in ((skew, False), (outer(), False)):
        a, b = run.mixing_weights(run.num_updates + 1)
        ref = ks.kfoc(a * ks.KronSum.from_kron(e1) + b * batch, method=method, tol=1e-10)
        e1 = run.update(batch)
        assert run._symmetric is sym
        np.testing.assert_allclose(e1.to_dense(), ref.to_dense(), atol=1e-9 * np.abs(ref.to_dense()).max())
    restored = ks.RunningEstimate.from_state_dict(run.state_dict(), kfoc_options={"method": method, "tol": 1e-10})
    assert restored._symmetric is None
    last = outer()
    np.testing.assert_allclose(restored.update(last).to_dense(), run.update(last).to_dense(), rtol=1e-12, atol=1e-14)


# -- the in-place EMA ------------------------------------------------------------------------


@given(st.floats(1e-6, 1.0), st.floats(1e-6, 1.0), st.booleans(), st.sampled_from(["float32", "float64"]),
       st.floats(-30, 30))
def test_mix_is_the_weighted_sum_and_leaves_old_alone(a, b, reuse, dtype, log_scale):
    """``_mix(a, old, b, new)`` = ``a·old + b·new`` for any positive weights (either larger) and
    entries of any scale; ``old`` is never written, ``new`` only with ``reuse_new=True``."""
    from kronsum._running import _mix

    rng = np.random.default_rng(0)
    old = (rng.standard_normal((4, 4)) * 10.0**log_scale).astype(dtype)
    new = (rng.standard_normal((4, 4)) * 10.0**log_scale).astype(dtype)
    old0, new0 = old.copy(), new.copy()
    got = _mix(a, old, b, new, reuse_new=reuse)
    want = a * old0.astype(np.float64) + b * new0.astype(np.float64)
    tol = 8 * np.finfo(dtype).eps * (a * np.abs(old0) + b * np.abs(new0))
    assert got.dtype == np.dtype(dtype) and np.all(np.isfinite(got))
    assert np.all(np.abs(got - want) <= tol)
    assert np.array_equal(old, old0)
    if not reuse:
        assert np.array_equal(new, new0)
    elif b <= a:  # no allocation: the result is new's memory
        assert got is new


def test_mix_does_not_overflow_for_lopsided_weights():
    """The smaller weight is divided by the larger: entries near float32's limit and weights
    1e-30 apart stay finite (``(a/b)·old`` with ``a ≫ b`` would overflow)."""
    from kronsum._running import _mix

    x = np.full((2, 2), 1e37, dtype=np.float32)
    for a, b in ((1.0, 1e-30), (1e-30, 1.0)):
        for reuse in (False, True):
            got = _mix(a, x.copy(), b, x.copy(), reuse_new=reuse)
            assert np.all(np.isfinite(got)) and np.allclose(got, (a + b) * 1e37, rtol=1e-6)
    # equal weights: the intermediate is the result / max(a, b), finite below max(a, b)·max
    y = np.full((2, 2), 1.6e38, dtype=np.float32)
    for reuse in (False, True):
        got = _mix(0.5, y.copy(), 0.5, y.copy(), reuse_new=reuse)
        assert np.all(np.isfinite(got)) and np.allclose(got, 1.6e38, rtol=1e-6)


# (0.9, False): b_t < a_t from the second update; (0.9, True): b_t > a_t at t = 2, then below
@pytest.mark.parametrize("decay,bias_correction", [(0.9, False), (0.9, True)])
@pytest.mark.parametrize("form", ["outer", "conv", "terms"])
def test_updates_never_write_to_earlier_estimates_or_batches(backend, form, decay, bias_correction):
    """The EMA mixes into the fresh factors of the batch estimate (kfac) or into one new array:
    an estimate a caller kept, and every batch's statistics and weights, hold the same numbers
    after later updates (decays with the batch weight above and below the old one; unequal
    weights, so that every branch of the weighted Gram product runs)."""
    if backend.name == "dask" and (form, bias_correction) != ("outer", False):
        pytest.skip("Dask arrays have no in-place operators (the mix rebinds): one case suffices")
    rng = np.random.default_rng(3)
    raw = [random_inputs(form, 6, 3, 4, T=2, seed=40 + i) + (rng.uniform(0.5, 2.0, 6),)
           for i in range(4)]
    make = getattr(ks.KronSum, f"from_{form}")
    for name in ESTIMATORS:
        run = ks.RunningEstimate(name, decay=decay, bias_correction=bias_correction)
        kept, batches = [], []
        for arrays in raw:
            on = [backend.asarray(a, "float64") for a in arrays]
            # copies: a backend may share the NumPy arrays' memory (torch.asarray does)
            batches.append((on, [a.copy() for a in arrays]))
            est = run.update(make(*on))
            kept.append((est, [backend.to_numpy(x).copy() for x in (est.left, est.right, est.scale)]))
        for est, copies in kept:
            for x, c in zip((est.left, est.right, est.scale), copies):
                assert np.array_equal(backend.to_numpy(x), c), name
        for on, copies in batches:
            for a, c in zip(on, copies):
                assert np.array_equal(backend.to_numpy(a), c), name


@pytest.mark.parametrize("bias_correction", [False, True])
def test_kfac_takes_each_batch_as_its_kfac_estimate(backend, bias_correction):
    """``RunningEstimate("kfac").update`` takes a batch's own K-FAC estimate (a ``Kron``, as
    ``collect_kfac`` gives it) as well as its statistics: the same running estimate either
    way, and the caller's ``Kron`` is never written to."""
    batches = [ks.KronSum.from_outer(*(backend.asarray(a, "float64") for a in
                                       random_inputs("outer", 7, 3, 4, seed=60 + i)),
                                     backend.asarray(np.linspace(0.5, 2.0, 7), "float64"))
               for i in range(4)]
    by_sum = ks.RunningEstimate("kfac", decay=0.8, bias_correction=bias_correction)
    by_kron = ks.RunningEstimate("kfac", decay=0.8, bias_correction=bias_correction)
    given = []
    for F in batches:
        want = by_sum.update(F)
        K = ks.kfac(F)
        given.append((K, [backend.to_numpy(x).copy() for x in (K.left, K.right, K.scale)]))
        got = by_kron.update(K)
        assert_same_backend(got.left, F.G)
        for a, b in ((got.left, want.left), (got.right, want.right), (got.scale, want.scale)):
            np.testing.assert_allclose(backend.to_numpy(a), backend.to_numpy(b), rtol=1e-12, atol=0)
    assert by_kron.num_updates == 4 and by_kron.estimate.info.method == "running/kfac"
    for K, copies in given:
        for x, c in zip((K.left, K.right, K.scale), copies):
            assert np.array_equal(backend.to_numpy(x), c)


def test_a_kron_batch_is_refused_where_the_statistics_are_needed():
    F = ks.KronSum.from_outer(np.ones((2, 2)), np.ones((2, 3)))
    for name in ("tkfac", "kfoc_approx", "kfoc_running", "ekfac"):
        with pytest.raises(TypeError, match=rf"Kron.*{name}.*KronSum"):
            ks.RunningEstimate(name).update(ks.kfac(F))
    run = ks.RunningEstimate("kfac")
    run.update(ks.kfac(F))
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(2, 3\)"):
        run.update(ks.Kron(np.eye(3), np.eye(3)))
    with pytest.raises(TypeError, match="float32"):
        run.update(ks.Kron(np.eye(2, dtype=np.float32), np.eye(3, dtype=np.float32)))
    assert run.step == 1


def test_a_kron_batch_is_copied_where_it_becomes_the_state():
    """The first update keeps the batch's estimate as the state: a caller who reuses its
    ``Kron``'s arrays afterwards does not change the running estimate."""
    F = ks.KronSum.from_outer(*random_inputs("outer", 6, 3, 4, seed=5))
    K = ks.kfac(F)
    run = ks.RunningEstimate("kfac", decay=0.9)
    want = run.update(K).to_dense().copy()
    K.left[...] = 7.0
    K.right[...] = -1.0
    assert np.array_equal(run.estimate.to_dense(), want)
