r"""The demo itself: training, Fisher blocks, estimators, errors, timings, table, figures, JSON.

Everything runs in float64 (the models are built and trained in float64), on the CPU by
default; with ``--device cuda`` on a GPU. Every random source is seeded, so a CPU run is
deterministic (the timings aside).

Part 1 (always): for each network (``mlp``, ``cnn``) train with plain mini-batch SGD and, at
each checkpoint, take the **exact** Fisher block of every layer on a fixed subset of the data
(``collect(..., fisher="exact")`` with ``CrossEntropyLoss(reduction="mean")``, the reduction
carried by the adapter's weights), approximate it with K-FAC, TKFAC, K-FOC, the
eigenvalue-corrected EKFAC in K-FAC's and in K-FOC's eigenbasis (and the Kronecker-rank-2/3 SVD
when :func:`kronsum.kronecker_svd` exists) and record
``float(kronsum.frobenius_error(F, est, relative=True))`` and the estimator's time.

Part 2 (``--train``): natural-gradient training of the MLP, the gradient of every layer
preconditioned by ``(F̂ + λI)⁻¹`` (``precondition(..., method="exact")``) with F̂ from K-FAC,
TKFAC or K-FOC of a Monte-Carlo Fisher of the current mini-batch, refreshed every few steps;
same learning rate, damping, initial weights and data order for the three; plus plain SGD.

torch is imported when this module is (guarded, so that the docs and doctests can import it
without torch); scikit-learn, matplotlib and tqdm only when the demo runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

import kronsum as ks

try:  # guarded like kronsum.adapters.torch: importable (docs, doctests) without torch
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - depends on the environment
    torch = None  # type: ignore[assignment]
    nn = None  # type: ignore[assignment]

__all__ = ["Config", "build_parser", "make_cnn", "make_mlp", "run"]

METHODS = ("kfac", "tkfac", "kfoc")
LABELS = {"kfac": "K-FAC", "tkfac": "TKFAC", "kfoc": "K-FOC", "ekfac": "EKFAC",
          "ekfac_kfoc": "EKFAC, K-FOC basis", "rank2": "Kron. rank 2", "rank3": "Kron. rank 3",
          "sgd": "SGD"}
COLORS = {"kfac": "tab:blue", "tkfac": "tab:orange", "kfoc": "tab:green", "ekfac": "tab:cyan",
          "ekfac_kfoc": "tab:olive", "rank2": "tab:purple", "rank3": "tab:brown", "sgd": "tab:gray"}
#: the eigenvalue-corrected columns and the basis each is never worse than
CORRECTED = {"ekfac": "kfac", "ekfac_kfoc": "kfoc"}


# -- configuration -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and hyper-parameters of one demo run (``Config.default()``, ``Config.quick()``)."""

    fisher_samples: int  # fixed subset of the digits the exact Fisher is taken on
    checkpoints: tuple[int, ...]  # SGD steps at which the Fisher is evaluated (part 1)
    batch_size: int = 32
    lr: float = 0.1  # part 1: mini-batch SGD with momentum
    momentum: float = 0.9
    ranks: tuple[int, ...] = (2, 3)  # Kronecker ranks (when kronsum.kronecker_svd exists)
    heatmap: tuple[str, str] = ("mlp", "fc2")  # network and layer of the heat-map figure
    # part 2 (--train)
    train_steps: int = 200
    train_batch: int = 128
    train_lr: float = 0.03  # natural-gradient steps, the same for K-FAC, TKFAC and K-FOC
    train_damping: float = 0.03
    sgd_lr: float = 1.0  # the plain-SGD baseline of part 2 (best of 0.3, 1, 2 on this task)
    update_every: int = 5  # recompute the blocks and estimates every this many steps
    eval_every: int = 5  # full-data loss every this many steps (not timed)
    train_seeds: int = 3  # part 2 runs per method (initial weights, batch order, MC labels)
    seed: int = 0

    @classmethod
    def default(cls, seed: int = 0) -> "Config":
        return cls(fisher_samples=256, checkpoints=(0, 25, 50, 100, 200), seed=seed)

    @classmethod
    def quick(cls, seed: int = 0) -> "Config":
        return cls(fisher_samples=64, checkpoints=(0, 20, 60), train_steps=40, update_every=4,
                   eval_every=4, train_seeds=2, seed=seed)


