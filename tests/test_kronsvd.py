"""Kronecker-rank-r approximations (``kronecker_svd``, ``KronSVD``) against dense ground truth.

References are NumPy's SVD of the rearrangement of the dense F built with ``np.kron`` from
materialised terms (``conftest.dense_F``), ``np.kron`` for the approximations and
``np.linalg.solve`` for the damped solves; none shares code with the library.
"""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import kronsum as ks
from conftest import assert_same_backend, dense_F, random_inputs, sums, svd_optimum



def _make(form, arrays, w=None):
    return getattr(ks.KronSum, f"from_{form}")(*arrays, w)


def _dense_approx(B):
    """``Σ σ_i kron(L_i, R_i)`` with NumPy's own kron."""
    return sum(s * np.kron(L, R) for s, L, R in zip(B.singular_values, B.lefts, B.rights))


def _methods(form):
    return ["auto", "lanczos"] + (["gram"] if form != "conv" else [])


@given(sums())
def test_matches_dense_svd_of_the_rearrangement(case):
    form, arrays, w = case
    F = _make(form, arrays, w)
    D = dense_F(form, arrays, w)
    m, n = F.m, F.n
    _, s = svd_optimum(D, m, n)
    normF = np.linalg.norm(D)
    full = min(m * m, n * n)
    ranks = sorted(set(range(1, min(4, full) + 1)) | {full})
    for method in _methods(form):
        errs = []
        for r in ranks:
            B = ks.kronecker_svd(F, rank=r, method=method)
            assert B.info.converged, B.info
            assert B.singular_values.shape == (r,)
            assert B.lefts.shape == (r, m, m) and B.rights.shape == (r, n, n)
            # singular values of 𝓡(F), descending, non-negative
            np.testing.assert_allclose(B.singular_values, s[:r], rtol=1e-8, atol=1e-10 * normF)
            assert np.all(np.diff(B.singular_values) <= 1e-12 * normF)
            # orthonormal unit-Frobenius factor stacks
            Lf, Rf = B.lefts.reshape(r, -1), B.rights.reshape(r, -1)
            np.testing.assert_allclose(Lf @ Lf.T, np.eye(r), atol=1e-8)
            np.testing.assert_allclose(Rf @ Rf.T, np.eye(r), atol=1e-8)
            # the exact error is the optimum sqrt(Σ_{i>r} σ_i²), with and without forming F
            opt = float(np.sqrt(np.sum(s[r:] ** 2)))
            err = float(ks.frobenius_error(F, B))
            assert np.isclose(err, opt, rtol=1e-7, atol=1e-9 * normF), (method, r, err, opt)
            assert np.isclose(np.linalg.norm(D - _dense_approx(B)), opt, rtol=1e-7, atol=1e-9 * normF)
            np.testing.assert_allclose(B.to_dense(), _dense_approx(B), atol=1e-12 * normF)
            # explained fraction Σ_{i≤r} σ_i² / ‖F‖²
            assert np.isclose(B.explained, np.sum(s[:r] ** 2) / normF**2, rtol=1e-9, atol=1e-12)
            assert np.isclose(B.total_norm, normF, rtol=1e-10)
            errs.append(err)
        # errors decrease with r and vanish at full Kronecker rank
        assert all(b <= a + 1e-10 * normF for a, b in zip(errs, errs[1:]))
        assert errs[-1] <= 1e-9 * normF
        assert np.isclose(B.explained, 1.0, atol=1e-10)


@given(sums())
def test_rank_one_agrees_with_kfoc(case):
    form, arrays, w = case
    F = _make(form, arrays, w)
    _, s = svd_optimum(dense_F(form, arrays, w), F.m, F.n)
    assume(s.size < 2 or s[1] < (1 - 1e-4) * s[0])  # a unique optimum
    for method in _methods(form):
        B = ks.kronecker_svd(F, rank=1, method=method)
        K = ks.kfoc(F, method="lanczos" if method == "lanczos" else "auto", tol=1e-10)  # residual rule
        normF = s[0] if s[0] > 0 else 1.0
        assert np.isclose(float(B.singular_values[0]), float(K.scale), rtol=1e-9, atol=1e-12 * normF)
        np.testing.assert_allclose(B.to_dense(), K.to_dense(), atol=1e-8 * normF)
        if s[0] > 0:  # same sign convention: tr(left) ≥ 0, hence the same factors
            np.testing.assert_allclose(B.lefts[0], K.left, atol=1e-7)
            np.testing.assert_allclose(B.rights[0], K.right, atol=1e-7)
        T = B.term(0)
        assert isinstance(T, ks.Kron)
        np.testing.assert_allclose(T.to_dense(), K.to_dense(), atol=1e-8 * normF)


