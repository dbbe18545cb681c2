"""K-FOC's factors of a PSD sum are PSD to rounding, on every route — also where the float32
iteration of float64 inputs meets factors with an exact null space (the gradient side of a
softmax cross-entropy layer, whose per-sample gradients sum to zero over the classes), which
damped inverses, log-determinants and sampling need."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, example, given, settings, strategies as st

import kronsum as ks
from conftest import svd_optimum, two_populations


def _softmax_block(K, m, n, seed, heavy):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((K, m)) * (3.0 if heavy else 1.0)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    G = p - np.eye(m)[rng.integers(0, m, K)]  # each row sums to zero: L has the null vector 1
    G *= rng.standard_t(3, size=(K, 1)) if heavy else 1.0
    A = np.hstack([rng.standard_normal((K, n - 1)), np.ones((K, 1))])
    return ks.KronSum.from_outer(G, A)


def _min_rel_eig(M):
    lam = np.linalg.eigvalsh(M)
    return lam[0] / np.abs(lam).max()


def _assert_psd_at_the_optimum(F, est, accuracy, half_atol=1e-9):
    """Both factors PSD to rounding, the damped inverse accepted, the right factor the
    normalised half-step of the left one (``R = 𝓡ᵀvec(L)/σ``, to ``half_atol``: rounding and
    the PSD moves), and the error within ``accuracy`` (default 1e-8) of the SVD optimum of the
    dense F, relative to ‖F‖."""
    half = F.contract_left(est.left)
    half = (half + half.T) / 2
    assert np.allclose(est.right, half / np.linalg.norm(half), rtol=0, atol=half_atol), est.info
    for M in (est.left, est.right):
        assert _min_rel_eig(M) >= -10 * M.shape[0] * np.finfo(M.dtype).eps, (est.info, _min_rel_eig(M))
    est.inverse(1e-6)  # refused for an indefinite factor
    D = F.to_dense()
    opt, _ = svd_optimum(D, F.m, F.n)
    err = float(np.linalg.norm(D - est.to_dense()))
    assert (err - opt) / float(np.linalg.norm(D)) <= (1e-8 if accuracy is None else accuracy) + 1e-12, est.info


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), heavy=st.booleans(),
       method=st.sampled_from(["auto", "lanczos", "power", "gram"]),
       accuracy=st.sampled_from([None, 1e-4]))
def test_factors_are_psd_with_a_null_space(seed, heavy, method, accuracy):
    """Also the float32 solve's own answer (``accuracy=1e-4``), finished in float32: PSD to
    float64's rounding once handed on as float64."""
    F = _softmax_block(7000, 10, 100, seed, heavy)  # large enough for the float32 iteration
    est = ks.kfoc(F, method=method, accuracy=accuracy)
    for M in (est.left, est.right):
        assert _min_rel_eig(M) >= -10 * M.shape[0] * np.finfo(M.dtype).eps, est.info
    assert np.isfinite(float(est.logdet(1e-3)))  # refused for an indefinite factor
    opt = ks.kfoc(F, method="power", tol=1e-13, accuracy=None)
    err, err_opt = (float(ks.frobenius_error(F, e)) for e in (est, opt))
    if accuracy is None:
        assert err <= err_opt * (1 + 1e-8)
    else:
        assert err - err_opt <= accuracy * float(F.frobenius_norm()), est.info


@pytest.mark.usefixtures("numba_path")
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), form=st.sampled_from(["outer", "conv"]),
       accuracy=st.sampled_from([None, 1e-6, 1e-4]),
       method=st.sampled_from(["auto", "gram", "lanczos"]))
