"""asv suite: the cost of one ``RunningEstimate.update`` per estimator (streaming estimates).

Cases are the fast-solver issue's: the outer form K=256, m=n=256 and the conv form K=32,
T=64, m=64, n=576 (``outer_data`` / ``conv_data``), and a small layer where the per-call cost
counts: the digits MLP's first layer (a batch of 64, m=20 outputs, n=65 inputs with the bias),
as a preconditioner refreshes it. Each call of ``time_update`` feeds the
next batch of a fixed cycle of four to a running estimate (decay 0.95) that setup has already
warmed up on three batches, so the timing is one update in steady state (numba compilation
and the cold first solve are outside it). BLAS is pinned to one thread as in ``estimators.py``.
``benchmarks/running_report.py`` prints the same cases side by side for docs/streaming.md.
"""

import kronsum as ks

from .common import blas_threads, conv_data, outer_data

ESTIMATORS = ["kfac", "tkfac", "kfoc_approx", "kfoc_running"]
CASES = {
    "outer-256x256x256": lambda seed: ks.KronSum.from_outer(*outer_data(256, 256, 256, seed=seed)),
    "conv-32x64x64x576": lambda seed: ks.KronSum.from_conv(*conv_data(32, 64, 64, 576, seed=seed)),
    "outer-64x20x65": lambda seed: ks.KronSum.from_outer(*outer_data(64, 20, 65, seed=seed)),
}


class RunningUpdate:
    params = (list(CASES), ESTIMATORS)
    param_names = ["case", "estimator"]
    timeout = 600
    number = 1

    def setup(self, case, est):
        self.batches = [CASES[case](seed) for seed in range(4)]
        self.run = ks.RunningEstimate(est, decay=0.95)
        self.i = 0
        # one BLAS thread from here to teardown: entering the limit per update costs more than
        # a small layer's update
        self._blas = blas_threads(1)
        self._blas.__enter__()
        for _ in range(3):  # warm-up: compilation, the cold first solve, BLAS buffers
            self._update()

    def teardown(self, case, est):
        self._blas.__exit__(None, None, None)

    def _update(self):
        F = self.batches[self.i % len(self.batches)]
        self.i += 1
        return self.run.update(F)

    def time_update(self, case, est):
        self._update()

    def peakmem_update(self, case, est):
        self._update()

    def track_iterations(self, case, est):
        """Operator applications of one update (0 for the closed forms)."""
        return self._update().info.iterations

    track_iterations.unit = "applications"
