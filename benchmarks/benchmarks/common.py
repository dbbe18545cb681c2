"""Benchmark cases shared by the asv suite and ``report.py``: data, baselines, thread control.

Kept free of asv imports so that the plain report script runs without asv installed.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

import kronsum as ks


def outer_data(K: int, m: int, n: int, seed: int = 0, kind: str = "heavy"):
    """Per-sample statistics of a fully-connected layer.

    ``kind="heavy"``: per-sample magnitudes drawn from a Student-t (3 dof) shared by the
    gradient and the input, as in training where large-loss samples have both large gradients
    and atypical inputs; K-FAC's independence assumption fails on it. ``"gap"``: nearly
    rank-two statistics whose rearrangement has σ2/σ1 ≈ 0.6 (a small spectral gap).
    """
    rng = np.random.default_rng(seed)
    if kind == "gap":
        # two sub-populations with their own Kronecker structure; sizes set the gap
        half = K // 2
        g0, a0 = rng.standard_normal(m), rng.standard_normal(n)
        g1, a1 = rng.standard_normal(m), rng.standard_normal(n)
        G = np.vstack([g0 + 0.3 * rng.standard_normal((half, m)), g1 + 0.3 * rng.standard_normal((K - half, m))])
        A = np.vstack([a0 + 0.3 * rng.standard_normal((half, n)), a1 + 0.3 * rng.standard_normal((K - half, n))])
        s = np.sqrt(np.r_[np.full(half, 1.0), np.full(K - half, 0.6)])[:, None]
        return G * s, A
    s = np.abs(rng.standard_t(3.0, size=(K, 1))) + 0.1
    return s * rng.standard_normal((K, m)), s * rng.standard_normal((K, n))


def _mixing(d: int, rng, decay: float = 0.7):
    """A random (d, d) mixing with singular values ``(1 + i)^-decay``: correlated channels."""
    U, _ = np.linalg.qr(rng.standard_normal((d, d)))
    V, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (U * (1.0 + np.arange(d)) ** -decay) @ V.T


def conv_data(K: int, T: int, m: int, n: int, seed: int = 0):
    """Per-sample statistics of a convolution: ``G`` (K, T, m) output gradients per position,
    ``A`` (K, T, n) unfolded patches. Channels are correlated (decaying spectra, as real
    activations and gradients are) and per-sample magnitudes heavy-tailed."""
    rng = np.random.default_rng(seed)
    s = np.abs(rng.standard_t(3.0, size=(K, 1, 1))) + 0.1
    G = s * (rng.standard_normal((K, T, m)) @ _mixing(m, rng))
    A = rng.standard_normal((K, T, n)) @ _mixing(n, rng)
    return G, A


def algorithm1_materialised(L: np.ndarray, R: np.ndarray, iterations: int = 20):
    """The paper's Algorithm 1 on materialised ``(K, m, m)`` / ``(K, n, n)`` terms (baseline only)."""
    K, m, _ = L.shape
    n = R.shape[1]
    Lf, Rf = L.reshape(K, m * m), R.reshape(K, n * n)
    Lhat = np.eye(m).reshape(-1)
    for _ in range(iterations):
        Rhat = (Lf @ Lhat) @ Rf
        Rhat /= np.linalg.norm(Rhat)
        Lhat = (Rf @ Rhat) @ Lf
        Lhat /= np.linalg.norm(Lhat)
    return Lhat.reshape(m, m), Rhat.reshape(n, n)


def materialise_outer(G: np.ndarray, A: np.ndarray):
    return np.einsum("ki,kj->kij", G, G), np.einsum("ki,kj->kij", A, A)


@contextlib.contextmanager
def blas_threads(n: int | None):
    """Limit BLAS threads inside the block (``None``: leave the default)."""
    if n is None:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def numba_switch(flag: bool):
    """Context manager switching kronsum's numba kernels on or off."""
    return ks.config(use_numba=flag) if hasattr(ks, "config") else contextlib.nullcontext()


def measure(fn, repeats: int):
    """``(median seconds, peak MiB, result)`` of ``fn()``: one warm-up call (numba compilation,
    BLAS buffers), the median of ``repeats`` timed calls, then the peak of NumPy's
    allocations (tracemalloc) during one more call."""
    import statistics
    import time
    import tracemalloc

    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    tracemalloc.reset_peak()
    out = fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return (statistics.median(times) if times else float("nan")), peak, out


CPU = os.cpu_count()
