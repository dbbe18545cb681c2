"""Benchmark: statistics + K-FAC through kronsum's PyTorch adapter against curvlinops.

On scikit-learn's digits (1797 samples, 8×8 images, 10 classes), one batch holding the whole
data set, cross-entropy with mean reduction, Monte-Carlo Fisher with one sample:

``curvlinops-kfac``  ``KFACLinearOperator(...)`` + ``.compute_kronecker_factors()``
                     (``separate_weight_and_bias=False``, ``check_deterministic=False``)
``kronsum-kfac``     ``collect(model, loss, X, fisher="mc")`` + ``kronsum.kfac`` per layer
``kronsum-kfoc``     the same + ``kronsum.kfoc`` per layer (the Frobenius-optimal factors)

and, to explain the numbers (full run only):

``kronsum-collect_kfac``  ``collect_kfac``: the K-FAC factors accumulated in the hooks, without
                      keeping the per-sample statistics

``kronsum-collect``   ``collect`` alone (the forward and backward passes)
``kfoc-floor``        ``collect`` + ``kfac`` + the two K×K Gram products ``GGᵀ``, ``AAᵀ`` of every
                      outer-form layer (NumPy, BLAS ``syrk``): what the exact Gram solver
                      cannot avoid (its K×K eigensolve excluded; conv layers counted as K-FAC)
``*-torch``           ``kronsum-kfac``/``kronsum-kfoc`` with
                      ``kronsum.config(torch_cpu_via_numpy=False)``: every operation in PyTorch

and a training-style pass over the same data in mini-batches of ``BATCH`` (128) samples, a
different quantity (per-batch statistics combined by an EMA, the way optimisers use them):

``curvlinops-kfac-batches``  ``KFACLinearOperator`` over the list of mini-batches
``stream-kfac``              per batch: ``collect`` + ``RunningEstimate("kfac").update`` per layer
``stream-kfoc_approx``       the same with ``"kfoc_approx"`` (each batch's K-FOC, EMA of factors)
``stream-kfoc_running``      the same with ``"kfoc_running"`` (K-FOC of previous estimate + batch,
                             warm-started)

Models: an MLP 64-256-256-10, a wide MLP 64-1024-1024-10 and a small CNN
(Conv 1→16 3×3 pad 1, Conv 16→32 3×3 pad 1 stride 2, Linear 512→10), in float32 and float64.
One thread everywhere (``torch.set_num_threads(1)``, threadpoolctl, the *_NUM_THREADS
variables); each (case, method) runs in a fresh subprocess: one warm-up run, then the median
of ``--repeats`` runs (more for short rows: about a second of runs, at most 51); ``peak_mib`` is the growth of the process's peak resident memory over
its state after setup (model, data, imports), which covers the warm-up and the timed runs.

Usage::

    python benchmarks/adapter_torch_report.py [--quick] [--json FILE] [--methods A,B,...] [--cases C,...]

``--quick``: the MLP and the CNN in float32, 3 repeats. Needs scikit-learn and, for the
reference rows, curvlinops-for-pytorch (its rows are skipped if it is not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
MODELS = ("mlp", "wide-mlp", "cnn")
DTYPES = ("float32", "float64")
METHODS = ("curvlinops-kfac", "kronsum-kfac", "kronsum-kfoc")
EXTRA = ("kronsum-collect_kfac", "kronsum-collect", "kfoc-floor", "kronsum-kfac-torch", "kronsum-kfoc-torch")
STREAM = ("curvlinops-kfac-batches", "stream-kfac", "stream-kfoc_approx", "stream-kfoc_running")
BATCH = 128


def _build(model_name, dtype_name):
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    dtype = getattr(torch, dtype_name)
    X, y = load_digits(return_X_y=True)
    X = torch.as_tensor(X / 16.0, dtype=dtype)
    y = torch.as_tensor(y, dtype=torch.long)
    torch.manual_seed(0)
    if model_name == "mlp":
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                              nn.Linear(256, 10))
    elif model_name == "wide-mlp":
        model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                              nn.Linear(1024, 10))
    else:
        X = X.reshape(-1, 1, 8, 8)
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                              nn.Linear(32 * 4 * 4, 10))
    return model.to(dtype), X, y


def stream_runner(ks, collect, model, loss, batches, estimator):
    """The ``stream-<estimator>`` rows: per mini-batch ``collect`` + ``RunningEstimate.update``
    per layer, with the package ``ks`` and its adapter's ``collect`` (an older version's in
    ``experiments/stream_ab.py``)."""
    import torch

    def run():
        gen = torch.Generator().manual_seed(0)
        running = {}
        for Xb, _ in batches:
            for name, F in collect(model, loss, Xb, fisher="mc", generator=gen).items():
                if name not in running:
                    running[name] = ks.RunningEstimate(estimator, decay=0.95)
                running[name].update(F)
        return {name: r.estimate for name, r in running.items()}
    return run


def _runner(method, model, X, y):
    import torch

    loss = torch.nn.CrossEntropyLoss()
    batches = [(X[i:i + BATCH], y[i:i + BATCH]) for i in range(0, X.shape[0], BATCH)]
    if method.startswith("curvlinops-kfac"):
        from curvlinops import KFACLinearOperator

        params = list(model.parameters())
        data = batches if method == "curvlinops-kfac-batches" else [(X, y)]

        def run():
            op = KFACLinearOperator(model, loss, params, data, fisher_type="mc", mc_samples=1,
                                    check_deterministic=False, num_data=X.shape[0],
                                    num_per_example_loss_terms=1, separate_weight_and_bias=False)
            op.compute_kronecker_factors()
            return op
        return run

    import kronsum as ks
    from kronsum.adapters.torch import collect, collect_kfac

    if method == "kronsum-collect_kfac":
        return lambda: collect_kfac(model, loss, X, fisher="mc",
                                    generator=torch.Generator().manual_seed(0))

    def blocks():
        return collect(model, loss, X, fisher="mc", generator=torch.Generator().manual_seed(0))

    if method == "kronsum-collect":
        return blocks
    if method.startswith("stream-"):
        return stream_runner(ks, collect, model, loss, batches, method.split("-", 1)[1])
    if method == "kfoc-floor":
        def run():
            out = {}
            for name, F in blocks().items():
                out[name] = ks.kfac(F)
                if F.form == "outer":
                    G, A = F.G.numpy(), F.A.numpy()
                    out[name] = (out[name], G @ G.T, A @ A.T)
            return out
        return run

    estimator = ks.kfac if method.startswith("kronsum-kfac") else ks.kfoc
    via_numpy = not method.endswith("-torch")

    def run():
        with ks.config(torch_cpu_via_numpy=via_numpy):
            return {name: estimator(F) for name, F in blocks().items()}
    return run


def _one(case, method, repeats):
    """Time one (case, method) in this process; print one JSON record."""
    import resource
    import time

    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    model_name, dtype_name = case.rsplit("/", 1)
    model, X, y = _build(model_name, dtype_name)
    run = _runner(method, model, X, y)
    with threadpool_limits(limits=1):
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        run()  # warm-up
        # short rows (tens of ms) are noisy: at least `repeats` runs and about a second of them
        repeats = max(repeats, min(51, int(1.0 / max(time.perf_counter() - t0, 1e-3))))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rec = {"case": case, "method": method, "median_s": statistics.median(times),
           "repeats": repeats, "peak_mib": (peak - base) / 1024.0}
    print(json.dumps(rec))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="MLP and CNN, float32, 3 repeats")
    ap.add_argument("--json", metavar="FILE", help="write the records as a JSON list")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 7, quick 3)")
    ap.add_argument("--methods", help="comma-separated subset of the methods to run")
    ap.add_argument("--cases", help="comma-separated subset of the cases, e.g. cnn/float32")
    ap.add_argument("--one", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    if args.one:
        _one(args.one[0], args.one[1], repeats)
        return

    try:
        import curvlinops  # noqa: F401
        methods = METHODS
    except ImportError:
        print("curvlinops-for-pytorch is not installed: its rows are skipped", file=sys.stderr)
        methods = METHODS[1:]
    if not args.quick:
        methods = methods + EXTRA + (STREAM if "curvlinops-kfac" in methods else STREAM[1:])
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = set(wanted) - set(METHODS + EXTRA + STREAM)
        if unknown:
            ap.error(f"unknown methods {sorted(unknown)}")
        methods = tuple(m for m in methods if m in wanted)
        if set(wanted) - set(methods):
            ap.error(f"methods {sorted(set(wanted) - set(methods))} are not run in this mode "
                     "(--quick runs the first three; curvlinops rows need curvlinops)")
    cases = [f"{m}/{d}" for m in (("mlp", "cnn") if args.quick else MODELS)
             for d in (("float32",) if args.quick else DTYPES)]
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        if set(wanted) - set(cases):
            ap.error(f"unknown cases {sorted(set(wanted) - set(cases))}; known: {cases}")
        cases = [c for c in cases if c in wanted]
    env = dict(os.environ, **{v: "1" for v in THREAD_VARS})
    records = []
    for case in cases:
        for method in methods:
            out = subprocess.run(
                [sys.executable, __file__, "--one", case, method, "--repeats", str(repeats)],
                env=env, capture_output=True, text=True, check=True,
            ).stdout
            rec = json.loads(out.strip().splitlines()[-1])
            records.append(rec)
            print(f"{rec['case']:18s} {rec['method']:16s} {rec['median_s'] * 1e3:9.1f} ms "
                  f"{rec['peak_mib']:8.1f} MiB", flush=True)

    by = {(r["case"], r["method"]): r for r in records}
    for ref_name, group in (("curvlinops-kfac", METHODS[1:] + EXTRA),
                            ("curvlinops-kfac-batches", STREAM[1:])):
        shown = [m for m in group if m in methods]
        if not shown:
            continue
        print(f"\n| case | {ref_name} | " + " | ".join(f"{m} (ratio)" for m in shown) + " |")
        print("|---|---|" + "---|" * len(shown))
        for case in cases:
            ref = by.get((case, ref_name))

            def cell(method):
                r = by[(case, method)]
                s = f"{r['median_s'] * 1e3:.1f} ms"
                return s + (f" ({r['median_s'] / ref['median_s']:.2f}×)" if ref else "")
            first = f"{ref['median_s'] * 1e3:.1f} ms" if ref else "—"
            print(f"| {case} | {first} | " + " | ".join(cell(m) for m in shown) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)


if __name__ == "__main__":
    main()