@given(sums())
def test_sign_convention_matvec_truncate(case):
    form, arrays, w = case
    F = _make(form, arrays, w)
    r = min(4, F.m**2, F.n**2)
    B = ks.kronecker_svd(F, rank=r)
    assert np.trace(B.lefts[0]) >= -1e-12
    for L in B.lefts[1:]:
        flat = L.reshape(-1)
        assert flat[np.argmax(np.abs(flat))] > 0
    if form != "terms":  # symmetric sums: every factor symmetric or antisymmetric
        for X in list(B.lefts) + list(B.rights):
            assert min(np.abs(X - X.T).max(), np.abs(X + X.T).max()) <= 1e-10
    rng = np.random.default_rng(0)
    V = rng.standard_normal((2, F.m, F.n))
    D = B.to_dense()
    got = B.matvec(V)
    for j in range(2):
        np.testing.assert_allclose(got[j].reshape(-1), D @ V[j].reshape(-1),
                                   atol=1e-10 * (1 + np.abs(D).max()) * np.abs(V).max())
    for r2 in range(1, r + 1):
        Bt = B.truncate(r2)
        assert Bt.rank == r2
        np.testing.assert_allclose(Bt.singular_values, B.singular_values[:r2])
        assert np.isclose(Bt.explained, np.sum(B.singular_values[:r2] ** 2) / B.total_norm**2)
        if r2 < r:
            assert Bt.info.sigma2 == pytest.approx(float(B.singular_values[r2]))
    assert np.isclose(float(B.trace()), np.trace(D), atol=1e-10 * (1 + np.abs(D).max()) * D.shape[0])


def test_rank_validation_names_the_sizes():
    F = _make("outer", random_inputs("outer", 5, 2, 3))
    for bad in (0, 5, -1):
        with pytest.raises(ValueError, match=r"min\(m², n²\) = min\(4, 9\) = 4"):
            ks.kronecker_svd(F, rank=bad)
    for bad in (2.0, True):  # not an integer: the wrong kind
        with pytest.raises(TypeError, match="rank must be an integer"):
            ks.kronecker_svd(F, rank=bad)
    with pytest.raises(ValueError, match="method"):
        ks.kronecker_svd(F, rank=1, method="power")
    with pytest.raises(ValueError, match="tol"):
        ks.kronecker_svd(F, rank=1, tol=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        ks.kronecker_svd(F, rank=1, max_iter=0)
    with pytest.raises(ValueError, match="gram"):
        ks.kronecker_svd(_make("conv", random_inputs("conv", 3, 2, 2)), rank=1, method="gram")
    with pytest.raises(TypeError, match="KronSum"):
        ks.kronecker_svd(np.eye(4), rank=1)
    B = ks.kronecker_svd(F, rank=2)
    with pytest.raises(ValueError, match="between 1 and 2"):
        B.truncate(3)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2, 3\)"):
        B.matvec(np.ones((3, 2)))


