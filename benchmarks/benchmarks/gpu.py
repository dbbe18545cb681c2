"""asv suite: K-FAC, TKFAC and K-FOC on CuPy and torch CUDA at the GPU sizes of issue #8.

Skipped (``NotImplementedError`` in setup) where the library or a CUDA GPU is missing, so
``asv check`` and CPU-only runs pass. Each timing synchronises the device after the call;
``track_*`` records kfoc's time over kfac's (target ≤ 1.5 on the outer case).
``benchmarks/gpu_report.py`` prints the same cases side by side with the GEMM floor.
"""

import os
import sys
import time

import kronsum as ks

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = {"outer": (1024, 4096, 4096), "conv": (128, 256, 256, 2304)}


def _lib(name):
    try:
        from gpu_report import Lib
        lib = Lib(name)
    except Exception as exc:  # library missing
        raise NotImplementedError(f"{name}: {exc}") from None
    if lib.device_name() == "cpu":
        raise NotImplementedError(f"{name}: no CUDA GPU")
    return lib


def _sum(lib, case):
    from gpu_report import conv_case, outer_case

    if case == "outer":
        return ks.KronSum.from_outer(*outer_case(lib, *CASES[case]))
    return ks.KronSum.from_conv(*conv_case(lib, *CASES[case]))


class GPUEstimators:
    params = (["cupy", "torch"], list(CASES), ["kfac", "tkfac", "kfoc"])
    param_names = ["backend", "case", "estimator"]
    timeout = 600

    def setup(self, backend, case, estimator):
        self.lib = _lib(backend)
        self.F = _sum(self.lib, case)
        self.fn = getattr(ks, estimator)
        self.fn(self.F)
        self.lib.sync()

    def time_estimate(self, backend, case, estimator):
        self.fn(self.F)
        self.lib.sync()


class GPURatio:
    params = (["cupy", "torch"],)
    param_names = ["backend"]
    timeout = 600

    def setup(self, backend):
        self.lib = _lib(backend)
        self.F = _sum(self.lib, "outer")

    def track_kfoc_over_kfac(self, backend):
        from gpu_report import interleaved

        times, _ = interleaved(self.lib, {"kfac": lambda: ks.kfac(self.F),
                                          "kfoc": lambda: ks.kfoc(self.F)}, 20)
        return times["kfoc"] / times["kfac"]

    track_kfoc_over_kfac.unit = "ratio"


del time
