"""Bad and extreme input: clear errors naming the argument, and finite answers over the whole
range of the dtype (opposite scales that cancel, entries near the largest or the smallest
number), or an OverflowError when the answer itself does not fit."""

import math

import numpy as np
import pytest

import kronsum as ks


def _outer(seed=0, K=9, m=3, n=4):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((K, m)), rng.standard_normal((K, n))


# -- Kron(scale=...) -------------------------------------------------------------------------


@pytest.mark.parametrize("bad, kind", [
    (None, TypeError), (1 + 2j, TypeError), ("x", TypeError), (True, TypeError),
    (np.array([1.0, 2.0]), ValueError), (np.array([1 + 1j]), TypeError),
])
def test_kron_scale_is_validated(bad, kind):
    with pytest.raises(kind, match="scale"):
        ks.Kron(np.eye(2), np.eye(3), scale=bad)


def test_kron_scale_of_another_library_is_named():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"scale .*torch"):
        ks.Kron(np.eye(2), np.eye(3), scale=torch.tensor(2.0))


def test_kron_scale_accepts_numbers_and_one_entry_arrays():
    for good in (2, 2.0, np.float32(2.0), np.int64(2), np.array(2.0), np.array([2.0]), np.array(2)):
        K = ks.Kron(np.eye(2), np.eye(3), scale=good)
        assert K.scale.shape == () and float(K.scale) == 2.0 and K.scale.dtype == np.float64


# -- opposite scales that cancel, and inputs at the ends of the range -----------------------


@pytest.mark.parametrize("cg, ca", [(1e200, 1e-200), (1e-200, 1e200), (2.0**1000, 2.0**-1000)])
def test_cancelling_scales_match_the_unscaled_problem(cg, ca):
    G, A = _outer()
    F0 = ks.KronSum.from_outer(G, A)
    F = ks.KronSum.from_outer(G * cg, A * ca)  # the same F up to rounding of the products
    for name in ("kfoc", "tkfac", "nearest_kronecker"):
        got, want = getattr(ks, name)(F), getattr(ks, name)(F0)
        assert np.isfinite(float(got.scale)), name
        np.testing.assert_allclose(got.to_dense(), want.to_dense(), rtol=1e-9, atol=1e-9 * float(want.scale))
    assert math.isclose(float(F.trace()), float(F0.trace()), rel_tol=1e-12)
    assert math.isclose(float(F.frobenius_norm()), float(F0.frobenius_norm()), rel_tol=1e-12)
    est = ks.kfac(F0)
    assert math.isclose(float(ks.frobenius_error(F, est)), float(ks.frobenius_error(F0, est)), rel_tol=1e-9)
    # kfac's own factors (means of the statistics) do not fit: a clear error, not NaN
    with pytest.raises(OverflowError, match="kfac's (left|right) factor"):
        ks.kfac(F)


def test_frobenius_error_of_an_underflowing_sum_is_finite():
    G, A = _outer()
    F = ks.KronSum.from_outer(G * 1e-300, A)  # entries ~1e-600: zero in float64
    est = ks.kfoc(F)
    assert float(est.scale) == 0.0 and est.info.degenerate
    for rel in (False, True):
        assert np.isfinite(float(ks.frobenius_error(F, est, relative=rel)))
    # a representable but tiny F: the relative error is that of the unscaled problem
    F2, F0 = ks.KronSum.from_outer(G * 1e-150, A * 1e-10), ks.KronSum.from_outer(G, A)
    assert math.isclose(float(ks.frobenius_error(F2, ks.kfoc(F2), relative=True)),
                        float(ks.frobenius_error(F0, ks.kfoc(F0), relative=True)), rel_tol=1e-6)


@pytest.mark.parametrize("dtype, big", [(np.float64, 1e150), (np.float32, 1e20)])
def test_a_sum_beyond_the_range_raises_overflow_error(dtype, big):
    G, A = _outer()
    F = ks.KronSum.from_outer((G * big).astype(dtype), (A * big).astype(dtype))
    for call in (ks.kfoc, ks.tkfac, ks.nearest_kronecker, lambda F: F.trace(), lambda F: F.frobenius_norm(),
                 lambda F: ks.kfoc(F, method="power"), lambda F: ks.kfoc(F, method="lanczos")):
        with pytest.raises(OverflowError, match="beyond the range of float"):
            call(F)


