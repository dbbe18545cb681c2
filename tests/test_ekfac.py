"""Eigenvalue-corrected estimates (``ekfac``, ``EigenKron``) against dense references.

The reference for ``S`` is the diagonal of ``(U ⊗ V)ᵀ F (U ⊗ V)`` with F formed by
``np.kron`` (conftest.dense_F); errors are ``‖F − F̂‖`` of dense matrices; solves, log-dets
and samples are checked against ``np.linalg`` on the dense damped matrix.
"""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kronsum as ks
from conftest import assert_same_backend, dense_F, random_inputs, sums
from test_inverse import inv_sqrt_psd, whitening_error, whitening_tol

FORMS = ["terms", "outer", "conv", "sum"]


def sym_inputs(form, K=6, m=3, n=4, T=3, seed=0):
    """NumPy inputs of a positive semi-definite sum (terms: ``L_k L_kᵀ``, ``R_k R_kᵀ``)."""
    arrays = random_inputs(form, K, m, n, T=T, seed=seed)
    if form == "terms":
        L, R = arrays
        arrays = (L @ L.transpose(0, 2, 1), R @ R.transpose(0, 2, 1))
    return arrays


def build(form, to, seed=0, m=3, n=4):
    """``(F, dense)``: a KronSum of the form with arrays made by ``to`` and its dense matrix."""
    if form == "sum":
        parts = [build(f, to, seed + i, m, n) for i, f in enumerate(["outer", "conv", "terms"])]
        F = parts[0][0] + 0.5 * parts[1][0] + parts[2][0]
        return F, parts[0][1] + 0.5 * parts[1][1] + parts[2][1]
    arrays = sym_inputs(form, m=m, n=n, seed=seed)
    w = np.random.default_rng(seed + 7).uniform(0.2, 2.0, 6)
    F = getattr(ks.KronSum, f"from_{form}")(*(to(a) for a in arrays), to(w))
    return F, dense_F(form, arrays, w)


def dense_ekfac(D, U, V):
    """``S`` and ``F̂`` from the dense F, literally: the diagonal in the basis ``kron(U, V)``."""
    W = np.kron(U, V)
    S = np.diag(W.T @ D @ W).reshape(U.shape[0], V.shape[0])
    return S, W @ np.diag(S.reshape(-1)) @ W.T


# -- S is the projected diagonal, on every form and backend ----------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("form", FORMS)
def test_S_is_the_diagonal_in_the_basis(backend, form, dtype):
    F, D = build(form, lambda a: backend.asarray(a, dtype))
    est = ks.ekfac(F)
    for x in (est.U, est.V, est.S):
        assert_same_backend(x, F.weights, F.weights.dtype)
    assert est.info.method == "ekfac/kfac" and (est.m, est.n, est.shape) == (3, 4, (12, 12))
    U, V, S = (backend.to_numpy(x).astype(float) for x in (est.U, est.V, est.S))
    rtol = 1e-10 if dtype == "float64" else 2e-4
    np.testing.assert_allclose(U.T @ U, np.eye(3), atol=10 * rtol)
    np.testing.assert_allclose(V.T @ V, np.eye(4), atol=10 * rtol)
    # the basis is kfac's: its factors are diagonal in U and V
    k = ks.kfac(F)
    for Q, M in ((U, k.left), (V, k.right)):
        M = backend.to_numpy(M).astype(float)
        off = Q.T @ M @ Q - np.diag(np.diag(Q.T @ M @ Q))
        assert np.linalg.norm(off) <= 10 * rtol * np.linalg.norm(M)
    S_ref, Fhat = dense_ekfac(D, U, V)
    np.testing.assert_allclose(S, S_ref, rtol=rtol, atol=rtol * np.abs(S_ref).max())
    np.testing.assert_allclose(backend.to_numpy(est.to_dense()), Fhat, rtol=10 * rtol,
                               atol=10 * rtol * np.abs(Fhat).max())


