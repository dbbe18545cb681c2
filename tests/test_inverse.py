"""Damped inverses, log-determinants and samples of ``scale · L ⊗ R`` (kronsum/_inverse.py).

Every number is checked against a dense NumPy reference built independently from the
formulas (``np.kron``, ``np.linalg.solve``, ``np.linalg.slogdet``, sample covariances).
"""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kronsum as ks
from conftest import assert_same_backend

METHODS = ["exact", "factored", "tkfac"]


# -- dense references (NumPy, from the papers' formulas) --------------------------------------


def dense_damped(L, R, s, lam, method):
    """The damped (mn, mn) matrix of each method, literally."""
    m, n = len(L), len(R)
    Im, In = np.eye(m), np.eye(n)
    if method == "exact":
        return s * np.kron(L, R) + lam * np.eye(m * n)
    if method == "factored":  # Martens & Grosse 2015, Sec. 6.3, on the actual matrices sL and R
        SL, SR = s * L, R
        pi = math.sqrt((np.trace(SL) / m) / (np.trace(SR) / n))
        return np.kron(SL + pi * math.sqrt(lam) * Im, SR + math.sqrt(lam) / pi * In)
    if method == "tkfac":  # Gao et al. 2021, Eq. (14) on delta Phi (x) Psi with unit traces
        delta = s * np.trace(L) * np.trace(R)
        Phi, Psi = L / np.trace(L), R / np.trace(R)
        return np.kron(math.sqrt(delta) * Phi + math.sqrt(lam) * Im,
                       math.sqrt(delta) * Psi + math.sqrt(lam) * In)
    raise AssertionError(method)


def psd(rng, d, rank=None, jitter=0.0):
    X = rng.standard_normal((d, d if rank is None else rank))
    return X @ X.T + jitter * np.eye(d)


def factors(seed=0, m=3, n=4):
    rng = np.random.default_rng(seed)
    return psd(rng, m, jitter=0.1), psd(rng, n, jitter=0.1), 1.7


def inv_sqrt_psd(C):
    w, U = np.linalg.eigh(C)
    return (U / np.sqrt(w)) @ U.T


def whitening_error(X, C):
    """‖Ŵ − I‖_F for the sample second moment Ŵ of C^{-1/2} x (rows of X are the x)."""
    W = X @ inv_sqrt_psd(C)
    return np.linalg.norm(W.T @ W / len(X) - np.eye(C.shape[0]))


def whitening_tol(d, N):
    """3 standard deviations: E‖Ŵ − I‖²_F = (d² + d)/N for Gaussian x with covariance C."""
    return 3.0 * math.sqrt((d * d + d) / N)


# -- every backend --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_solve_logdet_on_backend(backend, dtype):
    L, R, s = factors(0)
    rng = np.random.default_rng(1)
    V = rng.standard_normal((2, 3, 4))  # batched
    K = ks.Kron(backend.asarray(L, dtype), backend.asarray(R, dtype), scale=s)
    Vb = backend.asarray(V, dtype)
    rtol = 1e-9 if dtype == "float64" else 2e-4
    for method in METHODS:
        D = dense_damped(L, R, s, 0.3, method)
        inv = K.inverse(0.3, method)
        X = inv.solve(Vb)
        assert_same_backend(X, Vb, Vb.dtype)
        ref = np.linalg.solve(D, V.reshape(2, -1).T).T.reshape(2, 3, 4)
        np.testing.assert_allclose(backend.to_numpy(X), ref, rtol=rtol, atol=rtol * np.abs(ref).max())
        Xk = K.solve(Vb, 0.3, method=method)  # the thin Kron method: same numbers
        np.testing.assert_allclose(backend.to_numpy(Xk), backend.to_numpy(X), rtol=rtol, atol=rtol)
        ld = inv.logdet()
        assert_same_backend(ld, Vb, Vb.dtype)
        sign, ref_ld = np.linalg.slogdet(D)
        assert sign > 0
        assert np.isclose(float(backend.to_numpy(ld)), ref_ld, rtol=rtol)
        assert np.isclose(float(backend.to_numpy(K.logdet(0.3, method))), ref_ld, rtol=rtol)
        # round trip through the damped matrix itself
        np.testing.assert_allclose(backend.to_numpy(inv.matvec(X)), V, rtol=10 * rtol, atol=10 * rtol)


