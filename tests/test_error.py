"""frobenius_error: exact without forming F, and accurate when the error is tiny."""

import warnings

import numpy as np
import pytest

import kronsum as ks
from conftest import dense_F, random_inputs

# every test here runs with the numba kernels on and off (see conftest.numba_path)
pytestmark = pytest.mark.usefixtures("numba_path")


@pytest.mark.parametrize("form", ["terms", "outer", "conv"])
@pytest.mark.parametrize("method", ["direct", "gram"])
def test_matches_dense(form, method):
    arrays = random_inputs(form, 7, 3, 4, seed=1)
    F = getattr(ks.KronSum, f"from_{form}")(*arrays)
    D = dense_F(form, arrays)
    for est in (ks.kfac(F), ks.tkfac(F), ks.kfoc(F), ks.Kron(np.eye(3), np.ones((4, 4)), 0.3)):
        ref = np.linalg.norm(D - est.to_dense())
        assert np.isclose(float(ks.frobenius_error(F, est, method=method)), ref, rtol=1e-9)
        assert np.isclose(float(ks.frobenius_error(F, est, relative=True, method=method)),
                          ref / np.linalg.norm(D), rtol=1e-9)


def _near_kronecker(delta, seed=0):
    """Outer form whose gradients are all nearly parallel: F = Kronecker + O(delta)."""
    rng = np.random.default_rng(seed)
    K, m, n = 12, 4, 5
    g0 = rng.standard_normal(m)
    G = g0 * rng.uniform(0.5, 1.5, (K, 1)) + delta * rng.standard_normal((K, m))
    A = rng.standard_normal((K, n))
    return G, A


def _longdouble_error(G, A, est):
    Gl, Al = G.astype(np.longdouble), A.astype(np.longdouble)
    D = sum(np.kron(np.outer(g, g), np.outer(a, a)) for g, a in zip(Gl, Al))
    B = np.longdouble(float(est.scale)) * np.kron(est.left.astype(np.longdouble), est.right.astype(np.longdouble))
    return float(np.sqrt(np.sum((D - B) ** 2))), float(np.sqrt(np.sum(D**2)))


@pytest.mark.skipif(np.finfo(np.longdouble).eps > 1e-18, reason="needs 80-bit long double for the reference")
def test_no_catastrophic_cancellation_at_tiny_error():
    G, A = _near_kronecker(1e-9)
    F = ks.KronSum.from_outer(G, A)
    est = ks.kfoc(F)
    ref, normF = _longdouble_error(G, A, est)
    assert ref / normF < 1e-7  # the case is really near-Kronecker
    direct = float(ks.frobenius_error(F, est, method="direct"))
    assert np.isclose(direct, ref, rtol=1e-4), (direct, ref)
    # the expanded-square route cancels catastrophically here: this test can fail
    gram = float(ks.frobenius_error(F, est, method="gram"))
    assert not np.isclose(gram, ref, rtol=1e-2)


def test_auto_warns_when_it_must_fall_back_to_gram(monkeypatch):
    import kronsum._error as err

    G, A = _near_kronecker(1e-9)
    F = ks.KronSum.from_outer(G, A)
    est = ks.kfoc(F)
    monkeypatch.setattr(err, "_DIRECT_FLOPS", 0)  # pretend the layer is too large for "direct"
    with pytest.warns(ks.AccuracyWarning, match="method='direct'"):
        ks.frobenius_error(F, est)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F2 = ks.KronSum.from_outer(*random_inputs("outer", 5, 3, 3))
        ks.frobenius_error(F2, ks.kfac(F2))  # a large error: no warning


def test_direct_blocks_cover_all_rows(monkeypatch):
    import kronsum._error as err

    monkeypatch.setattr(err, "_BLOCK_ELEMENTS", 1)  # one row of i per block
    arrays = random_inputs("conv", 4, 5, 3, seed=3)
    F = ks.KronSum.from_conv(*arrays)
    est = ks.tkfac(F)
    ref = np.linalg.norm(dense_F("conv", arrays) - est.to_dense())
    assert np.isclose(float(ks.frobenius_error(F, est, method="direct")), ref, rtol=1e-10)


def test_nan_and_inf_propagate_and_zero_F_relative():
    import warnings

    F = ks.KronSum.from_outer(*random_inputs("outer", 6, 3, 2, seed=4))
    L = np.eye(3)
    L[0, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's own warnings about the NaN
        assert np.isnan(float(ks.frobenius_error(F, ks.Kron(L, np.eye(2)))))
        assert not np.isfinite(float(ks.frobenius_error(F, ks.Kron(np.eye(3), np.eye(2), np.inf))))
    Z = ks.KronSum.from_outer(np.zeros((2, 3)), np.ones((2, 2)))
    assert float(ks.frobenius_error(Z, ks.kfac(F), relative=True)) == np.inf
    assert float(ks.frobenius_error(Z, ks.kfac(Z), relative=True)) == 0.0