@pytest.mark.parametrize("method", ["gram", "lanczos"])
def test_degenerate_and_rank_deficient_give_finite_answers_and_notes(method):
    rng = np.random.default_rng(3)
    # F = U1⊗U1 + U2⊗U2 with orthonormal U1, U2: σ1 = σ2 = 1, Kronecker rank 2
    U1 = np.eye(3) / np.sqrt(3)
    A = rng.standard_normal((3, 3))
    U2 = A + A.T
    U2 -= np.sum(U2 * U1) * U1
    U2 /= np.linalg.norm(U2)
    F = ks.KronSum.from_terms(np.stack([U1, U2]), np.stack([U1, U2]))
    B1 = ks.kronecker_svd(F, rank=1, method=method)
    assert np.isfinite(B1.lefts).all() and np.isclose(float(B1.singular_values[0]), 1.0)
    assert any("not unique" in note for note in B1.info.notes)
    assert np.isclose(float(ks.frobenius_error(F, B1)), 1.0)
    B2 = ks.kronecker_svd(F, rank=2, method=method)
    assert any("not unique" in note for note in B2.info.notes)
    assert float(ks.frobenius_error(F, B2)) <= 1e-12
    B4 = ks.kronecker_svd(F, rank=4, method=method)
    np.testing.assert_allclose(B4.singular_values, [1, 1, 0, 0], atol=1e-12)
    assert any("rank 2 < 4" in note for note in B4.info.notes)
    Lf = B4.lefts.reshape(4, -1)
    np.testing.assert_allclose(Lf @ Lf.T, np.eye(4), atol=1e-10)
    # near-degenerate σ_r ≈ σ_{r+1}: finite and noted
    Fn = ks.KronSum.from_terms(np.stack([U1, U2]), np.stack([U1, U2]), np.array([1.0, 1.0 - 1e-12]))
    Bn = ks.kronecker_svd(Fn, rank=1, method=method)
    assert np.isfinite(Bn.lefts).all() and any("not unique" in note for note in Bn.info.notes)


def test_zero_sum_and_huge_scales():
    G, A = random_inputs("outer", 6, 3, 2)
    Z = ks.kronecker_svd(ks.KronSum.from_outer(0 * G, A), rank=2)
    assert np.all(Z.singular_values == 0) and np.isfinite(Z.lefts).all()
    assert Z.explained == 1.0 and any("zero" in note for note in Z.info.notes)
    F = ks.KronSum.from_outer(G, A)
    base = ks.kronecker_svd(F, rank=3)
    for c in (1e150, 1e-150):
        Bc = ks.kronecker_svd(ks.KronSum.from_outer(G * c, A), rank=3)
        np.testing.assert_allclose(Bc.singular_values / c**2, base.singular_values, rtol=1e-10)
        assert np.isclose(Bc.explained, base.explained, rtol=1e-12)


def test_float32():
    G, A = random_inputs("outer", 30, 4, 3)
    F = ks.KronSum.from_outer(G.astype(np.float32), A.astype(np.float32))
    B = ks.kronecker_svd(F, rank=3)
    assert B.lefts.dtype == np.float32 and B.singular_values.dtype == np.float32
    s = np.linalg.svd(ks.KronSum.from_outer(G, A).rearranged(), compute_uv=False)
    np.testing.assert_allclose(B.singular_values, s[:3], rtol=1e-4)


# -- damped solves ---------------------------------------------------------------------------


def _psd_case(m=3, n=4, K=40, seed=0):
    G, A = random_inputs("outer", K, m, n, seed=seed, kind="heavy")
    return ks.KronSum.from_outer(G, A)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank2_solve_exact_undamped_and_factored(seed):
    F = _psd_case(seed=seed)
    B = ks.kronecker_svd(F, rank=2)
    rng = np.random.default_rng(seed)
    V = rng.standard_normal((3, F.m, F.n))
    # λ = 0: A = σ1 L1⊗R1 + σ2 L2⊗R2, simultaneously diagonalised
    X, info = B.solve(V, 0.0, return_info=True)
    assert info.method == "kronsvd-solve/exact" and info.iterations == 0
    D = B.to_dense()
    for j in range(3):
        np.testing.assert_allclose(X[j].reshape(-1), np.linalg.solve(D, V[j].reshape(-1)), rtol=1e-7,
                                   atol=1e-9 * np.abs(X).max())
    # factored damping of the leading term: exact for every λ
    lam = 0.3
    s1, L1, R1 = float(B.singular_values[0]), B.lefts[0], B.rights[0]
    pi = np.sqrt((np.trace(s1 * L1) / F.m) / (np.trace(R1) / F.n))
    Dfac = (np.kron(s1 * L1 + pi * np.sqrt(lam) * np.eye(F.m), R1 + np.sqrt(lam) / pi * np.eye(F.n))
            + float(B.singular_values[1]) * np.kron(B.lefts[1], B.rights[1]))
    X, info = B.solve(V, lam, damping_method="factored", return_info=True)
    assert info.method == "kronsvd-solve/exact"
    for j in range(3):
        np.testing.assert_allclose(X[j].reshape(-1), np.linalg.solve(Dfac, V[j].reshape(-1)),
                                   rtol=1e-8, atol=1e-10 * np.abs(X).max())
    # λI with λ > 0 is not exact: auto uses CG, method="exact" refuses; λ ≥ σ2 keeps A ≻ 0
    with pytest.raises(ValueError, match="not simultaneously diagonalisable"):
        B.solve(V, lam, method="exact")
    lam = float(B.singular_values[1]) + 0.3
    X, info = B.solve(V, lam, return_info=True)
    assert info.method == "kronsvd-solve/cg" and info.converged
    Dl = D + lam * np.eye(D.shape[0])
    for j in range(3):
        np.testing.assert_allclose(X[j].reshape(-1), np.linalg.solve(Dl, V[j].reshape(-1)), rtol=1e-8,
                                   atol=1e-10 * np.abs(X).max())