@pytest.mark.parametrize("form", ["precision", "covariance"])
def test_sample_covariance_on_backend(backend, form):
    """Sample covariance of 20000 draws against the target, with a test that a wrong one fails."""
    rng = np.random.default_rng(3)
    L = np.diag([4.0, 0.5]) + 0.3 * np.ones((2, 2))
    R = psd(rng, 3, jitter=0.2)
    s, lam, N = 1.3, 0.4, 20000
    K = ks.Kron(backend.asarray(L, "float64"), backend.asarray(R, "float64"), scale=s)
    X = K.sample(N, 0.4, seed=12345, form=form)
    assert_same_backend(X, K.left, K.left.dtype)
    assert tuple(X.shape) == (N, 2, 3)
    X = backend.to_numpy(X).reshape(N, 6)  # row-major vec
    D = s * np.kron(L, R) + lam * np.eye(6)
    target = np.linalg.inv(D) if form == "precision" else D
    tol = whitening_tol(6, N)
    assert whitening_error(X, target) < tol
    # the test can fail: each wrong covariance is far outside the tolerance, and the same draws
    # are rejected against it
    wrongs = [np.linalg.inv(target),                                   # precision <-> covariance
              np.linalg.inv(s * np.kron(R, L) + lam * np.eye(6)) if form == "precision"
              else s * np.kron(R, L) + lam * np.eye(6),                # column-major vec
              target * 1.15]                                            # wrong magnitude
    for wrong in wrongs:
        S = inv_sqrt_psd(wrong)
        assert np.linalg.norm(S @ target @ S - np.eye(6)) > 2 * tol
        assert whitening_error(X, wrong) > tol


def test_float32_dtype_and_mixed_precision(backend):
    L, R, s = factors(4)
    K32 = ks.Kron(backend.asarray(L, "float32"), backend.asarray(R, "float32"), scale=s)
    inv = K32.inverse(0.1)
    for x in (inv.eigvecs_left, inv.eigvals_right, inv.logdet(), inv.sample(3, seed=0)):
        assert_same_backend(x, K32.left, K32.left.dtype)
    if backend.name in ("torch", "torch-cuda", "array-api-strict", "jax"):
        V64 = backend.asarray(np.ones((3, 4)), "float64")
        assert inv.solve(V64).dtype == V64.dtype  # promoted as result_type(V, factors)


@pytest.mark.parametrize("method", METHODS)
def test_repeated_solves_in_two_dtypes_match_dense(method):
    """One inverse solving right-hand sides of two dtypes in turn (an optimiser's steps reuse
    it): each solve has the dtype ``result_type(V, factors)`` and equals the dense solve,
    whatever came before."""
    rng = np.random.default_rng(3)
    L, R, s = factors(4)
    for fdtype in ("float64", "float32"):
        inv = ks.Kron(L.astype(fdtype), R.astype(fdtype), scale=s).inverse(0.1, method)
        D = dense_damped(L.astype(fdtype).astype("float64"), R.astype(fdtype).astype("float64"),
                         s, 0.1, method)
        for dtype in ("float64", "float32", "float64", "float32"):
            V = rng.standard_normal((2, 3, 4)).astype(dtype)
            X = inv.solve(V)
            assert X.dtype == np.result_type(fdtype, dtype)
            ref = np.linalg.solve(D, V.reshape(2, 12).astype("float64").T).T.reshape(2, 3, 4)
            tol = 1e-12 if fdtype == dtype == "float64" else 1e-5
            np.testing.assert_allclose(X, ref, rtol=tol, atol=tol * np.abs(ref).max())


# -- methods against the papers' formulas ---------------------------------------------------------


def test_factored_matches_martens_grosse_on_kfac_estimate():
    rng = np.random.default_rng(5)
    F = ks.KronSum.from_outer(rng.standard_normal((30, 3)), rng.standard_normal((30, 5)))
    est = ks.kfac(F)  # scale = Σw, factors are means: the actual K-FAC matrices are scale·L and R
    lam = 0.05
    inv = est.inverse(lam, "factored")
    D = dense_damped(np.asarray(est.left), np.asarray(est.right), float(est.scale), lam, "factored")
    np.testing.assert_allclose(inv.to_dense(), D, rtol=1e-10, atol=1e-12)
    SL, SR = float(est.scale) * est.left, est.right
    assert math.isclose(inv.pi, math.sqrt((np.trace(SL) / 3) / (np.trace(SR) / 5)), rel_tol=1e-12)
    V = rng.standard_normal((3, 5))
    np.testing.assert_allclose(inv.solve(V).reshape(-1), np.linalg.solve(D, V.reshape(-1)), rtol=1e-10)


