"""Sums of sums (form "sum"): every operation equals the same operation on the dense sum."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kronsum as ks
from conftest import dense_F, dense_terms, random_inputs, svd_optimum

# every test here runs with the numba kernels on and off (see conftest.numba_path)
pytestmark = pytest.mark.usefixtures("numba_path")


@st.composite
def composites(draw):
    m, n = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    parts, dense, pooled = [], 0.0, []
    for _ in range(draw(st.integers(2, 3))):
        form = draw(st.sampled_from(["terms", "outer", "conv"]))
        K = draw(st.integers(1, 6))
        seed = draw(st.integers(0, 2**31))
        arrays = random_inputs(form, K, m, n, T=draw(st.integers(1, 3)), seed=seed)
        if form == "terms":  # PSD terms, so the whole sum is PSD like a Fisher block
            arrays = tuple(a @ np.swapaxes(a, 1, 2) for a in arrays)
        c = draw(st.floats(0.1, 3.0))
        parts.append(c * getattr(ks.KronSum, f"from_{form}")(*arrays))
        dense = dense + c * dense_F(form, arrays)
        pooled.append((form, arrays, c))
    return ks.KronSum.concat(*parts), dense, pooled, m, n


@given(composites())
def test_operations_match_the_dense_sum(case):
    F, D, _, m, n = case
    assert F.form == "sum" and F.shape == D.shape
    assert np.allclose(F.to_dense(), D)
    Rm = D.reshape(m, n, m, n).transpose(0, 2, 1, 3).reshape(m * m, n * n)
    assert np.allclose(F.rearranged(), Rm)
    X = np.random.default_rng(0).standard_normal((m, m))
    assert np.allclose(F.contract_left(X).reshape(-1), Rm.T @ X.reshape(-1))
    assert np.isclose(F.trace(), np.trace(D))
    assert np.isclose(F.frobenius_norm(), np.linalg.norm(D), rtol=1e-9)


@given(composites())
def test_estimators_on_sums_of_sums(case):
    F, D, pooled, m, n = case
    opt, s = svd_optimum(D, m, n)
    normF = np.linalg.norm(D)
    est = ks.kfoc(F)
    # a conv part of one position is an outer part: the Gram solver takes it too
    gram_able = all(form != "conv" or arrays[0].shape[1] == 1 for form, arrays, _ in pooled)
    assert ks.choose_method(F) in (("gram", "lanczos") if gram_able else ("lanczos",))
    assert est.info.method.startswith("kfoc/" + ks.choose_method(F))
    err = float(ks.frobenius_error(F, est))
    assert err <= opt + (1e-8 + 1e-12) * normF  # the default accuracy
    for method in ("lanczos", "gram") if gram_able else ("lanczos",):
        other = ks.kfoc(F, method=method)
        assert float(ks.frobenius_error(F, other)) <= opt + (1e-8 + 1e-12) * normF
        assert float(other.scale) == pytest.approx(s[0], rel=1e-9, abs=1e-8 * normF)
    assert np.isclose(float(ks.frobenius_error(F, est, method="gram")), err, rtol=1e-6, atol=1e-7 * normF)
    assert np.isclose(float(ks.tkfac(F).trace()), np.trace(D))
    # K-FAC pools the terms of all parts (conv parts with KFC's 1/T on the gradient side)
    SL, SR, SW = 0.0, 0.0, 0.0
    for form, arrays, c in pooled:
        if form == "conv":
            G, A = arrays
            SL = SL + c * np.einsum("kti,ktj->ij", G, G) / G.shape[1]
            SR = SR + c * np.einsum("kti,ktj->ij", A, A)
            SW += c * G.shape[0]
        else:
            w, L, R = dense_terms(form, arrays)
            SL, SR, SW = SL + c * L.sum(0), SR + c * R.sum(0), SW + c * len(w)
    assert np.allclose(ks.kfac(F).to_dense(), np.kron(SL, SR) / SW)


def test_running_combination_of_estimate_and_batch():
    rng = np.random.default_rng(0)
    batch = ks.KronSum.from_outer(rng.standard_normal((20, 3)), rng.standard_normal((20, 4)))
    prev = ks.kfoc(batch, tol=1e-13)  # the optimum itself, not one within the default accuracy
    F = 0.95 * ks.KronSum.from_kron(prev) + 0.05 * batch
    D = 0.95 * prev.to_dense() + 0.05 * batch.to_dense()
    warm = ks.kfoc(F, init=prev)
    ref = ks.nearest_kronecker(F)
    assert np.allclose(warm.to_dense(), ref.to_dense(), atol=1e-9 * np.abs(D).max())
    # the batch's optimum stays the optimum of the combination: the warm start stops at once
    # (1 application, plus Lanczos's 4-step probe for a repeated sigma1)
    assert np.allclose(warm.left, prev.left) and np.allclose(warm.right, prev.right)
    assert warm.info.iterations <= 5


def test_errors():
    F = ks.KronSum.from_outer(np.ones((2, 2)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="same factor sizes"):
        F + ks.KronSum.from_outer(np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match=">= 0"):
        -1.0 * F
    with pytest.raises(TypeError):
        ks.KronSum.concat(F, np.eye(2))
    conv = ks.KronSum.from_conv(np.ones((2, 3, 2)), np.ones((2, 3, 3)))
    with pytest.raises(ValueError, match="gram"):
        ks.kfoc(F + conv, method="gram")
    with pytest.raises(ValueError, match="non-negative"):
        ks.KronSum.from_kron(ks.Kron(np.eye(2), np.eye(3), scale=-1.0))


def test_parts_of_two_array_libraries_are_refused():
    """A sum of a NumPy part and a PyTorch part: a TypeError naming both parts' array types."""
    torch = pytest.importorskip("torch")
    F = ks.KronSum.from_outer(np.ones((2, 2)), np.ones((2, 3)))
    T = ks.KronSum.from_outer(torch.ones((2, 2), dtype=torch.float64), torch.ones((2, 3), dtype=torch.float64))
    cases = [(lambda: ks.KronSum.concat(F, T), r"part 0 is numpy\.ndarray, part 1 is torch\.Tensor"),
             (lambda: ks.KronSum.concat(T, F), r"part 0 is torch\.Tensor, part 1 is numpy\.ndarray"),
             (lambda: F + T, r"part 0 is numpy\.ndarray, part 1 is torch\.Tensor"),
             (lambda: ks.KronSum.concat(F, F + F, T), r"part 2 is numpy\.ndarray, part 3 is torch\.Tensor")]
    for make, names in cases:
        with pytest.raises(TypeError, match=r"one array library; .*" + names):
            make()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "general"])
