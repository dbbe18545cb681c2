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
    assert est.info.method == "kfoc/lanczos"
    err = float(ks.frobenius_error(F, est))
    assert err <= opt * (1 + 1e-8) + 1e-12 * normF
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
    prev = ks.kfoc(batch)
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
    with pytest.raises(ValueError, match="gram"):
        ks.kfoc(F + F, method="gram")
    with pytest.raises(ValueError, match="non-negative"):
        ks.KronSum.from_kron(ks.Kron(np.eye(2), np.eye(3), scale=-1.0))


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
