"""The numba fast path and the array-API path give the same numbers, and the switch works."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kronsum as ks
from conftest import random_inputs

pytest.importorskip("numba", reason="numba is not installed: only the array-API path exists")


@pytest.fixture(params=[True, False], ids=["numba", "array-api"])
def use_numba(request):
    with ks.config(use_numba=request.param):
        yield request.param


@given(form=st.sampled_from(["outer", "terms"]), K=st.integers(1, 40), m=st.integers(1, 6),
       n=st.integers(1, 6), seed=st.integers(0, 2**31), kind=st.sampled_from(["gaussian", "heavy"]))
def test_gram_solver_same_numbers_on_both_paths(form, K, m, n, seed, kind):
    arrays = random_inputs(form, K, m, n, seed=seed, kind=kind)
    F = getattr(ks.KronSum, f"from_{form}")(*arrays)
    # the default accuracy: both paths within 1e-8·‖F‖ of the optimal error (they may stop a
    # step apart, as the bound meets the threshold at different roundings)
    with ks.config(use_numba=True):
        fast = ks.kfoc(F, method="gram")
    with ks.config(use_numba=False):
        slow = ks.kfoc(F, method="gram")
    normF = float(F.frobenius_norm())
    assert abs(float(ks.frobenius_error(F, fast)) - float(ks.frobenius_error(F, slow))) <= 1e-8 * normF
    # the residual rule: the same factors
    with ks.config(use_numba=True):
        fast = ks.kfoc(F, method="gram", tol=1e-10)
    with ks.config(use_numba=False):
        slow = ks.kfoc(F, method="gram", tol=1e-10)
    assert fast.info.method == "kfoc/gram[numba]" and slow.info.method == "kfoc/gram"
    ref = slow.to_dense()
    # the two routes round differently (the array-API one scales S_P, S_Q, w and finishes in
    # coefficient space); the eigenvector's sensitivity to rounding grows as 1/(1 - σ₂²/σ₁²)
    gap = 1 - (fast.info.sigma2 / fast.info.sigma1) ** 2 if fast.info.sigma2 else 1.0
    tol = 1e-9 / max(gap, 1e-3)
    assert np.allclose(fast.to_dense(), ref, rtol=tol, atol=tol * np.abs(ref).max())
    assert fast.info.converged and slow.info.converged


def test_switch_by_environment_variable(monkeypatch):
    from kronsum import _config

    monkeypatch.setenv("KRONSUM_DISABLE_NUMBA", "1")
    assert _config._defaults()["use_numba"] is False
    monkeypatch.setenv("KRONSUM_DISABLE_NUMBA", "0")
    assert _config._defaults()["use_numba"] is True


def test_config_validates_and_restores():
    before = ks.get_config()
    with pytest.raises(ValueError, match="unknown kronsum option"):
        ks.set_config(use_cuda=True)
    with pytest.raises(TypeError, match="must be a bool"):
        ks.set_config(use_numba="yes")
    with ks.config(use_numba=not before["use_numba"]):
        assert ks.get_config()["use_numba"] is (not before["use_numba"])
    assert ks.get_config() == before


@pytest.mark.parametrize("form", ["outer", "terms"])
def test_both_paths_reach_the_svd_optimum(use_numba, form):
    arrays = random_inputs(form, 30, 4, 5, seed=1, kind="heavy")
    F = getattr(ks.KronSum, f"from_{form}")(*arrays)
    est = ks.kfoc(F, method="gram", tol=1e-10)  # the residual rule: factors compared
    assert est.info.method.endswith("[numba]") is use_numba
    ref = ks.nearest_kronecker(F)
    assert np.allclose(est.to_dense(), ref.to_dense(), atol=1e-9 * np.abs(ref.to_dense()).max())


def test_float32_on_numba_path_keeps_dtype(use_numba):
    G, A = random_inputs("outer", 20, 3, 4, seed=2)
    F = ks.KronSum.from_outer(G.astype(np.float32), A.astype(np.float32))
    est = ks.kfoc(F, method="gram")
    assert est.left.dtype == est.right.dtype == est.scale.dtype == np.float32


# one gemm / rows split by sign for syrk / results wide enough for the tiled triangle copy
@pytest.mark.parametrize("K, d", [(50, 7), (300, 64), (40, 1024), (30, 2100)])
def test_weighted_gram_fast_path_matches_gemm(K, d):
    from kronsum._accel import weighted_gram

    rng = np.random.default_rng(0)
    V = rng.standard_normal((K, d))
    mixed = rng.standard_normal(K) * (rng.uniform(0, 1, K) > 0.3)  # both signs and zeros
    cases = [(V, c) for c in (rng.uniform(0, 1, K), rng.standard_normal(K), np.zeros(K),
                              -np.ones(K), np.full(K, 0.02), mixed)]
    cases.append((np.asfortranarray(V), np.full(K, 0.5)))  # a Fortran-ordered V, used as it is
    for V, c in cases:
        ref = V.T @ (c[:, None] * V)
        V0, c0 = V.copy(), c.copy()
        got = weighted_gram(V, c, np)
        assert np.array_equal(V, V0) and np.array_equal(c, c0)  # the inputs are left alone
        assert np.allclose(got, ref, rtol=1e-12, atol=1e-12 * d)
        assert np.array_equal(got, got.T)  # symmetric bit for bit on every route
        for alpha in (0.3, np.asarray(2.0**-40)):  # the scale kfac folds in (1/Σw, powers of 2)
            got = weighted_gram(V, c, np, alpha)
            assert np.allclose(got, alpha * ref, rtol=1e-12, atol=1e-12 * d * float(alpha))


def test_weighted_gram_small_route_keeps_entries_near_the_largest_number():
    """An entry above half the largest float64 stays finite (no doubling before halving)."""
    from kronsum._accel import weighted_gram

    V = np.array([[1e154, 1.0], [0.0, 1.0]])
    P = weighted_gram(V, np.array([1.0, 0.5]), np)
    assert np.isfinite(P).all() and P[0, 0] == pytest.approx(1e308) and np.array_equal(P, P.T)


@pytest.mark.parametrize("K, d", [(128, 36), (64, 200), (2048, 100), (40, 120)])
def test_row_gram_routes_match_the_product(K, d):
    """``V Vᵀ`` by gemm (many short rows) or NumPy's syrk route, the same numbers to rounding."""
    from kronsum._accel import row_gram

    V = np.random.default_rng(1).standard_normal((K, d))
    got = row_gram(V, np)
    ref = np.einsum("id,jd->ij", V, V)
    assert got.shape == (K, K)
    assert np.allclose(got, ref, rtol=1e-12, atol=1e-12 * d)
    assert np.allclose(got, got.T, rtol=1e-14, atol=1e-13 * d)


