"""Benchmark: which parameters of stock networks get a block, and what collect + K-FAC/K-FOC cost.

Four networks, random initialisation, eval mode, float32, cross-entropy (mean), Monte-Carlo
Fisher with one sample:

``resnet18``  ResNet-18 (BasicBlock ×[2, 2, 2, 2], 64–512 channels, BatchNorm, 10 classes; the
              standard architecture written out here), 64 images 3×32×32
``lm``        a token-level language model: Embedding(128, 64), two
              ``TransformerEncoderLayer(64, 4, 128, batch_first=True)``, Linear(64, 128);
              16 sequences of 32 tokens, logits (N, T, C) (``class_dim=-1``)
``vit``       a ViT-style classifier: 4×4 patch Conv2d(3, 64) on 32×32 images, class token and
              position embedding (bare parameters), two encoder layers, LayerNorm, Linear head;
              64 images
``mlp-bn``    Linear(64, 256)–BatchNorm1d–ReLU ×2, Linear(256, 10); 256 samples

Methods (each in a fresh subprocess, one thread, one warm-up run, then ``--repeats`` runs;
median CPU time from ``time.process_time`` and wall time. ``peak_mib`` comes from another
fresh subprocess: after one warm-up run, the peak resident memory of one more run minus the
resident memory before it (the peak reset through ``/proc/self/clear_refs``, Linux), with
glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the system and the
resident peak follows the live tensors; it includes the returned factors):

``kronsum-kfac``     ``collect`` + ``kronsum.kfac`` per block
``kronsum-collect_kfac``  ``collect_kfac``: the same K-FAC factors accumulated in the hooks,
                     without keeping the per-sample statistics
``kronsum-kfoc``     ``collect`` + ``kronsum.kfoc`` per block (per-block times are printed)
``curvlinops-kfac``  curvlinops' ``KFACLinearOperator`` on the parameters of the Linear and
                     Conv2d modules it supports (K-FAC-expand for sequences) +
                     ``compute_kronecker_factors()``; skipped when curvlinops is missing

Also printed: the share of trainable parameter entries with a block for kronsum and for the
curvlinops run, and every parameter kronsum leaves out with the reason.

Usage::

    python benchmarks/adapter_coverage.py [--repeats N] [--json FILE] [--models A,B]
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
MODELS = ("resnet18", "lm", "vit", "mlp-bn")
METHODS = ("curvlinops-kfac", "kronsum-kfac", "kronsum-collect_kfac", "kronsum-kfoc")


def _resnet18(nn, num_classes=10):
    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

        def forward(self, x):
            h = nn.functional.relu(self.bn1(self.conv1(x)))
            h = self.bn2(self.conv2(h))
            return nn.functional.relu(h + (x if self.down is None else self.down(x)))

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def _build(name):
    import torch
    from torch import nn

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    class_dim = 1
    if name == "resnet18":
        model = _resnet18(nn)
        X = torch.randn(64, 3, 32, 32, generator=g)
    elif name == "lm":
        class LM(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(128, 64)
                self.enc = nn.TransformerEncoder(
                    nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True), 2,
                    enable_nested_tensor=False)
                self.head = nn.Linear(64, 128)

            def forward(self, x):
                return self.head(self.enc(self.emb(x)))
        model = LM()
        X = torch.randint(0, 128, (16, 32), generator=g)
        class_dim = -1
    elif name == "vit":
        class ViT(nn.Module):
            def __init__(self):
                super().__init__()
                self.patch = nn.Conv2d(3, 64, 4, stride=4)
                self.cls = nn.Parameter(torch.zeros(1, 1, 64))
                self.pos = nn.Parameter(0.02 * torch.randn(1, 65, 64))
                self.enc = nn.TransformerEncoder(
                    nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True), 2,
                    enable_nested_tensor=False)
                self.norm = nn.LayerNorm(64)
                self.head = nn.Linear(64, 10)

            def forward(self, x):
                h = self.patch(x).flatten(2).transpose(1, 2)
                h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
                return self.head(self.norm(self.enc(h))[:, 0])
        model = ViT()
        X = torch.randn(64, 3, 32, 32, generator=g)
    else:
        model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(),
                              nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
                              nn.Linear(256, 10))
        X = torch.randn(256, 64, generator=g)
    return model.eval(), X, class_dim


def _curvlinops_params(model):
    """Parameters of the Linear/Conv2d modules that run as modules (an attention layer's
    ``out_proj`` is used as a bare weight, so curvlinops' hooks never see it)."""
    from torch import nn
    inside = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [p for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and id(m) not in inside for p in m.parameters(recurse=False) if p.requires_grad]


def _runner(method, model, X, class_dim, per_block):
    import time
    import warnings

    import torch

    loss = torch.nn.CrossEntropyLoss()
    if method == "curvlinops-kfac":
        from curvlinops import KFACLinearOperator

        params = _curvlinops_params(model)
        C = model(X).shape[-1] if class_dim == -1 else None

        class Channels(torch.nn.Module):  # curvlinops wants (N, C, ...) logits
            def __init__(self):
                super().__init__()
                self.inner = model

            def forward(self, x):
                return self.inner(x).transpose(1, 2) if C else self.inner(x)

        net = Channels()
        y = torch.zeros(X.shape[:2] if C else X.shape[:1], dtype=torch.long)

        def run():
            op = KFACLinearOperator(net, loss, params, [(X, y)], fisher_type="mc", mc_samples=1,
                                    check_deterministic=False, separate_weight_and_bias=False)
            op.compute_kronecker_factors()
            return op
        return run

    import kronsum as ks
    from kronsum.adapters.torch import UncoveredParametersWarning, collect, collect_kfac

    if method == "kronsum-collect_kfac":
        def run():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UncoveredParametersWarning)
                return collect_kfac(model, loss, X, fisher="mc", class_dim=class_dim,
                                    generator=torch.Generator().manual_seed(0))
        return run

    estimator = ks.kfac if method == "kronsum-kfac" else ks.kfoc

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UncoveredParametersWarning)
            blocks = collect(model, loss, X, fisher="mc", class_dim=class_dim,
                             generator=torch.Generator().manual_seed(0))
        out = {}
        for name, F in blocks.items():
            t0 = time.process_time()
            out[name] = estimator(F)
            per_block.setdefault(name, []).append((time.process_time() - t0, F.form, F.m, F.n,
                                                   F.num_terms))
        return out
    return run


