"""The conventions stated in the docs, tested once: vec order, factor order, sum not mean."""

import numpy as np
import pytest

import kronsum as ks
from conftest import dense_F, random_inputs


def test_row_major_vec_identity():
    rng = np.random.default_rng(0)
    L, R, V = rng.standard_normal((3, 3)), rng.standard_normal((4, 4)), rng.standard_normal((3, 4))
    # (L ⊗ R) vec(V) = vec(L V Rᵀ) with vec(V) = V.reshape(-1)
    assert np.allclose(np.kron(L, R) @ V.reshape(-1), (L @ V @ R.T).reshape(-1))
    K = ks.Kron(L, R, scale=2.0)
    assert np.allclose(K.to_dense(), 2.0 * np.kron(L, R))
    assert np.allclose(K.matvec(V).reshape(-1), K.to_dense() @ V.reshape(-1))


def test_kron_matvec_batched_and_trace_norm():
    rng = np.random.default_rng(1)
    L, R = rng.standard_normal((2, 2)), rng.standard_normal((3, 3))
    K = ks.Kron(L, R, scale=-1.5)
    V = rng.standard_normal((5, 4, 2, 3))
    out = K.matvec(V)
    assert out.shape == V.shape
    assert np.allclose(out[2, 1].reshape(-1), K.to_dense() @ V[2, 1].reshape(-1))
    assert np.isclose(K.trace(), np.trace(K.to_dense()))
    assert np.isclose(K.frobenius_norm(), np.linalg.norm(K.to_dense()))
    with pytest.raises(ValueError, match=r"\(\.\.\., 2, 3\)"):
        K.matvec(np.ones((3, 2)))


def test_weight_stored_out_in_is_grad_side_kron_activation_side():
    """For W (out, in), s = W a: dW = g aᵀ, vec(dW) = g ⊗ a, so vec(dW)vec(dW)ᵀ = ggᵀ ⊗ aaᵀ."""
    rng = np.random.default_rng(2)
    g, a = rng.standard_normal(3), rng.standard_normal(5)
    dW = np.outer(g, a)  # (out, in)
    block = np.outer(dW.reshape(-1), dW.reshape(-1))
    F = ks.KronSum.from_outer(g[None, :], a[None, :])
    assert F.m == 3 and F.n == 5
    assert np.allclose(F.to_dense(), block)


def test_conv_form_is_outer_product_of_per_sample_gradient():
    """conv: the per-sample weight gradient is X_k = G_kᵀ A_k and the term vec(X_k)vec(X_k)ᵀ."""
    G, A = random_inputs("conv", 3, 2, 4, T=5, seed=3)
    F = ks.KronSum.from_conv(G, A)
    X = np.einsum("ktm,ktn->kmn", G, A)
    ref = sum(np.outer(x.reshape(-1), x.reshape(-1)) for x in X)
    assert np.allclose(F.to_dense(), ref)
    assert np.allclose(F.to_dense(), dense_F("conv", (G, A)))


@pytest.mark.parametrize("form", ["terms", "outer", "conv"])
def test_sum_not_mean_and_weights(form):
    arrays = random_inputs(form, 4, 2, 3, seed=4)
    w = np.array([0.5, 2.0, 0.0, 1.0])
    F1 = getattr(ks.KronSum, f"from_{form}")(*arrays)
    Fw = getattr(ks.KronSum, f"from_{form}")(*arrays, w)
    assert np.allclose(F1.to_dense(), dense_F(form, arrays))  # weights default to 1: a sum
    assert np.allclose(Fw.to_dense(), dense_F(form, arrays, w))


@pytest.mark.parametrize("form", ["terms", "outer", "conv"])
def test_dense_views_and_summaries(form):
    arrays = random_inputs(form, 5, 3, 2, seed=5)
    F = getattr(ks.KronSum, f"from_{form}")(*arrays)
    D = dense_F(form, arrays)
    m, n = F.m, F.n
    assert F.shape == D.shape == (m * n, m * n)
    assert np.allclose(F.to_dense(), D)
    assert np.allclose(F.rearranged(), D.reshape(m, n, m, n).transpose(0, 2, 1, 3).reshape(m * m, n * n))
    assert np.isclose(F.trace(), np.trace(D))
    assert np.isclose(F.frobenius_norm(), np.linalg.norm(D))


