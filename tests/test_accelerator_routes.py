"""The routes kfoc takes on accelerators, exercised on the CPU.

On a GPU, ``kfoc``'s Gram solver (outer/terms forms, K small beside m and n) computes
``B^(2^s) α₀`` by repeated squaring of the K×K operator instead of running Lanczos (each
Lanczos step is a dozen tiny kernels); the coefficient-space finish (norms and signs from
K-vectors, one host read) serves every non-numba route. Here the squaring route is forced on
NumPy arrays (numba off) and checked against the SVD ground truth, including the σ₁ = σ₂,
zero-sum and float32-range cases.
"""

import numpy as np
import pytest
from hypothesis import given

import kronsum as ks
import kronsum._eigen as eigen
from conftest import dense_F, make_sum, random_inputs, sums, svd_optimum


@pytest.fixture
def squaring():
    with ks.config(use_numba=False, check_every=4, gram_squaring=True):
        yield


@given(sums(forms=("terms", "outer")))
def test_squaring_reaches_the_svd_optimum(case):
    form, arrays, w = case
    with ks.config(use_numba=False, gram_squaring=True):
        F = make_sum(form, arrays, w)
        est = ks.kfoc(F, method="gram")
    opt, s = svd_optimum(dense_F(form, arrays, w), F.m, F.n)
    normF = float(np.sqrt(np.sum(s**2)))
    err = float(ks.frobenius_error(F, est))
    assert err <= opt * (1 + 1e-8) + 1e-12 * normF, (est.info, err, opt)
    assert np.isclose(float(est.scale), s[0], rtol=1e-8, atol=1e-12 * normF)
    if float(est.scale) > 0:
        assert np.isclose(np.linalg.norm(est.left), 1.0) and np.isclose(np.linalg.norm(est.right), 1.0)
        assert np.trace(est.left) >= 0
    if est.info.sigma2 is not None and s[0] > 0:
        # a Ritz value of the deflated operator (4 Lanczos steps): a lower estimate of σ₂
        assert est.info.sigma2 <= s[1] * (1 + 1e-6) + 1e-10 * s[0]
    elif s[0] > 0:  # not probed: ‖F‖² − σ₁² proved σ₂ < σ₁
        assert np.sum(s[1:] ** 2) < s[0] ** 2


def test_squaring_is_the_route_taken(squaring):
    G, A = random_inputs("outer", 40, 6, 7, seed=2, kind="heavy")
    est = ks.kfoc(ks.KronSum.from_outer(G, A))
    assert est.info.method == "kfoc/gram-squaring" and est.info.converged
    assert est.info.iterations in (4 * 2**3 + 1, 4 * 2**6 + 1, 4 * 2**9 + 1)  # 32, 256, 2048 steps
    np.testing.assert_allclose(est.to_dense(), ks.nearest_kronecker(ks.KronSum.from_outer(G, A)).to_dense(),
                               atol=1e-9 * np.abs(G).max() ** 2 * np.abs(A).max() ** 2 * 40)


def test_squaring_reports_sigma1_equal_sigma2(squaring):
    E = np.eye(2)
    L = np.stack([np.outer(E[0], E[0]), np.outer(E[1], E[1])])
    F = ks.KronSum.from_terms(L, L.copy())
    est = ks.kfoc(F, method="gram")
    assert np.all(np.isfinite(est.to_dense()))
    assert np.isclose(float(ks.frobenius_error(F, est)), 1.0)
    assert any("not unique" in note for note in est.info.notes), est.info


@pytest.mark.parametrize("form", ["terms", "outer"])
def test_squaring_zero_sum(squaring, form):
    arrays = tuple(np.zeros_like(a) for a in random_inputs(form, 3, 2, 3, seed=0))
    est = ks.kfoc(getattr(ks.KronSum, f"from_{form}")(*arrays), method="gram")
    assert np.all(est.to_dense() == 0) and est.info.notes