@pytest.mark.parametrize("basis", ["tkfac", "kfoc"])
@pytest.mark.parametrize("form", ["outer", "conv", "sum"])
def test_other_bases_numpy(form, basis):
    F, D = build(form, np.asarray, seed=3)
    est = ks.ekfac(F, basis)
    assert est.info.method == f"ekfac/{basis}"
    S_ref, _ = dense_ekfac(D, est.U, est.V)
    np.testing.assert_allclose(est.S, S_ref, rtol=1e-10, atol=1e-10 * np.abs(S_ref).max())
    b = ks.tkfac(F) if basis == "tkfac" else ks.kfoc(F)
    for Q, M in ((est.U, b.left), (est.V, b.right)):
        off = Q.T @ M @ Q - np.diag(np.diag(Q.T @ M @ Q))
        assert np.linalg.norm(off) <= 1e-10 * np.linalg.norm(M)


def test_conv_associations_agree():
    """Both orders of ``Uᵀ G_kᵀ A_k V`` (T small: rotate first; T large: X_k first)."""
    rng = np.random.default_rng(5)
    for T in (1, 40):
        G, A = rng.standard_normal((5, T, 3)), rng.standard_normal((5, T, 2))
        F = ks.KronSum.from_conv(G, A)
        est = ks.ekfac(F)
        S_ref, _ = dense_ekfac(F.to_dense(), est.U, est.V)
        np.testing.assert_allclose(est.S, S_ref, rtol=1e-10, atol=1e-12 * np.abs(S_ref).max())


def test_given_kron_basis_and_torch_cpu_route():
    torch = pytest.importorskip("torch")
    F, D = build("outer", lambda a: torch.asarray(a, dtype=torch.float64))
    basis = ks.kfoc(F)
    for kw in ({"basis": basis}, {}):
        est = ks.ekfac(F, **kw) if kw else ks.ekfac(F, basis)
        assert isinstance(est.S, torch.Tensor) and est.info.method.startswith("ekfac/kfoc")
        S_ref, _ = dense_ekfac(D, est.U.numpy(), est.V.numpy())
        np.testing.assert_allclose(est.S.numpy(), S_ref, rtol=1e-10, atol=1e-12 * np.abs(S_ref).max())
    with ks.config(torch_cpu_via_numpy=False):
        est2 = ks.ekfac(F, basis)
    np.testing.assert_allclose(est2.to_dense().numpy(), est.to_dense().numpy(), rtol=1e-10, atol=1e-10)


# -- never worse than the basis; the error formula ---------------------------------------------


@given(data=sums(forms=("terms", "outer", "conv")), scale=st.sampled_from([1e-6, 1.0, 1e5]))
def test_never_worse_than_its_basis_and_exact_error(data, scale):
    form, arrays, w = data
    if form == "terms":
        L, R = arrays
        arrays = (L + L.transpose(0, 2, 1), R + R.transpose(0, 2, 1))
    arrays = (scale * arrays[0], arrays[1])
    F = getattr(ks.KronSum, f"from_{form}")(*arrays, w)
    D = dense_F(form, arrays, w)
    fn = np.linalg.norm(D)
    for basis in ("kfac", "tkfac", "kfoc"):
        b = {"kfac": ks.kfac, "tkfac": ks.tkfac, "kfoc": ks.kfoc}[basis](F)
        est = ks.ekfac(F, basis)
        S_ref, Fhat = dense_ekfac(D, est.U, est.V)
        err = np.linalg.norm(D - Fhat)
        assert err <= np.linalg.norm(D - b.to_dense()) + 1e-9 * fn
        assert math.isclose(float(ks.frobenius_error(F, est)), err, rel_tol=1e-7, abs_tol=1e-9 * fn)
        # ‖F − F̂‖² = ‖F‖² − ‖S‖² (a projection)
        assert math.isclose(err**2, fn**2 - float(np.sum(np.asarray(est.S) ** 2)),
                            rel_tol=1e-6, abs_tol=1e-9 * fn**2)