@pytest.mark.parametrize("rank", [1, 3, 4, 6])
@pytest.mark.parametrize("damping_method", ["exact", "factored"])
def test_cg_solve_matches_dense_solve(rank, damping_method):
    F = _psd_case(m=3, n=4, K=60, seed=rank)
    B = ks.kronecker_svd(F, rank=rank)
    # λ ≥ Σ_{i≥2} σ_i makes A positive definite (‖L_i ⊗ R_i‖₂ ≤ 1), as CG needs
    lam = float(np.sum(B.singular_values[1:])) + 0.1 * float(B.singular_values[0])
    rng = np.random.default_rng(rank)
    V = rng.standard_normal((2, F.m, F.n))
    inv1 = B.term(0).inverse(lam, damping_method)
    A = inv1.to_dense() + sum(float(s) * np.kron(L, R) for s, L, R in
                              zip(B.singular_values[1:], B.lefts[1:], B.rights[1:]))
    X, info = B.solve(V, lam, damping_method=damping_method, tol=1e-12, return_info=True)
    assert info.converged and info.residual <= 1e-11
    if rank > 2:
        assert info.method == "kronsvd-solve/cg" and 0 < info.iterations <= F.m * F.n
    for j in range(2):
        np.testing.assert_allclose(X[j].reshape(-1), np.linalg.solve(A, V[j].reshape(-1)), rtol=1e-9,
                                   atol=1e-11 * np.abs(X).max())
    # a loose tolerance stops earlier and says so honestly
    X2, info2 = B.solve(V, lam, method="cg", tol=1e-3, return_info=True)
    assert info2.residual <= 1e-3 and info2.iterations <= max(info.iterations, 1)
    with pytest.raises(ValueError, match="rank 1 and rank 2"):
        if rank > 2:
            B.solve(V, lam, method="exact")
        else:
            raise ValueError("rank 1 and rank 2")


def test_indefinite_truncated_sum_is_reported():
    # terms 2..r are indefinite: s1·(I/√2 ⊗ I/√2) + s2·(diag(1,-1)/√2 ⊗ I/√2)
    I2 = np.eye(2) / np.sqrt(2)
    D2 = np.diag([1.0, -1.0]) / np.sqrt(2)
    V = np.array([[1.0, 2.0], [3.0, 4.0]])
    B = ks.KronSVD(np.array([1.0, 0.5]), np.stack([I2, D2]), np.stack([I2, I2]))  # PD: 0.75, 0.25
    X, info = B.solve(V, 0.0, return_info=True)
    np.testing.assert_allclose(X.reshape(-1), np.linalg.solve(B.to_dense(), V.reshape(-1)))
    assert info.method == "kronsvd-solve/exact" and not info.notes and info.residual < 1e-14
    B2 = ks.KronSVD(np.array([1.0, 2.0]), np.stack([I2, D2]), np.stack([I2, I2]))  # 1.5 and -0.5
    X, info = B2.solve(V, 0.0, return_info=True)  # exact path: solves, and notes the indefiniteness
    np.testing.assert_allclose(X.reshape(-1), np.linalg.solve(B2.to_dense(), V.reshape(-1)))
    assert any("indefinite" in note for note in info.notes)
    B1 = ks.KronSVD(np.array([1.0, 1.0]), np.stack([I2, D2]), np.stack([I2, I2]))  # singular
    with pytest.raises(ValueError, match="singular"):
        B1.solve(V, 0.0, method="exact")
    B3 = ks.KronSVD(np.array([1.0, 2.0, 1e-3]), np.stack([I2, D2, I2]), np.stack([I2, I2, I2]))
    X, info = B3.solve(np.array([[0.0, 0.0], [1.0, 0.5]]), 0.1, return_info=True)
    assert not info.converged and any("negative curvature" in note for note in info.notes)


