"""Estimators against dense ground truth: SVD of the rearranged matrix and closed forms.

The references are built from ``np.kron`` of materialised terms and NumPy's SVD, sharing no
code with the library.
"""

import warnings

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import kronsum as ks
from conftest import FORMS, dense_F, dense_terms, random_inputs, sums, svd_optimum, two_populations

# every test here runs with the numba kernels on and off (see conftest.numba_path)
pytestmark = pytest.mark.usefixtures("numba_path")



def _errors(F, est, D):
    return float(ks.frobenius_error(F, est)), float(np.linalg.norm(D - est.to_dense()))


@given(sums())
def test_kfoc_reaches_svd_optimum(case):
    form, arrays, w = case
    F = getattr(ks.KronSum, f"from_{form}")(*arrays, w)
    D = dense_F(form, arrays, w)
    opt, s = svd_optimum(D, F.m, F.n)
    normF = np.linalg.norm(D)
    # rounding: the bound holds in exact arithmetic; the computed answer carries rounding of
    # about ε·‖|F|‖ (F of the inputs' magnitudes), far above ε‖F‖ where the terms cancel
    absolute = np.linalg.norm(dense_F(form, [np.abs(a) for a in arrays], None if w is None else np.abs(w)))
    rounding = 1e-12 + 100 * np.finfo(np.float64).eps * absolute / normF
    methods = ["auto", "lanczos", "gram"]
    for method in methods:
        est = ks.kfoc(F, method=method)
        err, err_dense = _errors(F, est, D)
        # the default accuracy: within 1e-8·‖F‖ of the optimal error, and within the bound
        gap = (err - opt) / normF
        assert gap <= 1e-8 + 1e-12, (method, err, opt, est.info)
        if est.info.error_gap_bound is not None and method != "power":
            assert gap <= est.info.error_gap_bound * (1 + 1e-6) + rounding, (method, gap, est.info)
        assert np.isclose(err, err_dense, rtol=1e-7, atol=1e-12 * normF)
        # the scale is σ1 (to second order in the angle) and the factors have unit norm
        assert np.isclose(float(est.scale), s[0], rtol=1e-8, atol=1e-8 * normF)
        assert np.isclose(np.linalg.norm(est.left), 1.0) and np.isclose(np.linalg.norm(est.right), 1.0)
    ref = ks.nearest_kronecker(F)
    assert np.isclose(float(ks.frobenius_error(F, ref)), opt, rtol=1e-8, atol=1e-12 * normF)


@given(sums())
def test_optimal_error_is_below_kfac_and_tkfac(case):
    form, arrays, w = case
    F = getattr(ks.KronSum, f"from_{form}")(*arrays, w)
    e_opt = float(ks.frobenius_error(F, ks.kfoc(F)))
    slack = 1e-10 * float(F.frobenius_norm())
    assert e_opt <= float(ks.frobenius_error(F, ks.kfac(F))) + slack
    assert e_opt <= float(ks.frobenius_error(F, ks.tkfac(F))) + slack


@given(sums(forms=("outer", "conv")))
def test_psd_in_psd_out(case):
    form, arrays, w = case
    F = getattr(ks.KronSum, f"from_{form}")(*arrays, w)
    # PSD to rounding with the residual rule; with the default accuracy (1e-8 on the error)
    # the factors are within an angle of about 1e-4 of the optimum's, and so are their
    # smallest eigenvalues (docs/kfoc.md)
    for est, floor in ((ks.kfoc(F), 1e-4), (ks.kfoc(F, method="lanczos"), 1e-4),
                       (ks.kfoc(F, tol=1e-10), 1e-9), (ks.kfoc(F, method="lanczos", tol=1e-10), 1e-9),
                       (ks.nearest_kronecker(F), 1e-9), (ks.kfac(F), 1e-9), (ks.tkfac(F), 1e-9)):
        for X in (est.left, est.right):
            assert np.allclose(X, X.T, atol=1e-14 * np.abs(X).max())
            lam = np.linalg.eigvalsh(X)
            assert lam.min() >= -floor * max(lam.max(), 1e-300), (est.info.method, lam)
        assert float(est.scale) >= 0


@given(sums())
def test_psd_terms_give_psd_factors(case):
    form, arrays, w = case
    wk, L, R = dense_terms(form, arrays, w)
    L = L @ np.swapaxes(L, 1, 2)  # PSD terms
    R = R @ np.swapaxes(R, 1, 2)
    F = ks.KronSum.from_terms(L, R, wk)
    # the default accuracy (1e-8 on the error) leaves an angle of about 1e-4 (see above)
    for est, floor in ((ks.kfoc(F), 1e-4), (ks.kfoc(F, tol=1e-10), 1e-9)):
        for X in (est.left, est.right):
            assert np.allclose(X, X.T)
            assert np.linalg.eigvalsh(X).min() >= -floor * np.abs(X).max()


@given(sums())
def test_tkfac_keeps_trace_and_matches_eq8(case):
    form, arrays, w = case
    F = getattr(ks.KronSum, f"from_{form}")(*arrays, w)
    est = ks.tkfac(F)
    D = dense_F(form, arrays, w)
    assert np.isclose(float(est.trace()), np.trace(D), rtol=1e-10, atol=1e-13 * np.abs(D).max())
    # closed form, Eq. (8) generalised: delta = Σ w trL trR, Φ = Σ w tr(R_k) L_k / delta ...
    wk, L, R = dense_terms(form, arrays, w)
    trL, trR = np.trace(L, axis1=1, axis2=2), np.trace(R, axis1=1, axis2=2)
    delta = np.sum(wk * trL * trR)
    assume(abs(delta) > 1e-8 * np.sum(np.abs(wk * trL * trR)))
    assert np.isclose(float(est.scale), delta, rtol=1e-10)
    assert np.allclose(est.left, np.einsum("k,kij->ij", wk * trR, L) / delta, atol=1e-10 * np.abs(est.left).max())
    assert np.allclose(est.right, np.einsum("k,kij->ij", wk * trL, R) / delta, atol=1e-10 * np.abs(est.right).max())
    assert np.isclose(np.trace(est.left), 1.0) and np.isclose(np.trace(est.right), 1.0)


def test_tkfac_position_independent_variant_is_theorem3():
    G, A = random_inputs("conv", 4, 3, 2, T=5, seed=11)
    F = ks.KronSum.from_conv(G, A)
    est = ks.tkfac(F, variant="position-independent")
    g2 = np.sum(G**2, axis=2)  # |g_kt|²
    a2 = np.sum(A**2, axis=2)
    delta = np.sum(g2 * a2)
    # Φ weighs g gᵀ by the trace of the *other* factor (the erratum in NOTES.md)
    phi = np.einsum("kt,kti,ktj->ij", a2, G, G) / delta
    psi = np.einsum("kt,kti,ktj->ij", g2, A, A) / delta
    assert np.isclose(float(est.scale), delta)
    assert np.allclose(est.left, phi) and np.allclose(est.right, psi)
    # on the outer form both variants agree
    Fo = ks.KronSum.from_outer(G[:, 0], A[:, 0])
    assert np.allclose(ks.tkfac(Fo).to_dense(), ks.tkfac(Fo, variant="position-independent").to_dense())


