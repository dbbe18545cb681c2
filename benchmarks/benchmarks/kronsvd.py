"""asv suite: Kronecker-rank-r approximations (``kronecker_svd``) for r = 1, 2, 4, 8.

The cases of the fast-solver benchmarks (``estimators.py``): the outer form K = 256,
m = n = 256 (``method="auto"``: the Gram solver) and the conv form K = 32, T = 64, m = 64,
n = 576 (block Lanczos through the contractions), and the damped solves of a rank-r result.
``benchmarks/kronsvd_report.py`` runs the same cases side by side, with the ratio to rank 1,
for docs/kronsvd.md. BLAS is pinned to one thread inside every timed call.
"""

import numpy as np

import kronsum as ks

from .common import blas_threads, conv_data, outer_data

RANKS = [1, 2, 4, 8]


class _Base:
    timeout = 600

    def _run(self, rank):
        with blas_threads(1):
            return ks.kronecker_svd(self.F, rank=rank)

    def time_kronecker_svd(self, rank):
        self._run(rank)

    def peakmem_kronecker_svd(self, rank):
        self._run(rank)


class KronSVDOuter(_Base):
    params = RANKS
    param_names = ["rank"]

    def setup(self, rank):
        self.F = ks.KronSum.from_outer(*outer_data(256, 256, 256))
        self._run(rank)  # warm-up


class KronSVDConv(_Base):
    params = RANKS
    param_names = ["rank"]

    def setup(self, rank):
        self.F = ks.KronSum.from_conv(*conv_data(32, 64, 64, 576))


class KronSVDSolve:
    """``KronSVD.solve`` on the outer case: rank 2 exact (factored damping) and CG (r = 2, 4, 8)."""

    params = (["exact2-factored", "cg2", "cg4", "cg8"],)
    param_names = ["what"]
    timeout = 600

    def setup(self, what):
        F = ks.KronSum.from_outer(*outer_data(256, 256, 256))
        rank = 2 if what.startswith("exact") else int(what[2:])
        self.B = ks.kronecker_svd(F, rank=rank)
        s = np.asarray(self.B.singular_values)
        self.lam = float(np.sum(s[1:]) + 1e-2 * s[0])  # λ ≥ Σ_{i≥2} σ_i: A is positive definite
        self.V = np.random.default_rng(0).standard_normal((256, 256))
        self.kw = (dict(damping_method="factored") if what.startswith("exact")
                   else dict(method="cg"))
        self._run(what)

    def _run(self, what):
        with blas_threads(1):
            return self.B.solve(self.V, self.lam, **self.kw)

    def time_solve(self, what):
        self._run(what)
