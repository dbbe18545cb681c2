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


class GPUKfocCudaGraphs:
    """``kfoc`` on the outer case with ``kronsum.config(cuda_graphs=True)`` (torch only; the
    capture happens in setup)."""

    timeout = 600

    def setup(self):
        self.lib = _lib("torch")
        self.F = _sum(self.lib, "outer")
        with ks.config(cuda_graphs=True):
            ks.kfoc(self.F)
        self.lib.sync()

    def time_kfoc_cuda_graphs(self):
        with ks.config(cuda_graphs=True):
            ks.kfoc(self.F)
        self.lib.sync()

    def teardown(self):
        ks.clear_cuda_graphs()


class GPURatio:
    params = (["cupy", "torch", "torch+cuda_graphs"],)
    param_names = ["backend"]
    timeout = 600

    def setup(self, backend):
        self.lib = _lib(backend.split("+")[0])
        self.F = _sum(self.lib, "outer")
        self.graphs = backend.endswith("+cuda_graphs")

    def track_kfoc_over_kfac(self, backend):
        from gpu_report import interleaved

        def kfoc():
            with ks.config(cuda_graphs=self.graphs):
                return ks.kfoc(self.F)

        times, _ = interleaved(self.lib, {"kfac": lambda: ks.kfac(self.F), "kfoc": kfoc}, 20)
        ks.clear_cuda_graphs()
        return times["kfoc"] / times["kfac"]

    track_kfoc_over_kfac.unit = "ratio"


del time
