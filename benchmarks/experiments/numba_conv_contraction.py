"""Experiment: a numba kernel for the conv contraction Σ_k w_k A_kᵀ (G_k M G_kᵀ) A_k vs the BLAS path."""
import sys, time
import numpy as np
from numba import njit, prange
import os
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.common import conv_data, blas_threads
import kronsum as ks

@njit(parallel=True, nogil=True, cache=False)
def conv_contract_numba(P, Q, M, w, nthreads):
    K, T, p = P.shape
    q = Q.shape[2]
    out = np.zeros((nthreads, q, q))
    per = (K + nthreads - 1) // nthreads
    for t in prange(nthreads):
        acc = np.zeros((q, q))
        for k in range(t * per, min(K, (t + 1) * per)):
            B = (P[k] @ M) @ P[k].T
            C = w[k] * (B @ Q[k])
            acc += Q[k].T @ C
        out[t] = acc
    return out.sum(axis=0)

for (K, T, m, n) in [(32, 64, 64, 576), (128, 16, 16, 144), (512, 4, 8, 32)]:
    G, A = conv_data(K, T, m, n)
    F = ks.KronSum.from_conv(G, A)
    M = np.random.default_rng(0).standard_normal((m, m)); M = M + M.T
    w = F.weights
    ref = F.contract_left(M)
    got = conv_contract_numba(G, A, M, w, 2)
    assert np.allclose(got, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    with blas_threads(1):
        res = {}
        for name, f in [("blas", lambda: F.contract_left(M)), ("numba", lambda: conv_contract_numba(G, A, M, w, 2))]:
            f(); ts = []
            for _ in range(7):
                t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
            res[name] = np.median(ts)
    print(f"K={K} T={T} m={m} n={n}: BLAS path {res['blas']*1e3:.2f} ms, numba {res['numba']*1e3:.2f} ms, ratio {res['numba']/res['blas']:.2f}")
