"""The whole API on every installed array library: same numbers, same array type and dtype."""

import numpy as np
import pytest

import kronsum as ks
from conftest import assert_same_backend, dense_F, random_inputs, svd_optimum, two_populations

FORMS = ["terms", "outer", "conv"]


def _sum(backend, form, dtype, seed=0, weights=True):
    arrays = random_inputs(form, 6, 3, 4, T=3, seed=seed)
    w = np.linspace(0.5, 1.5, 6) if weights else None
    xs = [backend.asarray(a, dtype) for a in arrays]
    wx = None if w is None else backend.asarray(w, dtype)
    return getattr(ks.KronSum, f"from_{form}")(*xs, wx), arrays, w


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_estimators_on_backend(backend, form, dtype):
    F, arrays, w = _sum(backend, form, dtype)
    Fnp = getattr(ks.KronSum, f"from_{form}")(*arrays, w)
    rtol = 1e-9 if dtype == "float64" else 2e-4
    like = F.weights
    # K-FOC on the residual rule: the factors themselves are compared across backends
    tight = {"kfoc": {"tol": 1e-10 if dtype == "float64" else 1e-5}}
    for name in ("kfac", "tkfac", "kfoc"):
        est = getattr(ks, name)(F, **tight.get(name, {}))
        ref = getattr(ks, name)(Fnp, **tight.get(name, {}))
        for got in (est.left, est.right, est.scale):
            assert_same_backend(got, like, like.dtype)
        dense = backend.to_numpy(est.to_dense())
        assert np.allclose(dense, ref.to_dense(), rtol=rtol, atol=rtol * np.abs(ref.to_dense()).max()), name
        e = ks.frobenius_error(F, est)
        assert_same_backend(e, like, like.dtype)
        assert np.isclose(float(backend.to_numpy(e)), float(ks.frobenius_error(Fnp, ref)), rtol=10 * rtol)
    opt, _ = svd_optimum(dense_F(form, arrays, w), Fnp.m, Fnp.n)
    err = float(backend.to_numpy(ks.frobenius_error(F, ks.kfoc(F))))  # the default accuracy
    normF = float(Fnp.frobenius_norm())
    assert err <= opt + (1e-8 if dtype == "float64" else 1e-4) * normF
    assert np.isclose(float(backend.to_numpy(F.trace())), float(Fnp.trace()), rtol=rtol)
    assert np.isclose(float(backend.to_numpy(F.frobenius_norm())), float(Fnp.frobenius_norm()), rtol=rtol)
    assert np.allclose(backend.to_numpy(F.to_dense()), Fnp.to_dense(), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", ["lanczos", "power", "gram"])
def test_kfoc_solvers_on_backend(backend, form, method):
    if method == "gram" and backend.name == "dask":
        pytest.skip("gram needs linalg.eigh (Dask has none)")
    F, arrays, w = _sum(backend, form, "float64")
    est = ks.kfoc(F, method=method, tol=1e-10)  # the residual rule: factors compared
    ref = ks.nearest_kronecker(getattr(ks.KronSum, f"from_{form}")(*arrays, w))
    assert_same_backend(est.left, F.weights, F.weights.dtype)
    assert est.info.converged
    assert np.allclose(backend.to_numpy(est.to_dense()), ref.to_dense(), atol=1e-7 * np.abs(ref.to_dense()).max())


@pytest.mark.parametrize("form", FORMS)
def test_reference_and_kron_methods_on_backend(backend, form):
    if backend.name == "dask":
        pytest.skip("the dense SVD reference is a NumPy/array-API-linalg tool; Dask is for large K")
    F, arrays, w = _sum(backend, form, "float64")
    ref = ks.nearest_kronecker(F)
    assert_same_backend(ref.left, F.weights, F.weights.dtype)
    K = ks.kfoc(F)
    V = backend.asarray(np.random.default_rng(0).standard_normal((2, F.m, F.n)), "float64")
    out = K.matvec(V)
    assert_same_backend(out, F.weights, F.weights.dtype)
    dense = backend.to_numpy(K.to_dense())
    assert np.allclose(backend.to_numpy(out).reshape(2, -1), backend.to_numpy(V).reshape(2, -1) @ dense.T)
    assert np.isclose(float(backend.to_numpy(K.trace())), np.trace(dense))


def test_assert_same_backend_can_fail():
    """The helper every backend test relies on rejects another library, device or dtype."""
    torch = pytest.importorskip("torch")
    x = np.ones(3)
    assert_same_backend(x, np.zeros(2), np.float64)
    with pytest.raises(AssertionError, match="namespace"):
        assert_same_backend(torch.ones(3, dtype=torch.float64), x)
    with pytest.raises(AssertionError, match="namespace"):
        assert_same_backend(x, torch.ones(3))
    with pytest.raises(AssertionError):
        assert_same_backend(x, np.zeros(2), np.float32)
    with pytest.raises(AssertionError, match="device"):
        assert_same_backend(torch.ones(3), torch.ones(3, device="meta"))


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_dominant_samples_start_on_backend(backend, method):
    """``init="auto"`` on an outer block that a few samples dominate: the same start (noted)
    and the same optimum on every backend; Dask keeps TKFAC's start (no sort)."""
    rng = np.random.default_rng(3)
    s = np.abs(rng.standard_t(1.5, size=(4096, 1))) + 1e-3
    G, A = s * rng.standard_normal((4096, 12)), s * rng.standard_normal((4096, 10))
    F = ks.KronSum.from_outer(backend.asarray(G, "float64"), backend.asarray(A, "float64"))
    Fnp = ks.KronSum.from_outer(G, A)
    est, ref = ks.kfoc(F, method=method), ks.kfoc(Fnp, method=method)
    assert any("largest of 4096 samples" in note for note in ref.info.notes), ref.info.notes
    started = [note for note in est.info.notes if "largest of" in note]
    assert started == ([] if backend.name == "dask" else [n for n in ref.info.notes if "largest of" in n])
    assert_same_backend(est.left, F.weights, F.weights.dtype)
    opt, sv = svd_optimum(Fnp.to_dense(), 12, 10)
    err = float(backend.to_numpy(ks.frobenius_error(F, est)))
    assert err <= opt + 1e-8 * np.sqrt(np.sum(sv ** 2))


@pytest.mark.parametrize("wide", [True, False])
def test_projected_iterate_on_backend(backend, wide):
    """A conv block whose Lanczos iterate at a loose accuracy is projected onto the PSD cone:
    on every backend the answer's right factor is the normalised half-step of its left one
    (the projection's, not the iterate's) and the answer is NumPy's to rounding."""
    m, n = (8, 36) if wide else (36, 8)
    G, A = two_populations("conv", 8, 8, m, n, 0)
    F = ks.KronSum.from_conv(backend.asarray(G, "float64"), backend.asarray(A, "float64"))
    est = ks.kfoc(F, method="lanczos", accuracy=1e-4)
    ref = ks.kfoc(ks.KronSum.from_conv(G, A), method="lanczos", accuracy=1e-4)
    assert_same_backend(est.left, F.weights, F.weights.dtype)
    L, R = backend.to_numpy(est.left), backend.to_numpy(est.right)
    half = ks.KronSum.from_conv(G, A).contract_left(L)
    half = (half + half.T) / 2
    np.testing.assert_allclose(R, half / np.linalg.norm(half), rtol=0, atol=1e-12)
    np.testing.assert_allclose(L, ref.left, rtol=0, atol=1e-10)
    np.testing.assert_allclose(R, ref.right, rtol=0, atol=1e-10)