def test_squaring_falls_back_to_lanczos_when_max_iter_is_small(squaring):
    G, A = random_inputs("outer", 40, 6, 7, seed=2, kind="heavy")
    est = ks.kfoc(ks.KronSum.from_outer(G, A), max_iter=20)
    assert est.info.method == "kfoc/gram"  # 32 power steps exceed max_iter: Lanczos instead


def test_squaring_float32_large_magnitudes(squaring):
    rng = np.random.default_rng(0)
    K, m = 64, 64
    s = np.abs(rng.standard_t(3.0, size=(K, 1))) + 0.1
    s[:2] = [[60.0], [50.0]]
    G = (16 * s * rng.standard_normal((K, m))).astype(np.float32)
    A = (16 * s * rng.standard_normal((K, m))).astype(np.float32)
    ref = ks.kfoc(ks.KronSum.from_outer(G.astype(float), A.astype(float)))
    est = ks.kfoc(ks.KronSum.from_outer(G, A))
    assert est.info.method == "kfoc/gram-squaring" and est.left.dtype == np.float32
    assert float(est.scale) == pytest.approx(float(ref.scale), rel=1e-4)
    assert abs(np.sum(est.left * ref.left)) == pytest.approx(1.0, abs=1e-4)
    assert abs(np.sum(est.right * ref.right)) == pytest.approx(1.0, abs=1e-4)


def test_squaring_float32_unit_factor_when_theta_times_scale_overflows(squaring):
    """Nearly equal samples of magnitude 2²⁸ (inside the range that normalized() leaves as
    is): θ ≈ K² in scaled units times c_Q = max‖a‖⁴ ≈ 5e35 passes float32's range, although
    σ₁ ≈ 7e20 does not. R's normaliser is √θ·√c_Q; √(θ c_Q) gave R = 0 with no note."""
    rng = np.random.default_rng(0)
    K, m, n = 64, 16, 16
    A = (2.0**28 * (rng.uniform(0.5, 1.0, n) + 0.02 * rng.standard_normal((K, n)))).astype(np.float32)
    G = (1 + 0.05 * rng.standard_normal((K, m))).astype(np.float32)
    assert np.abs(A).max() < 2**30
    est = ks.kfoc(ks.KronSum.from_outer(G, A))
    ref = ks.kfoc(ks.KronSum.from_outer(G.astype(float), A.astype(float)))
    assert est.info.method == "kfoc/gram-squaring" and not est.info.notes
    assert np.linalg.norm(est.left.astype(float)) == pytest.approx(1.0, rel=1e-5)
    assert np.linalg.norm(est.right.astype(float)) == pytest.approx(1.0, rel=1e-5)
    assert float(est.scale) == pytest.approx(float(ref.scale), rel=1e-4)
    assert abs(np.sum(est.right * ref.right)) == pytest.approx(1.0, abs=1e-4)


def test_gram_factors_are_symmetric_to_rounding_without_numba():
    """No symmetrisation pass on the array-API route (it would cost a transposed read of each
    factor): GEMM-based weighted Gram products are symmetric to rounding, not bit for bit."""
    torch = pytest.importorskip("torch")
    G, A = random_inputs("outer", 50, 9, 11, seed=4, kind="heavy")
    F = ks.KronSum.from_outer(torch.asarray(G), torch.asarray(A))
    for est in (ks.kfac(F), ks.kfoc(F, method="gram"), ks.kfoc(F, method="lanczos")):
        for X in (est.left, est.right):
            X = X.numpy()
            assert np.abs(X - X.T).max() <= 1e-14 * np.abs(X).max(), est.info.method