def test_solve_validation():
    B = ks.kronecker_svd(_psd_case(), rank=3)
    V = np.ones((3, 4))
    for bad in (-1.0, np.nan, None):
        with pytest.raises((ValueError, TypeError)):
            B.solve(V, bad)
    with pytest.raises(ValueError, match="method"):
        B.solve(V, 1.0, method="lu")
    with pytest.raises(ValueError, match="damping_method"):
        B.solve(V, 1.0, damping_method="tkfac")
    with pytest.raises(ValueError, match="tol"):
        B.solve(V, 1.0, tol=-1)
    with pytest.raises(ValueError, match="max_iter"):
        B.solve(V, 1.0, max_iter=0)
    X, info = B.solve(V, 1.0, max_iter=1, return_info=True)
    assert info.iterations == 1 and not info.converged and any("not converged" in n for n in info.notes)


# -- backends ----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["outer", "conv"])
def test_backends(backend, form):
    if backend.name == "jax" and form == "conv":
        pytest.skip("jax: eager compilation of every new shape costs seconds; the conv form is "
                    "covered on the other backends and the outer form on JAX")
    arrays = random_inputs(form, 6, 2, 3, T=2, seed=5)
    F_np = _make(form, arrays)
    ref = ks.kronecker_svd(F_np, rank=3, method="lanczos")
    F = getattr(ks.KronSum, f"from_{form}")(*(backend.asarray(a, "float64") for a in arrays))
    B = ks.kronecker_svd(F, rank=3)
    assert_same_backend(B.lefts, F.weights, F.dtype)
    np.testing.assert_allclose(backend.to_numpy(B.singular_values), ref.singular_values, rtol=1e-9)
    np.testing.assert_allclose(backend.to_numpy(B.to_dense()), ref.to_dense(), atol=1e-9)
    assert np.isclose(float(ks.frobenius_error(F, B)), float(ks.frobenius_error(F_np, ref)),
                      rtol=1e-7, atol=1e-12)
    V_np = np.random.default_rng(0).standard_normal((2, 3))
    V = backend.asarray(V_np, "float64")
    np.testing.assert_allclose(backend.to_numpy(B.matvec(V)), ref.matvec(V_np), atol=1e-10)
    sv = np.asarray(ref.singular_values)
    lam = float(sv[1:].sum() + 0.01 * sv[0])  # λ ≥ Σ_(i≥2) σ_i keeps the damped sum positive definite
    X = B.solve(V, lam)
    dense = np.linalg.solve(ref.to_dense() + lam * np.eye(6), V_np.reshape(-1)).reshape(2, 3)
    np.testing.assert_allclose(backend.to_numpy(X), dense, rtol=1e-7, atol=1e-10)


# -- damped solves: every route against a dense solve ------------------------------------------


def _dense_damped(B, lam, damping_method, lead_only=False):
    """The damped matrix ``A`` of ``KronSVD.solve`` built from the stored factors with ``np.kron``
    (its damped leading term alone with ``lead_only``)."""
    s = np.asarray(B.singular_values, dtype=float)
    m, n = B.m, B.n
    if damping_method == "exact":
        lead = s[0] * np.kron(B.lefts[0], B.rights[0]) + lam * np.eye(m * n)
    else:  # K-FAC's factored Tikhonov with π on the leading term
        pi = np.sqrt((s[0] * np.trace(B.lefts[0]) / m) / (np.trace(B.rights[0]) / n)) if lam > 0 else 1.0
        lead = np.kron(s[0] * B.lefts[0] + pi * np.sqrt(lam) * np.eye(m),
                       B.rights[0] + np.sqrt(lam) / pi * np.eye(n))
    if lead_only:
        return lead
    return lead + sum(s[i] * np.kron(B.lefts[i], B.rights[i]) for i in range(1, B.rank))


def _backward_error(A, X, V):
    """Normwise backward error ``‖v − Ax‖ / (‖A‖‖x‖ + ‖v‖)``, the largest over right-hand sides."""
    x, v = X.reshape(-1, A.shape[0]), V.reshape(-1, A.shape[0])
    nA = np.linalg.norm(A, 2)
    return max(np.linalg.norm(vj - A @ xj) / (nA * np.linalg.norm(xj) + np.linalg.norm(vj))
               for xj, vj in zip(x, v))