def test_one_term_and_samples_gram_and_norm(backend, dtype, symmetric):
    """A one-term terms part (a running estimate's previous one) beside an outer part: the
    cross Gram rows ``v_lᵀ T v_l`` (through ``‖F‖``, the Gram route's matrices and ``kfoc``)
    match the dense sum on every backend, for a general and a symmetric term."""
    m, n = 3, 4
    L, R = random_inputs("terms", 1, m, n, seed=21)
    if symmetric:
        L, R = L @ np.swapaxes(L, 1, 2), R @ np.swapaxes(R, 1, 2)
    G, A = random_inputs("outer", 6, m, n, seed=22)
    ws = np.linspace(0.5, 1.5, 6)
    dense = dense_F("terms", (L, R), np.array([0.7])) + dense_F("outer", (G, A), ws)
    b = lambda a: backend.asarray(a, dtype)  # noqa: E731
    F = ks.KronSum.from_terms(b(L), b(R), b(np.array([0.7]))) + ks.KronSum.from_outer(b(G), b(A), b(ws))
    rel = 1e-10 if dtype == "float64" else 1e-4
    assert float(backend.to_numpy(F.frobenius_norm())) == pytest.approx(np.linalg.norm(dense), rel=rel)
    _, sv = svd_optimum(dense, m, n)
    method = "lanczos" if backend.name == "dask" else "gram"  # Dask arrays have no Gram solver
    est = ks.kfoc(F, method=method, tol=1e-12 if dtype == "float64" else 1e-6)
    assert float(backend.to_numpy(est.scale)) == pytest.approx(sv[0], rel=1e-8 if dtype == "float64" else 1e-4)


@pytest.mark.parametrize("other", ["outer", "conv"])
@pytest.mark.parametrize("budget", [1, 1 << 24], ids=["one-term-chunks", "one-chunk"])
def test_cross_term_of_general_terms_and_samples(backend, other, budget, monkeypatch):
    """‖F‖ of terms (non-symmetric, weighted) + outer/conv parts equals the dense norm, on
    every backend, whether P's terms are batched in one chunk or one at a time."""
    from kronsum import _sum

    monkeypatch.setattr(_sum, "_CROSS_BUDGET", budget)
    m, n = 3, 4
    L, R = random_inputs("terms", 5, m, n, seed=11)
    wt = np.linspace(0.3, 1.7, 5)
    S = random_inputs(other, 7, m, n, T=2, seed=12)
    ws = np.linspace(0.5, 1.5, 7)
    dense = dense_F("terms", (L, R), wt) + dense_F(other, S, ws)
    b = lambda a: backend.asarray(a, "float64")  # noqa: E731
    F = (ks.KronSum.from_terms(b(L), b(R), b(wt))
         + getattr(ks.KronSum, f"from_{other}")(*(b(a) for a in S), b(ws)))
    got = float(backend.to_numpy(F.frobenius_norm()))
    assert got == pytest.approx(np.linalg.norm(dense), rel=1e-10)