@pytest.mark.parametrize("seed", range(5))
def test_deflated_probe_stops_when_the_krylov_space_is_exhausted(seed):
    """σ₂ from the deflated probe is a Ritz value, never above the true σ₂, even when its
    4 steps exceed the K − 1 dimensions left (K = 4 terms): the exhausted step's rounding
    noise must not be normalised into a spurious direction (it gave 14.4 for σ₂ = 12.4)."""
    L, R = random_inputs("terms", 4, 3, 4, seed=seed)
    F = ks.KronSum.from_terms(L, R)
    SP, SQ = F._gram("left"), F._gram("right")
    B = SQ @ SP
    evals, evecs = np.linalg.eig(B)
    x = evecs[:, np.argmax(evals.real)].real
    x = x / np.sqrt(x @ SP @ x)
    space = eigen.GramSpace(SP, SQ, np.ones(SP.shape[0]), np)
    s = np.linalg.svd(F.rearranged(), compute_uv=False)
    for steps in (1, 2, 3, 4, 8):
        s2, k = eigen.deflated_top(space, x, SP @ x, steps=steps)
        assert k <= 3
        assert s2 <= s[1] * (1 + 1e-8)
    assert s2 == pytest.approx(s[1], rel=1e-8)  # 3 steps span the deflated space: exact


