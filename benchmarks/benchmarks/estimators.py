"""asv suite: K-FAC, TKFAC and K-FOC per form and size, NumPy path and numba path.

Cases are those of ``benchmarks/report.py`` (which runs them side by side for the docs);
setup warms every kernel up so that numba's compilation never lands in a timing. BLAS is
pinned to one thread (see docs/benchmarks.md for why), numba on/off is a parameter.
"""

import numpy as np

import kronsum as ks

from .common import (algorithm1_materialised, blas_threads, conv_data, materialise_outer,
                     outer_data)

ESTIMATORS = {
    "kfac": ks.kfac,
    "tkfac": ks.tkfac,
    "kfoc": ks.kfoc,
    "kfoc-lanczos": lambda F: ks.kfoc(F, method="lanczos"),
}


class _Base:
    timeout = 600

    def _run(self, est, numba):
        with blas_threads(1), ks.config(use_numba=numba):
            return ESTIMATORS[est](self.F)


class OuterForm(_Base):
    params = (["256x256x256", "4096x128x128", "256x1024x1024"], list(ESTIMATORS), [True, False])
    param_names = ["KxMxN", "estimator", "numba"]

    def setup(self, shape, est, numba):
        K, m, n = (int(v) for v in shape.split("x"))
        self.F = ks.KronSum.from_outer(*outer_data(K, m, n))
        self._run(est, numba)

    def time_estimate(self, shape, est, numba):
        self._run(est, numba)

    def peakmem_estimate(self, shape, est, numba):
        self._run(est, numba)


class ConvForm(_Base):
    params = (["32x64x64x576", "8x16x16x144"], list(ESTIMATORS), [True, False])
    param_names = ["KxTxMxN", "estimator", "numba"]

    def setup(self, shape, est, numba):
        K, T, m, n = (int(v) for v in shape.split("x"))
        self.F = ks.KronSum.from_conv(*conv_data(K, T, m, n))
        self._run(est, numba)

    def time_estimate(self, shape, est, numba):
        self._run(est, numba)

    def peakmem_estimate(self, shape, est, numba):
        self._run(est, numba)


class SmallLayers:
    """Twenty small layers (m, n <= 64, K = 128) one after another: Python overhead dominates."""

    params = (["kfac", "tkfac", "kfoc"], [True, False])
    param_names = ["estimator", "numba"]

    def setup(self, est, numba):
        rng = np.random.default_rng(0)
        self.layers = [ks.KronSum.from_outer(*outer_data(128, int(rng.integers(8, 65)),
                                                         int(rng.integers(8, 65)), seed=i))
                       for i in range(20)]
        self.time_all(est, numba)

    def time_all(self, est, numba):
        with blas_threads(1), ks.config(use_numba=numba):
            for F in self.layers:
                ESTIMATORS[est](F)


class Baselines:
    """For comparison only: the paper's Algorithm 1 on materialised terms, the dense SVD."""

    timeout = 600

    def setup_cache(self):
        return None

    def time_algorithm1_materialised_256(self):
        with blas_threads(1):
            algorithm1_materialised(*self.terms, iterations=20)

    def time_dense_svd_16(self):
        with blas_threads(1):
            ks.nearest_kronecker(self.small)

    def setup(self):
        G, A = outer_data(256, 256, 256)
        self.terms = materialise_outer(G, A)
        self.small = ks.KronSum.from_outer(*outer_data(64, 16, 16))


class Iterations:
    """Operator applications on a small spectral gap (sigma2/sigma1 about 0.6): Lanczos vs power."""

    params = (["lanczos", "power"],)
    param_names = ["method"]

    def setup(self, method):
        self.F = ks.KronSum.from_outer(*outer_data(512, 64, 48, kind="gap"))

    def track_applications(self, method):
        return ks.kfoc(self.F, method=method).info.iterations

    track_applications.unit = "applications"