def build_parser(prog: str = "python -m kronsum demo") -> argparse.ArgumentParser:
    """The demo's command-line interface (no third-party import)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Reproduce the K-FAC / TKFAC / K-FOC approximation results on real networks: "
            "an MLP 64-20-20-20-10 (tanh, as in TKFAC's Figures 1-2) and a small CNN trained on "
            "scikit-learn's bundled digits; exact Fisher blocks at several SGD checkpoints, "
            "relative Frobenius errors and times per estimator; a table, PNG figures and a JSON "
            "file. --train adds natural-gradient training with each estimator."
        ),
    )
    p.add_argument("--out", default="kronsum-demo", metavar="DIR",
                   help="folder for the figures and demo.json (default: ./kronsum-demo)")
    p.add_argument("--quick", action="store_true",
                   help="smaller subset, fewer checkpoints and steps (about 20 s: 17-18 s on a 2-core "
                        "AMD EPYC VM, 2026-12; used by CI)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the networks and Fisher blocks live (default: cpu)")
    p.add_argument("--train", action="store_true",
                   help="also train the MLP by natural gradient with K-FAC, TKFAC, K-FOC and by SGD")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and sampling")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="CPU threads for torch and BLAS (default 1: the blocks are small, and "
                        "one thread is fastest and steadiest on a shared machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (there are none when stderr is not a terminal)")
    return p


# -- data and models -----------------------------------------------------------------------


def load_data(device: Any) -> tuple[Any, Any]:
    """scikit-learn's bundled digits: 1797 images 8×8, pixels scaled to [0, 1], float64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=torch.float64, device=device)
    y = torch.tensor(d.target, dtype=torch.long, device=device)
    return X, y


def make_mlp() -> Any:
    """TKFAC's Figure 1/2 network: 64-20-20-20-10, tanh (float64)."""
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(64, 20)), ("act1", nn.Tanh()),
        ("fc2", nn.Linear(20, 20)), ("act2", nn.Tanh()),
        ("fc3", nn.Linear(20, 20)), ("act3", nn.Tanh()),
        ("fc4", nn.Linear(20, 10)),
    ])).double()


class _Image(nn.Module if nn is not None else object):  # type: ignore[misc]
    def forward(self, x):
        return x.reshape(x.shape[0], 1, 8, 8)


def make_cnn() -> Any:
    """A small CNN: conv 1→8 3×3, conv 8→8 3×3 stride 2, ReLU, linear 128→10 (float64)."""
    return nn.Sequential(OrderedDict([
        ("image", _Image()),
        ("conv1", nn.Conv2d(1, 8, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 8, 3, stride=2, padding=1)), ("relu2", nn.ReLU()),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(8 * 4 * 4, 10)),
    ])).double()


NETWORKS: dict[str, tuple[str, Callable[[], Any]]] = {
    "mlp": ("MLP 64-20-20-20-10, tanh", make_mlp),
    "cnn": ("CNN conv(1→8) conv(8→8, stride 2) linear(128→10), ReLU", make_cnn),
}


# -- estimators ----------------------------------------------------------------------------


def _estimators(ranks: tuple[int, ...]) -> dict[str, Callable[[Any], Any]]:
    est: dict[str, Callable[[Any], Any]] = {"kfac": ks.kfac, "tkfac": ks.tkfac, "kfoc": ks.kfoc,
                                            "ekfac": ks.ekfac,
                                            "ekfac_kfoc": lambda F: ks.ekfac(F, basis="kfoc")}
    if hasattr(ks, "kronecker_svd"):
        for r in ranks:
            est[f"rank{r}"] = (lambda F, r=r: ks.kronecker_svd(F, rank=r))
    return est


def _timed(fn: Callable[[], Any], sync: Callable[[], None], min_total: float = 0.05,
           max_runs: int = 5) -> tuple[Any, float]:
    """``(result, seconds)``: the median of up to ``max_runs`` runs, repeated while cheap."""
    times: list[float] = []
    result = None
    while True:
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= max_runs or sum(times) >= min_total:
            break
    return result, statistics.median(times)


def _info(est: Any) -> dict[str, Any]:
    info = getattr(est, "info", None)
    if info is None:
        return {}
    return {"method": info.method, "iterations": info.iterations, "converged": info.converged,
            "notes": list(info.notes)}


