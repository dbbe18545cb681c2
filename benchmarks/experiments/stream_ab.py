"""Side-by-side CPU timing of the training-style K-FAC stream from two versions of kronsum.

Per mini-batch of 128 digits: ``collect`` + ``RunningEstimate(estimator).update`` per layer
(the ``stream-*`` rows of ``benchmarks/adapter_torch_report.py``), for this checkout and for
an older version imported as ``kronsum_old``, and curvlinops' ``KFACLinearOperator`` over the
same batches, interleaved round by round in one process (one thread), so machine noise hits
all three alike. Prints the median of each and the ratios.

    python benchmarks/experiments/stream_ab.py OLD_DIR [--cases mlp/float32,...] [--rounds N]
        [--estimator kfac]

``OLD_DIR`` holds the older package renamed ``kronsum_old`` (``git archive <commit> kronsum |
tar -x -C OLD_DIR && mv OLD_DIR/kronsum OLD_DIR/kronsum_old``). A diagnostic for the docs,
not a benchmark.
"""

import argparse
import importlib
import os
import statistics
import sys
import time

for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[v] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def stream(pkg, model, loss, batches, estimator):
    import adapter_torch_report as rep

    return rep.stream_runner(importlib.import_module(pkg),
                             importlib.import_module(pkg + ".adapters.torch").collect,
                             model, loss, batches, estimator)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old_dir")
    ap.add_argument("--cases", default="mlp/float32,mlp/float64,wide-mlp/float32,cnn/float32")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--estimator", default="kfac")
    args = ap.parse_args(argv)
    sys.path.insert(0, args.old_dir)
    import torch
    from threadpoolctl import threadpool_limits

    import adapter_torch_report as rep

    torch.set_num_threads(1)
    for case in args.cases.split(","):
        model_name, dtype_name = case.split("/")
        model, X, y = rep._build(model_name, dtype_name)
        loss = torch.nn.CrossEntropyLoss()
        batches = [(X[i:i + rep.BATCH], y[i:i + rep.BATCH]) for i in range(0, X.shape[0], rep.BATCH)]
        runs = {"curvlinops": rep._runner("curvlinops-kfac-batches", model, X, y),
                "old": stream("kronsum_old", model, loss, batches, args.estimator),
                "new": stream("kronsum", model, loss, batches, args.estimator)}
        times = {k: [] for k in runs}
        with threadpool_limits(limits=1):
            for f in runs.values():
                f()
            for _ in range(args.rounds):
                for k, f in runs.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{case:18s} curvlinops {med['curvlinops']:7.1f} ms | old {med['old']:7.1f} ms "
              f"({med['old'] / med['curvlinops']:.2f}×) | new {med['new']:7.1f} ms "
              f"({med['new'] / med['curvlinops']:.2f}×) | new/old {med['new'] / med['old']:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
