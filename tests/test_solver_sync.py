"""Batched host reads in the iterative solvers (``kronsum.config(check_every=...)``).

On an accelerator every read of a scalar to the host stalls the device queue, so ``kfoc``'s
iterative solvers read their convergence scalars every ``check_every`` iterations (default 4
there, 1 on the CPU). These tests force the batched mode on NumPy: the answer is the one of
the unbatched solver (the same step is returned), the work differs by at most
``check_every - 1`` applications, and the number of host reads really drops.
"""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kronsum as ks
from kronsum._eigen import KRYLOV_DIM
from conftest import dense_F, make_sum, random_inputs, sums, svd_optimum

METHODS = ["lanczos", "power", "gram"]


def _solve(F, method, every, **kw):
    with ks.config(check_every=every, use_numba=False):
        return ks.kfoc(F, method=method, **kw)


@given(sums(), st.sampled_from([2, 3, 5]))
def test_batched_reads_reach_the_svd_optimum(case, every):
    form, arrays, w = case
    F = make_sum(form, arrays, w)
    opt, s = svd_optimum(dense_F(form, arrays, w), F.m, F.n)
    normF = float(np.sqrt(np.sum(s**2)))
    for method in METHODS[:2] + ["gram"]:
        est = _solve(F, method, every)
        err = float(ks.frobenius_error(F, est))
        assert err <= opt + 1e-8 * normF + 1e-12 * normF, (method, every, err, opt)  # the default accuracy
        assert np.isclose(float(est.scale), s[0], rtol=1e-8, atol=1e-8 * normF)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("every", [2, 4, 7])
def test_batched_reads_return_the_same_step(method, every):
    """The recurrence is the same computation, so the returned iterate is the same one."""
    G, A = random_inputs("outer", 60, 7, 9, seed=3, kind="heavy")
    F = ks.KronSum.from_outer(G, A)
    one = _solve(F, method, 1)
    many = _solve(F, method, every)
    assert one.info.converged and many.info.converged
    np.testing.assert_allclose(many.left, one.left, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(many.right, one.right, rtol=1e-12, atol=1e-14)
    assert many.info.residual == pytest.approx(one.info.residual, rel=1e-6)
    # applications are counted as performed: up to every - 1 more per restart cycle
    cycles = math.ceil(one.info.iterations / KRYLOV_DIM)
    assert one.info.iterations <= many.info.iterations <= one.info.iterations + cycles * (every - 1)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_batched_reads_synchronise_less(method):
    """Count the host reads (``info.host_reads``): one per ``check_every`` steps (plus a few
    per restart; the power method adds its σ₂ probe, a few Lanczos steps after convergence,
    which reads about ten scalars once)."""
    G, A = random_inputs("conv", 40, 6, 8, T=4, seed=1, kind="gaussian")
    F = ks.KronSum.from_conv(G, A)
    reads = {}
    for every in (1, 5):
        est = _solve(F, method, every, tol=1e-13, max_iter=200)
        reads[every] = (est.info.host_reads, est.info.iterations)
    (r1, it1), (r5, it5) = reads[1], reads[5]
    assert r1 >= it1  # unbatched: at least one read per application
    cycles = math.ceil(it5 / KRYLOV_DIM)
    probe = 10 if method == "power" else 0
    assert r5 <= it5 / 5 + 4 * cycles + 8 + probe, reads
    assert r5 < r1 / 2, reads


def test_check_every_option_is_validated():
    with pytest.raises(ValueError, match="check_every"):
        ks.set_config(check_every=0)
    with pytest.raises(TypeError, match="check_every"):
        ks.set_config(check_every=True)
    with ks.config(check_every=3):
        assert ks.get_config()["check_every"] == 3
    assert ks.get_config()["check_every"] is None
