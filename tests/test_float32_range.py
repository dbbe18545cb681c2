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
    if est.info.sigma2 is not None:
        assert est.info.sigma2 == pytest.approx(ref.info.sigma2, rel=1e-3)