def _rss_kib(field):
    """``VmRSS`` / ``VmHWM`` of this process in KiB (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _one(name, method, repeats, memory):
    """Time ``repeats`` runs after a warm-up, or (``memory``) the peak resident memory of one."""
    import gc
    import time

    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    model, X, class_dim = _build(name)
    per_block: dict = {}
    run = _runner(method, model, X, class_dim, per_block)
    with threadpool_limits(limits=1):
        run()  # warm-up: lazy imports, numba compilation, allocator pools
        if memory:
            gc.collect()
            with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current VmRSS
                fh.write("5")
            base = _rss_kib("VmRSS")
            run()
            print(json.dumps({"peak_mib": (_rss_kib("VmHWM") - base) / 1024.0}))
            return
        cpu, wall = [], []
        for _ in range(repeats):
            c0, w0 = time.process_time(), time.perf_counter()
            run()
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    blocks = {k: (statistics.median(t for t, *_ in v[1:]),) + v[0][1:] for k, v in per_block.items()}
    rec = {"model": name, "method": method, "cpu_s": statistics.median(cpu),
           "wall_s": statistics.median(wall), "repeats": repeats, "blocks": blocks}
    print(json.dumps(rec))


def _coverage(name):
    from kronsum.adapters.torch import coverage

    model, _, _ = _build(name)
    cov = coverage(model)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cl = sum(p.numel() for p in _curvlinops_params(model))
    return cov, cl / total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        _one(args.one[0], args.one[1], args.repeats, args.memory)
        return
    models = MODELS if not args.models else tuple(m.strip() for m in args.models.split(","))
    if set(models) - set(MODELS):
        ap.error(f"unknown models {sorted(set(models) - set(MODELS))}")
    try:
        import curvlinops  # noqa: F401
        methods = METHODS
    except ImportError:
        print("curvlinops-for-pytorch is not installed: its rows are skipped", file=sys.stderr)
        methods = METHODS[1:]
    env = dict(os.environ, **{v: "1" for v in THREAD_VARS})
    records, shares = [], {}
    for name in models:
        cov, cl_share = _coverage(name)
        shares[name] = {"kronsum": cov.fraction, "curvlinops": cl_share,
                        "uncovered": cov.uncovered}
        print(f"{name}: kronsum covers {100 * cov.fraction:.1f} % of the trainable entries, "
              f"the curvlinops run {100 * cl_share:.1f} %; left out: "
              + (", ".join(f"{p} ({why})" for p, why in cov.uncovered.items()) or "nothing"),
              flush=True)
        for method in methods:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", name, method, "--repeats", str(args.repeats)],
                env=env, capture_output=True, text=True)
            if proc.returncode:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"  {method:16s} failed: {err}", flush=True)
                records.append({"model": name, "method": method, "error": err})
                continue
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            mem = subprocess.run(
                [sys.executable, __file__, "--one", name, method, "--memory"],
                env=dict(env, MALLOC_MMAP_THRESHOLD_="65536"), capture_output=True, text=True)
            if mem.returncode:
                print(f"  {method:16s} memory run failed: {mem.stderr.strip()[-200:]}", flush=True)
            else:
                rec.update(json.loads(mem.stdout.strip().splitlines()[-1]))
            records.append(rec)
            print(f"  {method:16s} CPU {rec['cpu_s'] * 1e3:9.1f} ms  wall "
                  f"{rec['wall_s'] * 1e3:9.1f} ms  peak {rec.get('peak_mib', float('nan')):7.1f} MiB",
                  flush=True)
            if method == "kronsum-kfoc":
                top = sorted(rec["blocks"].items(), key=lambda kv: -kv[1][0])[:5]
                for key, (t, form, m, n, K) in top:
                    print(f"      {key:40s} {form:5s} {m:4d}×{n:<5d} K={K:<6d} {t * 1e3:8.1f} ms")

    by = {(r["model"], r["method"]): r for r in records if "error" not in r}
    print("\n| network | share with a block (kronsum / curvlinops run) | curvlinops K-FAC | "
          "collect + kfac | collect_kfac | collect + kfoc | "
          "peak MiB (curvlinops / kfac / collect_kfac / kfoc) |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        ref = by.get((name, "curvlinops-kfac"))

        def cell(method):
            r = by.get((name, method))
            if r is None:
                return "—"
            s = f"{r['cpu_s'] * 1e3:.0f} ms"
            return s + (f" ({r['cpu_s'] / ref['cpu_s']:.2f}×)" if ref and r is not ref else "")
        peaks = " / ".join(f"{by[(name, m)]['peak_mib']:.0f}" if "peak_mib" in by.get((name, m), {})
                           else "—"
                           for m in METHODS)
        print(f"| {name} | {100 * shares[name]['kronsum']:.1f} % / "
              f"{100 * shares[name]['curvlinops']:.1f} % | {cell('curvlinops-kfac')} | "
              f"{cell('kronsum-kfac')} | {cell('kronsum-collect_kfac')} | {cell('kronsum-kfoc')} | "
              f"{peaks} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shares": shares, "records": records}, fh, indent=1)


if __name__ == "__main__":
    main()