def _check_solve(B, V, lam, damping_method, **kw):
    """Solve; a ``converged`` answer must solve the dense system, an unconverged one say why."""
    X, info = B.solve(V, lam, damping_method=damping_method, return_info=True, **kw)
    assert X.shape == V.shape
    A = _dense_damped(B, lam, damping_method)
    res = max(np.linalg.norm(vj - A @ xj) / max(np.linalg.norm(vj), 1e-300)
              for xj, vj in zip(X.reshape(-1, A.shape[0]), V.reshape(-1, A.shape[0])))
    # the reported residual is the true one (up to the rounding of A·X, large when CG diverged)
    scale = max(np.linalg.norm(A, 2) * np.linalg.norm(xj) / max(np.linalg.norm(vj), 1e-300)
                for xj, vj in zip(X.reshape(-1, A.shape[0]), V.reshape(-1, A.shape[0])))
    assert np.isclose(info.residual, res, rtol=1e-6, atol=1e-10 * max(scale, 1.0)), (info, res)
    if info.converged:
        assert _backward_error(A, X, V) < 1e-10, (info, _backward_error(A, X, V))
    else:
        assert info.notes, info
    return X, info


def _pd_lead(B, lam, damping_method) -> bool:
    """Whether the damped leading term is symmetric positive definite (well away from singular)."""
    L1, R1 = B.lefts[0], B.rights[0]
    if not (np.allclose(L1, L1.T) and np.allclose(R1, R1.T)):
        return False
    if damping_method == "factored" and lam > 0 and (np.linalg.eigvalsh(L1).min() < -1e-12
                                                      or np.linalg.eigvalsh(R1).min() < -1e-12):
        return False
    e = np.linalg.eigvalsh(_dense_damped(B, lam, damping_method, lead_only=True))
    return e.min() > 1e-10 * e.max()


@given(sums(), st.integers(1, 4), st.sampled_from([0.0, 1e-3, 1.0]), st.sampled_from(["exact", "factored"]),
       st.integers(-6, 6))
def test_solve_matches_dense_solve(case, rank, rel_damping, damping_method, exponent):
    form, arrays, w = case
    arrays = tuple(a * 10.0 ** exponent for a in arrays)
    F = _make(form, arrays, w)
    rank = min(rank, F.m * F.m, F.n * F.n)
    B = ks.kronecker_svd(F, rank=rank)
    lam = rel_damping * float(B.singular_values[0])
    V = np.random.default_rng(rank).standard_normal((2, F.m, F.n))
    try:
        _check_solve(B, V, lam, damping_method)
    except ValueError:  # a clear refusal only where the damped leading term cannot be inverted
        assert (damping_method == "factored" or rank == 1) and not _pd_lead(B, lam, damping_method)


def _unit(M):
    return M / np.linalg.norm(M)


