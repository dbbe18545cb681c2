"""Benchmark cases shared by the asv suite and ``report.py``: data, baselines, thread control.

Kept free of asv imports so that the plain report script runs without asv installed.
"""

from __future__ import annotations

import contextlib
import math
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
    """Limit BLAS threads inside the block (``None``: leave the default).

    threadpoolctl limits the BLAS libraries loaded when the block is entered: SciPy's (its own
    OpenBLAS, which kronsum's ``trmm`` route imports on first use) is loaded first, so that it
    does not run, and spin, on every core inside the block."""
    if n is None:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    try:
        import scipy.linalg  # noqa: F401
    except ImportError:  # pragma: no cover
        pass
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


# -- data families for the K-FOC cost benchmarks ------------------------------------------------
#
# The solver is never tuned to one kind of data: every K-FOC cost case runs on each family.

OUTER_FAMILIES = ("gaussian", "heavy", "gap", "digits")
CONV_FAMILIES = ("gaussian", "heavy", "gap", "correlated")


def outer_family(family: str, K: int, m: int, n: int, seed: int = 0, dtype=np.float64):
    """``(G, A)`` of an outer-form block from one data family.

    ``gaussian``: iid standard normal statistics. ``heavy``: per-sample magnitudes from a
    Student-t (3 dof) shared by gradient and input (:func:`outer_data`). ``gap``: two
    sub-populations with their own Kronecker structure, sized so that σ2/σ1 ≈ 0.9 (a small
    spectral gap: the iterative solvers' hard case). ``digits``: per-sample statistics that a
    softmax layer of real data gives — sklearn's digits images (with a bias column, tiled to
    the wanted n) as inputs and exact-Fisher output gradients ``(diag p − ppᵀ)^{1/2}`` rows of
    a random linear classifier (sklearn needed; m ≤ 10 classes are tiled up to m).
    """
    rng = np.random.default_rng(seed)
    if family == "gaussian":
        G, A = rng.standard_normal((K, m)), rng.standard_normal((K, n))
    elif family == "heavy":
        G, A = outer_data(K, m, n, seed=seed)
    elif family == "gap":
        half = K // 2
        g0, a0, g1, a1 = (rng.standard_normal(d) for d in (m, n, m, n))
        G = np.vstack([g0 + 0.3 * rng.standard_normal((half, m)), g1 + 0.3 * rng.standard_normal((K - half, m))])
        A = np.vstack([a0 + 0.3 * rng.standard_normal((half, n)), a1 + 0.3 * rng.standard_normal((K - half, n))])
        G[half:] *= math.sqrt(0.9)
    elif family == "digits":
        from sklearn.datasets import load_digits

        X = load_digits().data / 16.0
        X = np.hstack([X, np.ones((len(X), 1))])
        idx = rng.integers(0, len(X), K)
        A = np.tile(X[idx], (1, -(-n // X.shape[1])))[:, :n] + 1e-3 * rng.standard_normal((K, n))
        W = rng.standard_normal((X.shape[1], 10)) * 0.3
        logits = X[idx] @ W
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        y = np.array([rng.choice(10, p=pk) for pk in p])  # a sampled (MC Fisher) label
        g = p.copy()
        g[np.arange(K), y] -= 1.0
        G = np.tile(g, (1, -(-m // 10)))[:, :m] + 1e-3 * rng.standard_normal((K, m))
    else:
        raise ValueError(f"unknown outer family {family!r}; known: {OUTER_FAMILIES}")
    return G.astype(dtype), A.astype(dtype)


def conv_family(family: str, K: int, T: int, m: int, n: int, seed: int = 0, dtype=np.float64):
    """``(G, A)`` of a conv-form block (``(K, T, m)``, ``(K, T, n)``) from one data family:
    ``gaussian`` iid, ``heavy`` (Student-t per-sample magnitudes, iid channels), ``gap``
    (two sub-populations, σ2/σ1 ≈ 0.9), ``correlated`` (decaying channel spectra and
    heavy-tailed magnitudes: :func:`conv_data`)."""
    rng = np.random.default_rng(seed)
    if family == "gaussian":
        G, A = rng.standard_normal((K, T, m)), rng.standard_normal((K, T, n))
    elif family == "heavy":
        s = np.abs(rng.standard_t(3.0, size=(K, 1, 1))) + 0.1
        G, A = s * rng.standard_normal((K, T, m)), rng.standard_normal((K, T, n))
    elif family == "gap":
        half = K // 2
        g0, a0, g1, a1 = (rng.standard_normal(d) for d in (m, n, m, n))
        G = np.concatenate([g0 + 0.3 * rng.standard_normal((half, T, m)),
                            g1 + 0.3 * rng.standard_normal((K - half, T, m))])
        A = np.concatenate([a0 + 0.3 * rng.standard_normal((half, T, n)),
                            a1 + 0.3 * rng.standard_normal((K - half, T, n))])
        G[half:] *= math.sqrt(0.9)
    elif family == "correlated":
        G, A = conv_data(K, T, m, n, seed=seed)
    else:
        raise ValueError(f"unknown conv family {family!r}; known: {CONV_FAMILIES}")
    return G.astype(dtype), A.astype(dtype)


def interleaved(fns: dict, rounds: int) -> dict:
    """CPU and wall time of each callable, interleaved: after one warm-up call each, ``rounds``
    rounds that call every function once in turn, so that machine noise hits them alike.
    Returns ``{name: {"cpu_s": median process_time, "wall_s": median perf_counter}}``.
    (``time.process_time`` counts this process's CPU time only: other jobs on a shared machine
    do not inflate it, as they do wall time.)"""
    import statistics
    import time

    for fn in fns.values():
        fn()
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - w0)
    return {k: {"cpu_s": statistics.median(cpu[k]), "wall_s": statistics.median(wall[k])} for k in fns}
