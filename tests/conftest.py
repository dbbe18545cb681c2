"""Backends, data factories and assertions shared by the test-suite.

Every backend test takes the ``backend`` fixture, parametrised over NumPy, a read-only NumPy
(catches writes to the caller's arrays), array-api-strict, torch (CPU), JAX and Dask, and,
where a CUDA GPU is present, CuPy and torch CUDA tensors; a backend that is not installed
(or has no GPU) is skipped with its reason. ``KRONSUM_TEST_BACKENDS=cupy,torch-cuda`` limits
the parametrisation to the named backends (how the GPU run in docs/benchmarks.md was made).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import kronsum as ks

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "dev", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@dataclass(frozen=True)
class Backend:
    """How to move NumPy test data into one array library and back."""

    name: str
    module: Any
    asarray: Callable[[np.ndarray, str], Any]
    to_numpy: Callable[[Any], np.ndarray]

    def __repr__(self) -> str:  # readable test ids
        return self.name


def _numpy_backend():
    return Backend("numpy", np, lambda a, dt: np.array(a, dtype=dt), np.asarray)


def _readonly_backend():
    def asarray(a, dt):
        out = np.array(a, dtype=dt)
        out.flags.writeable = False
        return out

    return Backend("numpy-readonly", np, asarray, np.asarray)


def _strict_backend():
    xps = importlib.import_module("array_api_strict")
    dt = {"float32": xps.float32, "float64": xps.float64}
    return Backend("array-api-strict", xps, lambda a, d: xps.asarray(np.asarray(a, dtype=d), dtype=dt[d]),
                   lambda x: np.from_dlpack(x))


def _torch_backend():
    torch = importlib.import_module("torch")
    dt = {"float32": torch.float32, "float64": torch.float64}
    return Backend("torch", torch, lambda a, d: torch.asarray(np.asarray(a, dtype=d), dtype=dt[d]),
                   lambda x: x.detach().cpu().numpy())


def _cupy_backend():
    cp = importlib.import_module("cupy")
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken
        raise ImportError(f"no usable CUDA device ({type(exc).__name__}: {exc})") from None
    if count < 1:
        raise ImportError("no CUDA device")
    return Backend("cupy", cp, lambda a, d: cp.asarray(np.asarray(a, dtype=d)), cp.asnumpy)


def _torch_cuda_backend():
    torch = importlib.import_module("torch")
    if not torch.cuda.is_available():
        raise ImportError("torch sees no CUDA device")
    dt = {"float32": torch.float32, "float64": torch.float64}
    return Backend("torch-cuda", torch,
                   lambda a, d: torch.asarray(np.asarray(a, dtype=d), dtype=dt[d], device="cuda"),
                   lambda x: x.detach().cpu().numpy())


def _jax_backend():
    jax = importlib.import_module("jax")
    jax.config.update("jax_enable_x64", True)
    if jax.default_backend() != "cpu":
        # JAX's GPU default computes float32 matmuls in TF32 (~1e-3 relative): the float32
        # tolerances here are for full float32 (docs/backends.md says how users get it)
        jax.config.update("jax_default_matmul_precision", "highest")
    jnp = importlib.import_module("jax.numpy")
    return Backend("jax", jnp, lambda a, d: jnp.asarray(np.asarray(a, dtype=d)), np.asarray)


def _dask_backend():
    da = importlib.import_module("dask.array")
    return Backend("dask", da,
                   lambda a, d: da.from_array(np.asarray(a, dtype=d), chunks=max(1, len(a) // 2) if np.ndim(a) else ()),
                   lambda x: np.asarray(x.compute() if hasattr(x, "compute") else x))


_FACTORIES = {
    "numpy": _numpy_backend,
    "numpy-readonly": _readonly_backend,
    "array-api-strict": _strict_backend,
    "torch": _torch_backend,
    "jax": _jax_backend,
    "dask": _dask_backend,
    "cupy": _cupy_backend,
    "torch-cuda": _torch_cuda_backend,
}
GPU_BACKENDS = ("cupy", "torch-cuda")
_SELECTED = [b.strip() for b in os.environ.get("KRONSUM_TEST_BACKENDS", "").split(",") if b.strip()]
_unknown = set(_SELECTED) - set(_FACTORIES)
if _unknown:
    raise ValueError(f"KRONSUM_TEST_BACKENDS names unknown backends {sorted(_unknown)}; known: {list(_FACTORIES)}")
BACKENDS = _SELECTED or list(_FACTORIES)


def load_backend(name: str) -> Backend:
    """The named backend, or a skip saying why it is unavailable here."""
    try:
        return _FACTORIES[name]()
    except ImportError as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"{name} is unavailable here: {exc}")


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
def backend(request) -> Backend:
    return load_backend(request.param)


@pytest.fixture(scope="module", params=[b for b in BACKENDS if b in GPU_BACKENDS] or ["cupy"],
                ids=[b for b in BACKENDS if b in GPU_BACKENDS] or ["cupy"])
def gpu_backend(request) -> Backend:
    """CuPy or torch CUDA (skipped without a GPU)."""
    return load_backend(request.param)


# -- data ----------------------------------------------------------------------------------


def random_inputs(form: str, K: int, m: int, n: int, T: int = 3, *, seed: int = 0,
                  kind: str = "gaussian") -> tuple[np.ndarray, ...]:
    """NumPy inputs for ``KronSum.from_<form>``: ``(L, R)``, ``(G, A)`` or conv ``(G, A)``.

    ``kind="heavy"`` draws heavy-tailed, nearly low-rank statistics (as late-training
    gradients are); ``"gaussian"`` plain normals.
    """
    rng = np.random.default_rng(seed)

    def draw(*shape):
        x = rng.standard_normal(shape)
        if kind == "heavy":
            x = x * rng.standard_t(2.0, size=shape[:1] + (1,) * (len(shape) - 1))
        return x

    if form == "terms":
        L = draw(K, m, m)
        R = draw(K, n, n)
        return L, R
    if form == "outer":
        return draw(K, m), draw(K, n)
    return draw(K, T, m), draw(K, T, n)


FORMS = ["terms", "outer", "conv"]


@st.composite
def sums(draw, forms=tuple(FORMS)):
    """Hypothesis strategy: ``(form, arrays, weights)`` of a small random sum (K ≤ 10, m, n ≤ 4)."""
    form = draw(st.sampled_from(forms))
    K = draw(st.integers(1, 10))
    m = draw(st.integers(1, 4))
    n = draw(st.integers(1, 4))
    T = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["gaussian", "heavy"]))
    arrays = random_inputs(form, K, m, n, T=T, seed=seed, kind=kind)
    weighted = draw(st.booleans())
    w = np.random.default_rng(seed + 1).uniform(0.1, 2.0, K) if weighted else None
    return form, arrays, w


def make_sum(form: str, arrays, weights=None, **kw) -> ks.KronSum:
    return getattr(ks.KronSum, f"from_{form}")(*arrays, weights, **kw)


def dense_terms(form: str, arrays, weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Materialised ``(w, L_k, R_k)`` stacks for any form, by the textbook definitions."""
    if form == "terms":
        L, R = arrays
    elif form == "outer":
        G, A = arrays
        L = np.einsum("ki,kj->kij", G, G)
        R = np.einsum("ki,kj->kij", A, A)
    else:
        G, A = arrays  # conv: all (t, t') pairs per sample
        K, T, m = G.shape
        n = A.shape[-1]
        L = np.einsum("kti,ksj->ktsij", G, G).reshape(K * T * T, m, m)
        R = np.einsum("kti,ksj->ktsij", A, A).reshape(K * T * T, n, n)
        w = np.ones(K) if weights is None else np.asarray(weights, dtype=float)
        return np.repeat(w, T * T), L, R
    w = np.ones(len(L)) if weights is None else np.asarray(weights, dtype=float)
    return w, L, R


