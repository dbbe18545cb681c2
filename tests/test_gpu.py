"""Ground-truth property tests on GPU arrays (CuPy, torch CUDA); skipped without a GPU.

The ``backend``-parametrised tests elsewhere run the whole API on the GPU backends too; here
the hypothesis property tests of ``test_estimators.py`` are repeated on device arrays, with the
solvers' batched host reads (``check_every = 4`` on accelerators) in force.
"""

import numpy as np
import pytest
from hypothesis import given, settings

import kronsum as ks
from conftest import assert_same_backend, dense_F, make_sum, sums, svd_optimum
from kronsum._compat import on_accelerator


def _on_device(gpu_backend, form, arrays, w, dtype):
    """The drawn sum with its arrays (and weights) on the GPU backend, in ``dtype``."""
    return make_sum(form, [gpu_backend.asarray(a, dtype) for a in arrays],
                    None if w is None else gpu_backend.asarray(w, dtype))


@settings(max_examples=25)
@given(case=sums())
def test_kfoc_reaches_svd_optimum_on_gpu(gpu_backend, case):
    form, arrays, w = case
    F = _on_device(gpu_backend, form, arrays, w, "float64")
    assert on_accelerator(F.weights) and ks.get_config()["check_every"] is None
    opt, s = svd_optimum(dense_F(form, arrays, w), F.m, F.n)
    normF = float(np.sqrt(np.sum(s**2)))
    for method in ["auto", "lanczos", "power", "gram"]:
        est = ks.kfoc(F, method=method)
        assert_same_backend(est.left, F.weights, F.dtype)
        err = float(gpu_backend.to_numpy(ks.frobenius_error(F, est)))
        assert err <= opt * (1 + 1e-8) + 1e-12 * normF, (method, err, opt)
        assert np.isclose(float(gpu_backend.to_numpy(est.scale)), s[0], rtol=1e-8, atol=1e-12 * normF)


@settings(max_examples=25)
@given(case=sums())
def test_closed_forms_match_numpy_on_gpu(gpu_backend, case):
    form, arrays, w = case
    F = _on_device(gpu_backend, form, arrays, w, "float64")
    Fnp = make_sum(form, arrays, w)
    for name in ("kfac", "tkfac"):
        got, want = getattr(ks, name)(F), getattr(ks, name)(Fnp)
        D = want.to_dense()
        np.testing.assert_allclose(gpu_backend.to_numpy(got.to_dense()), D, rtol=1e-10,
                                   atol=1e-12 * max(np.abs(D).max(), 1e-300))


@settings(max_examples=15)
@given(case=sums(forms=("outer", "conv")))
def test_float32_kfoc_on_gpu(gpu_backend, case):
    form, arrays, w = case
    F = _on_device(gpu_backend, form, arrays, w, "float32")
    opt, s = svd_optimum(dense_F(form, arrays, w), F.m, F.n)
    normF = float(np.sqrt(np.sum(s**2)))
    est = ks.kfoc(F)
    assert est.left.dtype == F.dtype
    Fnp = make_sum(form, arrays, w)
    err = float(ks.frobenius_error(Fnp, ks.Kron(gpu_backend.to_numpy(est.left).astype(float),
                                                 gpu_backend.to_numpy(est.right).astype(float),
                                                 float(gpu_backend.to_numpy(est.scale)))))
    assert err <= opt + 1e-4 * normF


def test_gpu_outer_route_and_symmetry(gpu_backend):
    """Small K beside m, n on a GPU: the squaring route, the NumPy optimum, symmetric factors."""
    from conftest import random_inputs

    G, A = random_inputs("outer", 8, 32, 24, seed=7, kind="heavy")
    F = ks.KronSum.from_outer(gpu_backend.asarray(G, "float64"), gpu_backend.asarray(A, "float64"))
    est = ks.kfoc(F)
    assert est.info.method == "kfoc/gram-squaring" and est.info.converged
    ref = ks.nearest_kronecker(ks.KronSum.from_outer(G, A))
    np.testing.assert_allclose(gpu_backend.to_numpy(est.to_dense()), ref.to_dense(),
                               atol=1e-9 * np.abs(ref.to_dense()).max())
    for X in (est.left, est.right, ks.kfac(F).left):
        X = gpu_backend.to_numpy(X)
        assert np.abs(X - X.T).max() <= 1e-13 * np.abs(X).max()