@pytest.mark.parametrize("form", FORMS)
def test_frobenius_error_routes_on_backend(backend, form):
    F, D = build(form, lambda a: backend.asarray(a, "float64"), seed=2)
    est = ks.ekfac(F, "tkfac")
    _, Fhat = dense_ekfac(D, backend.to_numpy(est.U), backend.to_numpy(est.V))
    ref = np.linalg.norm(D - Fhat)
    for method in ("direct", "gram"):
        e = ks.frobenius_error(F, est, method=method)
        assert_same_backend(e, F.weights, F.weights.dtype)
        assert math.isclose(float(backend.to_numpy(e)), ref, rel_tol=1e-9)
    rel = ks.frobenius_error(F, est, relative=True)
    assert math.isclose(float(backend.to_numpy(rel)), ref / np.linalg.norm(D), rel_tol=1e-9)


def test_frobenius_error_of_another_sum_and_an_ekfac_structured_F():
    rng = np.random.default_rng(0)
    m, n = 3, 4
    U = np.linalg.qr(rng.standard_normal((m, m)))[0]
    V = np.linalg.qr(rng.standard_normal((n, n)))[0]
    S = rng.uniform(1.0, 2.0, (m, n))
    # F = Σ_ij S_ij u_i u_iᵀ ⊗ v_j v_jᵀ exactly (outer form, S_ij^{1/4} on each side)
    G = np.stack([S[i, j] ** 0.25 * U[:, i] for i in range(m) for j in range(n)])
    A = np.stack([S[i, j] ** 0.25 * V[:, j] for i in range(m) for j in range(n)])
    F = ks.KronSum.from_outer(G, A)
    est = ks.ekfac(F)
    direct = float(ks.frobenius_error(F, est, method="direct", relative=True))
    assert direct < 1e-13  # the Gram route's ‖F‖² − ‖S‖² cancels to ~1e-8 here
    np.testing.assert_allclose(est.to_dense(), F.to_dense(), rtol=0, atol=1e-13 * np.abs(S).max())
    # a small nonzero error (1e-6·‖F‖) is resolved to about ε‖F‖/err, ~1e-10
    F2 = F + ks.KronSum.from_outer(1e-3 * rng.standard_normal((1, m)), rng.standard_normal((1, n)))
    ref = np.linalg.norm(F2.to_dense() - est.to_dense())
    assert math.isclose(float(ks.frobenius_error(F2, est, method="direct")), ref, rel_tol=1e-8)
    # F̂ of one sum measured against another
    other = ks.KronSum.from_outer(rng.standard_normal((7, m)), rng.standard_normal((7, n)))
    ref = np.linalg.norm(other.to_dense() - est.to_dense())
    for method in ("direct", "gram"):
        assert math.isclose(float(ks.frobenius_error(other, est, method=method)), ref, rel_tol=1e-9)


def test_scaled_inputs_stay_finite():
    F, D = build("outer", np.asarray)
    big = ks.KronSum.from_outer(1e150 * F.G, F.A, F.weights)
    est = ks.ekfac(big)
    S_ref, _ = dense_ekfac(D, est.U, est.V)
    np.testing.assert_allclose(est.S / 1e300, S_ref, rtol=1e-10)
    assert math.isclose(float(ks.frobenius_error(big, est, relative=True)),
                        float(ks.frobenius_error(F, ks.ekfac(F), relative=True)), rel_tol=1e-8)


