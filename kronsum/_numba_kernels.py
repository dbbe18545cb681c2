"""numba kernels for NumPy inputs on the CPU (reached only through :mod:`kronsum._accel`).

``coef_lanczos`` is the whole K-FOC Gram solve after the two K×K Gram matrices: Lanczos in
coefficient space with the ``S_P`` metric, identical in arithmetic to the array-API path in
:mod:`kronsum._eigen` but without the Python overhead per step, which dominates for small
layers (K ≲ 256, m, n ≲ 64). ``nogil=True`` so threads can solve layers concurrently;
``cache=True`` so the compilation (about a second) is paid once per machine; no fastmath.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._stopping import gap_bound


_gap_bound = njit(cache=True, nogil=True)(gap_bound)


@njit(cache=True, nogil=True)
def weighted_hadamard_sum(SP, SQ, w):  # pragma: no cover - compiled
    """``wᵀ(S_P ∘ S_Q)w`` (``‖F‖²`` of the Gram space) in one pass, without a K×K temporary:
    the column sums ``Σ_k w_k (S_P ∘ S_Q)_kj`` accumulate along the rows (independent lanes,
    so the compiler vectorises them without fastmath), then one dot product with ``w``."""
    K = SP.shape[0]
    acc = np.zeros(K, dtype=np.float64)
    for k in range(K):
        wk = w[k]
        for j in range(K):
            acc[j] += SP[k, j] * SQ[k, j] * wk
    total = 0.0
    for j in range(K):
        total += acc[j] * w[j]
    return total


@njit(cache=True, nogil=True)
def coef_lanczos(SP, SQ, w, x0, tol, accuracy, f2, f2_err, th_rel, max_iter, kdim, eps, estimates):  # pragma: no cover - compiled
    """Top eigenpair of ``α ↦ W S_Q W S_P α`` in the ``S_P`` inner product.

    Stops as :class:`kronsum._eigen.Stop` does: residual ≤ ``tol``, or the error-gap bound
    :func:`kronsum._stopping.gap_bound` (with ``f2 = ‖F‖²`` and its rounding bound
    ``f2_err``, and ``th_rel·θ`` the Ritz value's rounding) ≤ ``accuracy`` (``< 0``: off),
    an uncertified bound only with ``estimates`` (:attr:`kronsum._eigen.Stop.estimates`: false
    where one Krylov basis of ``kdim`` vectors spans the space).
    Returns ``(alpha, applications, converged, residual, s2, bound, certified, th1, th2, r2)``
    (the last three as :class:`kronsum._eigen.Stop` records them, ``th2 < 0``: unknown);
    ``s2 < 0`` means "unknown" (and, with ``applications == 1`` and ``residual == 0``, an
    invariant start vector).
    """
    K = SP.shape[0]
    Mx = SP @ x0
    nx = math.sqrt(max(x0 @ Mx, 0.0))
    x = x0 / nx
    Mx = Mx / nx
    Q = np.empty((kdim + 1, K), dtype=SP.dtype)
    MQ = np.empty((kdim + 1, K), dtype=SP.dtype)
    n_apply = 0
    res = np.inf
    s2 = -1.0
    while True:
        Q[0] = x
        MQ[0] = Mx
        alphas = np.zeros(kdim)
        betas = np.zeros(kdim)
        for j in range(kdim):
            v = w * (SQ @ (w * MQ[j]))
            n_apply += 1
            a = v @ MQ[j]
            v = v - a * Q[j]
            if j > 0:
                v = v - betas[j - 1] * Q[j - 1]
            for _ in range(2):
                for i in range(j + 1):
                    v = v - (v @ MQ[i]) * Q[i]
            Mv = SP @ v
            b = math.sqrt(max(v @ Mv, 0.0))
            alphas[j] = a
            betas[j] = b
            T = np.zeros((j + 1, j + 1))
            for i in range(j + 1):
                T[i, i] = alphas[i]
                if i > 0:
                    T[i, i - 1] = betas[i - 1]
                    T[i - 1, i] = betas[i - 1]
            theta, S = np.linalg.eigh(T)
            th1 = theta[j]
            if th1 <= 0.0:
                return Q[0].copy(), n_apply, True, 0.0, 0.0, 0.0, f2 == 0.0, th1, -1.0, 0.0
            breakdown = b <= 64.0 * eps * th1
            if j == 0 and breakdown:  # the caller probes for σ₂ and bounds the gap then
                return Q[0].copy(), n_apply, True, 0.0, -1.0, math.inf, False, th1, -1.0, 0.0
            s2 = math.sqrt(max(theta[j - 1], 0.0)) if j > 0 else -1.0
            res = (max(b, 64.0 * eps * th1) if breakdown else b) * abs(S[j, j]) / th1
            th2 = theta[j - 1] if j > 0 else -1.0
            r2 = b * abs(S[j, j - 1]) if j > 0 else 0.0
            bound, certified = _gap_bound(th1, res * th1, th2, r2, f2, f2_err, 0.0, th_rel * th1)
            # an estimate (uncertified) stops only where one Krylov basis cannot span the space
            met = res <= tol or (accuracy >= 0.0 and bound <= accuracy and (certified or estimates))
            done = met or breakdown or n_apply >= max_iter
            if done or j == kdim - 1:
                coef = S[:, j].astype(SP.dtype)
                x = coef @ Q[: j + 1]
                Mx = coef @ MQ[: j + 1]
                nx = math.sqrt(max(x @ Mx, 0.0))
                x = x / nx
                Mx = Mx / nx
                if done:
                    return x, n_apply, met or breakdown, res, s2, bound, certified, th1, th2, r2
                break
            Q[j + 1] = v / b
            MQ[j + 1] = Mv / b


@njit(cache=True, nogil=True)
def coef_probe(SP, SQ, w, x, Mx, q0, theta1, steps, eps):  # pragma: no cover - compiled
    """:func:`kronsum._eigen._probe` and :func:`kronsum._eigen._probe_ritz` in the Gram space
    (``x`` unit in the ``S_P`` metric with Rayleigh quotient ``theta1``, ``q0`` the probe's
    random direction, drawn by the caller): ``steps`` Lanczos steps on the operator deflated by
    ``x``, then the Rayleigh–Ritz problem on ``x`` and their basis, same arithmetic. Returns
    ``(k, theta1, theta2, z)``: the steps taken (``-1``: the deflated start vanished), the top
    two Ritz values and the top Ritz vector (unit in the metric)."""
    K = SP.shape[0]
    Q = np.empty((steps + 2, K), dtype=SP.dtype)
    MQ = np.empty((steps + 2, K), dtype=SP.dtype)
    alphas = np.zeros(steps)
    betas = np.zeros(steps)
    coupling = np.zeros(steps)
    floor = 64.0 * eps * abs(theta1)
    q = q0 - (q0 @ Mx) * x
    Mq = SP @ q
    nq = math.sqrt(max(q @ Mq, 0.0))
    if not nq > 0.0:
        return -1, -1.0, -1.0, x.copy()
    Q[0] = x
    MQ[0] = Mx
    Q[1] = q / nq
    MQ[1] = Mq / nq
    n = 2
    k = 0
    for _ in range(steps):
        v = w * (SQ @ (w * MQ[n - 1]))
        a = v @ MQ[n - 1]
        h = v @ Mx
        for _ in range(2):
            for i in range(n):
                v = v - (v @ MQ[i]) * Q[i]
        Mv = SP @ v
        b = math.sqrt(max(v @ Mv, 0.0))
        alphas[k] = a
        betas[k] = b
        coupling[k] = h
        k += 1
        if b <= floor or b <= 1e-300:
            break
        Q[n] = v / b
        MQ[n] = Mv / b
        n += 1
    if k == 0:
        return 0, -1.0, -1.0, x.copy()
    H = np.zeros((k + 1, k + 1))
    H[0, 0] = theta1
    for i in range(k):
        H[0, i + 1] = coupling[i]
        H[i + 1, 0] = coupling[i]
        H[i + 1, i + 1] = alphas[i]
        if i + 1 < k:
            H[i + 1, i + 2] = betas[i]
            H[i + 2, i + 1] = betas[i]
    theta, S = np.linalg.eigh(H)
    s = S[:, k].astype(SP.dtype)
    z = s @ Q[: k + 1]
    Mz = s @ MQ[: k + 1]
    nz = math.sqrt(max(z @ Mz, 0.0))
    if not nz > 0.0:  # no length in the metric: the caller keeps the answer it has
        return -1, -1.0, -1.0, x.copy()
    return k, theta[k], theta[k - 1], z / nz


def _recompile_after_dependency_change(*kernels) -> None:
    """numba's ``cache=True`` checks only the file that defines a kernel (its documented
    limitation: changes to functions defined in another file are not detected), so a kernel
    compiled with :func:`kronsum._stopping.gap_bound` inlined would keep an old stopping rule
    from its cache after ``_stopping.py`` changed (an editable install, a source checkout).
    Each kernel's cache therefore records a digest of ``_stopping.py`` beside it and is flushed
    (recompiled at the next call) when the digest differs. Without a writable cache nothing is
    done: numba then compiles in memory. (A process that still runs the old rule and compiles
    after another one flushed and stamped the cache can save the old kernel under the new
    stamp: edit the sources with no solve running, or delete ``__pycache__``.)"""
    import hashlib
    import os

    from . import _stopping

    try:
        with open(_stopping.__file__, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
    except (OSError, TypeError):  # no source file (a frozen install): nothing to compare
        return
    for kernel in kernels:
        cache = getattr(kernel, "_cache", None)
        path = getattr(cache, "cache_path", None)
        if path is None or not hasattr(cache, "flush"):
            continue
        stamp = os.path.join(path, f"{kernel.py_func.__module__}.{kernel.py_func.__name__}.deps")
        try:
            with open(stamp) as fh:
                if fh.read() == digest:
                    continue
        except OSError:
            pass
        try:
            cache.flush()
            with open(stamp, "w") as fh:
                fh.write(digest)
        except OSError:  # a read-only cache: numba compiles without it
            pass


_recompile_after_dependency_change(coef_lanczos)