def test_factors_are_psd_where_the_optimum_is_singular(seed, form, accuracy, method):
    """Fewer samples (or positions) than a factor's size: the optimum's factor is singular, and
    an iterate stopped at an error-gap accuracy (its angle about the square root) would show
    eigenvalues of −√accuracy there. The answer is PSD to rounding, invertible with damping,
    and still within the accuracy of the optimal error (the projection onto the PSD cone
    brings it no farther from the PSD optimum)."""
    rng = np.random.default_rng(seed)
    m, n = int(rng.integers(6, 30)), int(rng.integers(3, 20))
    K = int(rng.integers(2, max(3, m // 2)))
    scale = rng.standard_t(1.5, (K, 1))  # heavy-tailed magnitudes per sample
    if form == "outer":
        F = ks.KronSum.from_outer(rng.standard_normal((K, m)) * scale, rng.standard_normal((K, n)))
    else:
        T = int(rng.integers(1, 4))
        F = ks.KronSum.from_conv(rng.standard_normal((K, T, m)) * scale[:, :, None],
                                 rng.standard_normal((K, T, n)))
    _assert_psd_at_the_optimum(F, ks.kfoc(F, method=method, accuracy=accuracy), accuracy)


@pytest.mark.usefixtures("numba_path")
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), form=st.sampled_from(["outer", "conv"]),
       accuracy=st.sampled_from([None, 1e-4]))
def test_terms_that_repeat_a_direction(seed, form, accuracy):
    """Per-sample gradients along a few directions only (one-hot-like rows; positions whose
    gradients are proportional): the Gram coefficients of the answer are not unique and may
    take both signs for a PSD factor. The answer stays at the optimum and PSD."""
    rng = np.random.default_rng(seed)
    m, n, K = int(rng.integers(1, 6)), int(rng.integers(1, 9)), int(rng.choice([2, 4, 8, 20]))
    w = rng.uniform(0.1, 2, K)
    if form == "outer":
        G = np.zeros((K, m))
        G[np.arange(K), rng.integers(0, m, K)] = rng.standard_normal(K)
        F = ks.KronSum.from_outer(G, rng.standard_normal((K, n)), w)
    else:
        T = int(rng.integers(2, 10))
        G = rng.standard_normal((K, T, 1)) * rng.standard_normal((K, 1, m))  # rank 1 per sample
        F = ks.KronSum.from_conv(G, rng.standard_normal((K, T, n)), w)
    _assert_psd_at_the_optimum(F, ks.kfoc(F, accuracy=accuracy), accuracy)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), accuracy=st.sampled_from([None, 1e-4]))
def test_conv_gram_route_with_positions_of_very_different_magnitudes(seed, accuracy):
    """Conv blocks whose positions' rows differ in magnitude by up to 10¹⁶: the rounding of the
    per-sample T × T coefficient matrices, at their own scale, would reach the factors far above
    the factors' rounding. The explicit Gram route keeps them PSD and within the accuracy."""
    rng = np.random.default_rng(seed)
    K, T, m, n = int(rng.integers(1, 4)), int(rng.choice([4, 9])), int(rng.integers(2, 14)), int(rng.integers(2, 6))
    G = rng.standard_normal((K, T, m)) * 10.0 ** rng.uniform(-8, 8, (K, T, 1))
    A = rng.standard_normal((K, T, n)) * 10.0 ** rng.uniform(-8, 8, (K, T, 1))
    F = ks.KronSum.from_conv(G, A)
    est = ks.kfoc(F, method="gram", accuracy=accuracy)
    assert est.info.method == "kfoc/gram"
    _assert_psd_at_the_optimum(F, est, accuracy)


@pytest.mark.parametrize("seed", [88, 91])
def test_conv_gram_route_with_positions_that_cancel(seed):
    """Conv blocks whose second half of positions nearly cancels the first (X_k about 1e-2 to
    1e-5 of its positions' magnitudes): an explicit Gram route continues by Lanczos on the
    contractions, whose half-step factor, PSD in exact arithmetic, rounds at the positions'
    scale and is made PSD to that rounding: both factors invertible, and the answer within the
    default accuracy or its bound (which then says it is not)."""
    rng = np.random.default_rng(seed)
    K, P, m, n = int(rng.integers(1, 6)), int(rng.integers(1, 4)), int(rng.integers(2, 8)), int(rng.integers(2, 8))
    delta = 10.0 ** -rng.uniform(2, 5)
    g, a = rng.standard_normal((K, P, m)), rng.standard_normal((K, P, n))
    G = np.concatenate([g, g], axis=1)
    A = np.concatenate([a, -a + delta * rng.standard_normal((K, P, n))], axis=1)
    F = ks.KronSum.from_conv(G, A)
    est = ks.kfoc(F, method="gram")
    for M in (est.left, est.right):
        assert _min_rel_eig(M) >= -10 * M.shape[0] * np.finfo(M.dtype).eps, (est.info, _min_rel_eig(M))
    est.inverse(1e-6)
    D = F.to_dense()
    opt, _ = svd_optimum(D, F.m, F.n)
    gap = (float(np.linalg.norm(D - est.to_dense())) - opt) / float(np.linalg.norm(D))
    assert gap <= max(1e-8, est.info.error_gap_bound) * (1 + 1e-6) + 1e-12, (gap, est.info)
    if gap > 1e-8:
        assert est.info.error_gap_bound > 1e-8 and est.info.notes, est.info