@given(sums())
def test_kfac_closed_form(case):
    form, arrays, w = case
    F = getattr(ks.KronSum, f"from_{form}")(*arrays, w)
    est = ks.kfac(F)
    wk = np.ones(F.num_terms) if w is None else w
    if form == "conv":
        G, A = arrays
        T = G.shape[1]
        ref = np.kron(np.einsum("k,kti,ktj->ij", wk, G, G), np.einsum("k,kti,ktj->ij", wk, A, A)) / (T * wk.sum())
    else:
        _, L, R = dense_terms(form, arrays, w)
        ref = np.kron(np.einsum("k,kij->ij", wk, L), np.einsum("k,kij->ij", wk, R)) / wk.sum()
    assert np.allclose(est.to_dense(), ref, atol=1e-12 * np.abs(ref).max())
    assert np.isclose(float(est.scale), wk.sum())


@given(sums(), st.floats(1e-3, 1e3), st.integers(0, 2**16))
def test_scaling_and_permutation(case, c, seed):
    form, arrays, w = case
    K = arrays[0].shape[0]
    wk = np.ones(K) if w is None else w
    F = getattr(ks.KronSum, f"from_{form}")(*arrays, wk)
    perm = np.random.default_rng(seed).permutation(K)
    Fp = getattr(ks.KronSum, f"from_{form}")(*(a[perm] for a in arrays), wk[perm])
    Fc = getattr(ks.KronSum, f"from_{form}")(*arrays, c * wk)
    for est in (ks.kfac, ks.tkfac, ks.kfoc):
        base = est(F).to_dense()
        tol = 1e-8 * np.abs(base).max() + 1e-300
        assert np.allclose(est(Fp).to_dense(), base, atol=tol), est.__name__
        assert np.allclose(est(Fc).to_dense(), c * base, atol=c * tol), est.__name__


def _norm(x):
    c = np.abs(x).max()
    return c * np.linalg.norm(x / c)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("exponent", [150, -150])
def test_extreme_scales_are_finite_and_correct(form, exponent):
    arrays = random_inputs(form, 6, 3, 2, seed=2)
    F1 = getattr(ks.KronSum, f"from_{form}")(*arrays)
    s = 10.0**exponent
    # scale the left inputs only, so that F itself stays representable (F scales by s or s²)
    big = (arrays[0] * s,) + tuple(arrays[1:])
    Fs = getattr(ks.KronSum, f"from_{form}")(*big)
    factor = s if form == "terms" else s * s
    for est in (ks.kfac, ks.tkfac, ks.kfoc, ks.nearest_kronecker):
        e1, es = est(F1), est(Fs)
        for x in (es.left, es.right, es.scale):
            assert np.all(np.isfinite(x)), est.__name__
        assert np.isclose(float(es.scale) / factor * _norm(es.left) * _norm(es.right),
                          float(e1.scale) * _norm(e1.left) * _norm(e1.right), rtol=1e-10)
        err1 = float(ks.frobenius_error(F1, e1, relative=True))
        errs = float(ks.frobenius_error(Fs, es, relative=True))
        assert np.isfinite(errs) and np.isclose(errs, err1, rtol=1e-8, atol=1e-14)
    assert np.isclose(float(Fs.frobenius_norm()) / factor, float(F1.frobenius_norm()), rtol=1e-12)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("w_exp,x_exp,dtype", [(150, 150, "float64"), (-200, -100, "float64"),
                                               (-310, 0, "float64"), (300, -150, "float64"),
                                               (30, 15, "float32"), (-30, -8, "float32")])