def dense_F(form: str, arrays, weights=None) -> np.ndarray:
    """F = Σ_k w_k kron(L_k, R_k) with NumPy's own ``np.kron``: the independent reference."""
    w, L, R = dense_terms(form, arrays, weights)
    return sum(wk * np.kron(Lk, Rk) for wk, Lk, Rk in zip(w, L, R))


def svd_optimum(F_dense: np.ndarray, m: int, n: int) -> tuple[float, np.ndarray]:
    """Optimal error ``sqrt(Σ_{i≥2} σ_i²)`` and singular values of the rearranged dense F."""
    Rm = F_dense.reshape(m, n, m, n).transpose(0, 2, 1, 3).reshape(m * m, n * n)
    s = np.linalg.svd(Rm, compute_uv=False)
    return float(np.sqrt(np.sum(s[1:] ** 2))), s


def assert_same_backend(x, like, dtype=None):
    """The result lives in the same namespace and on the same device as ``like`` and has the
    expected dtype (the caller's array type comes back)."""
    import array_api_compat

    got, want = array_api_compat.array_namespace(x), array_api_compat.array_namespace(like)
    assert got is want, f"result namespace {got.__name__} is not the input's {want.__name__}"
    dx, dl = array_api_compat.device(x), array_api_compat.device(like)
    assert dx == dl, f"result on device {dx!r}, input on {dl!r}"
    if dtype is not None:
        assert x.dtype == dtype, (x.dtype, dtype)


@pytest.fixture(params=["numba", "array-api"])
def numba_path(request):
    """Run a test with kronsum's numba kernels on and off (same numbers expected)."""
    on = request.param == "numba"
    if on:
        pytest.importorskip("numba", reason="numba is not installed: only the array-API path exists")
    with ks.config(use_numba=on):
        yield on


def two_populations(form, K, T, m, n, seed):
    """``(G, A)`` of an outer (``T`` unused) or conv block whose samples form two
    sub-populations around two mean directions (σ₂/σ₁ near 0.9): Lanczos stopped at a loose
    accuracy mixes in the second pair, which is indefinite, so the iterate shows negative
    eigenvalues where the optimal factor's are small."""
    rng = np.random.default_rng(seed)
    shape = (K, T) if form == "conv" else (K,)
    half = K // 2
    g0, a0, g1, a1 = (rng.standard_normal(d) for d in (m, n, m, n))
    G = np.concatenate([g0 + 0.3 * rng.standard_normal((half,) + shape[1:] + (m,)),
                        g1 + 0.3 * rng.standard_normal((K - half,) + shape[1:] + (m,))])
    A = np.concatenate([a0 + 0.3 * rng.standard_normal((half,) + shape[1:] + (n,)),
                        a1 + 0.3 * rng.standard_normal((K - half,) + shape[1:] + (n,))])
    G[half:] *= np.sqrt(0.9)
    return G, A
