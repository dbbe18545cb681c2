"""PyTorch CPU tensors through the NumPy fast paths (option ``torch_cpu_via_numpy``).

With the option on (default), ``kfac``, ``tkfac`` and ``kfoc`` hand float32/float64 CPU
tensors to the NumPy code as views of the same memory and return tensor factors; with it off
every operation stays in PyTorch. Both must give the same numbers; tensors that require
grad, and everything that is not a plain CPU tensor, never take the route.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kronsum as ks
from conftest import random_inputs, sums
from kronsum import _accel

torch = pytest.importorskip("torch", reason="torch is not installed")

ESTIMATORS = {"kfac": ks.kfac, "tkfac": ks.tkfac, "kfoc": ks.kfoc}


def _torch_sum(form, arrays, w, dtype=torch.float64):
    ts = [torch.asarray(a, dtype=dtype) for a in arrays]
    wt = None if w is None else torch.asarray(w, dtype=dtype)
    return getattr(ks.KronSum, f"from_{form}")(*ts, weights=wt)


def _both(est, F, **kw):
    with ks.config(torch_cpu_via_numpy=True):
        on = est(F, **kw)
    with ks.config(torch_cpu_via_numpy=False):
        off = est(F, **kw)
    return on, off


def _tol(est_name, K):
    if est_name != "kfoc" or K.info.sigma2 is None:
        return 1e-10
    gap = 1 - (K.info.sigma2 / K.info.sigma1) ** 2 if K.info.sigma1 > 0 else 1.0
    return 1e-9 / max(gap, 1e-3)


@settings(deadline=None, max_examples=40)
@given(case=sums(), name=st.sampled_from(sorted(ESTIMATORS)))
def test_same_numbers_with_and_without_the_route(case, name):
    form, arrays, w = case
    F = _torch_sum(form, arrays, w)
    on, off = _both(ESTIMATORS[name], F)
    for K in (on, off):
        assert isinstance(K.left, torch.Tensor) and isinstance(K.right, torch.Tensor)
        assert isinstance(K.scale, torch.Tensor) and K.scale.shape == ()
        assert K.left.dtype == K.right.dtype == K.scale.dtype == torch.float64
        assert K.left.device.type == "cpu"
    tol = _tol(name, on)
    a, b = on.to_dense().numpy(), off.to_dense().numpy()
    assert np.allclose(a, b, rtol=tol, atol=tol * max(np.abs(b).max(), 1e-300))
    assert on.info.converged == off.info.converged
    assert on.info.notes == off.info.notes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_route_reaches_the_numpy_kernels(dtype):
    G, A = random_inputs("outer", 40, 5, 6, seed=3)
    F = _torch_sum("outer", (G, A), None, dtype)
    on, off = _both(ks.kfoc, F, method="gram")
    numba = ks.get_config()["use_numba"]
    assert on.info.method == ("kfoc/gram[numba]" if numba else "kfoc/gram")
    assert off.info.method == "kfoc/gram"
    assert on.left.dtype == dtype and on.scale.dtype == dtype
    # the SVD ground truth of the rearranged matrix, in float64
    Fd = ks.KronSum.from_outer(G, A)
    s = np.linalg.svd(Fd.rearranged(), compute_uv=False)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    assert float(on.scale) == pytest.approx(s[0], rel=rtol)


def test_views_share_memory_and_inputs_are_untouched():
    G, A = random_inputs("conv", 7, 3, 4, T=2, seed=1)
    F = _torch_sum("conv", (G, A), np.linspace(0.5, 1.5, 7))
    before = [t.clone() for t in (F.G, F.A, F.weights)]
    import array_api_compat

    np_xp = array_api_compat.array_namespace(np.empty(0))
    Fh = F._map(lambda t: t.numpy(), np_xp)
    assert np.shares_memory(Fh.G, F.G.numpy()) and np.shares_memory(Fh.A, F.A.numpy())
    for name in ESTIMATORS:
        ESTIMATORS[name](F)
    for t, b in zip((F.G, F.A, F.weights), before):
        assert torch.equal(t, b)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad:UserWarning")
def test_tensors_that_require_grad_stay_in_torch():
    G, A = random_inputs("outer", 30, 4, 3, seed=2)
    G = torch.asarray(G, requires_grad=True)
    assert not _accel._torch_cpu_plain([G]) and _accel._torch_cpu_plain([G.detach()])
    F = ks.KronSum.from_outer(G, torch.asarray(A))
    with ks.config(torch_cpu_via_numpy=True):
        est = ks.kfoc(F, method="gram")
    assert est.info.method == "kfoc/gram"  # not the numba kernel: no NumPy view was taken
    ref = ks.kfoc(ks.KronSum.from_outer(G.detach().numpy(), A), method="gram")
    assert float(est.scale) == pytest.approx(float(ref.scale), rel=1e-10)


def test_sum_of_sums_and_a_kron_init_take_the_route():
    G, A = random_inputs("outer", 20, 3, 4, seed=5)
    L, R = random_inputs("terms", 3, 3, 4, seed=6)
    F = _torch_sum("outer", (G, A), None) + _torch_sum("terms", (L @ L.transpose(0, 2, 1),
                                                              R @ R.transpose(0, 2, 1)), None)
    init = ks.kfac(F)
    assert isinstance(init.left, torch.Tensor)
    on, off = _both(ks.kfoc, F, init=init)
    assert isinstance(on.left, torch.Tensor)
    assert np.allclose(on.to_dense().numpy(), off.to_dense().numpy(), rtol=1e-8, atol=1e-10)


def test_option_is_validated():
    with pytest.raises(TypeError, match="must be a bool"):
        ks.set_config(torch_cpu_via_numpy=1)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("form", ["outer", "conv", "terms"])
def test_the_estimators_receive_numpy_views_only_with_the_option(name, form, monkeypatch):
    """The decorator is not a no-op: with the option on, the estimator body gets one NumPy
    view of the sum (and the answer comes back as tensors); with it off, none."""
    seen = []
    real = ks.KronSum._map

    def spy(self, f, xp=None):
        out = real(self, f, xp)
        if isinstance(self.weights, torch.Tensor) and isinstance(out.weights, np.ndarray):
            seen.append(np.ndarray)  # a NumPy view of the tensors' sum was made
        return out

    monkeypatch.setattr(ks.KronSum, "_map", spy)
    F = _torch_sum(form, random_inputs(form, 6, 3, 2, T=2, seed=8), None, torch.float32)
    with ks.config(torch_cpu_via_numpy=True):
        on = ESTIMATORS[name](F)
    assert seen == [np.ndarray] and isinstance(on.left, torch.Tensor)
    with ks.config(torch_cpu_via_numpy=False):
        ESTIMATORS[name](F)
    assert seen == [np.ndarray]


def test_factors_stay_on_the_cpu_under_a_default_device():
    """A default device (torch.set_default_device, or this context) must not move the returned
    factors: torch.as_tensor would put them there."""
    F = _torch_sum("outer", random_inputs("outer", 10, 3, 2, seed=9), None)
    with torch.device("meta"):
        est = ks.kfac(F)
    assert est.left.device.type == "cpu" and est.scale.device.type == "cpu"
