"""asv suite: K-FOC against K-FAC on every data family (the cases of ``kfoc_floor.py``).

``time_*`` are asv's wall-clock timings of each estimator; ``track_cpu_ratio`` is K-FOC's CPU
time over K-FAC's (``time.process_time``, interleaved rounds, one BLAS thread): the number the
targets in docs/benchmarks.md are stated in, and the one that stays meaningful on a shared
machine.
"""

import kronsum as ks

from .common import CONV_FAMILIES, OUTER_FAMILIES, blas_threads, conv_family, interleaved, outer_family

_OUTER = ["256x1024x1024", "4096x128x128", "1797x256x257"]
_CONV = ["32x64x64x576"]


class _Floor:
    timeout = 900
    number = 1
    repeat = 5

    def _make(self, shape, family):
        raise NotImplementedError

    def setup(self, shape, family):
        try:
            self.F = self._make(shape, family)
        except ImportError as exc:  # the digits family needs scikit-learn
            raise NotImplementedError(str(exc)) from exc
        with blas_threads(1):
            ks.kfac(self.F)
            ks.kfoc(self.F)

    def time_kfac(self, shape, family):
        with blas_threads(1):
            ks.kfac(self.F)

    def time_kfoc(self, shape, family):
        with blas_threads(1):
            ks.kfoc(self.F)

    def track_cpu_ratio(self, shape, family):
        with blas_threads(1):
            t = interleaved({"kfac": lambda: ks.kfac(self.F), "kfoc": lambda: ks.kfoc(self.F)}, 5)
        return t["kfoc"]["cpu_s"] / t["kfac"]["cpu_s"]

    track_cpu_ratio.unit = "kfoc / kfac CPU time"

    def track_cpu_ratio_accuracy_1e4(self, shape, family):
        """The same at an optimiser's accuracy, ``kfoc(F, accuracy=1e-4)``."""
        with blas_threads(1):
            t = interleaved({"kfac": lambda: ks.kfac(self.F),
                             "kfoc": lambda: ks.kfoc(self.F, accuracy=1e-4)}, 5)
        return t["kfoc"]["cpu_s"] / t["kfac"]["cpu_s"]

    track_cpu_ratio_accuracy_1e4.unit = "kfoc / kfac CPU time"


class OuterFloor(_Floor):
    params = (_OUTER, list(OUTER_FAMILIES))
    param_names = ["KxMxN", "family"]

    def _make(self, shape, family):
        K, m, n = (int(v) for v in shape.split("x"))
        return ks.KronSum.from_outer(*outer_family(family, K, m, n))


class ConvFloor(_Floor):
    params = (_CONV, list(CONV_FAMILIES))
    param_names = ["KxTxMxN", "family"]

    def _make(self, shape, family):
        K, T, m, n = (int(v) for v in shape.split("x"))
        return ks.KronSum.from_conv(*conv_family(family, K, T, m, n))
