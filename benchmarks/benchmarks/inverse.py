"""asv suite: damped Kronecker inverses (``Kron.solve``, ``Kron.inverse``) against dense solves.

The cases of ``benchmarks/inverse_report.py`` (which runs them side by side for
docs/inverse.md). BLAS is pinned to one thread inside every timed call when threadpoolctl is
installed (imported lazily: only numpy and kronsum are imported at module level).
"""

import contextlib

import numpy as np

import kronsum as ks


def _one_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _problem(m, seed=0):
    rng = np.random.default_rng(seed)
    X, Y = rng.standard_normal((m, 2 * m)), rng.standard_normal((m, 2 * m))
    return ks.Kron(X @ X.T / (2 * m), Y @ Y.T / (2 * m), scale=3.0), rng.standard_normal((m, m))


LAMBDA = 1e-2


class KronSolve:
    """``Kron.solve`` for m = n, each method, with the inverse cached or recomputed per call."""

    params = ([64, 256, 1024], ["exact", "factored", "tkfac"], ["cached", "uncached"])
    param_names = ["m", "method", "inverse"]
    timeout = 600

    def setup(self, m, method, inverse):
        self.K, self.V = _problem(m)
        self.inv = self.K.inverse(LAMBDA, method)
        self._run(m, method, inverse)

    def _run(self, m, method, inverse):
        with _one_thread():
            if inverse == "cached":
                return self.inv.solve(self.V)
            return self.K.solve(self.V, LAMBDA, method)

    def time_solve(self, m, method, inverse):
        self._run(m, method, inverse)

    def peakmem_solve(self, m, method, inverse):
        self._run(m, method, inverse)


class Eigendecompositions:
    """The cost a cached inverse pays once: the two ``eigh`` (and building the inverse)."""

    params = ([64, 256, 1024], ["eigh", "inverse-exact", "inverse-factored"])
    param_names = ["m", "what"]
    timeout = 600

    def setup(self, m, what):
        self.K, _ = _problem(m)

    def _run(self, m, what):
        with _one_thread():
            if what == "eigh":
                return np.linalg.eigh(self.K.left), np.linalg.eigh(self.K.right)
            return self.K.inverse(LAMBDA, what.split("-")[1])

    def time_decompose(self, m, what):
        self._run(m, what)

    def peakmem_decompose(self, m, what):
        self._run(m, what)


class DenseSolve:
    """``numpy.linalg.solve`` of the dense ``(mn, mn)`` damped matrix: only where it fits."""

    params = [32, 48, 64]
    param_names = ["m"]
    timeout = 600

    def setup(self, m):
        self.K, V = _problem(m)
        self.D = self.K.to_dense() + LAMBDA * np.eye(m * m)
        self.v = V.reshape(-1)

    def time_dense_solve(self, m):
        with _one_thread():
            np.linalg.solve(self.D, self.v)

    def peakmem_dense_solve(self, m):
        with _one_thread():
            np.linalg.solve(self.K.to_dense() + LAMBDA * np.eye(m * m), self.v)


class LogdetSample:
    """``logdet`` and 8 posterior samples from a cached inverse."""

    params = ([256, 1024], ["logdet", "sample8"])
    param_names = ["m", "what"]
    timeout = 600

    def setup(self, m, what):
        K, _ = _problem(m)
        self.inv = K.inverse(LAMBDA)

    def time_op(self, m, what):
        with _one_thread():
            self.inv.logdet() if what == "logdet" else self.inv.sample(8, seed=0)