# -- the algebra in the eigenbasis --------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_algebra_on_backend(backend, dtype):
    F, D = build("conv", lambda a: backend.asarray(a, dtype), seed=4)
    est = ks.ekfac(F, "kfoc")
    Fhat = backend.to_numpy(est.to_dense()).astype(float)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((2, 3, 4))
    Xb = backend.asarray(X, dtype)
    rtol = 1e-9 if dtype == "float64" else 2e-4
    lam = 0.3
    Dd = Fhat + lam * np.eye(12)

    def close(got, want, r=rtol):
        assert_same_backend(got, F.weights, F.weights.dtype)
        np.testing.assert_allclose(backend.to_numpy(got), want, rtol=r, atol=r * np.abs(want).max())

    close(est.matvec(Xb), (X.reshape(2, 12) @ Fhat.T).reshape(2, 3, 4))
    close(est.trace(), np.trace(Fhat))
    close(est.frobenius_norm(), np.linalg.norm(Fhat))
    close(est.solve(Xb, lam), np.linalg.solve(Dd, X.reshape(2, 12).T).T.reshape(2, 3, 4), 10 * rtol)
    close(est.logdet(lam), np.linalg.slogdet(Dd)[1])
    inv = est.inverse(lam)
    assert isinstance(inv, ks.KronInverse) and inv.method == "exact" and inv.damping == lam
    close(inv.to_dense(), Dd)
    close(inv.eigvals(), backend.to_numpy(est.S) + lam)
    close(inv.with_damping(1.0).logdet(), np.linalg.slogdet(Fhat + np.eye(12))[1])
    close(inv.matvec(inv.solve(Xb)), X, 10 * rtol)


@pytest.mark.parametrize("form", ["precision", "covariance"])
def test_sample_covariance(backend, form):
    """Sample covariance of 20000 draws against the target, and a wrong target is rejected."""
    F, _ = build("outer", lambda a: backend.asarray(a, "float64"), m=2, n=3)
    est = ks.ekfac(F)
    N, lam = 20000, 0.4
    X = est.sample(N, lam, seed=123, form=form)
    assert_same_backend(X, est.S, est.S.dtype)
    assert tuple(X.shape) == (N, 2, 3)
    X = backend.to_numpy(X).reshape(N, 6)
    Dd = backend.to_numpy(est.to_dense()) + lam * np.eye(6)
    target = np.linalg.inv(Dd) if form == "precision" else Dd
    tol = whitening_tol(6, N)
    assert whitening_error(X, target) < tol
    for wrong in (np.linalg.inv(target), 1.15 * target):
        Sq = inv_sqrt_psd(wrong)
        assert np.linalg.norm(Sq @ target @ Sq - np.eye(6)) > 2 * tol
        assert whitening_error(X, wrong) > tol


# -- bad input, no mutation ----------------------------------------------------------------------