def _torch_cuda_only(gpu_backend):
    if gpu_backend.name != "torch-cuda":
        pytest.skip("CUDA graphs (option cuda_graphs): PyTorch CUDA only")


def test_cuda_graph_route_matches_eager(gpu_backend, monkeypatch):
    """``kronsum.config(cuda_graphs=True)``: the squaring route replayed from one captured graph
    per input layout gives the eager answer; new data of the same layout is copied into the
    graph's inputs (a cache hit), and returned factors are fresh arrays that later replays
    leave alone; float32 too; at most ``_GRAPH_CACHE_SIZE`` layouts are kept."""
    _torch_cuda_only(gpu_backend)
    import kronsum._accel as accel
    from conftest import random_inputs

    ks.clear_cuda_graphs()
    kept = []
    for seed in range(3):
        G, A = random_inputs("outer", 8, 32, 24, seed=seed, kind="heavy")
        F = ks.KronSum.from_outer(gpu_backend.asarray(G, "float64"), gpu_backend.asarray(A, "float64"))
        with ks.config(cuda_graphs=True):
            got = ks.kfoc(F)
        want = ks.kfoc(F)
        assert got.info.method == want.info.method == "kfoc/gram-squaring"
        assert got.info.iterations == want.info.iterations
        for a, b in ((got.left, want.left), (got.right, want.right), (got.scale, want.scale)):
            np.testing.assert_allclose(gpu_backend.to_numpy(a), gpu_backend.to_numpy(b), rtol=1e-12, atol=1e-15)
        kept.append((got, gpu_backend.to_numpy(got.left).copy()))
    for got, left in kept:
        assert np.array_equal(gpu_backend.to_numpy(got.left), left)
    assert ks.clear_cuda_graphs() == 1  # one layout, one graph
    monkeypatch.setattr(accel, "_GRAPH_CACHE_SIZE", 8)
    for K in range(8, 18):
        G, A = random_inputs("outer", K, 64, 48, seed=K, kind="heavy")  # 10K² ≤ m² + n²
        F = ks.KronSum.from_outer(gpu_backend.asarray(G, "float32"), gpu_backend.asarray(A, "float32"))
        with ks.config(cuda_graphs=True):
            got = ks.kfoc(F)
        want = ks.kfoc(F)
        assert got.info.method == "kfoc/gram-squaring"
        np.testing.assert_allclose(gpu_backend.to_numpy(got.to_dense()), gpu_backend.to_numpy(want.to_dense()),
                                   rtol=1e-4, atol=1e-5 * float(np.abs(gpu_backend.to_numpy(want.to_dense())).max()))
    assert ks.clear_cuda_graphs() == 8


def _orthonormal_terms(rng, k, d):
    """k symmetric d×d matrices, orthonormal in the Frobenius inner product."""
    S = rng.standard_normal((d * d, k))
    Q, _ = np.linalg.qr(S)
    M = Q.T.reshape(k, d, d)
    M = (M + np.swapaxes(M, 1, 2)) / 2
    Q, _ = np.linalg.qr(M.reshape(k, d * d).T)
    return Q.T.reshape(k, d, d)


def test_cuda_graph_route_past_the_first_check(gpu_backend):
    """σ₂/σ₁ = 0.8: 32 power steps do not meet tol 1e-10, so the route squares on from the
    graph's state (256 steps). That state is copied per call: new data of the same layout
    must not see the previous call's later levels (the cached state would be stale)."""
    _torch_cuda_only(gpu_backend)
    ks.clear_cuda_graphs()
    for seed in range(3):
        rng = np.random.default_rng(seed)
        Ls, Rs = _orthonormal_terms(rng, 3, 8), _orthonormal_terms(rng, 3, 8)
        F = ks.KronSum.from_terms(gpu_backend.asarray(Ls, "float64"), gpu_backend.asarray(Rs, "float64"),
                                  gpu_backend.asarray(np.array([1.0, 0.8, 0.3]) * (1 + seed), "float64"))
        with ks.config(cuda_graphs=True):
            got = ks.kfoc(F)
        want = ks.kfoc(F)
        assert got.info.method == want.info.method == "kfoc/gram-squaring"
        assert got.info.iterations == want.info.iterations == 4 * 2**6 + 1
        assert float(gpu_backend.to_numpy(got.scale)) == pytest.approx(1 + seed, rel=1e-12)
        np.testing.assert_allclose(gpu_backend.to_numpy(got.to_dense()), gpu_backend.to_numpy(want.to_dense()),
                                   rtol=1e-12, atol=1e-14 * (1 + seed))
    assert ks.clear_cuda_graphs() == 1