@pytest.mark.parametrize("G, A, w", [
    ([[1e308]], [[1e-300]], None),                      # largest entry ≥ 2^1023
    ([[2.0**1023, -2.0**1022]], [[2.0**-1000, 2.0**-1001]], None),
    (None, None, 1e308),                                 # huge weights with small G
])
def test_largest_entries_near_the_top_of_the_range(G, A, w):
    if G is None:
        G0, A0 = _outer()
        G, A, w = G0 * 1e-100, A0, np.full(G0.shape[0], w)
        F0 = ks.KronSum.from_outer(G0, A0)
        factor = 1e308 * 1e-200
    else:
        G, A = np.array(G), np.array(A)
        F0 = ks.KronSum.from_outer(G / 2.0**500 if G.max() > 1e300 else G, A * 2.0**500 if G.max() > 1e300 else A)
        factor = 1.0
    F = ks.KronSum.from_outer(G, A, w)
    for name in ("kfoc", "tkfac", "nearest_kronecker"):
        got, want = getattr(ks, name)(F), getattr(ks, name)(F0)
        assert math.isclose(float(got.scale), factor * float(want.scale), rel_tol=1e-9), name
    assert math.isclose(float(F.trace()), factor * float(F0.trace()), rel_tol=1e-12)


def test_infinite_or_nan_factor_of_a_sum_is_refused():
    F = ks.KronSum.from_outer(*_outer())
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="c·F"):
            bad * F
    with pytest.raises(TypeError, match="c·F"):
        F.scaled("2")
    assert np.allclose((np.float32(2.0) * F).to_dense(), 2 * F.to_dense())


# -- notes of degenerate cases ---------------------------------------------------------------


def _tied_sum():
    """σ1 = σ2 = 1 > σ3 = 0: two orthonormal Kronecker terms of equal weight."""
    L = np.stack([np.diag([1.0, 0.0]), np.diag([0.0, 1.0])])
    R = np.stack([np.diag([1.0, 0.0, 0.0]), np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]]) / np.sqrt(2)])
    return ks.KronSum.from_terms(L, R)


@pytest.mark.parametrize("call", [
    lambda F: ks.kfoc(F, method="power", init="random", seed=0),
    lambda F: ks.kfoc(F, method="power"),
    lambda F: ks.kfoc(F, method="gram", init="random", seed=0),
    lambda F: ks.nearest_kronecker(F),
], ids=["power-random", "power", "gram-random", "svd"])
def test_ties_are_noted(call):
    est = call(_tied_sum())
    assert any("sigma1 == sigma2" in note for note in est.info.notes), est.info.notes
    assert math.isclose(float(est.scale), 1.0, rel_tol=1e-8)


def test_kfac_of_zero_statistics_with_weights_is_noted():
    for G, A in ((np.zeros((3, 2)), np.ones((3, 2))), (np.ones((3, 2)), np.zeros((3, 2)))):
        est = ks.kfac(ks.KronSum.from_outer(G, A))
        assert est.info.degenerate and "statistics are all zero" in est.info.notes[0]
        assert np.all(est.to_dense() == 0)


# -- errors that name the argument -----------------------------------------------------------


def test_errors_name_the_argument():
    G, A = _outer()
    F = ks.KronSum.from_outer(G, A)
    with pytest.raises(TypeError, match="from_kron takes a kronsum.Kron"):
        ks.KronSum.from_kron(np.eye(3))
    with pytest.raises(TypeError, match="seed"):
        ks.kfoc(F, init="random", seed="x")
    with pytest.raises(ValueError, match="seed"):
        ks.kfoc(F, init="random", seed=-1)
    with pytest.raises(TypeError, match=r"weights must be real numbers, got 'a'"):
        ks.KronSum.from_outer(G, A, ["a"] * 9)
    with pytest.raises(TypeError, match=r"weights must be real numbers, got None"):
        ks.KronSum.from_outer(G, A, [None] * 9)
    with pytest.raises(TypeError, match=r"G must have a real floating dtype.*non-numeric dtype object"):
        ks.KronSum.from_outer(G.astype(object), A)
    with pytest.raises(TypeError, match=r"G must have a real floating dtype.*boolean"):
        ks.KronSum.from_outer(G > 0, A)


@pytest.mark.parametrize("option, bad, kind", [
    ("tol", True, TypeError), ("max_iter", True, TypeError), ("max_iter", 2.0, TypeError),
    ("max_iter", 0, ValueError), ("tol", float("nan"), ValueError), ("tol", "1e-3", TypeError),
    ("accuracy", False, TypeError), ("accuracy", float("inf"), ValueError),
])
def test_numeric_options_of_kfoc(option, bad, kind):
    F = ks.KronSum.from_outer(*_outer())
    with pytest.raises(kind, match=option):
        ks.kfoc(F, **{option: bad})


def test_numpy_integers_are_integers():
    F = ks.KronSum.from_outer(*_outer())
    assert ks.kfoc(F, max_iter=np.int64(50)).info.converged
    assert ks.kronecker_svd(F, rank=np.int32(2), max_iter=np.int64(200)).rank == 2