@st.composite
def rank2_with_parity(draw):
    """A ``KronSVD`` of rank 2: a positive-definite leading pair and a second pair whose factors
    are each symmetric or antisymmetric (the conv form's second pair can be antisymmetric)."""
    m, n = draw(st.integers(2, 5)), draw(st.integers(2, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    parities = draw(st.sampled_from([("anti", "anti"), ("sym", "sym"), ("sym", "anti"), ("anti", "sym")]))

    def spd(d):
        X = rng.standard_normal((d, 2 * d))
        return _unit(X @ X.T)

    def second(d, parity):
        X = rng.standard_normal((d, d))
        return _unit(X - X.T if parity == "anti" else X + X.T)

    s1 = 1.0
    s2 = draw(st.floats(1e-3, 2.0))
    return ks.KronSVD(np.array([s1, s2]), np.stack([spd(m), second(m, parities[0])]),
                      np.stack([spd(n), second(n, parities[1])])), parities


@given(rank2_with_parity(), st.sampled_from([0.0, 1e-2, 1.0]))
def test_rank2_exact_solve_with_antisymmetric_second_pair(case, lam):
    B, parities = case
    V = np.random.default_rng(0).standard_normal((3, B.m, B.n))
    for damping_method in ("exact", "factored") if lam == 0 else ("factored",):
        A = _dense_damped(B, lam, damping_method)
        s = np.linalg.svd(A, compute_uv=False)
        assume(s[-1] > 1e-8 * s[0])  # a non-singular system
        X, info = _check_solve(B, V, lam, damping_method)
        assert info.method == "kronsvd-solve/exact" and info.converged, info
        ref = np.linalg.solve(A, V.reshape(3, -1).T).T.reshape(V.shape)
        np.testing.assert_allclose(X, ref, atol=1e-6 * np.abs(ref).max() * s[0] / s[-1] * 1e-6)


def test_rank2_solve_conv_antisymmetric_pair_regression():
    rng = np.random.default_rng(5)
    F = ks.KronSum.from_conv(rng.standard_normal((4, 2, 2)), rng.standard_normal((4, 2, 3)))
    B = ks.kronecker_svd(F, rank=2)
    assert np.allclose(B.lefts[1], -B.lefts[1].T)  # the second pair is antisymmetric
    V = np.ones((2, 3))
    for lam, damping_method in ((0.0, "exact"), (0.0, "factored"), (1.0, "factored"), (1.0, "exact")):
        X, info = _check_solve(B, V, lam, damping_method)
        assert info.converged
        ref = np.linalg.solve(_dense_damped(B, lam, damping_method), V.reshape(-1)).reshape(V.shape)
        np.testing.assert_allclose(X, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())
    X = B.solve(V, 0.0, method="exact")  # the documented exact route, without diagnostics
    np.testing.assert_allclose(X.reshape(-1), np.linalg.solve(B.to_dense(), V.reshape(-1)), rtol=1e-9)


def test_rank2_general_second_pair_is_not_diagonalised():
    rng = np.random.default_rng(3)
    X1 = rng.standard_normal((3, 6))
    L1 = _unit(X1 @ X1.T)
    B = ks.KronSVD(np.array([1.0, 0.3]), np.stack([L1, _unit(rng.standard_normal((3, 3)))]),
                   np.stack([L1, _unit(rng.standard_normal((3, 3)))]))
    V = rng.standard_normal((3, 3))
    with pytest.raises(ValueError, match="neither symmetric nor antisymmetric"):
        B.solve(V, 0.0, method="exact")
    X, info = _check_solve(B, V, 0.0, "exact")  # auto: CG, and the diagnostics say so
    assert info.method == "kronsvd-solve/cg"
    assert any("neither symmetric nor antisymmetric" in note for note in info.notes)


def test_exact_route_reports_a_wrong_answer(monkeypatch):
    # a solve route that returns a wrong answer must not be reported as converged
    B = ks.kronecker_svd(_psd_case(), rank=1)
    V = np.random.default_rng(0).standard_normal((3, 4))
    inv = B.term(0).inverse(0.5)
    monkeypatch.setattr(type(inv), "solve", lambda self, V: V)  # a wrong answer: A⁻¹V replaced by V
    X, info = B.solve(V, 0.5, return_info=True)
    assert not info.converged and any("residual check" in note for note in info.notes)


def test_rank2_exact_solve_antisymmetric_pair_on_every_backend(backend):
    # the complex diagonalisation of the antisymmetric pair, on each array library
    rng = np.random.default_rng(5)
    arrays = (rng.standard_normal((4, 2, 2)), rng.standard_normal((4, 2, 3)))
    ref = ks.kronecker_svd(ks.KronSum.from_conv(*arrays), rank=2)
    B = ks.KronSVD(*(backend.asarray(np.asarray(a), "float64")
                     for a in (ref.singular_values, ref.lefts, ref.rights)))
    V_np = rng.standard_normal((2, 2, 3))
    for lam, damping_method in ((0.0, "exact"), (0.5, "factored")):
        X, info = B.solve(backend.asarray(V_np, "float64"), lam, damping_method=damping_method,
                          return_info=True)
        assert_same_backend(X, B.lefts, B.lefts.dtype)
        assert info.method == "kronsvd-solve/exact" and info.converged, info
        A = _dense_damped(ref, lam, damping_method)
        dense = np.linalg.solve(A, V_np.reshape(2, -1).T).T.reshape(V_np.shape)
        np.testing.assert_allclose(backend.to_numpy(X), dense, rtol=1e-9, atol=1e-12)