def test_conv_gram_route_on_positions_that_cancel_says_so():
    """Positions that cancel to about 1e-7 of their magnitudes leave the conv Gram route's metric
    numerically singular at the answer (it finds a zero sum): an explicit ``method="gram"``
    continues by Lanczos on the contractions, whose bound allows for the rounding at the
    positions' scale, and says so in the notes; ``auto`` answers the same way."""
    rng = np.random.default_rng(184)
    K, P, m, n = int(rng.integers(1, 6)), int(rng.integers(1, 4)), int(rng.integers(2, 8)), int(rng.integers(2, 8))
    delta = 10.0 ** -rng.uniform(2, 7)
    g, a = rng.standard_normal((K, P, m)), rng.standard_normal((K, P, n))
    F = ks.KronSum.from_conv(np.concatenate([g, g], axis=1),
                             np.concatenate([a, -a + delta * rng.standard_normal((K, P, n))], axis=1))
    D = F.to_dense()
    opt, _ = svd_optimum(D, F.m, F.n)
    for method in ("gram", "auto"):
        est = ks.kfoc(F, method=method)
        assert est.info.method == "kfoc/lanczos", est.info
        assert any("positions cancel" in note for note in est.info.notes), est.info
        assert float(est.scale) > 0
        gap = (float(np.linalg.norm(D - est.to_dense())) - opt) / float(np.linalg.norm(D))
        assert gap <= est.info.error_gap_bound, (gap, est.info)
        est.inverse(1e-6)


@pytest.mark.parametrize("form", ["outer", "conv"])
def test_running_kfoc_estimates_stay_psd_and_invertible(form):
    """``RunningEstimate("kfoc_running")`` on batches smaller than the factors (rank-deficient
    statistics), 40 seeded streams: every update's estimate is PSD to rounding and its damped
    inverse exists (the previous estimate enters each sum as a PSD term)."""
    for seed in range(40):
        rng = np.random.default_rng([21, seed])
        m, n = int(rng.choice([2, 5, 16, 40])), int(rng.choice([3, 8, 33]))
        run = ks.RunningEstimate("kfoc_running", 0.95)
        for _ in range(6):
            B = int(rng.choice([1, 2, 3, 8]))
            if form == "outer":
                F = ks.KronSum.from_outer(rng.standard_normal((B, m)), rng.standard_normal((B, n)))
            else:
                T = int(rng.integers(1, 4))
                F = ks.KronSum.from_conv(rng.standard_normal((B, T, m)),
                                         rng.standard_normal((B, T, n)))
            est = run.update(F)
            for M in (est.left, est.right):
                assert _min_rel_eig(M) >= -10 * M.shape[0] * np.finfo(M.dtype).eps, (seed, est.info)
            est.inverse(1e-3)  # refused for an indefinite factor