def evaluate_layer(F: Any, estimators: dict[str, Callable[[Any], Any]],
                   sync: Callable[[], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Relative errors, times and diagnostics of each estimator on one block; and the estimates."""
    rec: dict[str, Any] = {"times": {}, "info": {}, "notes": [], "error_seconds": {}}
    ests = {}
    for name, fn in estimators.items():
        try:
            est, seconds = _timed(lambda: fn(F), sync)
        except Exception as exc:  # an optional column (rank r) must not sink the demo
            if name in METHODS:
                raise
            rec[name] = None
            rec["notes"].append(f"{name}: failed: {type(exc).__name__}: {exc}")
            continue
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            err = float(ks.frobenius_error(F, est, relative=True))
        rec["error_seconds"][name] = time.perf_counter() - t0
        rec["notes"] += [f"{name}: {w.message}" for w in caught]
        rec[name] = err
        rec["times"][name] = seconds
        rec["info"][name] = _info(est)
        ests[name] = est
    return rec, ests


# -- part 1: exact Fisher blocks along SGD training ----------------------------------------


def _full_loss(model: Any, X: Any, y: Any) -> tuple[float, float]:
    with torch.no_grad():
        out = model(X)
        loss = float(nn.functional.cross_entropy(out, y))
        acc = float((out.argmax(1) == y).double().mean())
    return loss, acc


def fisher_study(net: str, X: Any, y: Any, cfg: Config, sync: Callable[[], None],
                 progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any] | None, list[dict[str, Any]]]:
    """Train ``net`` with SGD; at each checkpoint evaluate every layer's exact Fisher block.
    Returns the records, the heat-map layer's dense blocks and every layer's leading output
    units at the last checkpoint (:func:`_leading_units`)."""
    from kronsum.adapters.torch import collect
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    model = NETWORKS[net][1]().to(X.device)
    loss_fn = nn.CrossEntropyLoss()  # reduction="mean": the adapter's weights are 1/N
    rng = np.random.default_rng(cfg.seed)
    subset = torch.as_tensor(rng.permutation(X.shape[0])[: cfg.fisher_samples], device=X.device)
    Xf, yf = X[subset], y[subset]
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    estimators = _estimators(cfg.ranks)
    records: list[dict[str, Any]] = []
    heat = None
    layers_heat: list[dict[str, Any]] = []  # every layer's leading output units, last step
    last = max(cfg.checkpoints)
    order_rng = np.random.default_rng(cfg.seed + 1)
    perm, pos = order_rng.permutation(X.shape[0]), 0

    # no remaining-time estimate: the Fisher checkpoints, most of the time, come in bursts
    # that no rate over the SGD steps predicts
    bar = tqdm(total=last, desc=f"{net}: SGD, exact Fisher at {len(cfg.checkpoints)} checkpoints",
               unit="step", disable=not progress, leave=True, file=sys.stderr,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed} elapsed{postfix}]")
    for step in range(last + 1):
        if step in cfg.checkpoints:
            bar.set_postfix_str(f"Fisher at step {step}")
            model.eval()
            t0 = time.perf_counter()
            blocks = collect(model, loss_fn, Xf, yf, fisher="exact")
            sync()
            t_collect = time.perf_counter() - t0
            loss, acc = _full_loss(model, X, y)
            for layer, F in blocks.items():
                rec, ests = evaluate_layer(F, estimators, sync)
                records.append({
                    "network": net, "step": step, "layer": layer, "shape": [F.m, F.n],
                    "form": F.form, "num_terms": F.num_terms,
                    **{k: rec[k] for k in estimators},
                    "times": rec["times"], "collect_seconds": t_collect,
                    "error_seconds": rec["error_seconds"],
                    "train_loss": loss, "train_accuracy": acc,
                    "info": rec["info"], "notes": rec["notes"],
                })
                if step == last:
                    layers_heat.append(_leading_units(net, layer, step, F, ests, rec))
                if step == last and (net, layer) == tuple(cfg.heatmap):
                    heat = {"network": net, "layer": layer, "step": step,
                            "shape": [F.m, F.n],
                            "exact": F.to_dense().cpu().numpy(),
                            **{k: e.to_dense().cpu().numpy() for k, e in ests.items()},
                            "errors": {k: rec[k] for k in ests}}
            model.train()
            bar.set_postfix_str(f"loss {loss:.3f}")
        if step == last:
            break
        if pos + cfg.batch_size > len(perm):
            perm, pos = order_rng.permutation(X.shape[0]), 0
        idx = torch.as_tensor(perm[pos: pos + cfg.batch_size], device=X.device)
        pos += cfg.batch_size
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
        bar.update(1)
    bar.close()
    return records, heat, layers_heat


def _leading_units(net: str, layer: str, step: int, F: Any, ests: dict[str, Any],
                   rec: dict[str, Any], units: int = 3) -> dict[str, Any]:
    """The exact block's entries of the first ``units`` output units (the leading
    ``units·n × units·n`` sub-block in row-major vec: ``G`` restricted to its first ``units``
    columns, without the whole ``mn × mn`` matrix) and each estimate's, as NumPy arrays."""
    u = min(units, F.m)
    d = u * F.n
    G = F.G[..., :u]
    sub = (ks.KronSum.from_outer(G, F.A, F.weights) if F.form == "outer"
           else ks.KronSum.from_conv(G, F.A, F.weights))
    out = {"network": net, "layer": layer, "step": step, "shape": [F.m, F.n], "units": u,
           "exact": sub.to_dense().cpu().numpy(), "errors": {}}
    for k, e in ests.items():
        out[k] = e.to_dense()[:d, :d].cpu().numpy()
        out["errors"][k] = rec[k]
    return out


# -- part 2: natural-gradient training ------------------------------------------------------


def ngd_study(X: Any, y: Any, cfg: Config, sync: Callable[[], None],
              progress: bool) -> dict[str, Any]:
    """Train the MLP by SGD and by NGD with K-FAC, TKFAC, K-FOC (same lr, damping, data order),
    ``cfg.train_seeds`` times (initial weights, batch order and Monte-Carlo labels from seed
    ``cfg.seed + 1000·s``); per method the medians over the seeds and their range."""
    runs: dict[str, Any] = {}
    for method in ("sgd",) + METHODS:
        seeds = [_ngd_run(method, X, y, cfg, cfg.seed + 1000 * s, sync, progress)
                 for s in range(cfg.train_seeds)]
        loss = np.array([r["train_loss"] for r in seeds])
        med = lambda key: float(np.median([r[key] for r in seeds]))  # noqa: E731
        runs[method] = {"lr": seeds[0]["lr"], "steps": seeds[0]["steps"],
                        "wall_seconds": np.median([r["wall_seconds"] for r in seeds], axis=0).tolist(),
                        "train_loss": np.median(loss, axis=0).tolist(),
                        "train_loss_min": loss.min(axis=0).tolist(), "train_loss_max": loss.max(axis=0).tolist(),
                        "final_loss": med("final_loss"), "final_losses": [r["final_loss"] for r in seeds],
                        "final_accuracy": med("final_accuracy"), "total_seconds": med("total_seconds"),
                        "estimator_seconds": med("estimator_seconds"), "seeds": seeds}
    return {"network": "mlp", "fisher": "mc (1 sample per input, mini-batch)",
            "damping": cfg.train_damping, "lr": cfg.train_lr, "sgd_lr": cfg.sgd_lr,
            "batch_size": cfg.train_batch, "update_every": cfg.update_every,
            "precondition_method": "exact", "train_seeds": cfg.train_seeds, "runs": runs}


def _ngd_run(method: str, X: Any, y: Any, cfg: Config, seed: int, sync: Callable[[], None],
             progress: bool) -> dict[str, Any]:
    """One training run of :func:`ngd_study` (one method, one seed)."""
    from kronsum.adapters.torch import collect, precondition
    from tqdm import tqdm

    order_rng = np.random.default_rng(seed + 2)
    per_epoch = X.shape[0] // cfg.train_batch
    order = np.concatenate([order_rng.permutation(X.shape[0])[: per_epoch * cfg.train_batch]
                            for _ in range(cfg.train_steps // per_epoch + 1)])
    batches = [order[i * cfg.train_batch: (i + 1) * cfg.train_batch] for i in range(cfg.train_steps)]
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(seed)
    model = make_mlp().to(X.device)
    gen = torch.Generator(device=X.device).manual_seed(seed + 3)
    lr = cfg.sgd_lr if method == "sgd" else cfg.train_lr
    opt = torch.optim.SGD(model.parameters(), lr=lr)  # plain SGD step on the (preconditioned) gradient
    estimator = getattr(ks, method, None)
    estimates = None
    wall, steps, walls, losses, batch_losses = 0.0, [], [], [], []
    estimate_seconds = 0.0
    bar = tqdm(batches, desc=f"train mlp: {LABELS[method]} (seed {seed})", unit="step",
               disable=not progress, leave=True, file=sys.stderr)
    for step, b in enumerate(bar):
        if step % cfg.eval_every == 0:
            steps.append(step)
            walls.append(wall)
            losses.append(_full_loss(model, X, y)[0])
        idx = torch.as_tensor(b, device=X.device)
        xb, yb = X[idx], y[idx]
        sync()
        t0 = time.perf_counter()
        if method != "sgd" and step % cfg.update_every == 0:
            blocks = collect(model, loss_fn, xb, yb, fisher="mc", generator=gen)
            t1 = time.perf_counter()
            estimates = {name: estimator(F) for name, F in blocks.items()}
            sync()
            estimate_seconds += time.perf_counter() - t1
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        if estimates is not None:
            precondition(model, estimates, cfg.train_damping, method="exact")
        opt.step()
        sync()
        wall += time.perf_counter() - t0
        batch_losses.append(loss.item())
    bar.close()
    steps.append(cfg.train_steps)
    walls.append(wall)
    final_loss, final_acc = _full_loss(model, X, y)
    losses.append(final_loss)
    return {"seed": seed, "lr": lr, "steps": steps, "wall_seconds": walls, "train_loss": losses,
            "batch_loss": batch_losses, "final_loss": final_loss, "final_accuracy": final_acc,
            "total_seconds": wall, "estimator_seconds": estimate_seconds}


# -- output --------------------------------------------------------------------------------


def _cols(records: list[dict[str, Any]]) -> list[str]:
    keys = (list(METHODS) + [k for k in CORRECTED if k in records[0]]
            + sorted(k for k in records[0] if k.startswith("rank")))
    return keys


SHORT = {"kfac": "K-FAC", "tkfac": "TKFAC", "kfoc": "K-FOC", "ekfac": "EKFAC", "ekfac_kfoc": "EK-FOC",
         "rank2": "rank 2", "rank3": "rank 3"}


def format_table(records: list[dict[str, Any]], step: int | None = None) -> str:
    """The terminal table: per layer at the last checkpoint, errors and times per method."""
    cols = _cols(records)
    w = 7
    errs = " ".join(f"{SHORT[c]:>{w}s}" for c in cols)
    left = f"{'network':7s} {'layer':5s} {'block (form)':15s}"
    lines = [f"{'':{len(left)}s} {'relative error ‖F − F̂‖/‖F‖':^{len(errs)}s} | "
             f"{'estimator time (ms)':^{len(errs)}s}".rstrip(),
             f"{left} {errs} | {errs}"]
    lines.append("-" * len(lines[-1]))
    for net in NETWORKS:
        recs = [r for r in records if r["network"] == net]
        if not recs:
            continue
        s = max(r["step"] for r in recs) if step is None else step
        for r in (r for r in recs if r["step"] == s):
            shape = f"{r['shape'][0]}×{r['shape'][1]} ({r['form']})"
            lines.append(
                f"{net:7s} {r['layer']:5s} {shape:15s} "
                + " ".join(f"{r[c]:{w}.4f}" if r[c] is not None else f"{'—':>{w}s}" for c in cols)
                + " | " + " ".join(f"{1e3 * r['times'][c]:{w}.1f}" if c in r["times"]
                                   else f"{'—':>{w}s}" for c in cols))
    return "\n".join(lines)


def _plot_errors(records: list[dict[str, Any]], path: str) -> None:
    """Each estimator's error as a fraction of K-FAC's at the same step, one panel per layer
    (a linear axis where the estimators differ; K-FAC's own error in each panel's title), the
    legend in the grid's free cell or under the panels."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    cols = _cols(records)
    nets = [n for n in NETWORKS if any(r["network"] == n for r in records)]
    panels = [(net, layer) for net in nets
              for layer in OrderedDict.fromkeys(r["layer"] for r in records if r["network"] == net)]
    ncol = 4
    nrow = -(-(len(panels) + 1) // ncol)  # one cell for the legend
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 2.9 * nrow), squeeze=False,
                             sharey=True, layout="constrained")
    lines = {}
    for k, (net, layer) in enumerate(panels):
        ax = axes[k // ncol][k % ncol]
        recs = [r for r in records if r["network"] == net and r["layer"] == layer]
        steps = [r["step"] for r in recs]
        base = np.array([r["kfac"] for r in recs], dtype=float)
        for c in cols:
            vals = np.array([np.nan if r[c] is None else r[c] for r in recs], dtype=float) / base
            lines[c], = ax.plot(steps, vals, marker="o", ms=3.5, lw=1.6, color=COLORS[c], label=LABELS[c],
                                ls="-" if c in METHODS else "--")
        m, n = recs[0]["shape"]
        ax.set_title(f"{net} {layer} ({m}×{n}, {recs[0]['form']})\nK-FAC's error "
                     f"{base.min():.2g}–{base.max():.2g}", fontsize=9)
        ax.set_ylim(0, 1.08)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.grid(True, alpha=0.35)
        ax.tick_params(labelsize=8)
        ax.set_xticks(steps)
        if k % ncol == 0:
            ax.set_ylabel("error / K-FAC's error", fontsize=9)
        if k // ncol == nrow - 1 or k + ncol >= len(panels):
            ax.set_xlabel("SGD step", fontsize=9)
    for k in range(len(panels), nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    free = axes[(nrow * ncol - 1) // ncol][(nrow * ncol - 1) % ncol]
    free.legend(handles=[lines[c] for c in cols], loc="center", fontsize=9, frameon=False,
                title="‖F − F̂‖ / ‖F‖ relative to K-FAC's", title_fontsize=9)
    fig.suptitle("Each estimate's Frobenius error as a fraction of K-FAC's, per layer and SGD step "
                 "(digits, exact Fisher; lower is closer to the exact block)", fontsize=10.5)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _plot_heatmaps(heat: dict[str, Any], path: str, units: int = 5) -> None:
    """Exact block, approximations and |differences| on the entries of the first output units,
    with lines between the units' sub-blocks and labelled colour scales."""
    import matplotlib.pyplot as plt

    names = ["exact"] + [k for k in ("kfac", "tkfac", "kfoc", "rank3") if k in heat]
    m, n = heat["shape"]
    units = min(units, m)
    d = units * n  # the leading d×d sub-block: output units 0..units-1, every input
    F = heat["exact"][:d, :d]
    blocks = {k: heat[k][:d, :d] for k in names}
    vmax = float(np.quantile(np.abs(F), 0.995)) or 1.0  # a few large entries would wash it out
    diffs = {k: np.abs(F - blocks[k]) for k in names[1:]}
    dmax = vmax / 2
    fig, axes = plt.subplots(2, len(names), figsize=(2.9 * len(names) + 1.2, 6.4), squeeze=False,
                             layout="constrained")
    ticks = [u * n + (n - 1) / 2 for u in range(units)]

    def frame(ax, color, xlabel):  # unit boundaries and unit labels on both axes
        for u in range(1, units):
            ax.axhline(u * n - 0.5, color=color, lw=0.6)
            ax.axvline(u * n - 0.5, color=color, lw=0.6)
        ax.set_xticks(ticks, [str(u) for u in range(units)], fontsize=8)
        ax.set_yticks(ticks, [str(u) for u in range(units)], fontsize=8)
        if xlabel:
            ax.set_xlabel(f"output unit ({n} inputs each)", fontsize=8)

    im = im2 = None
    for j, k in enumerate(names):
        ax = axes[0][j]
        im = ax.imshow(blocks[k], cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        title = "exact F" if k == "exact" else f"{LABELS[k]}\nerror {heat['errors'][k]:.3f}"
        ax.set_title(title, fontsize=10)
        frame(ax, "k", k == "exact")
        if j == 0:
            ax.set_ylabel("output unit", fontsize=8)
        ax = axes[1][j]
        if k == "exact":
            ax.axis("off")
            continue
        im2 = ax.imshow(diffs[k], cmap="magma", vmin=0, vmax=dmax, interpolation="nearest")
        ax.set_title(f"|F − {LABELS[k]}|", fontsize=10)
        frame(ax, "0.75", True)
        if j == 1:
            ax.set_ylabel("output unit", fontsize=8)
    cb = fig.colorbar(im, ax=list(axes[0]), shrink=0.85, extend="both")
    cb.set_label("entry of the block", fontsize=9)
    cb2 = fig.colorbar(im2, ax=list(axes[1]), shrink=0.85, extend="max")
    cb2.set_label("absolute difference", fontsize=9)
    fig.suptitle(f"{heat['network']} layer {heat['layer']} ({m}×{n}) after {heat['step']} SGD steps: "
                 f"the exact Fisher block and its approximations\n(errors: relative Frobenius error "
                 f"of the whole {m * n}×{m * n} block; shown: the {d}×{d} entries of output units "
                 f"0–{units - 1}, {n} inputs each; colour scales clipped at the 99.5th percentile of |F|)",
                 fontsize=10)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _plot_layer_heatmaps(layers: list[dict[str, Any]], path: str) -> None:
    """Every layer (rows): the exact block and each estimate's |F − F̂| on the entries of its
    first output units, each row on the scale of its own |F| (99.5th percentile)."""
    import matplotlib.pyplot as plt

    names = [k for k in ("kfac", "tkfac", "kfoc", "rank3") if any(k in h for h in layers)]
    rows, cols = len(layers), 1 + len(names)
    fig, axes = plt.subplots(rows, cols, figsize=(2.35 * cols + 1.3, 2.05 * rows + 0.9),
                             squeeze=False, layout="constrained")
    im = im2 = None
    for i, h in enumerate(layers):
        m, n = h["shape"]
        u = h["units"]
        F = h["exact"]
        scale = float(np.quantile(np.abs(F), 0.995)) or 1.0
        for j, k in enumerate(["exact"] + names):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if k != "exact" and k not in h:
                ax.axis("off")
                continue
            if k == "exact":
                im = ax.imshow(F / scale, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
                ax.set_ylabel(f"{h['network']} {h['layer']}\n{m}×{n}, units 0–{u - 1}", fontsize=9)
            else:
                im2 = ax.imshow(np.abs(F - h[k]) / scale, cmap="magma", vmin=0, vmax=0.5,
                                interpolation="nearest")
                ax.set_title(f"error {h['errors'][k]:.3f}", fontsize=8, pad=2)
            for q in range(1, u):  # lines between the output units' sub-blocks
                ax.axhline(q * n - 0.5, color="0.6", lw=0.5)
                ax.axvline(q * n - 0.5, color="0.6", lw=0.5)
            if i == 0:
                head = "exact F" if k == "exact" else f"|F − {LABELS[k]}|"
                ax.set_title(head + ("" if k == "exact" else f"\nerror {h['errors'][k]:.3f}"),
                             fontsize=9)
    cb = fig.colorbar(im, ax=[a[0] for a in axes], shrink=0.6, location="left", extend="both")
    cb.set_label("F / (99.5th percentile of |F|, per row)", fontsize=8)
    cb2 = fig.colorbar(im2, ax=[a[j] for a in axes for j in range(1, cols)], shrink=0.6, extend="max")
    cb2.set_label("|F − F̂| / (99.5th percentile of |F|, per row)", fontsize=8)
    step = layers[0]["step"] if layers else 0
    fig.suptitle(f"Every layer after {step} SGD steps: the exact Fisher block and the absolute "
                 f"differences of each approximation, on the entries of the first output units\n"
                 f"(lines between units; errors: relative Frobenius error of the whole block)",
                 fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_train(ngd: dict[str, Any], path: str) -> None:
    """Training loss against step and wall time: the median over the seeds, their range shaded."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    styles = {"sgd": "-", "kfac": "-", "tkfac": "--", "kfoc": ":"}
    for method, r in ngd["runs"].items():
        kw = dict(color=COLORS[method], ls=styles.get(method, "-"), lw=2.0,
                  label=f"{LABELS[method]} (lr {r['lr']:g}): final {r['final_loss']:.3f}")
        for ax, x in ((a1, r["steps"]), (a2, r["wall_seconds"])):
            ax.plot(x, r["train_loss"], **kw)
            ax.fill_between(x, r["train_loss_min"], r["train_loss_max"], color=COLORS[method], alpha=0.15, lw=0)
    for ax, xl in ((a1, "step"), (a2, "wall time (s, training only; median over the seeds)")):
        ax.set_yscale("log")
        ax.set_xlabel(xl, fontsize=10)
        ax.set_ylabel("training loss (all 1797 digits)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=9)
    a1.legend(fontsize=9, title=f"median of {ngd['train_seeds']} seeds (range shaded)", title_fontsize=9)
    fig.suptitle(f"MLP on digits: natural gradient with each estimator (damping {ngd['damping']:g}, "
                 f"blocks every {ngd['update_every']} steps) against SGD", fontsize=11)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _check(records: list[dict[str, Any]], slack: float = 1e-9) -> list[str]:
    """Records where K-FOC's error exceeds TKFAC's or K-FAC's (it is the optimum), or an
    eigenvalue-corrected estimate's exceeds its basis's (it never is worse): none expected."""
    bad = []
    pairs = [("kfoc", "tkfac"), ("kfoc", "kfac")] + list(CORRECTED.items())
    for r in records:
        for mine, other in pairs:
            if r.get(mine) is not None and r.get(other) is not None and r[mine] > r[other] * (1 + slack):
                bad.append(f"{r['network']} {r['layer']} step {r['step']}: {LABELS[mine]} {r[mine]:.6g} > "
                           f"{LABELS[other]} {r[other]:.6g}")
    return bad


def run(args: argparse.Namespace) -> int:
    """Run the demo for parsed ``args``; returns the exit status."""
    import matplotlib

    matplotlib.use("Agg")

    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    if args.threads < 1:
        print("kronsum demo: --threads must be at least 1", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with threadpool_limits(limits=args.threads):
            return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    import matplotlib
    import sklearn
    import tqdm

    t_start = time.perf_counter()
    cfg = Config.quick(args.seed) if args.quick else Config.default(args.seed)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("kronsum demo: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # bars only on a terminal: in a log file their carriage returns are noise
    progress = not args.no_progress and sys.stderr.isatty()
    os.makedirs(args.out, exist_ok=True)
    X, y = load_data(device)

    print(f"kronsum {ks.__version__} demo{' --quick' if args.quick else ''}: digits "
          f"({X.shape[0]} samples), exact Fisher on a fixed subset of {cfg.fisher_samples}, "
          f"float64, device {device}, checkpoints {list(cfg.checkpoints)}")
    if not hasattr(ks, "kronecker_svd"):
        print("(kronsum.kronecker_svd is not available: no Kronecker-rank-2/3 columns)")

    records: list[dict[str, Any]] = []
    heat = None
    layers_heat: list[dict[str, Any]] = []
    for net in NETWORKS:
        recs, h, hl = fisher_study(net, X, y, cfg, sync, progress)
        records += recs
        heat = heat or h
        layers_heat += hl
    ngd = ngd_study(X, y, cfg, sync, progress) if args.train else None

    files = {"errors": os.path.join(args.out, "demo-errors.png"),
             "heatmaps": os.path.join(args.out, "demo-heatmaps.png"),
             "heatmaps_layers": os.path.join(args.out, "demo-heatmaps-layers.png"),
             "json": os.path.join(args.out, "demo.json")}
    _plot_errors(records, files["errors"])
    if heat is not None:
        _plot_heatmaps(heat, files["heatmaps"])
    else:  # pragma: no cover - the heat-map layer is always collected
        del files["heatmaps"]
    _plot_layer_heatmaps(layers_heat, files["heatmaps_layers"])
    if ngd is not None:
        files["train"] = os.path.join(args.out, "demo-train.png")
        _plot_train(ngd, files["train"])

    bad = _check(records)
    wall = time.perf_counter() - t_start
    result = {
        "meta": {
            "date": datetime.date.today().isoformat(), "kronsum": ks.__version__,
            "torch": torch.__version__, "numpy": np.__version__,
            "scikit-learn": sklearn.__version__, "matplotlib": matplotlib.__version__,
            "tqdm": tqdm.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "threads": args.threads, "device": str(device),
            "dtype": "float64 (models trained and Fisher blocks computed in float64)",
            "quick": bool(args.quick), "seed": cfg.seed, "config": dataclasses.asdict(cfg),
            "data": "sklearn.datasets.load_digits: 1797 images 8x8, pixels / 16",
            "fisher": "exact (collect(..., fisher='exact'), CrossEntropyLoss(reduction='mean'))",
            "error": "float(kronsum.frobenius_error(F, est, relative=True))",
            "times": "seconds per estimator call, time.perf_counter, median of up to 5 runs "
                     "(repeated while under 50 ms in total)",
            "networks": {k: v[0] for k, v in NETWORKS.items()},
            "wall_seconds": wall,
        },
        "records": records,
        "kfoc_best_everywhere": not bad,
        "violations": bad,
        "train": ngd,
        "files": {k: os.path.basename(v) for k, v in files.items()},
    }
    with open(files["json"], "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)

    print()
    print(f"Relative Frobenius error ‖F − F̂‖/‖F‖ of each layer's exact Fisher block after "
          f"{max(cfg.checkpoints)} SGD steps, and the estimator's time:")
    print(format_table(records))
    if ngd is not None:
        print()
        print(f"Natural-gradient training of the MLP ({cfg.train_steps} steps, batch "
              f"{cfg.train_batch}, lr {cfg.train_lr:g}, damping {cfg.train_damping:g}; "
              f"SGD lr {cfg.sgd_lr:g}; medians of {cfg.train_seeds} seeds, range in brackets):")
        for method, r in ngd["runs"].items():
            print(f"  {LABELS[method]:6s} final training loss {r['final_loss']:.4f} "
                  f"[{min(r['final_losses']):.4f}–{max(r['final_losses']):.4f}], accuracy "
                  f"{r['final_accuracy']:.3f}, {r['total_seconds']:.2f} s")
    print()
    if bad:
        print("K-FOC is NOT below TKFAC and K-FAC everywhere (or an EKFAC column above its "
              "basis):\n  " + "\n  ".join(bad))
    else:
        print(f"K-FOC's error ≤ TKFAC's and ≤ K-FAC's, and each EKFAC column's ≤ its basis's, on "
              f"every layer at every checkpoint ({len(records)} blocks).")
    print(f"Wrote {', '.join(files.values())} ({wall:.1f} s)")
    return 0