def test_kfac_factors_at_extreme_weight_and_statistic_scales(form, w_exp, x_exp, dtype):
    """K-FAC's factors are weighted means: weights scaled by 10^w_exp leave them unchanged and
    statistics scaled by 10^x_exp scale them by a power of that, even where ``Σw`` times the
    statistics' products leaves the dtype's range (F itself may not be representable), and a
    sum whose parts' weights differ by that scale pools them at their true weights."""
    arrays = random_inputs(form, 6, 3, 2, seed=5)
    make = getattr(ks.KronSum, f"from_{form}")
    w = np.random.default_rng(1).uniform(0.5, 1.0, 6)
    sw, sx = 10.0**w_exp, 10.0**x_exp
    Fs = make(*[(a * sx).astype(dtype) for a in arrays[:1]], *[a.astype(dtype) for a in arrays[1:]],
              (w * sw).astype(dtype))
    est = ks.kfac(Fs)
    rtol = 1e-10 if dtype == "float64" else 1e-4
    factor = sx if form == "terms" else sx * sx  # L_k scales by sx, g_k g_kᵀ by sx²
    assert est.left.dtype == np.dtype(dtype) and np.all(np.isfinite(est.left)) and not est.info.notes
    w_used = np.asarray(Fs.weights, dtype=np.float64) / sw  # the weights as the dtype holds them
    ref = ks.kfac(make(*arrays, w_used))
    assert np.allclose(est.left / factor, ref.left, rtol=rtol, atol=0)
    assert np.allclose(est.right, ref.right, rtol=rtol, atol=0)
    assert float(est.scale) / sw == pytest.approx(float(w_used.sum()), rel=rtol)
    if dtype == "float64" and w_exp > 0:  # a sum: one part at weight scale sw, one at 1
        S = ks.KronSum.concat(make(*arrays, w * sw), make(*arrays, w))
        both = ks.kfac(S)
        assert np.allclose(both.left, ref.left, rtol=1e-10) and np.allclose(both.right, ref.right, rtol=1e-10)
        assert float(both.scale) == pytest.approx((sw + 1.0) * float(w.sum()), rel=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_zero_sum_gives_zero_never_nan(form):
    arrays = tuple(np.zeros_like(a) for a in random_inputs(form, 3, 2, 3, seed=0))
    F = getattr(ks.KronSum, f"from_{form}")(*arrays)
    for est in (ks.kfac(F), ks.tkfac(F), ks.kfoc(F), ks.kfoc(F, method="power"), ks.nearest_kronecker(F)):
        D = est.to_dense()
        assert np.all(np.isfinite(D)) and np.all(D == 0), est.info.method
        assert float(ks.frobenius_error(F, est)) == 0.0
        assert float(ks.frobenius_error(F, est, relative=True)) == 0.0
    assert ks.kfoc(F).info.notes and ks.tkfac(F).info.notes
    # zero weights as well
    arrays = random_inputs(form, 3, 2, 3, seed=0)
    Fw = getattr(ks.KronSum, f"from_{form}")(*arrays, np.zeros(3))
    assert np.all(ks.kfac(Fw).to_dense() == 0) and ks.kfac(Fw).info.notes


def test_sigma1_equals_sigma2_is_finite_and_reported():
    # F = e1e1ᵀ⊗e1e1ᵀ + e2e2ᵀ⊗e2e2ᵀ: the rearrangement has σ1 = σ2 = 1
    E = np.eye(2)
    L = np.stack([np.outer(E[0], E[0]), np.outer(E[1], E[1])])
    F = ks.KronSum.from_terms(L, L.copy())
    for method in ("gram", "lanczos", "power"):
        est = ks.kfoc(F, method=method)
        assert np.all(np.isfinite(est.to_dense()))
        assert np.isclose(float(ks.frobenius_error(F, est)), 1.0)  # sqrt(σ2²) either way
        if method != "power":
            assert any("not unique" in note for note in est.info.notes), est.info
    ref = ks.nearest_kronecker(F)
    assert np.isclose(ref.info.sigma1, ref.info.sigma2)


@pytest.mark.parametrize("init", ["auto", "tkfac", "kfac", "identity", "random"])
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_inits_reach_the_same_optimum(init, method):
    arrays = random_inputs("conv", 12, 4, 3, T=4, seed=5)
    F = ks.KronSum.from_conv(*arrays)
    opt = ks.nearest_kronecker(F)
    est = ks.kfoc(F, method=method, init=init, seed=3, tol=1e-10)  # residual rule: factors compared
    assert est.info.converged
    assert np.allclose(est.to_dense(), opt.to_dense(), atol=1e-7 * np.abs(opt.to_dense()).max())
    warm = ks.kfoc(F, method=method, init=est)
    # a warm start at the optimum stops at once; both solvers then spend <= 4 products probing
    # the deflated operator for a repeated sigma1 (the tie note), counted in the iterations
    assert warm.info.iterations <= (6 if method == "power" else 5)
    assert warm.info.sigma2 is not None


def _dominated_outer(K, m, n, df, seed, weights=False):
    """Outer-form statistics whose per-sample magnitudes (shared by gradient and input) are
    Student-t with ``df`` degrees of freedom: a few samples carry most of F for small ``df``."""
    rng = np.random.default_rng(seed)
    s = np.abs(rng.standard_t(df, size=(K, 1))) + 1e-3
    G, A = s * rng.standard_normal((K, m)), s * rng.standard_normal((K, n))
    w = rng.uniform(0.5, 2.0, K) if weights else None
    return G, A, w


def _dominant_rule(G, A, w):
    """The documented ``init="auto"`` rule: the smallest of 64, 128, 256, 512 samples (4s ≤ K,
    their Gram solve s²(m + n)/2 + s(m² + n²)/2 at most a sixteenth of K(m² + n²)) whose magnitudes
    |w_k|‖g_k‖²‖a_k‖² carry at least 15/16 of their sum; ``(s, the others' share of S)``."""
    K, m = G.shape
    n = A.shape[1]
    beta = np.sort((np.ones(K) if w is None else np.abs(w)) * (G * G).sum(1) * (A * A).sum(1))[::-1]
    for s in (64, 128, 256, 512):
        if (4 * s <= K and s * (s * (m + n) + m * m + n * n) / 2 <= K * (m * m + n * n) / 16
                and beta[s:].sum() <= beta.sum() / 16):
            return s, float(beta[s:].sum())
    return None, 0.0


@settings(max_examples=20, deadline=None)
@given(K=st.sampled_from([4096, 6144]), m=st.integers(8, 14), n=st.integers(8, 14),
       df=st.floats(0.5, 4.0), seed=st.integers(0, 2**16), weights=st.booleans(),
       method=st.sampled_from(["lanczos", "power"]))
@example(K=4096, m=12, n=11, df=3.0, seed=0, weights=False, method="lanczos")
@example(K=4096, m=12, n=12, df=1.0, seed=4, weights=True, method="power")
@example(K=4096, m=8, n=9, df=1.0, seed=0, weights=False, method="lanczos")
def test_the_dominant_samples_start_follows_its_rule_and_reaches_the_optimum(K, m, n, df, seed, weights, method):
    G, A, w = _dominated_outer(K, m, n, df, seed, weights)
    F = ks.KronSum.from_outer(G, A, weights=w)
    opt, sv = svd_optimum(F.to_dense(), m, n)
    nF = float(np.sqrt(np.sum(sv ** 2)))
    s, rest = _dominant_rule(G, A, w)
    est = ks.kfoc(F, method=method)
    started = [note for note in est.info.notes if "largest of" in note]
    assert bool(started) == (s is not None), (s, est.info.notes)
    if s is not None:
        assert f"the {s} largest of {K} samples" in started[0]
    err = float(ks.frobenius_error(F, est))
    if method == "lanczos" or est.info.converged:
        assert err - opt <= 1e-8 * nF + 1e-12 * nF, (err, opt, est.info)
    assert min(np.linalg.eigvalsh(est.left).min(), np.linalg.eigvalsh(est.right).min()) >= -1e-12
    if s is not None:
        # one application from the start: ‖F − F_s‖ ≤ rest moves the optimal error by at most
        # rest, and the start's error from F_s's optimum by at most rest again; the start
        # solves F_s to the default accuracy, 1e-8·‖F_s‖ ≤ 1e-8·(‖F‖ + rest)
        one = ks.kfoc(F, method="lanczos", max_iter=1)
        slack = 2 * rest + 1e-8 * (nF + rest)
        assert float(ks.frobenius_error(F, one)) <= opt + slack * (1 + 1e-6), (rest, opt, nF)


def test_the_dominant_samples_start_saves_applications():
    G, A, _ = _dominated_outer(4096, 12, 10, 3.0, seed=1)
    F = ks.KronSum.from_outer(G, A)
    opt, sv = svd_optimum(F.to_dense(), 12, 10)
    auto, tk = ks.kfoc(F, method="lanczos"), ks.kfoc(F, method="lanczos", init="tkfac")
    assert any("largest of 4096 samples" in note for note in auto.info.notes)
    assert not any("largest of" in note for note in tk.info.notes)
    assert auto.info.iterations < tk.info.iterations, (auto.info, tk.info)
    for est in (auto, tk):
        assert float(ks.frobenius_error(F, est)) - opt <= 1e-8 * np.sqrt(np.sum(sv ** 2))
    # statistics without dominant samples, and the Gram solver, keep TKFAC's start
    F = ks.KronSum.from_outer(*random_inputs("outer", 4096, 12, 10, seed=1))
    assert not any("largest of" in note for note in ks.kfoc(F, method="lanczos").info.notes)
    F = ks.KronSum.from_outer(G, A)
    assert not any("largest of" in note for note in ks.kfoc(F, method="gram").info.notes)


def test_lanczos_needs_far_fewer_products_on_a_small_gap():
    arrays = random_inputs("outer", 400, 12, 10, seed=0, kind="heavy")
    F = ks.KronSum.from_outer(*arrays)
    lz, pw = ks.kfoc(F, method="lanczos", tol=1e-10), ks.kfoc(F, method="power", tol=1e-10)
    assert lz.info.converged and pw.info.converged
    assert lz.info.iterations < pw.info.iterations
    assert np.allclose(lz.to_dense(), pw.to_dense(), atol=1e-6 * np.abs(lz.to_dense()).max())


def test_float32_within_1e4_of_optimum():
    for form in FORMS:
        arrays = random_inputs(form, 8, 4, 3, seed=9)
        F64 = getattr(ks.KronSum, f"from_{form}")(*arrays)
        F32 = getattr(ks.KronSum, f"from_{form}")(*(a.astype(np.float32) for a in arrays))
        opt = float(ks.frobenius_error(F64, ks.nearest_kronecker(F64)))
        for method in ["auto", "lanczos", "power"]:
            est = ks.kfoc(F32, method=method)
            assert est.left.dtype == np.float32 and est.scale.dtype == np.float32
            err = float(ks.frobenius_error(F64, ks.Kron(est.left.astype(np.float64), est.right.astype(np.float64), float(est.scale))))
            assert err <= opt * (1 + 1e-4), (form, method, err, opt)


def test_float64_accumulation_for_float32_inputs():
    arrays = random_inputs("conv", 10, 5, 4, seed=12, kind="heavy")
    F64 = ks.KronSum.from_conv(*arrays)
    F32 = F64.astype(np.float32)
    ref = ks.nearest_kronecker(F64).to_dense()
    est = ks.kfoc(F32, precision="float64", tol=1e-12)
    assert est.left.dtype == np.float32 and est.scale.dtype == np.float32
    dense = ks.Kron(est.left.astype(np.float64), est.right.astype(np.float64), float(est.scale)).to_dense()
    # factors rounded to float32 once, from inputs rounded to float32 once: ~1e-6, not ~1e-4
    assert np.allclose(dense, ref, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(ValueError, match="precision"):
        ks.kfoc(F32, precision="double")


def test_one_position_conv_is_solved_as_an_outer_block():
    """A conv block with T = 1 (a 1×1 output map) is Σ w g gᵀ ⊗ a aᵀ: K-FOC takes the Gram
    solver there (no contraction at all) and gives the outer form's answer."""
    rng = np.random.default_rng(3)
    G, A = rng.standard_normal((16, 1, 40)), rng.standard_normal((16, 1, 30))
    conv = ks.KronSum.from_conv(G, A)
    outer = ks.KronSum.from_outer(G[:, 0, :], A[:, 0, :])
    choice = ks.choose_method(conv, explain=True)
    assert choice.method == "gram" and "T = 1" in choice.reason and choice.costs["gram"] < choice.costs["lanczos"]
    est, ref = ks.kfoc(conv), ks.kfoc(outer)
    assert est.info.method.startswith("kfoc/gram") and est.info.contractions == 0
    np.testing.assert_allclose(est.to_dense(), ref.to_dense(), rtol=1e-10, atol=1e-12 * float(ref.scale))
    B = ks.kronecker_svd(conv, rank=2)
    assert B.info.method == "kronsvd/gram"
    np.testing.assert_allclose(B.singular_values, ks.kronecker_svd(outer, rank=2).singular_values, rtol=1e-10)


@pytest.mark.parametrize("K, m, n, expected", [(128, 32, 32, "gram"), (256, 512, 512, "gram"),
                                               (4096, 32, 32, "lanczos"), (2560, 10, 129, "lanczos")])
def test_method_rule_follows_the_cost_model(K, m, n, expected):
    """Gram when K is not much larger than m and n; Lanczos when its K×K passes dominate."""
    F = ks.KronSum.from_outer(np.ones((K, m)), np.ones((K, n)))
    choice = ks.choose_method(F, explain=True)
    assert choice.method == expected and set(choice.costs) == {"gram", "lanczos"}, choice
    assert ks.choose_method(F, "power", explain=True).reason == "requested"


def test_method_choice_follows_the_options_and_dtype():
    """The modelled costs change with what they depend on, also when the same shape was asked
    before: the numba option (the Gram solver's per-step Python calls) and float32 inputs."""
    F = ks.KronSum.from_outer(np.ones((256, 48)), np.ones((256, 40)))
    with ks.config(use_numba=True):
        on = ks.choose_method(F, explain=True).costs
    with ks.config(use_numba=False):
        off = ks.choose_method(F, explain=True).costs
    assert off["lanczos"] == on["lanczos"]
    assert off["gram"] > on["gram"] or not ks.get_config()["use_numba"]
    f32 = ks.choose_method(F.astype(np.float32), explain=True).costs
    assert f32["lanczos"] < ks.choose_method(F, explain=True).costs["lanczos"]
    choice = ks.choose_method(F, explain=True)
    choice.costs["gram"] = -1.0  # the caller's copy: the next choice is not affected
    assert ks.choose_method(F, explain=True).costs["gram"] > 0


@pytest.mark.parametrize("K, T, m, n, expected", [(64, 4, 64, 576, "gram"), (16, 2, 40, 300, "gram"),
                                                  (32, 64, 64, 576, "lanczos"), (64, 9, 64, 64, "lanczos")])
def test_conv_rule_follows_the_cost_model(K, T, m, n, expected):
    """The conv form's Gram solver (per-sample T×T coefficients) when K·T is small beside the
    layer's sizes; Lanczos on the contractions when its K²T³ block products dominate."""
    F = ks.KronSum.from_conv(np.ones((K, T, m)), np.ones((K, T, n)))
    choice = ks.choose_method(F, explain=True)
    assert choice.method == expected and set(choice.costs) == {"gram", "lanczos"}, choice


def test_conv_gram_solver_matches_lanczos_and_skips_the_contractions():
    """On a deep-layer-like conv block (few samples and positions, wide layer) the Gram solver
    gives Lanczos's optimum with no contraction and a certified or estimated bound."""
    rng = np.random.default_rng(5)
    G = rng.standard_normal((24, 3, 20))
    A = rng.standard_normal((24, 3, 90)) * rng.standard_normal((24, 3, 1))
    F = ks.KronSum.from_conv(G, A, rng.random(24))
    est, ref = ks.kfoc(F), ks.kfoc(F, method="lanczos", tol=1e-12)
    assert est.info.method == "kfoc/gram" and est.info.contractions == 0 and est.info.converged
    assert est.info.error_gap_bound <= 1e-8
    gap = float(ks.frobenius_error(F, est)) - float(ks.frobenius_error(F, ref))
    assert gap <= 1e-8 * float(F.frobenius_norm())
    for init in ("kfac", "identity", "random", ref):
        other = ks.kfoc(F, method="gram", init=init, seed=1, tol=1e-12)
        np.testing.assert_allclose(other.to_dense(), ref.to_dense(), atol=1e-9 * float(ref.scale))
    for X in (est.left, est.right):  # symmetric, PSD to the accuracy's angle
        assert np.array_equal(X, X.T) and np.linalg.eigvalsh(X).min() >= -1e-4 * np.abs(X).max()


# -- the accuracy rule -------------------------------------------------------------------------


@given(sums(), st.sampled_from([1e-3, 1e-5, 1e-8]), st.sampled_from(["auto", "lanczos", "gram"]))
def test_accuracy_bounds_the_error_gap(case, accuracy, method):
    """``kfoc(F, accuracy=a)`` returns an error within ``a·‖F‖`` of the optimum, and the
    reported bound is never below the true gap."""
    form, arrays, w = case
    F = getattr(ks.KronSum, f"from_{form}")(*arrays, w)
    D = dense_F(form, arrays, w)
    opt, s = svd_optimum(D, F.m, F.n)
    normF = np.linalg.norm(D)
    assume(normF > 0)
    est = ks.kfoc(F, method=method, accuracy=accuracy)
    gap = (float(ks.frobenius_error(F, est)) - opt) / normF
    floor = 1e-12  # the error evaluation's own rounding, relative to ‖F‖
    assert est.info.converged and gap <= accuracy + floor, (gap, est.info)
    assert est.info.error_gap_bound is not None
    if est.info.error_gap_certified:  # proven: never below the true gap
        assert gap <= est.info.error_gap_bound * (1 + 1e-6) + floor, (gap, est.info)


def test_estimated_bound_is_above_the_true_gap_on_fixed_data():
    """The estimate (second Ritz value, ×4) is not proven; on these fixed sums of every form
    and data kind it is above the true gap at every accuracy."""
    for seed in range(12):
        for form in FORMS:
            for kind in ("gaussian", "heavy"):
                arrays = random_inputs(form, 9, 3, 4, T=3, seed=seed, kind=kind)
                F = getattr(ks.KronSum, f"from_{form}")(*arrays)
                opt, s = svd_optimum(dense_F(form, arrays), F.m, F.n)
                normF = float(np.sqrt(np.sum(s**2)))
                for accuracy in (1e-3, 1e-6):
                    est = ks.kfoc(F, method="lanczos", accuracy=accuracy)
                    gap = (float(ks.frobenius_error(F, est)) - opt) / normF
                    assert gap <= est.info.error_gap_bound + 1e-12, (seed, form, kind, gap, est.info)


@pytest.mark.parametrize("method", ["auto", "gram", "lanczos"])
@pytest.mark.parametrize("accuracy", [1e-4, 1e-6])
def test_a_small_space_is_not_stopped_on_an_estimate(method, accuracy):
    """Two independent blocks (F = F₁ ⊕ F₂ on disjoint rows and columns): an early
    Krylov space holds F₁'s top pair but a second Ritz value far below λ₂, so the estimate
    (uncertified) had stopped at 8e-6 on a true gap of 4e-4 at accuracy 1e-4. A space of at
    most 20 dimensions (here the Gram route's 10 terms, or the 4 × 4 factor) is exhausted
    instead, for at most that many applications: the answer is the optimum."""
    rng = np.random.default_rng([0, 229])
    K, m, n = 5, 11, 4
    G, A = np.zeros((2 * K, m)), np.zeros((2 * K, n))
    G[:K, : m // 2] = rng.standard_normal((K, m // 2))
    G[K:, m // 2:] = rng.standard_normal((K, m - m // 2))
    A[:K, : n // 2] = rng.standard_normal((K, n // 2))
    A[K:, n // 2:] = rng.standard_normal((K, n - n // 2))
    w = np.ones(2 * K)
    w[K:] = 1 + 1e-10
    F = ks.KronSum.from_outer(G, A, w)
    D = dense_F("outer", [G, A], w)
    opt, s = svd_optimum(D, m, n)
    est = ks.kfoc(F, method=method, accuracy=accuracy)
    gap = (float(np.linalg.norm(D - est.to_dense())) - opt) / float(np.linalg.norm(D))
    assert gap <= accuracy, (gap, est.info)
    assert gap <= est.info.error_gap_bound + 1e-12, (gap, est.info)


@settings(deadline=None, max_examples=25)
@given(st.integers(11, 150), st.integers(2, 5), st.integers(2, 12), st.sampled_from([1e-3, 1e-2]),
       st.integers(0, 2**31 - 1))
def test_a_gram_solve_of_small_rank_is_not_stopped_on_an_estimate(K, m, n, eps, seed):
    """A block with two nearly tied singular values (a copy of its first half's terms on
    other rows and columns, weighted ``1 + eps``) and a narrow side (m ≤ 5): its rearranged
    matrix has rank at most ``m(m + 1)/2 ≤ 15`` whatever K, so one Krylov basis spans the Gram
    route's space. At accuracy 1e-4 an early estimate (a Ritz vector blending the two tied
    directions, a second Ritz value far below λ₂) had stopped at 1e-6 on a true gap of 3e-4;
    the solve runs on to the optimum instead, and the bound is above the gap."""
    rng = np.random.default_rng(seed)
    hm, hn = max(m // 2, 1), max(n // 2, 1)
    G1, A1 = np.zeros((K, m)), np.zeros((K, n))
    G1[:, :hm], A1[:, :hn] = rng.standard_normal((K, hm)), rng.standard_normal((K, hn))
    G2, A2 = np.zeros_like(G1), np.zeros_like(A1)
    G2[:, m - hm:], A2[:, n - hn:] = G1[:, :hm], A1[:, :hn]
    w1 = rng.uniform(0.2, 2.0, K)
    G, A, w = np.concatenate([G1, G2]), np.concatenate([A1, A2]), np.concatenate([w1, (1 + eps) * w1])
    F = ks.KronSum.from_outer(G, A, w)
    D = dense_F("outer", [G, A], w)
    opt, s = svd_optimum(D, m, n)
    normF = float(np.linalg.norm(D))
    est = ks.kfoc(F, method="gram", accuracy=1e-4)
    gap = (float(np.linalg.norm(D - est.to_dense())) - opt) / normF
    assert gap <= 1e-10 and gap <= est.info.error_gap_bound + 1e-12, (gap, est.info)


@settings(deadline=None, max_examples=30)
@given(st.sampled_from(["outer", "terms"]), st.integers(11, 150), st.integers(6, 24), st.integers(6, 24),
       st.sampled_from([1e-3, 1e-5, 1e-7]), st.sampled_from([None, 1e-4]), st.integers(0, 2**31 - 1))
def test_the_gram_route_resolves_nearly_tied_top_directions(form, K, m, n, eps, accuracy, seed):
    """Two nearly tied singular values (a copy of the first half's terms on other rows and
    columns, weighted ``1 + eps``): a single-vector Krylov space blends the two directions
    into its Ritz vector with a small residual and a second Ritz value far below λ₂, so the
    estimate (uncertified) had stopped far below the true gap — by up to 2e6 at the default
    accuracy with eps = 1e-7. The deflated probe that checks such a stop finds the second
    direction; the solve goes on and the bound is above the gap, which meets the accuracy."""
    rng = np.random.default_rng(seed)
    hm, hn = m // 2, n // 2
    w1 = rng.uniform(0.2, 2.0, K)
    w = np.concatenate([w1, (1 + eps) * w1])
    if form == "outer":
        G1, A1 = np.zeros((K, m)), np.zeros((K, n))
        G1[:, :hm], A1[:, :hn] = rng.standard_normal((K, hm)), rng.standard_normal((K, hn))
        G2, A2 = np.zeros_like(G1), np.zeros_like(A1)
        G2[:, hm:2 * hm], A2[:, hn:2 * hn] = G1[:, :hm], A1[:, :hn]
        arrays = [np.concatenate([G1, G2]), np.concatenate([A1, A2])]
    else:
        def group(d, h):
            X = rng.standard_normal((K, h, 3))
            P1 = np.zeros((K, d, d))
            P1[:, :h, :h] = X @ X.transpose(0, 2, 1)
            P2 = np.zeros_like(P1)
            P2[:, h:2 * h, h:2 * h] = P1[:, :h, :h]
            return np.concatenate([P1, P2])
        arrays = [group(m, hm), group(n, hn)]
    F = getattr(ks.KronSum, f"from_{form}")(*arrays, w)
    D = dense_F(form, arrays, w)
    opt, s = svd_optimum(D, m, n)
    normF = float(np.linalg.norm(D))
    est = ks.kfoc(F, method="gram", **({} if accuracy is None else {"accuracy": accuracy}))
    gap = (float(np.linalg.norm(D - est.to_dense())) - opt) / normF
    floor = 1e-12
    assert gap <= (accuracy or 1e-8) + floor and gap <= est.info.error_gap_bound + floor, (gap, est.info)


def test_the_check_of_an_estimate_covers_tol_stops_and_keeps_max_iter():
    """On a nearly tied block (eps = 1e-5): a stop on ``tol`` reports the probe's bound too
    (it had reported 1e-14 on a true gap of 2e-8), and the probe's applications count toward
    ``max_iter``, which no answer exceeds."""
    rng = np.random.default_rng(7)
    K, m, n, eps = 40, 10, 12, 1e-5
    w1 = rng.uniform(0.2, 2.0, K)
    w = np.concatenate([w1, (1 + eps) * w1])
    G1, A1 = np.zeros((K, m)), np.zeros((K, n))
    G1[:, :5], A1[:, :6] = rng.standard_normal((K, 5)), rng.standard_normal((K, 6))
    G2, A2 = np.zeros_like(G1), np.zeros_like(A1)
    G2[:, 5:], A2[:, 6:] = G1[:, :5], A1[:, :6]
    G, A = np.concatenate([G1, G2]), np.concatenate([A1, A2])
    F = ks.KronSum.from_outer(G, A, w)
    D = dense_F("outer", [G, A], w)
    opt, s = svd_optimum(D, m, n)
    normF = float(np.linalg.norm(D))
    for kw in ({"tol": 1e-6}, {"tol": 1e-4, "accuracy": 1e-12}):
        est = ks.kfoc(F, method="gram", **kw)
        gap = (float(np.linalg.norm(D - est.to_dense())) - opt) / normF
        assert gap <= est.info.error_gap_bound + 1e-12, (kw, gap, est.info)
    for max_iter in (2, 5, 9, 14):
        assert ks.kfoc(F, method="gram", max_iter=max_iter).info.iterations <= max_iter


def test_accuracy_stops_earlier_than_the_residual_rule():
    G, A = random_inputs("conv", 30, 6, 8, T=5, seed=2, kind="heavy")
    F = ks.KronSum.from_conv(G, A)
    opt = float(ks.frobenius_error(F, ks.nearest_kronecker(F)))
    normF = float(F.frobenius_norm())
    tight = ks.kfoc(F, tol=1e-10)
    loose = ks.kfoc(F, accuracy=1e-4)
    default = ks.kfoc(F)
    assert loose.info.iterations < default.info.iterations <= tight.info.iterations
    for est, acc in ((loose, 1e-4), (default, 1e-8)):
        assert (float(ks.frobenius_error(F, est)) - opt) / normF <= acc
        assert not est.info.error_gap_certified  # Lanczos on the contractions: an estimate
    assert tight.info.residual <= 1e-10


def test_gram_solver_certifies_its_bound():
    """The Gram solver knows ‖F‖²: with K-FOC explaining more than half of it the bound is
    proven (and true)."""
    rng = np.random.default_rng(0)
    g, a = rng.standard_normal(6), rng.standard_normal(7)
    G = g + 0.3 * rng.standard_normal((50, 6))  # nearly one Kronecker product
    A = a + 0.3 * rng.standard_normal((50, 7))
    F = ks.KronSum.from_outer(G, A)
    est = ks.kfoc(F, method="gram", accuracy=1e-6)
    assert est.info.error_gap_certified and est.info.converged
    opt = float(ks.frobenius_error(F, ks.nearest_kronecker(F)))
    gap = (float(ks.frobenius_error(F, est)) - opt) / float(F.frobenius_norm())
    assert gap <= est.info.error_gap_bound * (1 + 1e-6) + 1e-13 and est.info.error_gap_bound <= 1e-6


def test_lanczos_certifies_its_bound_where_the_norm_is_cheap():
    """On a conv block with few samples beside its positions, ‖F‖² costs less than one
    application: Lanczos on the contractions then proves its bound as the Gram solver does
    (when K-FOC explains more than half of ‖F‖²), and the bound holds."""
    rng = np.random.default_rng(3)
    c = rng.standard_normal((6, 16, 1))  # G_k ≈ c_k gᵀ, A_k ≈ c_k aᵀ: F ≈ one Kronecker product
    G = c * rng.standard_normal(8) + 0.2 * rng.standard_normal((6, 16, 8))
    A = c * rng.standard_normal(12) + 0.2 * rng.standard_normal((6, 16, 12))
    F = ks.KronSum.from_conv(G, A)
    opt = float(ks.frobenius_error(F, ks.nearest_kronecker(F)))
    for accuracy in (1e-4, 1e-8):
        est = ks.kfoc(F, method="lanczos", accuracy=accuracy)
        assert est.info.method == "kfoc/lanczos"
        assert est.info.error_gap_certified and est.info.converged
        gap = (float(ks.frobenius_error(F, est)) - opt) / float(F.frobenius_norm())
        assert gap <= est.info.error_gap_bound * (1 + 1e-6) + 1e-13
        assert est.info.error_gap_bound <= accuracy


def test_accuracy_and_tol_are_validated():
    F = ks.KronSum.from_outer(np.ones((3, 2)), np.ones((3, 2)))
    for bad in (0, -1e-3, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="accuracy"):
            ks.kfoc(F, accuracy=bad)
    for bad in (True, "1e-8", 1j):  # the wrong kind: TypeError
        with pytest.raises(TypeError, match="accuracy"):
            ks.kfoc(F, accuracy=bad)
    with pytest.raises(TypeError, match="tol"):
        ks.kfoc(F, tol=True)


@pytest.mark.parametrize("shape", [(64, 64, 32, 128), (64, 64, 128, 32)], ids=["side-left", "side-right"])
@pytest.mark.parametrize("kind", ["heavy", "nearly-kronecker"])
def test_float32_iterations_meet_the_float64_accuracy(shape, kind):
    """Large float64 blocks iterate in float32 and are checked and finished in float64: the
    answer meets the default accuracy; where float32 cannot resolve the optimum (F nearly one
    Kronecker product, optimal error ≈ 0) float64 iterations take over."""
    K, T, m, n = shape
    G, A = random_inputs("conv", K, m, n, T=T, seed=1, kind="heavy")
    if kind == "nearly-kronecker":  # X_k = G_kᵀA_k ≈ c_k g aᵀ
        rng = np.random.default_rng(2)
        G = rng.standard_normal((K, T, 1)) * rng.standard_normal(m) + 1e-5 * G
        A = rng.standard_normal(n) + 1e-5 * A
    F = ks.KronSum.from_conv(G, A)
    est = ks.kfoc(F)
    assert est.info.method == "kfoc/lanczos[float32]" and est.info.converged, est.info
    assert est.left.dtype == np.float64
    # stopped by the bound, or by the residual rule where no second Ritz value exists (the
    # float32 start spanned an invariant subspace)
    assert est.info.error_gap_bound <= 1e-8 or est.info.residual <= 1e-10, est.info
    with ks.config(mixed_precision=False):
        ref = ks.kfoc(F, tol=1e-12)
        plain = ks.kfoc(F)
    assert plain.info.method == "kfoc/lanczos"
    normF = float(F.frobenius_norm())
    with warnings.catch_warnings():
        # an optimal error near 1e-5·‖F‖: the Gram route of frobenius_error keeps about
        # 1e-11·‖F‖ absolute accuracy, enough here
        warnings.simplefilter("ignore", ks.AccuracyWarning)
        gap = (float(ks.frobenius_error(F, est)) - float(ks.frobenius_error(F, ref))) / normF
    assert gap <= 1e-8 + 1e-10, (gap, est.info)
    np.testing.assert_allclose(float(est.scale), float(plain.scale), rtol=1e-8)


@pytest.mark.parametrize("form", ["outer", "conv"])
@pytest.mark.parametrize("accuracy", [1e-4, 1e-3])
def test_a_loose_accuracy_takes_the_float32_answer_within_its_bound(form, accuracy):
    """At an optimiser's accuracy, a large float64 block's float32 solve may be returned
    itself (finished in float32, without the float64 check) when its bound, which adds the
    float32 copy's rounding of F, meets the accuracy: the answer is then within that bound of
    the optimum, float64, PSD, with the sign rule, and its note says so; at a tight accuracy
    the float64 check runs as before."""
    if form == "outer":
        G, A = random_inputs("outer", 2400, 130, 120, seed=3, kind="heavy")
        F = ks.KronSum.from_outer(G, A, np.linspace(0.5, 2.0, 2400))
    else:  # few positions: the conv rounding bound ‖G_k‖²‖A_k‖² is tight enough
        G, A = random_inputs("conv", 700, 100, 130, T=4, seed=3, kind="heavy")
        F = ks.KronSum.from_conv(G, A)
    est = ks.kfoc(F, method="lanczos", accuracy=accuracy)
    notes = " ".join(est.info.notes)
    assert est.info.method == "kfoc/lanczos[float32]" and est.info.converged, est.info
    assert "finished in float32" in notes, est.info
    assert not est.info.error_gap_certified  # float32's operator error is measured, not proven
    assert est.left.dtype == est.right.dtype == np.float64
    assert est.info.error_gap_bound <= accuracy
    ref = ks.kfoc(F, method="lanczos", tol=1e-12)
    normF = float(F.frobenius_norm())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ks.AccuracyWarning)
        gap = (float(ks.frobenius_error(F, est)) - float(ks.frobenius_error(F, ref))) / normF
    assert gap <= est.info.error_gap_bound, (gap, est.info)
    for factor in (est.left, est.right):
        np.testing.assert_allclose(factor, factor.T, rtol=0, atol=1e-12)
        assert np.linalg.eigvalsh(factor).min() >= -1e-6 * np.linalg.norm(factor)
    assert np.trace(est.left) > 0
    np.testing.assert_allclose(float(est.scale), float(ref.scale), rtol=10 * accuracy)
    tight = ks.kfoc(F, method="lanczos", accuracy=1e-8)
    assert tight.info.converged and tight.info.error_gap_bound <= 1e-8, tight.info
    if form == "conv":  # its float32 finish would cost about what the float64 check does
        assert not any("float32" in note for note in tight.info.notes), tight.info
    # the outer block (no ‖F‖² here: the check could not certify its bound either) may take
    # the float32 answer where its bound allows; either way the answer is within its bound
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ks.AccuracyWarning)
        gap = (float(ks.frobenius_error(F, tight)) - float(ks.frobenius_error(F, ref))) / normF
    assert gap <= tight.info.error_gap_bound, (gap, tight.info)


def test_a_float32_answer_is_projected_at_a_second_order_cost():
    """Gradients whose rows sum to zero (a softmax layer's) make the left factor singular,
    and float32's rounding leaves the float32 answer indefinite there. Its projection onto the
    PSD cone moves the factors at float32's rounding, but the error grows only to second order
    in that move (its first-order term is F's residual at the answer), so the float32 answer
    stands at accuracies far below float32's rounding, within its bound. At an accuracy just
    below that answer's bound, the projection's (small) cost takes it past: float64 Lanczos
    goes on from the float32 answer, and its answer meets the accuracy."""
    G, A = two_populations("outer", 4096, None, 128, 128, seed=0)
    G = G - G.mean(axis=1, keepdims=True)
    F = ks.KronSum.from_outer(G, A)
    with ks.config(mixed_precision=False):
        ref = ks.kfoc(F, tol=1e-12)
    normF = float(F.frobenius_norm())
    opt = float(ks.frobenius_error(F, ref))
    est = ks.kfoc(F, accuracy=2e-9)
    assert any("finished in float32" in note for note in est.info.notes), est.info
    tight = ks.kfoc(F, accuracy=est.info.error_gap_bound * (1 - 1e-9))
    assert not any("float32" in note for note in tight.info.notes), tight.info
    for e, accuracy in ((est, 2e-9), (tight, est.info.error_gap_bound * (1 - 1e-9))):
        assert e.info.method == "kfoc/lanczos[float32]" and e.info.converged, e.info
        assert e.info.error_gap_bound <= accuracy, e.info
        gap = (float(ks.frobenius_error(F, e)) - opt) / normF
        assert gap <= e.info.error_gap_bound + 1e-12, (gap, e.info)
        for factor in (e.left, e.right):
            assert np.linalg.eigvalsh(factor).min() >= -1e-12 * np.linalg.norm(factor)


@pytest.mark.parametrize("accuracy", [1e-2, 1e-3, 1e-4])
def test_the_float32_answer_takes_the_copys_distance_as_an_operator_error(accuracy):
    """Many positions per sample: the worst-case distance of the float32 copy from F (from
    the inputs' magnitudes, 3ε₃₂·S) is about 3e-3 of σ₁ here. Taken as an error of the
    operator, it moves the error gap quadratically, so the float32 answer is returned at
    accuracies far below that distance, and its true gap stays within the reported bound."""
    G, A = random_inputs("conv", 16, 32, 256, T=64, seed=4)
    F = ks.KronSum.from_conv(G, A)
    S = float(np.sum(np.sum(G * G, axis=(1, 2)) * np.sum(A * A, axis=(1, 2))))  # Σ‖G_k‖²‖A_k‖²
    assert 3 * float(np.finfo(np.float32).eps) * S > 1e-3 * float(ks.kfoc(F).scale)
    est = ks.kfoc(F, method="lanczos", accuracy=accuracy)
    assert any("finished in float32" in note for note in est.info.notes), est.info
    assert est.info.converged and not est.info.error_gap_certified
    assert est.info.error_gap_bound <= accuracy
    ref = ks.kfoc(F, method="lanczos", tol=1e-12)
    gap = (float(ks.frobenius_error(F, est)) - float(ks.frobenius_error(F, ref))) / float(F.frobenius_norm())
    assert gap <= est.info.error_gap_bound, (gap, est.info)


@pytest.mark.parametrize("shape", [(40, 32, 4, 6), (40, 32, 6, 4), (1000, 16, 8, 73), (1000, 16, 73, 8)],
                         ids=["left", "right", "left-wide", "right-wide"])
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_conv_blocks_with_many_positions_reach_the_optimum(shape, method):
    """Many positions per sample and small factors (like a small CNN's convolutions): the
    solve forms the weighted per-sample matrices √w_k G_kᵀA_k once and contracts through
    them — by products over all samples, or, for a wide side and many samples, by the Gram
    product of the rows of the factor's eigenvectors; the answer is the SVD optimum."""
    K, T, m, n = shape
    G, A = random_inputs("conv", K, m, n, T=T, seed=7)
    w = np.random.default_rng(8).random(K)
    w[0] = 0.0
    F = ks.KronSum.from_conv(G, A, w)
    V = np.reshape(np.swapaxes(G, 1, 2) @ A, (K, m * n))  # rows vec(X_k), X_k = G_kᵀA_k
    D = (V.T * w) @ V  # F = Σ_k w_k vec(X_k) vec(X_k)ᵀ
    opt, s = svd_optimum(D, m, n)
    est = ks.kfoc(F, method=method)
    err = float(np.linalg.norm(D - est.to_dense()))
    assert (err - opt) / np.linalg.norm(D) <= 1e-8, est.info
    np.testing.assert_allclose(float(est.scale), s[0], rtol=1e-7)
    for factor in (est.left, est.right):
        assert np.linalg.eigvalsh(factor).min() >= -1e-12


@pytest.mark.parametrize("method", ["auto", "gram", "lanczos", "power"])
def test_a_start_at_a_smaller_singular_pair_is_not_returned(method):
    """TKFAC's start ∝ I is an eigenvector of the smaller singular pair here (σ = 2 against
    σ₁ = 6): the solvers see no other direction from it. kfoc must notice (the deflated probe
    finds σ₂ > σ₁) and solve again, not return σ = 2 as converged."""
    D = np.diag([1.0, -1.0])
    F = ks.KronSum.from_terms(np.stack([D, np.eye(2)]), np.stack([3 * D, np.eye(2)]))
    est = ks.kfoc(F, method=method)
    assert float(est.scale) == pytest.approx(6.0)
    assert est.info.converged and any("random start" in note for note in est.info.notes)
    assert float(ks.frobenius_error(F, est)) == pytest.approx(2.0, rel=1e-8)  # = σ₂
    assert not any("sigma1 == sigma2" in note for note in est.info.notes)


def test_a_warm_start_orthogonal_to_the_optimum_is_not_returned():
    """A warm start with zero overlap (as RunningEstimate passes the previous estimate) gives
    a zero first estimate; kfoc solves again instead of calling the sum zero."""
    F = ks.KronSum.from_kron(ks.Kron(np.diag([1.0, 0.0]), np.eye(3)))
    est = ks.kfoc(F, method="lanczos", init=ks.Kron(np.diag([0.0, 1.0]), np.eye(3)))
    assert float(est.scale) == pytest.approx(np.sqrt(3.0))
    assert float(ks.frobenius_error(F, est)) <= 1e-12
    assert not any("zero sum" in note for note in est.info.notes)
    zero = ks.kfoc(ks.KronSum.from_outer(np.zeros((3, 2)), np.ones((3, 2))))
    assert float(zero.scale) == 0 and zero.info.error_gap_bound == 0.0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([6, 8, 10, 12]), st.sampled_from(["outer", "conv"]),
       st.sampled_from(["auto", "gram"]))
@example(251936, 12, "outer", "auto")  # ‖F‖² (Gram) − θ (contractions) is their rounding alone
def test_certified_bound_holds_on_nearly_kronecker_sums(seed, digits, form, method):
    """F within ``10^-digits`` of one Kronecker product: the Gram matrices, products of F's
    data, cannot tell the terms' directions apart there, so a zero residual in their metric
    certifies nothing. Every certified bound must still hold (and ``auto`` meet the default
    accuracy), against the dense SVD optimum."""
    rng = np.random.default_rng(seed)
    K, m, n = int(rng.integers(2, 13)), int(rng.integers(2, 18)), int(rng.integers(2, 6))
    noise = 10.0 ** -digits
    if form == "outer":
        G = rng.standard_normal(m) + noise * rng.standard_normal((K, m))
        arrays = [G, rng.standard_normal((K, n))]
    else:
        T = int(rng.integers(1, 5))
        G = rng.standard_normal((K, T, 1)) * rng.standard_normal(m) + noise * rng.standard_normal((K, T, m))
        arrays = [G, rng.standard_normal((K, T, n))]
    F = getattr(ks.KronSum, f"from_{form}")(*arrays)
    D = dense_F(form, arrays)
    opt, _ = svd_optimum(D, F.m, F.n)
    normF = np.linalg.norm(D)
    est = ks.kfoc(F, method=method)
    gap = (float(np.linalg.norm(D - est.to_dense())) - opt) / normF
    floor = 1e-14  # the reference's own rounding, relative to ‖F‖
    if est.info.error_gap_certified:
        assert gap <= est.info.error_gap_bound * (1 + 1e-6) + floor, (gap, est.info)
    if method == "auto":
        assert gap <= 1e-8 + floor and est.info.converged, (gap, est.info)


@pytest.mark.skipif(np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps,
                    reason="needs an extended-precision np.longdouble for the reference")
@pytest.mark.parametrize("form", ["outer", "conv"])
def test_the_bound_covers_storing_an_exact_answer(form):
    """One Kronecker product: the optimal error is 0 and the solver's residual can be exactly 0,
    but the factors and scale as stored round (a gap of a few ε, measured in extended precision
    from the stored numbers): the reported bound is never below that."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        m, n = int(rng.integers(2, 9)), int(rng.integers(2, 9))
        g, a = rng.standard_normal(m), rng.standard_normal(n)
        if form == "outer":
            F = ks.KronSum.from_outer(g[None], a[None])
        else:
            F = ks.KronSum.from_conv(g * np.ones((1, 3, 1)), a * np.ones((1, 3, 1)))  # 9 ggᵀ ⊗ aaᵀ
        est = ks.kfoc(F)
        ld = np.longdouble
        L, R = est.left.astype(ld), est.right.astype(ld)
        D = np.einsum("i,j,k,l->ikjl", g.astype(ld), g.astype(ld), a.astype(ld), a.astype(ld))
        D = D * (9 if form == "conv" else 1)
        E = ld(float(est.scale)) * np.einsum("ij,kl->ikjl", L, R)
        gap = float(np.sqrt(np.sum((D - E) ** 2)) / np.sqrt(np.sum(D ** 2)))
        assert 0 < est.info.error_gap_bound and gap <= est.info.error_gap_bound, (gap, est.info)


@pytest.mark.skipif(np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps,
                    reason="needs an extended-precision np.longdouble for the reference")
def test_an_exhausted_krylov_space_bounds_with_its_threshold():
    """Tiny outer sums whose rows span 10^±8, so that one term nearly is F: Lanczos finds the
    start invariant or exhausts its Krylov space at once (a remainder below 64εθ, read as
    zero). The certified bound takes that threshold as the residual, not zero; the gap is
    measured in extended precision from the stored answer (the optimum from the singular
    values, accurate to ε·σ₁)."""
    ld = np.longdouble
    for seed in range(300):
        rng = np.random.default_rng(seed)
        K, m, n = 3, 2, 3
        G = rng.standard_normal((K, m)) * 10.0 ** rng.uniform(-8, 8, (K, 1))
        A = rng.standard_normal((K, n)) * 10.0 ** rng.uniform(-8, 8, (K, 1))
        est = ks.kfoc(ks.KronSum.from_outer(G, A), method="lanczos")
        Gl, Al = G.astype(ld), A.astype(ld)
        D = np.einsum("ki,kj,kl,kr->iljr", Gl, Gl, Al, Al)
        s = np.linalg.svd(D.transpose(0, 2, 1, 3).reshape(m * m, n * n).astype(np.float64), compute_uv=False)
        E = ld(float(est.scale)) * np.einsum("ij,kl->ikjl", est.left.astype(ld), est.right.astype(ld))
        gap = float((np.sqrt(np.sum((D - E) ** 2)) - ld(np.sqrt(np.sum(s[1:] ** 2)))) / np.sqrt(np.sum(D * D)))
        if est.info.error_gap_certified:
            assert gap <= est.info.error_gap_bound * (1 + 1e-6) + 2e-16, (seed, gap, est.info)