def test_bad_input():
    F, _ = build("outer", np.asarray)
    with pytest.raises(TypeError, match="KronSum"):
        ks.ekfac(F.to_dense())
    with pytest.raises(ValueError, match="basis"):
        ks.ekfac(F, "kfc")
    with pytest.raises(TypeError, match="basis"):
        ks.ekfac(F, 3)
    with pytest.raises(ValueError, match="basis has factor sizes"):
        ks.ekfac(F, ks.Kron(np.eye(2), np.eye(4)))
    with pytest.raises(ValueError, match="not symmetric"):
        ks.ekfac(F, ks.Kron(np.triu(np.ones((3, 3))), np.eye(4)))
    with pytest.raises(ValueError, match="NaN"):
        ks.ekfac(F, ks.Kron(np.full((3, 3), np.nan), np.eye(4)))
    with pytest.raises(TypeError, match="dtype"):
        ks.ekfac(F, ks.Kron(np.eye(3, dtype=np.float32), np.eye(4, dtype=np.float32)))
    with pytest.raises(ValueError, match="NaN"):
        ks.KronSum.from_outer(np.full((2, 3), np.nan), np.ones((2, 4)))
    est = ks.ekfac(F)
    with pytest.raises(ValueError, match="damping"):
        est.solve(np.ones((3, 4)), -1.0)
    with pytest.raises(ValueError, match="damping"):
        est.logdet(float("nan"))
    with pytest.raises(ValueError, match="method"):
        est.inverse(0.1, method="factored")
    with pytest.raises(ValueError, match=r"\(\.\.\., m, n\)"):
        est.solve(np.ones((4, 3)), 0.1)
    with pytest.raises(ValueError, match=r"\(\.\.\., m, n\)"):
        est.matvec(np.ones((4, 3)))
    with pytest.raises(ValueError, match="n \\(the number of samples\\)"):
        est.sample(0, 0.1)
    # singular without damping is refused; with damping fine
    sing = ks.EigenKron(np.eye(2), np.eye(2), np.array([[1.0, 0.0], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="singular"):
        sing.solve(np.ones((2, 2)), 0.0)
    assert np.isfinite(sing.logdet(1e-3))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        ks.EigenKron(np.eye(2), np.eye(2), np.array([[1.0, -1.0], [2.0, 3.0]])).solve(np.ones((2, 2)), 1.0)
    with pytest.raises(ValueError, match="S must have shape"):
        ks.EigenKron(np.eye(2), np.eye(3), np.ones((3, 2)))
    with pytest.raises(ValueError, match="square"):
        ks.EigenKron(np.ones((2, 3)), np.eye(3), np.ones((2, 3)))
    with pytest.raises(TypeError, match="U must"):
        ks.EigenKron([[1.0]], np.eye(3), np.ones((1, 3)))
    with pytest.raises(ValueError, match="bases of sizes"):
        ks.frobenius_error(ks.KronSum.from_outer(np.ones((2, 2)), np.ones((2, 4))), est)
    with pytest.raises(ValueError, match="dense"):
        est.to_dense(max_elements=10)


@pytest.mark.parametrize("form", FORMS)
def test_inputs_are_not_modified(form):
    F, _ = build(form, np.asarray)
    before = [a.copy() for a in F._arrays()]
    est = ks.ekfac(F, "kfoc")
    U, V, S = est.U.copy(), est.V.copy(), est.S.copy()
    X = np.ones((3, 4))
    est.solve(X, 0.1), est.matvec(X), est.sample(2, 0.1, seed=0), est.logdet(0.1)
    ks.frobenius_error(F, est)
    for a, b in zip(F._arrays(), before):
        np.testing.assert_array_equal(a, b)
    for a, b in ((est.U, U), (est.V, V), (est.S, S), (X, np.ones((3, 4)))):
        np.testing.assert_array_equal(a, b)


# -- curvlinops ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_name", ["ce-sum", "ce-mean", "mse-sum", "mse-mean"])
def test_equals_curvlinops_ekfac(loss_name):
    """The K-FAC-basis result equals curvlinops' ``EKFACLinearOperator`` (type-2 Fisher) on an MLP.

    curvlinops holds per layer the eigenvectors ``Q_g`` (gradient side), ``Q_a`` (input side,
    bias column appended) and the corrected eigenvalues ``E`` (out, in) of the weight matrix;
    its block acts on a weight ``W`` as ``Q_g ((Q_gᵀ W Q_a) ∘ E) Q_aᵀ``, which in row-major vec
    is ``kron(Q_g, Q_a) diag(vec E) kron(Q_g, Q_a)ᵀ``: the same form as an EigenKron.
    Compared as dense matrices (eigenvectors are defined up to signs and within null spaces).
    """
    curvlinops = pytest.importorskip("curvlinops", reason="curvlinops-for-pytorch is not installed")
    torch = pytest.importorskip("torch")
    from kronsum.adapters import torch as kt
    from test_adapter_torch import LOSSES, _data, _mlp

    model = _mlp()
    X, y_cls, y_reg = _data("mlp", n=8)
    y = y_cls if loss_name.startswith("ce") else y_reg
    loss = LOSSES[loss_name]()
    op = curvlinops.EKFACLinearOperator(
        model, loss, list(model.parameters()), [(X, y)], fisher_type="type-2",
        separate_weight_and_bias=False, check_deterministic=False,
    )
    op.compute_eigenvalue_correction()
    blocks = kt.collect(model, loss, X, y, fisher="exact")
    assert len(blocks) == 3
    for name, F in blocks.items():
        Qg = op._gradient_covariances_eigenvectors[name]
        Qa = op._input_covariances_eigenvectors[name]
        E = op._corrected_eigenvalues[name]
        if isinstance(E, dict):  # a layer without bias: {position of the weight: E}
            (E,) = E.values()
        W = torch.kron(Qg, Qa)
        ref = W @ torch.diag(E.reshape(-1)) @ W.T
        est = ks.ekfac(F)
        assert est.S.shape == E.shape
        got = est.to_dense()
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-9,
                                   atol=1e-10 * float(ref.abs().max()))


# -- streaming: RunningEstimate("ekfac") -------------------------------------------------------


def _batches(to, count=6, m=3, n=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        if i % 3 == 2:  # a conv batch among outer ones
            G, A = rng.standard_normal((4, 3, m)), rng.standard_normal((4, 3, n))
            out.append(ks.KronSum.from_conv(to(G), to(A)))
        else:
            K = 10 + i
            out.append(ks.KronSum.from_outer(to(rng.standard_normal((K, m))), to(rng.standard_normal((K, n)))))
    return out


@pytest.mark.parametrize("basis_every, bias_correction", [(1, False), (2, False), (3, True)])
def test_running_ekfac_follows_its_rule(basis_every, bias_correction):
    """S_t = diag in (U_t ⊗ V_t) of a_t F̂_{t−1} + b_t F_t, U_t, V_t the running K-FAC's
    eigenvectors refreshed at t = 1, 1 + B, …; checked with dense matrices."""
    batches = _batches(np.asarray)
    run = ks.RunningEstimate("ekfac", decay=0.7, basis_every=basis_every,
                             bias_correction=bias_correction)
    kfac_run = ks.RunningEstimate("kfac", decay=0.7, bias_correction=bias_correction)
    prev = None
    for t, F in enumerate(batches, start=1):
        est = run.update(F)
        k = kfac_run.update(F)
        assert isinstance(est, ks.EigenKron) and est.info.method == "running/ekfac"
        U, V = np.asarray(est.U), np.asarray(est.V)
        if (t - 1) % basis_every == 0:  # the eigenvectors of the running K-FAC factors
            for Q, M in ((U, k.left), (V, k.right)):
                off = Q.T @ M @ Q - np.diag(np.diag(Q.T @ M @ Q))
                assert np.linalg.norm(off) <= 1e-10 * np.linalg.norm(M)
        else:
            np.testing.assert_array_equal(U, prev.U)
            np.testing.assert_array_equal(V, prev.V)
        a, b = run.mixing_weights(t)
        target = b * F.to_dense() + (a * prev.to_dense() if prev is not None else 0.0)
        S_ref, Fhat = dense_ekfac(target, U, V)
        np.testing.assert_allclose(est.S, S_ref, rtol=1e-10, atol=1e-12 * np.abs(S_ref).max())
        prev = est
    assert run.num_updates == len(batches)


def test_running_ekfac_of_identical_batches_is_the_batch_estimate(backend):
    F = _batches(lambda a: backend.asarray(a, "float64"), count=1)[0]
    run = ks.RunningEstimate("ekfac", decay=0.9, basis_every=2)
    for _ in range(4):
        est = run.update(F)
    assert_same_backend(est.S, F.weights, F.weights.dtype)
    np.testing.assert_allclose(backend.to_numpy(est.to_dense()), backend.to_numpy(ks.ekfac(F).to_dense()),
                               rtol=1e-9, atol=1e-10)


def test_running_ekfac_state_dict_round_trip(backend):
    batches = _batches(lambda a: backend.asarray(a, "float64"))
    run = ks.RunningEstimate("ekfac", decay=0.8, basis_every=2, update_every=2)
    for F in batches[:3]:
        run.update(F)
    state = run.state_dict()
    assert state["basis_every"] == 2 and tuple(state["S"].shape) == (3, 4)
    restored = ks.RunningEstimate.from_state_dict(state)
    assert restored.basis_every == 2
    np.testing.assert_array_equal(backend.to_numpy(restored.estimate.S), backend.to_numpy(run.estimate.S))
    for F in batches[3:]:
        a, b = run.update(F), restored.update(F)
        np.testing.assert_array_equal(backend.to_numpy(a.S), backend.to_numpy(b.S))
        np.testing.assert_array_equal(backend.to_numpy(a.U), backend.to_numpy(b.U))
    empty = ks.RunningEstimate("ekfac", basis_every=3).state_dict()
    assert ks.RunningEstimate.from_state_dict(empty).num_updates == 0


def test_running_ekfac_bad_state_and_options():
    batches = _batches(np.asarray, count=2)
    run = ks.RunningEstimate("ekfac", decay=0.8)
    for F in batches:
        run.update(F)
    state = run.state_dict()
    with pytest.raises(ValueError, match="basis_every"):
        ks.RunningEstimate("kfac", basis_every=2)
    with pytest.raises(ValueError, match="basis_every"):
        ks.RunningEstimate("ekfac", basis_every=0)
    with pytest.raises(ValueError, match="basis_every"):
        ks.RunningEstimate("ekfac", decay=0.8, basis_every=2).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        ks.RunningEstimate.from_state_dict({k: v for k, v in state.items() if k != "S"})
    with pytest.raises(ValueError, match=r"state\['S'\] must have shape"):
        ks.RunningEstimate.from_state_dict({**state, "S": np.ones((4, 3))})
    with pytest.raises(ValueError, match="NaN"):
        ks.RunningEstimate.from_state_dict({**state, "U": np.full((3, 3), np.nan)})
    with pytest.raises(TypeError, match="dtype"):
        ks.RunningEstimate.from_state_dict({**state, "S": state["S"].astype(np.float32)})
    with pytest.raises(ValueError, match="unexpected keys"):  # ekfac keys in a kfac state
        ks.RunningEstimate.from_state_dict({**state, "estimator": "kfac"})


def test_zero_sum_gives_a_zero_estimate():
    F = ks.KronSum.from_outer(np.ones((3, 2)), np.ones((3, 3)), np.zeros(3))
    est = ks.ekfac(F)
    assert np.all(est.S == 0) and "zero" in " ".join(est.info.notes)
    assert float(ks.frobenius_error(F, est)) == 0.0
    assert float(ks.frobenius_error(F, est, relative=True)) == 0.0
    np.testing.assert_allclose(est.solve(np.ones((2, 3)), 2.0), np.full((2, 3), 0.5))


def test_auto_gram_route_warns_for_tiny_errors():
    """Above ~2e9 multiply-adds "auto" takes the Gram route, which cancels for tiny errors: warned,
    at the caller's line; method="direct" is exact."""
    rng = np.random.default_rng(0)
    m = n = 32
    U = np.linalg.qr(rng.standard_normal((m, m)))[0]
    V = np.linalg.qr(rng.standard_normal((n, n)))[0]
    i, j = rng.integers(0, m, 2000), rng.integers(0, n, 2000)
    s = rng.uniform(1.0, 2.0, 2000)
    F = ks.KronSum.from_outer(s[:, None] ** 0.25 * U[:, i].T, s[:, None] ** 0.25 * V[:, j].T)
    S = ks.ekfac(F, ks.Kron(U @ np.diag(np.arange(1.0, m + 1)) @ U.T, V @ np.diag(np.arange(1.0, n + 1)) @ V.T)).S
    est = ks.EigenKron(U, V, S)
    with pytest.warns(ks.AccuracyWarning, match="Gram route") as rec:
        ks.frobenius_error(F, est)
    assert rec[0].filename == __file__
    assert float(ks.frobenius_error(F, est, method="direct", relative=True)) < 1e-13


def test_conv_in_chunks_of_samples(monkeypatch):
    """The conv pass in chunks of samples (memory bound) gives the same S as one chunk."""
    import kronsum._ekfac as ek

    F, D = build("conv", np.asarray, seed=6)
    whole = ks.ekfac(F)
    monkeypatch.setattr(ek, "_CHUNK_ELEMENTS", 1)  # one sample per chunk
    chunked = ks.ekfac(F)
    np.testing.assert_allclose(chunked.S, whole.S, rtol=1e-12)
    S_ref, _ = dense_ekfac(D, chunked.U, chunked.V)
    np.testing.assert_allclose(chunked.S, S_ref, rtol=1e-10)