def test_tkfac_eq14_on_tkfac_estimate():
    rng = np.random.default_rng(6)
    est = ks.tkfac(ks.KronSum.from_outer(rng.standard_normal((20, 4)), rng.standard_normal((20, 3))))
    lam, delta = 0.2, float(est.scale)  # TKFAC: scale = δ = tr F, unit-trace Φ = left, Ψ = right
    D = np.kron(math.sqrt(delta) * est.left + math.sqrt(lam) * np.eye(4),
                math.sqrt(delta) * est.right + math.sqrt(lam) * np.eye(3))
    inv = est.inverse(lam, "tkfac")
    assert math.isclose(inv.delta, delta, rel_tol=1e-12)
    np.testing.assert_allclose(inv.to_dense(), D, rtol=1e-10, atol=1e-12)
    assert math.isclose(float(inv.logdet()), np.linalg.slogdet(D)[1], rel_tol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_invariant_to_scale_split_and_signs(method):
    L, R, s = factors(7)
    rng = np.random.default_rng(8)
    V = rng.standard_normal((3, 4))
    base = ks.Kron(L, R, scale=s)
    ref = base.solve(V, 0.5, method)
    splits = [ks.Kron(3.0 * L, R, scale=s / 3.0), ks.Kron(L / 5.0, 2.0 * R, scale=2.5 * s),
              ks.Kron(s * L, R), ks.Kron(math.sqrt(s) * L, math.sqrt(s) * R),
              ks.Kron(-L, -R, scale=s), ks.Kron(-L, R, scale=-s)]
    for K in splits:
        inv = K.inverse(0.5, method)
        np.testing.assert_allclose(inv.solve(V), ref, rtol=1e-10, atol=1e-12)
        assert math.isclose(float(inv.logdet()), float(base.logdet(0.5, method)), rel_tol=1e-12)
    assert any("sign" in note for note in ks.Kron(-L, -R, scale=s).inverse(0.5, method).notes)


def test_methods_differ_and_agree_at_zero_damping():
    L, R, s = factors(9, 3, 5)
    K = ks.Kron(L, R, scale=s)
    V = np.random.default_rng(0).standard_normal((3, 5))
    out = {mth: K.solve(V, 0.5, mth) for mth in METHODS}
    assert not np.allclose(out["exact"], out["factored"])
    assert not np.allclose(out["factored"], out["tkfac"])  # π ≠ 1 here (m ≠ n, distinct traces)
    zero = [K.solve(V, 0.0, mth) for mth in METHODS]  # λ = 0: every method is (sL ⊗ R)⁻¹
    for z in zero[1:]:
        np.testing.assert_allclose(z, zero[0], rtol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_zero_product_is_lambda_identity(method):
    K = ks.Kron(np.zeros((2, 2)), np.eye(3), scale=1.0)
    inv = K.inverse(0.25, method)
    np.testing.assert_allclose(inv.to_dense(), 0.25 * np.eye(6), atol=1e-15)
    assert math.isclose(float(inv.logdet()), 6 * math.log(0.25))
    with pytest.raises(ValueError, match="singular"):
        K.inverse(0.0, method)


# -- TKFAC's new damping, Eq. (15)-(16) -----------------------------------------------------------


def _layers():
    rng = np.random.default_rng(10)
    sizes = [(3, 4, 0.05), (2, 5, 0.08), (4, 2, 3.0)]  # two small-trace conv layers, one large fc
    return [ks.tkfac(ks.KronSum.from_outer(c * rng.standard_normal((12, m)), rng.standard_normal((12, n))))
            for m, n, c in sizes]


def _eq15(est, delta_eff, nu):
    m, n = est.m, est.n
    dt = max(nu, delta_eff)
    return np.kron(math.sqrt(dt) * est.left + dt / m * np.eye(m),
                   math.sqrt(dt) * est.right + dt / n * np.eye(n))


def test_tkfac_new_scheme_dict_and_list():
    ests = _layers()
    deltas = [float(e.scale) for e in ests]
    nu = 1.0
    assert deltas[0] < nu and deltas[1] < nu < deltas[2]
    beta = max(max(nu, d) / d for d in deltas)
    invs = ks.tkfac_damped_inverses({"conv1": ests[0], "conv2": ests[1], "fc": ests[2]}, nu,
                                    expand=["fc"])
    assert list(invs) == ["conv1", "conv2", "fc"]
    for key, est, d in zip(invs, ests, deltas):
        inv = invs[key]
        assert inv.method == "tkfac_new" and inv.damping is None
        assert math.isclose(inv.beta, beta) and inv.nu == nu and math.isclose(inv.delta, d)
        D = _eq15(est, beta * d if key == "fc" else d, nu)
        np.testing.assert_allclose(inv.to_dense(), D, rtol=1e-10, atol=1e-12)
        V = np.random.default_rng(0).standard_normal((est.m, est.n))
        np.testing.assert_allclose(inv.solve(V).reshape(-1), np.linalg.solve(D, V.reshape(-1)), rtol=1e-9)
        assert math.isclose(float(inv.logdet()), np.linalg.slogdet(D)[1], rel_tol=1e-10)
    # a list, the default "unrestricted" expansion (the layer with δ >= ν) gives the same
    as_list = ks.tkfac_damped_inverses(ests, nu)
    np.testing.assert_allclose(as_list[2].to_dense(), invs["fc"].to_dense(), rtol=1e-12)
    none = ks.tkfac_damped_inverses(ests, nu, expand="none")
    np.testing.assert_allclose(none[2].to_dense(), _eq15(ests[2], deltas[2], nu), rtol=1e-10)
    with pytest.raises(ValueError, match="damping of 'tkfac_new' is automatic"):
        none[0].with_damping(0.1)


def test_tkfac_new_scheme_errors():
    ests = _layers()
    with pytest.raises(ValueError, match="at least one"):
        ks.tkfac_damped_inverses([], 1.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="nu"):
            ks.tkfac_damped_inverses(ests, bad)
    with pytest.raises(ValueError, match="not in estimates"):
        ks.tkfac_damped_inverses({"a": ests[0]}, 1.0, expand=["b"])
    with pytest.raises(TypeError, match="Kron"):
        ks.tkfac_damped_inverses([np.eye(2)], 1.0)
    with pytest.raises(TypeError):
        ks.tkfac_damped_inverses(ests[0], 1.0)


# -- caching -----------------------------------------------------------------------------------


def test_inverse_caches_eigendecompositions(monkeypatch):
    import array_api_compat.numpy as cnp

    L, R, s = factors(11)
    K = ks.Kron(L, R, scale=s)
    invs = {mth: K.inverse(0.3, mth) for mth in METHODS}

    def boom(*a, **k):
        raise AssertionError("eigh called again")

    monkeypatch.setattr(cnp.linalg, "eigh", boom)
    monkeypatch.setattr(np.linalg, "eigh", boom)
    V = np.random.default_rng(0).standard_normal((5, 3, 4))
    for mth, inv in invs.items():
        for _ in range(3):
            inv.solve(V), inv.logdet(), inv.sample(2, seed=0)
        other = inv.with_damping(0.7)  # re-damping reuses the decomposition
        np.testing.assert_allclose(other.to_dense(), dense_damped(L, R, s, 0.7, mth), rtol=1e-10, atol=1e-12)


# -- diagnostics and errors -----------------------------------------------------------------------


def test_rounding_negative_eigenvalues_are_clipped_and_recorded():
    rng = np.random.default_rng(12)
    U, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    L = (U * np.array([2.0, 1.0, 0.5, -1e-17])) @ U.T
    L = (L + L.T) / 2
    inv = ks.Kron(L, np.eye(3)).inverse(0.1)
    assert any("clipped" in note for note in inv.notes)
    assert float(np.min(inv.eigvals_left)) >= 0
    D = np.kron((U * np.array([2.0, 1.0, 0.5, 0.0])) @ U.T, np.eye(3)) + 0.1 * np.eye(12)
    np.testing.assert_allclose(inv.to_dense(), D, atol=1e-12)
    with pytest.raises(ValueError, match=r"left factor of shape \(4, 4\).*not positive semi-definite"):
        ks.Kron((U * np.array([2.0, 1.0, 0.5, -0.1])) @ U.T, np.eye(3)).inverse(0.1)
    with pytest.raises(ValueError, match="negative semi-definite"):
        ks.Kron(np.eye(2), np.eye(3), scale=-1.0).inverse(0.1)
    with pytest.raises(ValueError, match="not symmetric"):
        ks.Kron(np.triu(np.ones((3, 3))), np.eye(2)).inverse(0.1)


def test_singular_exact_with_zero_damping_raises_clearly():
    rng = np.random.default_rng(13)
    K = ks.Kron(psd(rng, 4, rank=2), psd(rng, 3), scale=1.0)
    for method in METHODS:
        with pytest.raises(ValueError, match=r"singular with damping=0\.0.*use a damping > 0"):
            K.solve(np.ones((4, 3)), 0.0, method)
    assert np.all(np.isfinite(K.solve(np.ones((4, 3)), 1e-3)))  # any λ > 0 is fine


def test_failed_eigendecomposition_names_shape_and_damping(monkeypatch):
    import array_api_compat.numpy as cnp

    K = ks.Kron(np.eye(3), np.eye(2))

    def fail(*a, **k):
        raise np.linalg.LinAlgError("Eigenvalues did not converge")

    monkeypatch.setattr(cnp.linalg, "eigh", fail)
    with pytest.raises(ks.DecompositionError,
                       match=r"left factor of shape \(3, 3\).*damping=0\.5.*did not converge"):
        K.inverse(0.5)
    monkeypatch.undo()
    bad = ks.Kron(np.array([[1.0, np.nan], [np.nan, 1.0]]), np.eye(2))
    with pytest.raises(ks.DecompositionError, match=r"\(2, 2\).*damping=0\.5"):
        bad.inverse(0.5, "factored")


@pytest.mark.parametrize("damping,exc", [(-1.0, ValueError), (float("nan"), ValueError),
                                         (float("inf"), ValueError), (1j, TypeError),
                                         (True, TypeError), ("0.1", TypeError), (None, TypeError),
                                         (np.ones(2), TypeError)])
def test_damping_validation(damping, exc):
    K = ks.Kron(np.eye(2), np.eye(2))
    with pytest.raises(exc, match="damping"):
        K.inverse(damping)


def test_argument_validation():
    K = ks.Kron(np.eye(3), 2 * np.eye(4))
    inv = K.inverse(np.asarray(0.1))  # 0-d arrays are accepted as damping
    assert inv.damping == 0.1
    with pytest.raises(ValueError, match="method"):
        K.inverse(0.1, "cholesky")
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 4\).*got \(4, 3\)"):
        inv.solve(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 4\)"):
        inv.solve(np.ones(12))
    with pytest.raises(TypeError, match="real floating"):
        inv.solve(np.ones((3, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="real floating"):
        inv.solve(np.ones((3, 4), dtype=np.complex128))
    with pytest.raises(TypeError, match="array"):
        inv.solve([[1.0] * 4] * 3)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="same library"):
        inv.solve(torch.ones((3, 4), dtype=torch.float64))
    with pytest.raises(ValueError, match="n"):
        inv.sample(0)
    with pytest.raises(ValueError, match="form"):
        inv.sample(2, form="cov")
    with pytest.raises(TypeError, match="seed"):
        inv.sample(2, seed="abc")
    with pytest.raises(TypeError, match="Kron"):
        ks.KronInverse(np.eye(3), 0.1)


def test_inputs_not_mutated_and_seeds():
    L, R, s = factors(14)
    L0, R0 = L.copy(), R.copy()
    K = ks.Kron(L, R, scale=s)
    V = np.random.default_rng(0).standard_normal((2, 3, 4))
    V0 = V.copy()
    inv = K.inverse(0.2, "factored")
    inv.solve(V), inv.sample(3, seed=1)
    assert np.array_equal(L, L0) and np.array_equal(R, R0) and np.array_equal(V, V0)
    a = inv.sample(4, seed=7)
    np.testing.assert_array_equal(a, inv.sample(4, seed=7))
    np.testing.assert_array_equal(a, inv.sample(4, seed=np.random.default_rng(7)))
    assert not np.array_equal(a, inv.sample(4, seed=8))


def test_jax_key_and_torch_generator():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = pytest.importorskip("jax.numpy")
    L, R, s = factors(15)
    Kj = ks.Kron(jnp.asarray(L), jnp.asarray(R), scale=s)
    for key in (jax.random.key(0), jax.random.PRNGKey(0)):
        x = Kj.sample(3, 0.1, seed=key)
        assert isinstance(x, jax.Array) and x.shape == (3, 3, 4)
    np.testing.assert_array_equal(np.asarray(Kj.sample(3, 0.1, seed=jax.random.key(1))),
                                  np.asarray(Kj.sample(3, 0.1, seed=jax.random.key(1))))
    with pytest.raises(TypeError, match="JAX"):
        ks.Kron(L, R).sample(2, 0.1, seed=jax.random.key(0))
    torch = pytest.importorskip("torch")
    Kt = ks.Kron(torch.asarray(L), torch.asarray(R), scale=s)
    g = torch.Generator().manual_seed(0)
    x = Kt.sample(3, 0.1, seed=g)
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float64
    with pytest.raises(TypeError, match="torch"):
        ks.Kron(L, R).sample(2, 0.1, seed=torch.Generator())


def test_dask_stays_lazy():
    da = pytest.importorskip("dask.array")
    L, R, s = factors(16)
    K = ks.Kron(da.from_array(L), da.from_array(R), scale=s)
    V = np.random.default_rng(0).standard_normal((4, 3, 4))
    out = K.inverse(0.3).solve(da.from_array(V, chunks=(2, 3, 4)))
    assert isinstance(out, da.Array)
    D = dense_damped(L, R, s, 0.3, "exact")
    np.testing.assert_allclose(out.compute().reshape(4, -1), np.linalg.solve(D, V.reshape(4, -1).T).T,
                               rtol=1e-10)


# -- properties over shapes and damping ------------------------------------------------------------


@given(m=st.integers(1, 4), n=st.integers(1, 4), seed=st.integers(0, 2**16),
       lam=st.one_of(st.just(0.0), st.floats(1e-3, 10.0)), method=st.sampled_from(METHODS),
       split=st.floats(0.1, 10.0), batch=st.integers(0, 2))
def test_property_against_dense(m, n, seed, lam, method, split, batch):
    rng = np.random.default_rng(seed)
    L, R = psd(rng, m, jitter=0.05), psd(rng, n, jitter=0.05)
    s = float(rng.uniform(0.1, 5.0))
    K = ks.Kron(split * L, R, scale=s / split)
    D = dense_damped(L, R, s, lam, method)
    shape = (batch, m, n) if batch else (m, n)
    V = rng.standard_normal(shape)
    inv = K.inverse(lam, method)
    X = inv.solve(V)
    ref = np.linalg.solve(D, V.reshape(-1, m * n).T).T.reshape(shape)
    np.testing.assert_allclose(X, ref, rtol=1e-7, atol=1e-7 * np.abs(ref).max())
    np.testing.assert_allclose(inv.to_dense(), D, rtol=1e-9, atol=1e-9 * np.abs(D).max())
    assert math.isclose(float(inv.logdet()), np.linalg.slogdet(D)[1], rel_tol=1e-9, abs_tol=1e-9)
    assert inv.sample(2, seed=seed).shape == (2, m, n)


def test_a_damping_that_rounds_to_zero_is_refused_on_a_singular_product():
    """A damping below the dtype's smallest normal number rounds away in ``s·a_i·b_j + λ``:
    a singular product is refused then, as for λ = 0, not solved into NaN."""
    K = ks.Kron(np.diag([1.0, 0.0]).astype(np.float32), np.eye(2, dtype=np.float32))
    for lam in (0.0, 1e-46):
        with pytest.raises(ValueError, match="singular"):
            K.inverse(lam)
    inv = K.inverse(float(np.finfo(np.float32).smallest_normal))
    assert np.all(np.isfinite(inv.solve(np.ones((2, 2), np.float32))))