# -- streaming state ---------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["kfac", "kfoc_running", "kfoc_approx"])
def test_state_dict_with_a_negative_scale_is_refused(estimator):
    F = ks.KronSum.from_outer(*_outer())
    run = ks.RunningEstimate(estimator)
    run.update(F)
    state = run.state_dict()
    bad = dict(state, scale=-state["scale"])
    with pytest.raises(ValueError, match=r"state\['scale'\] must be >= 0"):
        ks.RunningEstimate.from_state_dict(bad)
    fresh = ks.RunningEstimate(estimator)
    with pytest.raises(ValueError, match=r"state\['scale'\]"):
        fresh.load_state_dict(bad)
    assert fresh.num_updates == 0 and fresh.step == 0  # refused: nothing restored


def test_kfoc_options_are_checked_when_given():
    for opts, kind in (({"tol": True}, TypeError), ({"max_iter": 0}, ValueError),
                       ({"seed": "x"}, TypeError), ({"accuracy": -1.0}, ValueError)):
        with pytest.raises(kind, match="kfoc_options"):
            ks.RunningEstimate("kfoc_running", kfoc_options=opts)


# -- the PyTorch adapter's precondition --------------------------------------------------------


def test_precondition_is_atomic_and_names_the_layer():
    torch = pytest.importorskip("torch")
    kt = pytest.importorskip("kronsum.adapters.torch")
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    X = torch.randn(8, 3, dtype=torch.float64)
    net(X).square().sum().backward()
    before = {k: p.grad.clone() for k, p in net.named_parameters()}
    good = ks.Kron(torch.eye(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    wrong_size = ks.Kron(torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    singular = ks.Kron(torch.zeros(2, 2, dtype=torch.float64), torch.eye(5, dtype=torch.float64))
    for later, damping, kind, match in ((wrong_size, 0.1, ValueError, "layer '2'"),
                                        (singular, 0.0, ValueError, "singular"),
                                        ("not a Kron", 0.1, TypeError, r"estimates\['2'\]")):
        with pytest.raises(kind, match=match):
            kt.precondition(net, {"0": good, "2": later}, damping)
        for k, p in net.named_parameters():  # the first layer was not rewritten either
            assert torch.equal(p.grad, before[k]), k
    with pytest.raises(ValueError, match=r"layer '1' \(ReLU\) has no weight"):
        kt.precondition(net, {"0": good, "1": good}, 0.1)
    with pytest.raises(ValueError, match="no submodule 'x'"):
        kt.precondition(net, {"x": good}, 0.1)
    with pytest.raises(TypeError, match="damping"):
        kt.precondition(net, {"0": good}, "0.1")
    for k, p in net.named_parameters():
        assert torch.equal(p.grad, before[k]), k


# -- KronSVD's damped inverses over many dampings ------------------------------------------------


def test_kronsvd_reuses_the_decomposition_and_bounds_its_cache(monkeypatch):
    import gc

    rng = np.random.default_rng(5)
    F = ks.KronSum.from_outer(rng.standard_normal((40, 4)), rng.standard_normal((40, 5)))
    V = rng.standard_normal((4, 5))
    for rank in (1, 3):
        B = ks.kronecker_svd(F, rank=rank)
        calls = []
        eigh = np.linalg.eigh
        monkeypatch.setattr(np.linalg, "eigh", lambda *a, **k: calls.append(1) or eigh(*a, **k))
        dampings = [10.0 ** (k / 10) for k in range(60)]
        answers = [B.solve(V, lam) for lam in dampings]
        monkeypatch.undo()
        assert len(calls) <= 2, (rank, len(calls))  # the leading term's two decompositions, once
        gc.collect()
        alive = sum(type(o) is ks.KronInverse for o in gc.get_objects())
        assert alive <= 16, alive  # a bounded cache, not one entry per damping
        # the cached route gives the answers of a fresh object
        for lam, X in zip(dampings[::17], answers[::17]):
            np.testing.assert_allclose(X, ks.kronecker_svd(F, rank=rank).solve(V, lam), rtol=1e-10, atol=1e-12)
        del B, answers


def test_other_numeric_options_share_the_validator():
    F = ks.KronSum.from_outer(*_outer())
    K = ks.kfac(F)
    for call, name in ((lambda: F.to_dense(max_elements=True), "max_elements"),
                       (lambda: ks.nearest_kronecker(F, max_elements="big"), "max_elements"),
                       (lambda: K.sample(True, damping=0.1), "n"),
                       (lambda: ks.kronecker_svd(F, rank=2).solve(np.ones((3, 4)), 0.1, max_iter=True), "max_iter"),
                       (lambda: ks.set_config(check_every=2.0), "check_every")):
        with pytest.raises(TypeError, match=name):
            call()
    with ks.config(check_every=np.int64(2)):
        assert ks.get_config()["check_every"] == 2
    assert F.to_dense(max_elements=np.int64(10**6)).shape == (12, 12)


def test_float32_norm_of_entries_inside_the_float64_window():
    """Entries of 7e7 (inside the window float64 leaves unscaled) with weights of 2e3: the squared
    norm's fourth powers leave float32's range although ‖F‖ ≈ 3e19 fits it."""
    G, A, w = np.array([[-1.9256955]]), np.array([[7.1623944e7]]), np.array([1922.9741])
    F64 = ks.KronSum.from_outer(G, A, w)
    F32 = ks.KronSum.from_outer(G.astype(np.float32), A.astype(np.float32), w.astype(np.float32))
    for f in (lambda F: F.frobenius_norm(), lambda F: F.trace(), lambda F: ks.kfoc(F).scale):
        assert math.isclose(float(f(F32)), float(f(F64)), rel_tol=1e-5)


def test_kfoc_in_float64_of_a_float32_sum_beyond_float32():
    G, A = _outer()
    F = ks.KronSum.from_outer((G * 1e12).astype(np.float32), (A * 1e12).astype(np.float32))
    with pytest.raises(OverflowError, match="float32"):  # σ₁ ~ 1e49 has no float32 scale
        ks.kfoc(F, precision="float64")
    F = ks.KronSum.from_outer((G * 1e12).astype(np.float32), (A * 1e-12).astype(np.float32))
    est, ref = ks.kfoc(F, precision="float64"), ks.kfoc(ks.KronSum.from_outer(G, A))
    assert math.isclose(float(est.scale), float(ref.scale), rel_tol=1e-5)


@pytest.mark.parametrize("estimator", ["kfac", "tkfac", "kfoc_running", "kfoc_approx"])
def test_a_failing_batch_leaves_the_running_estimate_as_it_was(estimator):
    G, A = _outer()
    run = ks.RunningEstimate(estimator, decay=0.5)
    first = run.update(ks.KronSum.from_outer(G, A))
    before = (run.step, run.num_updates, float(first.scale), np.array(first.left))
    bad = ks.KronSum.from_outer(G * 1e150, A * 1e150) if estimator != "kfac" else \
        ks.KronSum.from_outer(G * 1e200, A * 1e-200)
    with pytest.raises(OverflowError):
        run.update(bad)
    est = run.estimate
    assert (run.step, run.num_updates, float(est.scale)) == before[:3]
    np.testing.assert_array_equal(est.left, before[3])


def test_kron_scale_may_be_a_numpy_scalar_for_any_library():
    torch = pytest.importorskip("torch")
    K = ks.Kron(torch.eye(2, dtype=torch.float64), torch.eye(3, dtype=torch.float64), scale=np.float32(2.0))
    assert isinstance(K.scale, torch.Tensor) and float(K.scale) == 2.0


def test_a_zero_side_with_huge_other_inputs_is_a_zero_sum():
    G, A = _outer()
    Z = ks.KronSum.from_outer(np.zeros_like(G), A * 1e300, np.full(G.shape[0], 1e308))
    assert float(Z.trace()) == 0.0 and float(Z.frobenius_norm()) == 0.0
    for name in ("kfoc", "tkfac", "nearest_kronecker"):
        est = getattr(ks, name)(Z)
        assert float(est.scale) == 0.0 and est.info.degenerate, name
    # as a part of a sum it neither dominates nor hides the other part
    F0 = ks.KronSum.from_outer(G, A)
    S = Z + F0
    for name in ("kfoc", "tkfac", "nearest_kronecker"):
        assert math.isclose(float(getattr(ks, name)(S).scale), float(getattr(ks, name)(F0).scale), rel_tol=1e-9)
    assert math.isclose(float(S.trace()), float(F0.trace()), rel_tol=1e-12)
    est = ks.kfoc(F0)
    assert math.isclose(float(ks.frobenius_error(S, est)), float(ks.frobenius_error(F0, est)), rel_tol=1e-6)
    assert float(ks.frobenius_error(Z, ks.Kron(np.eye(3), np.eye(4), 0.0))) == 0.0


def test_kronecker_svd_of_one_by_one_factors_on_torch():
    """1×1 factors: NumPy's reversed eigenvector columns are a 1×1 view with negative strides,
    which NumPy calls contiguous and torch refuses."""
    torch = pytest.importorskip("torch")
    F = ks.KronSum.from_outer(torch.tensor([[0.9]], dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64))
    B = ks.kronecker_svd(F, rank=1)
    assert math.isclose(float(B.singular_values[0]), 0.81 * 0.25, rel_tol=1e-12)