@pytest.mark.parametrize("seed", range(10))
def test_deflated_probe_on_a_rank_deficient_gram_space(seed):
    """Outer form with K = 8 > m(m+1)/2 = 3: S_P is singular, the deflated operator has rank 2
    and σ₂ ≪ σ₁ (nearly equal samples); the probe's Ritz value stays a lower estimate of σ₂."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal(2) + 0.05 * rng.standard_normal((8, 2))
    A = rng.standard_normal(2) + 0.05 * rng.standard_normal((8, 2))
    F = ks.KronSum.from_outer(G, A)
    SP, SQ = F._gram("left"), F._gram("right")
    evals, evecs = np.linalg.eig(SQ @ SP)
    x = evecs[:, np.argmax(evals.real)].real
    x = x / np.sqrt(x @ SP @ x)
    space = eigen.GramSpace(SP, SQ, np.ones(SP.shape[0]), np)
    s = np.linalg.svd(F.rearranged(), compute_uv=False)
    assert s[1] < s[0] / 8
    for theta1 in (None, s[0] ** 2):
        s2, _ = eigen.deflated_top(space, x, SP @ x, theta1, steps=6)
        assert s2 <= s[1] * (1 + 1e-6) + 1e-12 * s[0]


@pytest.mark.parametrize("every", [1, 3], ids=["read-each-step", "batched-reads"])
@pytest.mark.parametrize("form", ["outer", "terms", "conv"])
@pytest.mark.parametrize("shape", [(3, 5), (5, 3)], ids=["side-left", "side-right"])
def test_lanczos_reads_the_other_factor_off_its_basis(form, shape, every):
    """Lanczos keeps each basis vector's half-step image, so the finish reads the other factor
    off its basis: one contraction for the TKFAC start, two per application, and only the one
    that makes the second factor from the first when the iterate is the right factor (also
    with the accelerators' batched convergence reads); the factors agree with the power
    method's."""
    m, n = shape
    F = make_sum(form, random_inputs(form, 9, m, n, T=2, seed=4, kind="heavy"), None)
    with ks.config(check_every=every):
        est = ks.kfoc(F, method="lanczos", tol=1e-10)  # the residual rule: factors compared
    iterates_left = m <= n
    assert est.info.contractions == 1 + 2 * est.info.iterations + (not iterates_left), est.info
    ref = ks.kfoc(F, method="power", tol=1e-13, max_iter=20000)
    np.testing.assert_allclose(est.to_dense(), ref.to_dense(), rtol=1e-8, atol=1e-10 * np.abs(ref.to_dense()).max())


def test_half_step_images_are_kept_only_when_they_are_small():
    """Iterating on the 2×2 side of a 2 × 1000 block would keep 1000×1000 images per basis
    vector: then the finish contracts once more instead."""
    G, A = random_inputs("outer", 2, 2, 1000, seed=1)
    est = ks.kfoc(ks.KronSum.from_outer(G, A), method="lanczos")
    assert est.info.contractions == 2 + 2 * est.info.iterations, est.info
    G, A = random_inputs("outer", 20, 2, 3, seed=1)
    est = ks.kfoc(ks.KronSum.from_outer(G, A), method="lanczos")
    assert est.info.contractions == 1 + 2 * est.info.iterations, est.info


@pytest.mark.parametrize("form", ["outer", "terms"])
def test_squaring_pass_has_no_host_read(form):
    """The squaring route's device part, from the Gram matrices to the final factors and the
    stacked scalars, runs on torch "meta" tensors, which hold no data: a host read there
    (``bool``, ``float``, ``item``, a transfer) would raise. So on a GPU nothing in it waits for
    the device."""
    torch = pytest.importorskip("torch")
    arrays = random_inputs(form, 40, 6, 7, seed=1)
    F = getattr(ks.KronSum, f"from_{form}")(*(torch.asarray(a) for a in arrays))
    Fm = F._map(lambda a: a.to("meta"))
    st = eigen.squaring_pass(Fm, Fm.weights * Fm._traces("right"))
    assert st.cL.device.type == st.cR.device.type == st.scalars.device.type == "meta"
    assert tuple(st.cL.shape) == tuple(st.cR.shape) == (40,) and tuple(st.scalars.shape) == (6,)
    eigen.squaring_more(Fm, st, 3)  # the later levels too
    assert st.level == 6 and st.cL.device.type == "meta"
    with pytest.raises(RuntimeError):  # the check itself can fail: a read does raise
        bool(st.scalars[0] > 0)


def test_squaring_reads_the_host_once_per_level(squaring):
    """Two host reads when 32 power steps suffice: the inputs' scales (one batched read) and
    the stacked scalars of the finished pass; one more per further squaring level. (The
    meta-tensor test above shows that the pass itself reads nothing.)"""
    G, A = random_inputs("outer", 40, 6, 7, seed=2, kind="heavy")
    with ks.config(check_every=None):
        est = ks.kfoc(ks.KronSum.from_outer(G, A))
    assert est.info.method == "kfoc/gram-squaring"
    levels = {33: 1, 257: 2, 2049: 3}[est.info.iterations]
    assert est.info.host_reads == 1 + levels, est.info


def test_cuda_graphs_option_is_inert_off_cuda(squaring):
    """The option only concerns PyTorch CUDA tensors: elsewhere the same eager route runs and
    nothing is captured (the GPU tests in test_gpu.py check the graph route itself)."""
    torch = pytest.importorskip("torch")
    G, A = random_inputs("outer", 40, 6, 7, seed=2, kind="heavy")
    for F in (ks.KronSum.from_outer(G, A), ks.KronSum.from_outer(torch.asarray(G), torch.asarray(A))):
        with ks.config(cuda_graphs=True, torch_cpu_via_numpy=False):
            got = ks.kfoc(F)
        with ks.config(torch_cpu_via_numpy=False):
            want = ks.kfoc(F)
        assert got.info.method == want.info.method == "kfoc/gram-squaring"
        np.testing.assert_array_equal(np.asarray(got.left), np.asarray(want.left))
    assert ks.clear_cuda_graphs() == 0


def test_rebuilt_sum_over_new_arrays():
    """The CUDA-graph route rebuilds the sum over its static copies: every part gets its own
    arrays back, in ``_arrays()`` order, and the sum's weights are its parts' again."""
    prev = ks.KronSum.from_kron(ks.Kron(np.eye(6), np.eye(7), 2.0))
    G, A = random_inputs("outer", 30, 6, 7, seed=3)
    F = prev + 0.5 * ks.KronSum.from_outer(G, A)
    copies = [np.array(a) for a in F._arrays()]
    Fr = eigen.rebuilt(F, copies)
    assert Fr.form == "sum" and [P.form for P in Fr.parts] == ["terms", "outer"]
    assert all(a is b for a, b in zip(Fr._arrays(), copies))
    np.testing.assert_array_equal(Fr.weights, F.weights)
    np.testing.assert_allclose(Fr.to_dense(), F.to_dense(), rtol=0, atol=0)
    assert eigen.structure(F) == ("terms", "outer") and eigen.structure(prev) == ("terms",)


def test_squaring_route_on_every_backend(backend):
    """The squaring route's array-API code (``full``, ``maximum``, ``linalg.diagonal``, a
    bool ``astype``, one stacked read) on each backend, forced on (it runs on accelerators
    only): the NumPy answer for the outer and terms forms and a K-FOC_running sum."""
    if backend.name == "dask":
        pytest.skip("the Gram solver does not take Dask arrays (chunked along K)")
    G, A = random_inputs("outer", 30, 6, 7, seed=2, kind="heavy")
    L, R = random_inputs("terms", 5, 4, 3, seed=3)
    cases = {"outer": lambda a: ks.KronSum.from_outer(a(G), a(A)),
             "terms": lambda a: ks.KronSum.from_terms(a(L), a(R)),
             "sum": lambda a: (ks.KronSum.from_outer(a(G), a(A))
                               + ks.KronSum.from_kron(ks.kfac(ks.KronSum.from_outer(a(G), a(A)))))}
    with ks.config(use_numba=False, check_every=4, gram_squaring=True, torch_cpu_via_numpy=False):
        for name, make in cases.items():
            want = ks.kfoc(make(np.asarray), method="gram")
            got = ks.kfoc(make(lambda x: backend.asarray(x, "float64")), method="gram")
            assert got.info.method == want.info.method == "kfoc/gram-squaring", name
            np.testing.assert_allclose(backend.to_numpy(got.to_dense()), want.to_dense(),
                                       rtol=1e-10, atol=1e-12 * np.abs(want.to_dense()).max())


ROUTES = {"plain": dict(use_numba=False, gram_squaring=False),
          "numba": dict(use_numba=True, gram_squaring=False),
          "squaring": dict(use_numba=False, gram_squaring=True)}


@pytest.mark.parametrize("form", ["outer", "terms"])
@pytest.mark.parametrize("seed", range(3))
def test_accelerators_agree_with_the_plain_path(form, seed):
    """Each accelerator behind the Gram solve (the numba kernel; the squaring route, forced on
    the CPU) gives the plain array-API Lanczos's answer for kfoc; kronecker_svd of rank 2 and 3
    gives the same answer under every switch (SVD ground truth), and its first term is kfoc's."""
    pytest.importorskip("numba")
    arrays = random_inputs(form, 30, 5, 6, seed=seed, kind="heavy")
    F = getattr(ks.KronSum, f"from_{form}")(*arrays)
    s = np.linalg.svd(F.rearranged(), compute_uv=False)
    est = {}
    for name, opts in ROUTES.items():
        with ks.config(**opts):
            est[name] = ks.kfoc(F, method="gram", tol=1e-10)  # the residual rule: factors compared
    assert {name: e.info.method for name, e in est.items()} == {
        "plain": "kfoc/gram", "numba": "kfoc/gram[numba]", "squaring": "kfoc/gram-squaring"}
    # the eigenvector's sensitivity to rounding and to the residual grows as 1/(1 - σ₂²/σ₁²)
    gap = 1 - (s[1] / s[0]) ** 2
    ref = est["plain"].to_dense()
    tol = 1e-8 / max(gap, 1e-3)
    for name, e in est.items():
        assert e.info.converged, name
        assert float(e.scale) == pytest.approx(s[0], rel=1e-10), name
        np.testing.assert_allclose(e.to_dense(), ref, rtol=0, atol=tol * np.abs(ref).max(), err_msg=name)
    for rank in (2, 3):
        outs = {}
        for name, opts in ROUTES.items():
            with ks.config(**opts):
                outs[name] = ks.kronecker_svd(F, rank, method="gram")
        want = outs["plain"].to_dense()
        for name, B in outs.items():
            assert B.info.converged and B.info.method == "kronsvd/gram", name
            np.testing.assert_allclose(B.singular_values, s[:rank], rtol=1e-9, err_msg=name)
            np.testing.assert_allclose(B.to_dense(), want, rtol=0, atol=1e-9 * np.abs(want).max(), err_msg=name)
            np.testing.assert_allclose(B.term(0).to_dense(), ref, rtol=0, atol=tol * np.abs(ref).max(),
                                       err_msg=name)