@pytest.mark.parametrize("form", ["terms", "outer", "conv"])
def test_contractions_are_rearranged_products(form):
    arrays = random_inputs(form, 6, 3, 4, seed=6)
    F = getattr(ks.KronSum, f"from_{form}")(*arrays)
    Rm = F.rearranged()
    rng = np.random.default_rng(7)
    X, Y = rng.standard_normal((3, 3)), rng.standard_normal((4, 4))
    assert np.allclose(F.contract_left(X).reshape(-1), Rm.T @ X.reshape(-1))
    assert np.allclose(F.contract_right(Y).reshape(-1), Rm @ Y.reshape(-1))


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-11), (np.float32, 2e-5)])
@pytest.mark.parametrize("form", ["outer", "conv"])
def test_contractions_with_a_wide_side_agree_with_the_definition(form, dtype, rtol):
    # a side of 128 or more with at least twice as many rows (samples, or samples × positions)
    # takes the quadratic forms with a symmetric factor through its triangle on NumPy (trmm);
    # a general factor through the full product: both equal the definition, computed here
    # term by term in float64
    rng = np.random.default_rng(11)
    if form == "outer":
        K, m, n = 300, 130, 3
        G, A = rng.standard_normal((K, m)), rng.standard_normal((K, n))
        X_k = G[:, :, None] * A[:, None, :]  # (K, m, n): the per-term matrices g_k a_kᵀ
        F = ks.KronSum.from_outer(G.astype(dtype), A.astype(dtype), np.linspace(0.5, 2, K).astype(dtype))
    else:
        K, T, m, n = 8, 40, 48, 130  # T < m ≪ n: the (n, n) factor taken per position
        G, A = rng.standard_normal((K, T, m)), rng.standard_normal((K, T, n))
        X_k = np.swapaxes(G, 1, 2) @ A  # (K, m, n): X_k = G_kᵀ A_k
        F = ks.KronSum.from_conv(G.astype(dtype), A.astype(dtype), np.linspace(0.5, 2, K).astype(dtype))
    w = np.linspace(0.5, 2, K)
    X_k = X_k.astype(dtype).astype(np.float64)  # the inputs' own rounding
    for side, d in (("left", m), ("right", n)):
        Z = rng.standard_normal((d, d))
        for M in (Z, Z + Z.T):  # general, symmetric
            Mc = M.astype(dtype)
            M64 = Mc.astype(np.float64)
            if side == "left":  # Σ_k w_k X_kᵀ M X_k, (n, n)
                ref = np.einsum("k,kia,ij,kjb->ab", w, X_k, M64, X_k, optimize=True)
                got = F.contract_left(Mc.copy())
            else:  # Σ_k w_k X_k M X_kᵀ, (m, m)
                ref = np.einsum("k,kai,ij,kbj->ab", w, X_k, M64, X_k, optimize=True)
                got = F.contract_right(Mc.copy())
            assert got.dtype == dtype
            scale = np.abs(np.einsum("k,kia,ij,kjb->ab", w, np.abs(X_k), np.abs(M64), np.abs(X_k), optimize=True)
                           if side == "left" else
                           np.einsum("k,kai,ij,kbj->ab", w, np.abs(X_k), np.abs(M64), np.abs(X_k), optimize=True)).max()
            np.testing.assert_allclose(got, ref, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("K, T, m, n", [(3, 2, 6, 7), (3, 40, 2, 3), (64, 16, 8, 64), (64, 16, 64, 8)])
def test_conv_contraction_every_association_agrees(K, T, m, n):
    # T small: per position; T large beside m, n: per sample through X_k; many samples of a
    # narrow side: the weighted Gram product of the rows (P_k v_i)ᵀ Q_k (eigh of a symmetric X)
    G, A = random_inputs("conv", K, m, n, T=T, seed=T)
    rng = np.random.default_rng(0)
    w = rng.random(K)
    w[0] = 0.0
    F = ks.KronSum.from_conv(G, A, w)
    Rm = F.rearranged()
    for X in (rng.standard_normal((m, m)), None):
        for Xs in ((X, X + X.T) if X is not None else (None,)):  # general, symmetric, identity
            ref = Rm.T @ (np.eye(m) if Xs is None else Xs).reshape(-1)
            got = F.contract_left(None if Xs is None else Xs.copy())
            np.testing.assert_allclose(got.reshape(-1), ref, rtol=1e-11, atol=1e-11 * np.abs(ref).max())
            if Xs is None or np.array_equal(Xs, Xs.T):
                np.testing.assert_allclose(got, got.T, rtol=1e-13, atol=1e-13 * np.abs(ref).max())
        Y = rng.standard_normal((n, n))
        for Ys in (Y, Y + Y.T):
            ref = Rm @ Ys.reshape(-1)
            np.testing.assert_allclose(F.contract_right(Ys).reshape(-1), ref, rtol=1e-11,
                                       atol=1e-11 * np.abs(ref).max())