def test_weighted_gram_alpha_on_other_backends(backend):
    """The ``alpha`` of the array-API path (folded into the weights) gives NumPy's numbers."""
    from kronsum._accel import weighted_gram
    from kronsum._compat import namespace

    rng = np.random.default_rng(1)
    V, c = rng.standard_normal((30, 5)), rng.uniform(0, 1, 30)
    Vb, cb = backend.asarray(V, "float64"), backend.asarray(c, "float64")
    xp = namespace(Vb)
    alpha = xp.asarray(0.25, dtype=Vb.dtype)
    got = backend.to_numpy(weighted_gram(Vb, cb, xp, alpha))
    assert np.allclose(got, weighted_gram(V, c, np, 0.25), rtol=1e-12, atol=1e-14)
    assert np.allclose(got, 0.25 * V.T @ (c[:, None] * V), rtol=1e-12, atol=1e-14)


def test_get_config_reports_whether_the_kernels_can_run():
    """``use_numba`` is ``True`` only when numba is installed and not switched off by the
    environment (a fresh interpreter, so that no earlier ``config`` call leaks in)."""
    import importlib.util
    import os
    import subprocess
    import sys

    code = "import kronsum as ks; print(ks.get_config()['use_numba'])"
    have = importlib.util.find_spec("numba") is not None
    for env, expect in (({}, have), ({"KRONSUM_DISABLE_NUMBA": "1"}, False)):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, **env}, check=True).stdout.strip()
        assert out == str(expect)
    hidden = subprocess.run(  # numba made unimportable: reported off
        [sys.executable, "-c", "import sys; sys.modules['numba'] = None; import importlib.util as u; "
         "u.find_spec = (lambda f: lambda n, *a: None if n == 'numba' else f(n, *a))(u.find_spec); " + code],
        capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "KRONSUM_DISABLE_NUMBA"},
        check=True).stdout.strip()
    assert hidden == "False"


def test_get_config_reads_false_when_numba_fails_to_import(tmp_path):
    """An installed numba that fails on import (e.g. built for another NumPy) is reported off,
    and the estimators take the array-API path."""
    import os
    import subprocess
    import sys

    broken = tmp_path / "numba"
    broken.mkdir()
    # not an ImportError: a broken llvmlite raises OSError; switching numba off must still work
    (broken / "__init__.py").write_text("raise OSError('cannot load library libllvmlite.so')\n")
    code = ("import numpy as np, kronsum as ks; ks.set_config(use_numba=False); "
            "ks.set_config(use_numba=True); "
            "F = ks.KronSum.from_outer(np.ones((8, 3)), np.ones((8, 2))); "
            "print(ks.get_config()['use_numba'], ks.kfoc(F, method='gram').info.method)")
    env = {k: v for k, v in os.environ.items() if k != "KRONSUM_DISABLE_NUMBA"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.strip()
    assert out == "False kfoc/gram"


@pytest.mark.slow  # three subprocesses, each compiling the kernel
def test_kernel_cache_is_recompiled_when_the_stopping_rule_changes(tmp_path):
    """numba's cache checks only the kernel's own file; the Gram solve's kernel inlines the
    stopping rule of another file, so a changed rule must flush its cache (simulated by a
    stale digest): recompiled then, loaded from the cache otherwise."""
    import os
    import subprocess
    import sys

    if os.environ.get("NUMBA_DISABLE_JIT", "0") != "0":
        pytest.skip("NUMBA_DISABLE_JIT: nothing is compiled or cached")
    code = (
        "import numpy as np\n"
        "from kronsum import _numba_kernels as k\n"
        "S = np.eye(3); w = np.ones(3)\n"
        "k.coef_lanczos(S, S, w, np.ones(3), 1e-10, -1.0, 3.0, 0.0, 0.0, 5, 3, 2.2e-16, True)\n"
        "s = k.coef_lanczos.stats\n"
        "print('hit' if sum(s.cache_hits.values()) else 'miss' if sum(s.cache_misses.values()) else '?')\n"
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))

    def run():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert run() == "miss"  # the first compilation, saved
    assert run() == "hit"  # loaded
    stamps = list(tmp_path.rglob("*.coef_lanczos.deps"))
    assert len(stamps) == 1
    stamps[0].write_text("the digest of an older _stopping.py")
    assert run() == "miss"  # flushed and compiled again
    assert run() == "hit"
