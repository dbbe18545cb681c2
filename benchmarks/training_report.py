"""Report: training the digits MLP and CNN with SGD, Adam, and SGD on gradients preconditioned
by ``kronsum.adapters.torch.Preconditioner`` (K-FAC, K-FOC_running, EKFAC), on one thread, with
kfac-pytorch's ``KFACPreconditioner`` beside them where it is installed.

Data: scikit-learn's digits (1797 images 8×8, float64), mini-batches of 64 drawn in the same
order by every run, 300 steps (about 11 epochs). Networks: the demo's MLP (64-20-20-20-10,
tanh) and CNN. Every optimiser is plain SGD with momentum 0.9 on the (preconditioned) gradient,
except Adam. Tuning: each method's learning rate (and the preconditioners' damping) is chosen
on a grid by the training loss on all 1797 images after the first 100 steps of the same run;
the grids are in ``GRIDS``. The preconditioners refresh their estimates every 10 steps from a
Monte-Carlo Fisher of the batch (``fisher="mc"``, one sampled label per input) with
``decay=0.95``, recorded from the training step's own forward pass (``capture="hooks"``);
the two empirical-Fisher rows (kronsum's K-FAC and kfac-pytorch's, which records the training
step's own backward pass and has no sampled-label pass) compare the two libraries on the same
statistics.

Per method: the training loss on all images every 20 steps against the CPU time
(``time.process_time``) and wall time of the training steps alone (the loss evaluations are
not counted), and steps per second relative to SGD; the tuned runs are repeated
(``--repeats``, default 5) interleaved across the methods, and the run of median CPU time is
reported, with the range of the paired ratios, and its mean CPU milliseconds per step of the
steps that refresh (10, 20, ...) and of the others (step 0, with its one-time costs, in
neither). Run
``python benchmarks/training_report.py [--quick] [--json FILE] [--plot FILE]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import blas_threads  # noqa: E402
from kronsum.adapters.torch import Preconditioner  # noqa: E402
from kronsum.demo.run import load_data, make_cnn, make_mlp  # noqa: E402

GRIDS = {
    "SGD": {"lr": [0.03, 0.1, 0.3, 1.0]},
    "Adam": {"lr": [1e-3, 3e-3, 1e-2]},
    "K-FAC": {"lr": [0.01, 0.03, 0.1, 0.3], "damping": [1e-2, 1e-1, 1.0]},
    "K-FOC": {"lr": [0.01, 0.03, 0.1, 0.3], "damping": [1e-2, 1e-1, 1.0]},
    "EKFAC": {"lr": [0.01, 0.03, 0.1, 0.3], "damping": [1e-2, 1e-1, 1.0]},
    "K-FAC (minimal loop)": {"lr": [0.01, 0.03, 0.1, 0.3], "damping": [1e-2, 1e-1, 1.0]},
    "K-FAC, empirical Fisher": {"lr": [0.01, 0.03, 0.1, 0.3], "damping": [1e-2, 1e-1, 1.0]},
    "kfac-pytorch (empirical Fisher)": {"lr": [0.01, 0.03, 0.1, 0.3], "damping": [1e-2, 1e-1, 1.0]},
}
ESTIMATOR = {"K-FAC": "kfac", "K-FOC": "kfoc_running", "EKFAC": "ekfac", "K-FAC, empirical Fisher": "kfac"}
PEER = "kfac-pytorch (empirical Fisher)"
REFRESH_EVERY = 10  # the preconditioners' refresh interval (steps 0, 10, 20, ... refresh)


def _peer_available() -> bool:
    """Whether kfac-pytorch, the peer row's library, is installed: a module ``kfac`` that
    imports and has ``preconditioner.KFACPreconditioner`` (not some other package of that name)."""
    try:
        import kfac
    except Exception:  # noqa: BLE001 - absent, or present but broken: no peer row
        return False
    return hasattr(getattr(kfac, "preconditioner", None), "KFACPreconditioner")


def _peer(model, lr, damping):
    """kfac-pytorch's ``KFACPreconditioner`` set up as the kronsum rows are: factors and their
    eigendecompositions refreshed every 10 steps, EMA decay 0.95, float64 factors and
    inverses, and no KL clipping (a ``kl_clip`` schedule that returns None: it then computes
    no scale, as the kronsum rows, which clip nothing). Its statistics are the empirical
    Fisher's, recorded by its hooks from the training step's own forward and backward passes
    (no sampled-label pass)."""
    import kfac

    return kfac.preconditioner.KFACPreconditioner(
        model, factor_update_steps=REFRESH_EVERY, inv_update_steps=REFRESH_EVERY, damping=damping,
        factor_decay=0.95, kl_clip=lambda step: None, lr=lr, factor_dtype=torch.float64,
        inv_dtype=torch.float64)


class MinimalKFAC:
    """A reference for the timings, not part of kronsum: the estimates and step of
    ``Preconditioner(estimator="kfac", fisher="mc", damping_method="exact", capture="hooks")``
    written directly in PyTorch for ``nn.Linear`` and ``nn.Conv2d`` with bias, with no input
    checks, no finiteness checks, no diagnostics and no library: the least eager per-layer work
    such a preconditioner does. Per refresh: forward hooks for one pass, one backward pass of
    a sampled label (the same draws as kronsum's), ``L = GᵀG/(N·T)``, ``R = AᵀA/N`` (rows of
    output gradients and unfolded inputs with a ones column, ``T`` positions per sample), their
    EMA and two ``eigh``; per step ``U_L ((U_Lᵀ V U_R) / (a bᵀ + λ)) U_Rᵀ`` per layer."""

    def __init__(self, model, damping, decay=0.95, update_every=10, generator=None):
        self.layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.damping, self.decay, self.update_every = damping, decay, update_every
        self.generator, self.steps, self.state, self.acts = generator, 0, {}, {}

    def forward(self, model, x):
        """The model's output; on a refresh step the layers' inputs and outputs are kept."""
        if self.steps % self.update_every:
            return model(x)
        hooks = [m.register_forward_hook(lambda m, i, o: self.acts.__setitem__(m, (i[0], o)))
                 for m in self.layers]
        try:
            return model(x)
        finally:
            for h in hooks:
                h.remove()

    def sample_grads(self, out):
        """On a refresh step, before ``loss.backward()``: the layers' output gradients of the
        summed loss of labels drawn from the model (the graph kept for the user's backward)."""
        if self.steps % self.update_every:
            return
        with torch.no_grad():
            draw = torch.multinomial(torch.softmax(out, -1), 1, generator=self.generator)[:, 0]
        outs = [self.acts[m][1] for m in self.layers]
        loss = nn.functional.cross_entropy(out, draw, reduction="sum")
        self.grads = torch.autograd.grad(loss, outs, retain_graph=True)

    def step(self):
        """After ``loss.backward()``: refresh if due, then rewrite the gradients."""
        with torch.no_grad():
            if self.steps % self.update_every == 0:
                for m, g in zip(self.layers, self.grads):
                    a = self.acts[m][0]
                    N = a.shape[0]
                    if isinstance(m, nn.Conv2d):
                        a = nn.functional.unfold(a, m.kernel_size, dilation=m.dilation,
                                                 padding=m.padding, stride=m.stride)
                        T = a.shape[-1]
                        a = a.transpose(1, 2).reshape(N * T, -1)
                        g = g.reshape(N, g.shape[1], -1).transpose(1, 2).reshape(N * T, -1)
                    else:
                        T = 1
                    a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
                    L, R = g.T @ g / (N * T), a.T @ a / N
                    if m in self.state:
                        L = self.decay * self.state[m][0] + (1 - self.decay) * L
                        R = self.decay * self.state[m][1] + (1 - self.decay) * R
                    la, UL = torch.linalg.eigh(L)
                    lb, UR = torch.linalg.eigh(R)
                    self.state[m] = (L, R, UL, UR, torch.outer(la, lb) + self.damping)
                self.acts, self.grads = {}, None
            for m in self.layers:
                L, R, UL, UR, E = self.state[m]
                V = torch.cat([m.weight.grad.reshape(m.weight.shape[0], -1), m.bias.grad[:, None]], 1)
                P = UL @ ((UL.T @ V @ UR) / E) @ UR.T
                m.weight.grad.copy_(P[:, :-1].reshape(m.weight.shape))
                m.bias.grad.copy_(P[:, -1])
        self.steps += 1


def _full_loss(model, X, y):
    """The loss on all of ``X``, the model in eval mode (the same outputs: no dropout or batch
    norm here) so that no preconditioner's hooks record this pass (kfac-pytorch's record any
    forward pass of a module in training mode, gradients or not)."""
    model.eval()
    try:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(X), y))
    finally:
        model.train()