def test_small_factors_formed_over_many_terms_are_invertible():
    """Two independent blocks (F = F₁ ⊕ F₂ on disjoint rows and columns) make the optimal 2 × 2
    right factor singular; formed over 34 terms, its rounding (up to 34·ε) had left an
    eigenvalue of −8e-15, beyond the 10·d·ε = 4.4e-15 that ``inverse()`` allows, which then
    refused it. Every route returns factors the inverse accepts."""
    rng = np.random.default_rng([3, 125])
    K, m, n = 17, 7, 2
    G, A = np.zeros((2 * K, m)), np.zeros((2 * K, n))
    G[:K, : m // 2] = rng.standard_normal((K, m // 2))
    G[K:, m // 2:] = rng.standard_normal((K, m - m // 2))
    A[:K, : n // 2] = rng.standard_normal((K, n // 2))
    A[K:, n // 2:] = rng.standard_normal((K, n - n // 2))
    w = np.ones(2 * K)
    w[K:] = 1 + 1e-2
    F = ks.KronSum.from_outer(G, A, w)
    D = F.to_dense()
    opt, _ = svd_optimum(D, m, n)
    for method in ("auto", "gram", "lanczos", "power"):
        for accuracy in (None, 1e-4):
            est = ks.kfoc(F, method=method, accuracy=accuracy)
            for M in (est.left, est.right):
                assert _min_rel_eig(M) >= -10 * M.shape[0] * np.finfo(M.dtype).eps, (method, est.info)
            est.inverse(1e-6)
            gap = (float(np.linalg.norm(D - est.to_dense())) - opt) / float(np.linalg.norm(D))
            assert gap <= (accuracy or 1e-8), (method, gap, est.info)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), accuracy=st.sampled_from([1e-3, 1e-4, 1e-6]))
@example(seed=4, accuracy=1e-4)
@pytest.mark.usefixtures("numba_path")
def test_gram_route_at_a_loose_accuracy_gives_psd_factors_without_a_projection(seed, accuracy):
    """A Gram-route answer stopped by a loose accuracy whose coefficients take both signs, on
    a block whose left factor is large against K (projecting it would cost an m × m eigh): the
    coefficients iterate on instead, and both factors come from them (no contraction), PSD,
    within the bound of the dense optimum."""
    rng = np.random.default_rng(seed)
    K, m, n = int(rng.integers(16, 30)), int(rng.integers(36, 41)), int(rng.integers(3, 8))
    s = np.abs(rng.standard_t(2, size=(K, 1))) + 0.1
    G, A = s * rng.standard_normal((K, m)), s * rng.standard_normal((K, n))
    F = ks.KronSum.from_outer(G, A)
    opt, sv = svd_optimum(F.to_dense(), m, n)
    nF = float(np.sqrt(np.sum(sv ** 2)))
    # not a block that one sample dominates so far that F is a Kronecker product to rounding:
    # the Gram matrices cannot resolve its optimum, and the answer is checked on the
    # contractions (the route the nearly-exact tests cover)
    assume(opt > 1e-6 * nF)
    est = ks.kfoc(F, method="gram", accuracy=accuracy)
    assert est.info.converged and est.info.contractions == 0, est.info
    for factor in (est.left, est.right):
        lam = np.linalg.eigvalsh(factor)
        assert lam.min() >= -10 * factor.shape[0] * np.finfo(float).eps * lam.max(), lam.min()
    gap = (float(ks.frobenius_error(F, est)) - opt) / nF
    assert gap <= est.info.error_gap_bound + 1e-13 and est.info.error_gap_bound <= accuracy, (gap, est.info)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), form=st.sampled_from(["outer", "conv"]),
       block=st.sampled_from(["two populations", "few samples"]), wide=st.booleans(),
       accuracy=st.sampled_from([None, 1e-6, 1e-4]), method=st.sampled_from(["lanczos", "power"]),
       flip=st.booleans())
@example(seed=0, form="conv", block="two populations", wide=True, accuracy=1e-4, method="lanczos", flip=False)
@example(seed=0, form="conv", block="two populations", wide=True, accuracy=1e-4, method="lanczos", flip=True)
@example(seed=1, form="conv", block="two populations", wide=False, accuracy=1e-4, method="lanczos", flip=False)
@example(seed=1, form="conv", block="two populations", wide=False, accuracy=1e-4, method="lanczos", flip=True)
def test_a_projected_iterate_is_finished_with_its_own_half_step(seed, form, block, wide, accuracy, method, flip):
    """Where the iterate is projected onto the PSD cone (here: a loose accuracy mixing in an
    indefinite second pair, or an optimum whose factor is singular), the other factor is still
    the normalised half-step of the projected one, ``R = 𝓡ᵀvec(L)/σ`` (with the sign rule), as
    for every answer: the solver's image of the iterate corrected by that of the removed
    negative part. Both factors PSD, the error within the accuracy of the optimum. The start
    is TKFAC's factor or its negative (``flip``), so that the iterate comes out with either
    sign of its trace: the projection is of ``±x``."""
    m, n = (8, 36) if wide else (36, 8)
    if block == "two populations":
        G, A = two_populations(form, 8, 8, m, n, seed)
    else:  # fewer samples than the iterated factor's size, heavy-tailed magnitudes
        rng = np.random.default_rng(seed)
        K, T = 3, 2
        s = rng.standard_t(1.5, (K, 1, 1))
        G, A = s * rng.standard_normal((K, T, m)), rng.standard_normal((K, T, n))
        if form == "outer":
            G, A = G[:, 0], A[:, 0]
    F = ks.KronSum.from_conv(G, A) if form == "conv" else ks.KronSum.from_outer(G, A)
    start = ks.tkfac(F)
    if flip:
        start = ks.Kron(-start.left, -start.right, start.scale)
    est = ks.kfoc(F, method=method, accuracy=accuracy, init=start)
    _assert_psd_at_the_optimum(F, est, accuracy, half_atol=1e-12)
    assert np.isclose(float(est.scale), np.linalg.norm(F.contract_left(est.left)), rtol=1e-12)
