"""asv suite: statistics + K-FAC/K-FOC through the PyTorch adapter against curvlinops (issue #10).

The cases and runners of ``benchmarks/adapter_torch_report.py`` (scikit-learn's digits; an MLP
64-256-256-10, a wide MLP 64-1024-1024-10 and a small CNN; float32 and float64; one thread):
one batch of all 1797 samples (``kronsum-kfac``, ``kronsum-kfoc``, ``kronsum-collect_kfac``,
``curvlinops-kfac``) and the
training-style pass in mini-batches of 128 with an EMA (``stream-kfac``,
``curvlinops-kfac-batches``). ``track_ratio`` records kronsum's time over curvlinops' for the
same data, measured side by side in one process (targets: K-FAC ≤ 1.0, K-FOC ≤ 1.5 on the
one-batch rows; the stream has none). Skipped (``NotImplementedError`` in setup) without torch
and scikit-learn, and the curvlinops rows and ratios without curvlinops-for-pytorch; the
default asv environment (``kronsum[numba]``) has neither, so run it with
``asv run -E existing`` in an environment that has them.
"""

import os
import statistics
import sys
import time

from .common import blas_threads

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = ["mlp/float32", "mlp/float64", "wide-mlp/float32", "wide-mlp/float64", "cnn/float32",
         "cnn/float64"]
REFERENCE = {"kronsum-kfac": "curvlinops-kfac", "kronsum-kfoc": "curvlinops-kfac",
             "kronsum-collect_kfac": "curvlinops-kfac",
             "stream-kfac": "curvlinops-kfac-batches"}


def _runner(case, method):
    try:
        import torch

        import adapter_torch_report as rep
        if method.startswith("curvlinops"):
            import curvlinops  # noqa: F401
        model, X, y = rep._build(*case.split("/"))
    except ImportError as exc:
        raise NotImplementedError(f"{method}: {exc}") from None
    torch.set_num_threads(1)
    return rep._runner(method, model, X, y)


class AdapterTorch:
    params = (CASES, ["kronsum-kfac", "kronsum-kfoc", "kronsum-collect_kfac", "stream-kfac",
                      "curvlinops-kfac", "curvlinops-kfac-batches"])
    param_names = ["case", "method"]
    timeout = 900
    number = 1

    def setup(self, case, method):
        self.run = _runner(case, method)
        with blas_threads(1):
            self.run()  # warm-up: numba compilation, first-call costs

    def time_run(self, case, method):
        with blas_threads(1):
            self.run()


class AdapterTorchRatio:
    """kronsum's median time over curvlinops' on the same data, interleaved in one process."""

    params = (CASES, list(REFERENCE))
    param_names = ["case", "method"]
    timeout = 900

    def setup(self, case, method):
        self.ours = _runner(case, method)
        self.ref = _runner(case, REFERENCE[method])

    def track_ratio(self, case, method):
        times = {"ours": [], "ref": []}
        with blas_threads(1):
            self.ours()  # warm-up
            self.ref()
            for _ in range(7):
                for key, fn in (("ours", self.ours), ("ref", self.ref)):
                    t0 = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - t0)
        return statistics.median(times["ours"]) / statistics.median(times["ref"])

    track_ratio.unit = "ratio"