def test_cuda_graph_capture_failure_warns_once_and_runs_eagerly(gpu_backend):
    """A build that reads the device (not capturable) warns once for its layout and returns
    None (the caller runs eagerly); the failure is remembered, so no second warning."""
    _torch_cuda_only(gpu_backend)
    import warnings

    from kronsum._accel import cuda_graph

    x = gpu_backend.asarray(np.arange(4.0), "float64")
    ks.clear_cuda_graphs()
    with ks.config(cuda_graphs=True):
        with pytest.warns(RuntimeWarning, match="CUDA graph capture of host-read failed"):
            assert cuda_graph("host-read", lambda a: float(a[0].sum()), [x]) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cuda_graph("host-read", lambda a: float(a[0].sum()), [x]) is None
    assert ks.clear_cuda_graphs() == 1
    assert cuda_graph("host-read", lambda a: a[0] * 2, [x]) is None  # option off


@settings(max_examples=15)
@given(case=sums(forms=("terms", "outer")))
def test_cuda_graph_route_reaches_svd_optimum(gpu_backend, case):
    """Hypothesis cases on the graph route (forced: the drawn K is rarely small beside m, n)."""
    _torch_cuda_only(gpu_backend)

    form, arrays, w = case
    F = _on_device(gpu_backend, form, arrays, w, "float64")
    opt, s = svd_optimum(dense_F(form, arrays, w), F.m, F.n)
    normF = float(np.sqrt(np.sum(s**2)))
    ks.clear_cuda_graphs()
    with ks.config(cuda_graphs=True, gram_squaring=True):
        for _ in range(2):  # the capture, then a replay
            est = ks.kfoc(F, method="gram")
            assert est.info.method in ("kfoc/gram-squaring", "kfoc/gram")  # gram: Lanczos took over
            err = float(gpu_backend.to_numpy(ks.frobenius_error(F, est)))
            assert err <= opt * (1 + 1e-8) + 1e-12 * normF, (est.info, err, opt)
            assert np.isclose(float(gpu_backend.to_numpy(est.scale)), s[0], rtol=1e-8, atol=1e-12 * normF)
    assert ks.clear_cuda_graphs() == 1  # the pass was captured (even if Lanczos finished)


def test_cuda_graph_route_on_a_running_sum(gpu_backend):
    """K-FOC_running's sum (previous estimate + a batch) under the CUDA-graph route: the
    parts are rebuilt over the graph's static inputs, and the answer is the eager one."""
    _torch_cuda_only(gpu_backend)
    from conftest import random_inputs

    ks.clear_cuda_graphs()
    for seed in range(2):
        G, A = random_inputs("outer", 12, 48, 40, seed=seed, kind="heavy")
        B = ks.KronSum.from_outer(gpu_backend.asarray(G, "float64"), gpu_backend.asarray(A, "float64"))
        F = ks.KronSum.from_kron(ks.kfac(B)).scaled(0.9) + B.scaled(0.1)
        with ks.config(cuda_graphs=True):
            got = ks.kfoc(F, method="gram")
        want = ks.kfoc(F, method="gram")
        assert got.info.method == want.info.method == "kfoc/gram-squaring"
        for a, b in ((got.left, want.left), (got.right, want.right), (got.scale, want.scale)):
            np.testing.assert_allclose(gpu_backend.to_numpy(a), gpu_backend.to_numpy(b), rtol=1e-12, atol=1e-15)
    assert ks.clear_cuda_graphs() == 1
