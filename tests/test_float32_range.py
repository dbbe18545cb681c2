"""float32 solves on statistics whose products leave float32's range.

The operator of the iterative solvers multiplies four K-scale quantities (‖F‖² and, for the Gram
solver, entries of S_P ~ ‖g‖⁴ times those of S_Q): for a wide layer with large per-sample
magnitudes that exceeds 3.4e38 although every input entry is modest. The solvers scale their
spaces so that float32 still reaches the float64 optimum (found wrong or non-finite before).
"""

import numpy as np
import pytest

import kronsum as ks


def _big_outer(dtype):
    rng = np.random.default_rng(0)
    K, m, n = 256, 256, 256
    s = np.abs(rng.standard_t(3.0, size=(K, 1))) + 0.1
    s[:2] = [[60.0], [50.0]]
    G = 16 * s * rng.standard_normal((K, m))
    A = 16 * s * rng.standard_normal((K, n))
    return G.astype(dtype), A.astype(dtype)


@pytest.mark.parametrize("method", ["gram", "lanczos", "power"])
@pytest.mark.parametrize("use_numba", [False, True])
def test_float32_large_magnitudes_reach_the_float64_optimum(method, use_numba):
    G, A = _big_outer(np.float32)
    ref = ks.kfoc(ks.KronSum.from_outer(G.astype(np.float64), A.astype(np.float64)))
    assert float(ref.scale) ** 2 > 1e30  # σ₁² is far beyond float32's range
    with ks.config(use_numba=use_numba):
        est = ks.kfoc(ks.KronSum.from_outer(G, A), method=method)
    assert est.left.dtype == np.float32 and est.info.converged
    assert np.isfinite(est.left).all() and np.isfinite(est.right).all()
    assert float(est.scale) == pytest.approx(float(ref.scale), rel=1e-4)
    # the factors, not only the scale: the same direction as the float64 optimum
    assert abs(np.sum(est.left * ref.left)) == pytest.approx(1.0, abs=1e-4)
    assert abs(np.sum(est.right * ref.right)) == pytest.approx(1.0, abs=1e-4)
    if est.info.sigma2 is not None:  # a lower estimate of σ₂ (a Ritz value), in range
        F64 = ks.KronSum.from_outer(G.astype(np.float64), A.astype(np.float64))
        s2 = float(np.asarray(ks.kronecker_svd(F64, rank=2, tol=1e-12).singular_values)[1])
        assert 0 <= est.info.sigma2 <= s2 * (1 + 1e-4), (est.info.sigma2, s2)


@pytest.mark.parametrize("method", ["auto", "gram", "lanczos"])
def test_float32_rows_of_opposite_scales_keep_their_certificate(method):
    """One Kronecker product in float32 whose rows are scaled by 1e7, 1e-8 and 1e-1 on one side
    and the reverse on the other: every side is normalised by its largest row, so the dominant
    term's σ₁² lies below float32's range in those units. The check of a nearly exact answer on
    the contractions must not read that as a zero sum: the answer is the product itself and a
    certified bound holds (against the float64 dense optimum, 0)."""
    rng = np.random.default_rng(0)
    g, a = rng.standard_normal(4), rng.standard_normal(4)
    G = np.stack([1e7 * g, 1e-8 * g, 1e-1 * g]).astype(np.float32)
    A = np.stack([1e-8 * a, 1e7 * a, 1e-2 * a]).astype(np.float32)
    F = ks.KronSum.from_outer(G, A)
    est = ks.kfoc(F, method=method)
    D = np.asarray(F.to_dense(), dtype=np.float64)
    err = np.linalg.norm(D - np.asarray(est.to_dense(), dtype=np.float64)) / np.linalg.norm(D)
    assert float(est.scale) > 0 and err <= 1e-5, (err, est.info)
    if est.info.error_gap_certified:
        assert err <= est.info.error_gap_bound * (1 + 1e-6) + 1e-7, (err, est.info)


@pytest.mark.parametrize("squaring", [False, True])
def test_float32_array_api_gram_routes_over_rows_twelve_orders_apart(squaring):
    """float32 outer sums whose rows' magnitudes span 10^±6 on both sides, through the array-API
    Gram route and its squaring route (what PyTorch on a GPU, JAX and CuPy take): the K×K work
    keeps every term (scaled in float32, entries ~‖g‖⁴ of the small rows fell below float32's
    range), so every certified bound holds against the float64 dense optimum."""
    for seed in range(40):
        rng = np.random.default_rng(seed)
        K, m, n = int(rng.integers(2, 13)), int(rng.integers(2, 10)), int(rng.integers(2, 7))
        G = (rng.standard_normal((K, m)) * 10.0 ** rng.uniform(-6, 6, (K, 1))).astype(np.float32)
        A = (rng.standard_normal((K, n)) * 10.0 ** rng.uniform(-6, 6, (K, 1))).astype(np.float32)
        F = ks.KronSum.from_outer(G, A)
        D = np.einsum("ki,kj,kl,kr->iljr", *(x.astype(np.float64) for x in (G, G, A, A)))
        D = D.reshape(m * n, m * n)
        Rm = D.reshape(m, n, m, n).transpose(0, 2, 1, 3).reshape(m * m, n * n)
        s = np.linalg.svd(Rm, compute_uv=False)
        opt, normF = float(np.sqrt(np.sum(s[1:] ** 2))), float(np.linalg.norm(s))
        with ks.config(use_numba=False, gram_squaring=squaring):
            est = ks.kfoc(F, method="gram")
        E = np.kron(est.left.astype(np.float64), est.right.astype(np.float64)) * float(est.scale)
        gap = (float(np.linalg.norm(D - E)) - opt) / normF
        if est.info.error_gap_certified:
            assert gap <= est.info.error_gap_bound * (1 + 1e-6) + 1e-7, (seed, gap, est.info)


def test_auto_keeps_the_better_bound_when_its_lanczos_fallback_does_no_better():
    """A float32 sum nearly one Kronecker product: the Gram route's answer, checked on the
    contractions, misses the default accuracy, and ``auto`` tries Lanczos from it. Where Lanczos
    bounds its own answer no better, ``auto`` returns the Gram answer with its (certified) bound
    and says so: never a weaker bound than the explicit Gram route's."""
    rng = np.random.default_rng(5)
    K, m, n = 64, 12, 10
    for noise in (1e-2, 1e-3, 1e-4, 1e-5):
        G = (rng.standard_normal(m) + noise * rng.standard_normal((K, m))).astype(np.float32)
        A = rng.standard_normal((K, n)).astype(np.float32)
        F = ks.KronSum.from_outer(G, A)
        gram, auto = ks.kfoc(F, method="gram"), ks.kfoc(F)
        assert auto.info.error_gap_bound <= gram.info.error_gap_bound * (1 + 1e-9), (noise, auto.info, gram.info)
        assert auto.info.error_gap_certified or not gram.info.error_gap_certified