@st.composite
def gram_sums(draw):
    """Sums of 2–3 parts of the terms and outer forms (the Gram solver's sums)."""
    m, n = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    parts = []
    for _ in range(draw(st.integers(2, 3))):
        form = draw(st.sampled_from(["terms", "outer"]))
        arrays = random_inputs(form, draw(st.integers(1, 6)), m, n, seed=draw(st.integers(0, 2**31)),
                               kind=draw(st.sampled_from(["gaussian", "heavy"])))
        if form == "terms" and draw(st.booleans()):  # PSD terms, or general (non-symmetric) ones
            arrays = tuple(a @ np.swapaxes(a, 1, 2) for a in arrays)
        parts.append(draw(st.floats(0.1, 3.0)) * getattr(ks.KronSum, f"from_{form}")(*arrays))
    return ks.KronSum.concat(*parts), m, n


@given(gram_sums(), st.sampled_from(["float64", "float32"]), st.sampled_from([1, 1 << 24]))
def test_gram_matrices_of_a_sum_are_the_rearrangement_columns_products(case, dtype, budget):
    """S_P = PᵀP and S_Q = QᵀQ for the sum's vec'd terms, by the definition; float32 inputs
    with ``float64=True`` give float64; the terms × outer blocks in one chunk or term by term."""
    from kronsum import _sum

    F, m, n = case
    F = F.astype(np.dtype(dtype).type) if dtype == "float32" else F
    P, Q = [], []
    for part in F.parts:
        if part.form == "terms":
            P += [L.reshape(-1) for L in part.L]
            Q += [R.reshape(-1) for R in part.R]
        else:
            P += [np.outer(g, g).reshape(-1) for g in part.G]
            Q += [np.outer(a, a).reshape(-1) for a in part.A]
    P, Q = np.array(P, dtype=np.float64).T, np.array(Q, dtype=np.float64).T
    tol = 1e-12 if dtype == "float64" else 1e-5
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_sum, "_CROSS_BUDGET", budget)
        for float64 in (False, True):
            for side, V in (("left", P), ("right", Q)):
                S = F._gram(side, float64=float64)
                assert S.dtype == (np.float64 if float64 else np.dtype(dtype))
                assert np.allclose(S, V.T @ V, rtol=tol, atol=tol * np.abs(V).max() ** 2 * max(V.shape[0], 1))
    c = np.arange(F.num_terms, dtype=F.dtype)
    assert np.allclose(F._combine("left", c), (P @ c).reshape(m, m), rtol=tol,
                       atol=tol * np.abs(P).max() * F.num_terms ** 2)


def test_kfoc_running_takes_the_gram_solver_and_agrees_with_lanczos(backend):
    rng = np.random.default_rng(4)
    b = lambda a: backend.asarray(a, "float64")  # noqa: E731
    batch = ks.KronSum.from_outer(b(rng.standard_normal((40, 5))), b(rng.standard_normal((40, 6))))
    prev = ks.kfoc(ks.KronSum.from_outer(b(rng.standard_normal((30, 5))), b(rng.standard_normal((30, 6)))))
    F = 0.9 * ks.KronSum.from_kron(prev) + 0.1 * batch
    if backend.name == "dask":
        assert ks.choose_method(F) == "lanczos"
        return
    assert ks.choose_method(F) == "gram"
    gram = ks.kfoc(F, init=prev, tol=1e-10)  # the residual rule: factors compared
    lanczos = ks.kfoc(F, init=prev, method="lanczos", tol=1e-10)
    assert gram.info.method.startswith("kfoc/gram")
    D = backend.to_numpy(F.to_dense())
    _, s = svd_optimum(D, 5, 6)
    assert float(backend.to_numpy(gram.scale)) == pytest.approx(s[0], rel=1e-10)
    assert np.allclose(backend.to_numpy(gram.to_dense()), backend.to_numpy(lanczos.to_dense()),
                       atol=1e-8 * np.abs(D).max())
    run = ks.RunningEstimate("kfoc_running", decay=0.9)
    run.update(ks.KronSum.from_outer(b(rng.standard_normal((30, 5))), b(rng.standard_normal((30, 6)))))
    est = run.update(batch)  # previous estimate + batch: a sum of a terms and an outer part
    # the Gram solver works on K×K Gram matrices: no contraction of the sum at all
    assert est.info.contractions == 0 and est.info.converged, est.info


@given(gram_sums())
def test_kronecker_svd_of_a_sum_by_the_gram_solver(case):
    """Rank-r approximation of a sum of terms/outer parts by the Gram solver = SVD ground truth."""
    F, m, n = case
    D = F.to_dense()
    _, s = svd_optimum(D, m, n)
    normF = np.linalg.norm(D)
    for r in range(1, min(3, m * m, n * n) + 1):
        B = ks.kronecker_svd(F, rank=r, method="gram")
        assert B.info.converged, B.info
        np.testing.assert_allclose(B.singular_values, s[:r], rtol=1e-8, atol=1e-10 * normF)
        opt = float(np.sqrt(np.sum(s[r:] ** 2)))
        assert np.isclose(np.linalg.norm(D - B.to_dense()), opt, rtol=1e-7, atol=1e-9 * normF)