def train(make, X, y, batches, method, lr, damping=None, eval_every=20, stop=None):
    """One run; returns ``{"steps", "cpu_s", "wall_s", "loss"}`` (loss on all of ``X``)."""
    torch.manual_seed(0)
    model = make()
    loss_fn = nn.CrossEntropyLoss()
    if method == "Adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    pre = ref = peer = None
    if method == PEER:
        peer = _peer(model, lr, damping)
    elif method == "K-FAC (minimal loop)":
        ref = MinimalKFAC(model, damping, update_every=REFRESH_EVERY, generator=torch.Generator().manual_seed(1))
    elif method in ESTIMATOR:
        kw = {"basis_every": 5} if method == "EKFAC" else {}
        fisher = "empirical" if "empirical" in method else "mc"
        pre = Preconditioner(model, loss_fn, estimator=ESTIMATOR[method], fisher=fisher,
                             update_every=REFRESH_EVERY, decay=0.95, damping=damping,
                             generator=torch.Generator().manual_seed(1), capture="hooks", **kw)
    out = {"steps": [], "cpu_s": [], "wall_s": [], "loss": []}
    cpu = wall = 0.0
    phase = [0.0, 0.0]  # CPU seconds of the later steps that refresh (every 10th) and of the others
    for step, idx in enumerate(batches[:stop]):
        if step % eval_every == 0:
            out["steps"].append(step), out["cpu_s"].append(cpu), out["wall_s"].append(wall)
            out["loss"].append(_full_loss(model, X, y))
        xb, yb = X[idx], y[idx]
        c0, w0 = time.process_time(), time.perf_counter()
        opt.zero_grad()
        if ref is not None:  # the reference: its own hooks and sampled-label backward pass
            out_b = ref.forward(model, xb)
            ref.sample_grads(out_b)
            loss_fn(out_b, yb).backward()
            ref.step()
        else:
            loss_fn(model(xb), yb).backward()
        if pre is not None:
            pre.step()  # capture="hooks": a refresh step's statistics come from the pass above
        if peer is not None:
            peer.step()  # its hooks recorded the statistics of the passes above
        opt.step()
        dc = time.process_time() - c0
        cpu += dc
        wall += time.perf_counter() - w0
        if step:  # the first step also pays one-time costs (buffers, hooks, layouts)
            phase[step % REFRESH_EVERY != 0] += dc
    n = len(batches[:stop])
    out["steps"].append(n), out["cpu_s"].append(cpu), out["wall_s"].append(wall)
    out["loss"].append(_full_loss(model, X, y))
    refreshes = -(-n // REFRESH_EVERY) - 1  # after the first step
    out["cpu_ms_per_refresh_step"] = 1e3 * phase[0] / max(refreshes, 1)
    out["cpu_ms_per_other_step"] = 1e3 * phase[1] / max(n - 1 - refreshes, 1)
    return out


def run(quick: bool = False, repeats: int = 5) -> dict:
    X, y = load_data("cpu")
    steps, tune_steps = (60, 30) if quick else (300, 100)
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(len(X)) for _ in range(steps * 64 // len(X) + 1)])
    batches = [torch.as_tensor(order[i * 64:(i + 1) * 64]) for i in range(steps)]
    result = {"steps": steps, "tune_steps": tune_steps, "batch_size": 64, "grids": GRIDS,
              "networks": {}}
    with blas_threads(1):
        torch.set_num_threads(1)
        for net, make in (("mlp", make_mlp), ("cnn", make_cnn)):
            runs = {}
            for method, grid in GRIDS.items():
                if method == PEER and not _peer_available():
                    result.setdefault("skipped", {})[method] = "kfac-pytorch is not installed"
                    continue
                best = None
                for values in itertools.product(*grid.values()):
                    kw = dict(zip(grid, values))
                    try:
                        loss = train(make, X, y, batches, method, stop=tune_steps,
                                     eval_every=tune_steps, **kw)["loss"][-1]
                    except (ValueError, OverflowError, RuntimeError):  # diverged (non-finite statistics, LinAlgError)
                        loss = float("inf")
                    if not np.isfinite(loss):
                        loss = float("inf")
                    if best is None or loss < best[0]:
                        best = (loss, kw)
                runs[method] = {"settings": best[1]}
            # the tuned runs, repeated and interleaved across methods (the same trajectory each
            # time: only the times vary); the run of median CPU time is kept
            times: dict = {method: [] for method in runs}
            for _ in range(repeats):
                for method, r in runs.items():
                    out = train(make, X, y, batches, method, **r["settings"])
                    times[method].append(out)
            for method, r in runs.items():
                reps = sorted(times[method], key=lambda o: o["cpu_s"][-1])
                r.update(reps[len(reps) // 2])
                r["cpu_s_repeats"] = [o["cpu_s"][-1] for o in times[method]]
            sgd = runs["SGD"]["cpu_s_repeats"]
            for r in runs.values():
                r["steps_per_s_vs_sgd"] = float(np.median(sgd)) / r["cpu_s"][-1]
                ratios = [a / b for a, b in zip(sgd, r["cpu_s_repeats"])]  # paired by repeat
                r["steps_per_s_vs_sgd_range"] = [min(ratios), max(ratios)]
            result["networks"][net] = runs
    result["repeats"] = repeats
    return result


def format_table(result: dict) -> str:
    lines = [f"{result['steps']} steps of 64 images; settings tuned on the first {result['tune_steps']}",
             "",
             f"times: medians of {result.get('repeats', 1)} interleaved repeats; the ratio's range "
             "over the repeats (paired) in brackets",
             "",
             "| network | method | settings | final train loss | CPU s | wall s | steps/s vs SGD (CPU) |",
             "|---|---|---|---|---|---|---|"]
    for net, runs in result["networks"].items():
        for method, r in runs.items():
            s = ", ".join(f"{k}={v:g}" for k, v in r["settings"].items())
            lines.append(f"| {net} | {method} | {s} | {r['loss'][-1]:.4f} | {r['cpu_s'][-1]:.2f} "
                         f"| {r['wall_s'][-1]:.2f} | {r['steps_per_s_vs_sgd']:.2f} "
                         f"[{r['steps_per_s_vs_sgd_range'][0]:.2f}–{r['steps_per_s_vs_sgd_range'][1]:.2f}] |")
    for method, why in result.get("skipped", {}).items():
        lines.append(f"\n{method}: not run ({why})")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, (net, runs) in zip(axes, result["networks"].items()):
        for method, r in runs.items():
            ax.plot(r["cpu_s"], r["loss"], marker=".", label=method)
        ax.set(title=net.upper(), xlabel="CPU seconds of training (1 thread)",
               ylabel="training loss (all 1797 images)", yscale="log")
    # one legend for both panels, below them: inside, it hides the curves
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved repeats of the tuned runs (default 5; 2 with --quick)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    result = run(args.quick, args.repeats or (2 if args.quick else 5))
    print(format_table(result))
    if args.json:
        result["machine"] = {"platform": platform.platform(), "torch": torch.__version__,
                             "date": time.strftime("%Y-%m-%d")}
        if _peer_available():
            import kfac

            result["machine"]["kfac-pytorch"] = getattr(kfac, "__version__", "unknown")
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
