r"""PyTorch adapter: per-layer Fisher blocks of a model as :class:`~kronsum.KronSum`, and back.

The functions:

:func:`collect`
    one forward pass with hooks on every supported layer (see :func:`coverage`), then
    one backward pass per output-gradient term (one for ``"empirical"``, ``n_samples`` for
    ``"mc"``, one per class/output for ``"exact"``), returning ``{layer name: KronSum}`` with the
    model's device and dtype.
:func:`collect_kfac`
    the same passes, returning K-FAC's factors per layer (``{layer name: Kron}``, equal to
    :func:`~kronsum.kfac` of :func:`collect`'s blocks) without keeping the statistics.
:func:`precondition`
    replaces each covered layer's ``weight.grad`` (and ``bias.grad``) by
    ``(scale·L ⊗ R + λI)⁻¹ vec(∇W)``, leaving every other parameter alone.

Conventions (the library's, see ``docs/adapters.md``): a weight stored ``(out, in)`` — a conv
weight viewed as ``(out, in·kh·kw)`` — has its block as **gradient-side ⊗ activation-side** in
row-major vec; a bias is an extra **last** column of the weight, its input a column of ones;
``F`` is a **sum** over loss terms whose weights carry the loss's reduction, so the block is the
Fisher of the loss exactly as the user defined it:

* ``CrossEntropyLoss(reduction="sum")``: ``F = Σ_n E_y[∇ℓ_n ∇ℓ_nᵀ]``, ``"mean"``: ``1/N`` times
  that (``ℓ_n`` the per-sample negative log-likelihood);
* ``MSELoss``: ``ℓ_n = ‖f_n − y_n‖²`` is the negative log-likelihood of ``N(f_n, I/2)`` up to a
  constant, so the Fisher is the Gauss-Newton matrix ``Σ_n 2 J_nᵀJ_n``, divided by ``N·D`` for
  ``"mean"`` (PyTorch's mean runs over all ``N·D`` entries).

The gradients with respect to the layers' outputs are taken through zero perturbations added to
those outputs (``torch.autograd.grad`` with respect to them), so the parameters' ``.grad`` are
never touched, no weight gradient is computed, and in-place activations after a layer are safe.

Examples
--------
>>> import torch
>>> import kronsum as ks
>>> from kronsum.adapters.torch import collect, precondition
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
>>> X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
>>> loss_fn = torch.nn.CrossEntropyLoss()
>>> blocks = collect(model, loss_fn, X, y, fisher="exact")
>>> {name: (F.m, F.n) for name, F in blocks.items()}
{'0': (8, 5), '2': (3, 9)}
>>> estimates = {name: ks.kfoc(F) for name, F in blocks.items()}
>>> loss_fn(model(X), y).backward()
>>> precondition(model, estimates, damping=1e-3)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

try:  # the adapter is importable (for its docs) without torch; its functions are not usable
    import torch
    import torch.nn.functional as _tF
    from torch import nn
except ImportError:  # pragma: no cover - depends on the environment
    torch = None  # type: ignore[assignment]
    nn = None  # type: ignore[assignment]

from .._accel import gram
from .._closed_forms import _new_kron
from .._compat import all_finite, namespace
from .._ekfac import EigenKron
from .._kron import Kron, KronInfo
from .._sum import KronSum
from .._validation import check_array
from ._torch_layers import (
    Capture,
    custom_rule,
    register_rule,
    rule_for,
    rules_version,
    uncovered_reason,
    unregister_types,
)
from ._torch_losses import NegativeLogLikelihood, loss_spec, output_grad_terms

__all__ = [
    "FISHER_TYPES", "Coverage", "NegativeLogLikelihood", "Preconditioner",
    "UncoveredParametersWarning", "collect", "collect_kfac",
    "coverage", "precondition", "register_layer", "supported_layers", "unregister_layer",
]

#: The Fisher types :func:`collect` knows.
FISHER_TYPES = ("mc", "empirical", "exact")
_SHARING = ("expand", "sample", "reduce")


def _require_torch() -> None:
    if torch is None:  # pragma: no cover - depends on the environment
        raise ImportError(
            "kronsum.adapters.torch needs PyTorch; install it with `pip install 'kronsum[torch]'`"
        )


# -- layers --------------------------------------------------------------------------------


class UncoveredParametersWarning(UserWarning):
    """:func:`collect` leaves trainable parameters without a block (see :func:`coverage`)."""


@dataclass(frozen=True)
class Coverage:
    """Which trainable parameters of a model get a block, and why the others do not.

    Attributes
    ----------
    layers : dict of str to torch.nn.Module
        The covered modules, ``{name: module}`` in ``model.named_modules()`` order.
    covered : dict of str to str
        ``{parameter name: covering module name}``.
    uncovered : dict of str to str
        ``{parameter name: reason}`` for every other trainable parameter.
    fraction : float
        Share of the trainable parameters' entries that are covered.
    """

    layers: dict
    covered: dict
    uncovered: dict
    fraction: float


def _rule_params(mod: Any, paths: tuple) -> list:
    """The trainable parameters among ``paths`` (relative to ``mod``)."""
    out = []
    for path in paths:
        try:
            p = mod.get_parameter(path)
        except AttributeError:
            continue
        if p.requires_grad:
            out.append(p)
    return out


def _unblockable(name: str, mod: Any, rule: Any) -> str | None:
    """Why a module a rule matches still gets no block (``None``: it gets its blocks): each
    block's weight must be a trainable parameter of the module itself. A parametrized weight
    (``weight_norm``, ``spectral_norm``, ``orthogonal``, ``torch.nn.utils.parametrize``) trains
    other tensors, whose gradient is not the weight's; a frozen weight has no gradient to
    precondition (a trainable bias alone gets no block)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(mod) or hasattr(mod, "weight_g"):  # new- or old-style
        return ("its weight or bias is parametrized (weight_norm, spectral_norm, orthogonal, "
                "...): the trained tensors are the parametrization's, whose gradient is not the "
                "layer's")
    for spec in rule.specs(name, mod):
        rel = spec.weight[len(name) + 1:] if name else spec.weight
        try:
            p = mod.get_parameter(rel)
        except AttributeError:
            return f"its weight {spec.weight!r} is not a parameter of the layer"
        if not p.requires_grad:
            return "its weight is frozen (requires_grad=False); a trainable bias alone gets no block"
    return None


def _parameter_slots(model: Any) -> dict[int, set]:
    """``{id(parameter): {"module.name", ...}}``: every place a parameter is registered, a
    module registered under several names counted under each (tied weights show as two)."""
    slots: dict[int, set] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pn, p in mod.named_parameters(recurse=False):
            slots.setdefault(id(p), set()).add(f"{mname}.{pn}" if mname else pn)
    return slots


def coverage(model: Any, layers: Iterable[str] | None = None) -> Coverage:
    """The layers :func:`collect` covers and the trainable parameters it leaves out, with reasons.

    Covered module types: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (any groups), ``nn.Embedding``,
    ``nn.MultiheadAttention``, the affine parameters of ``LayerNorm``, ``BatchNorm``,
    ``GroupNorm``, ``InstanceNorm`` and ``RMSNorm``, and types added with
    :func:`register_layer`; every one with a trainable weight, or exactly those named in
    ``layers`` (``KeyError`` for a name that is not a covered layer). Parameters of other
    modules (``ConvTranspose``, ``PReLU``, bare parameters such as a class token, attention's
    ``bias_k``/``bias_v``, ...) are listed in ``uncovered`` with the reason, and so are tied
    weights (one tensor held by two modules, e.g. a language model's embedding and output
    layer): the gradient of a tied weight sums both uses, which no one layer's block gives.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from kronsum.adapters.torch import coverage
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.PReLU(), nn.Linear(8, 2))
    >>> cov = coverage(model)
    >>> list(cov.layers), cov.uncovered
    (['0', '1', '3'], {'2.weight': 'a parameter of PReLU, which has no layer rule (register_layer adds one)'})
    >>> round(cov.fraction, 3)
    0.987
    """
    _require_torch()
    wanted = None if layers is None else list(layers)
    slots = _parameter_slots(model)
    candidates: dict[str, Any] = {}  # every module a rule covers (not inside another one)
    excluded: dict[str, str] = {}  # layers a rule matches that get no block: why
    for name, mod in model.named_modules():
        if any(name.startswith(o + ".") or (o == "" and name) for o in candidates):
            continue
        rule = rule_for(mod)
        if rule is not None and _rule_params(mod, rule.params):
            others = sorted({o for p in mod.parameters() for o in slots[id(p)]
                             if not (o.startswith(name + ".") if name else True)})
            if others:
                excluded[name] = "tied: the same tensor is also " + ", ".join(others) + (
                    "; its gradient sums both uses, which no one layer's Kronecker block gives")
                continue
            why = _unblockable(name, mod, rule)
            if why:
                excluded[name] = why
                continue
            candidates[name] = mod
    if wanted is None:
        found = candidates
    else:
        missing = [n for n in wanted if n not in candidates]
        if missing:
            why = "; ".join(f"{n!r}: {excluded[n]}" for n in missing if n in excluded)
            raise KeyError(f"not a layer kronsum covers: {missing}" + (f" ({why})" if why else ""))
        found = {n: m for n, m in candidates.items() if n in wanted}
    covered: dict[str, str] = {}
    for name, mod in found.items():
        for spec in rule_for(mod).specs(name, mod):
            for p in (spec.weight, spec.bias):
                if p is not None:
                    covered[p] = name
    uncovered: dict[str, str] = {}
    total = kept = 0
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        total += p.numel()
        if pname in covered:
            kept += p.numel()
            continue
        owner = next((n for n in candidates if n == "" or pname.startswith(n + ".")), None)
        mname = pname.rsplit(".", 1)[0] if "." in pname else ""
        left_out = next((n for n in excluded if n == "" or pname.startswith(n + ".")), None)
        if owner is None and left_out is not None:
            uncovered[pname] = excluded[left_out]
        elif owner is not None and owner not in found:
            uncovered[pname] = "its layer is not in `layers=`"
        elif owner is not None:
            uncovered[pname] = f"{type(candidates[owner]).__name__}.{pname[len(owner):].lstrip('.')} has no Kronecker block"
        else:
            uncovered[pname] = uncovered_reason(model.get_submodule(mname))
    return Coverage(found, covered, uncovered, kept / total if total else 1.0)


def supported_layers(model: Any, layers: Iterable[str] | None = None) -> dict[str, Any]:
    """The layers :func:`collect` covers: ``{name: module}`` (``coverage(model, layers).layers``).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from kronsum.adapters.torch import supported_layers
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    >>> list(supported_layers(model))
    ['0', '3']
    """
    return coverage(model, layers).layers


def register_layer(module_type: Any, inputs: Callable[[Any, tuple, Any], Any]) -> None:
    r"""Cover a custom layer ``y[n, t] = W a[n, t] (+ b)`` by giving its per-sample inputs.

    Parameters
    ----------
    module_type : type or tuple of types
        Modules with a ``weight`` parameter (viewed ``(m, n)``, ``m`` the output size) and
        optionally a ``bias`` (``m``). Registered types take precedence over the built-in rules;
        registering a type again replaces its rule; :func:`unregister_layer` removes it.
    inputs : callable
        ``inputs(module, args, output) -> A``: the inputs of the weight, ``(N, T, n)`` — ``N``
        samples, ``T`` positions (1 for a plain map) — from the forward call's positional
        arguments ``args`` and its ``output`` ``(N, ..., m)``, whose gradient (viewed
        ``(N, T, m)``) is taken as the output gradient.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from kronsum.adapters.torch import collect, register_layer, unregister_layer
    >>> class Scaled(nn.Module):                      # y = W (2x)
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.randn(3, 4))
    ...     def forward(self, x):
    ...         return (2 * x) @ self.weight.T
    >>> register_layer(Scaled, lambda mod, args, out: 2 * args[0])
    >>> F = collect(Scaled(), nn.MSELoss(), torch.randn(5, 4), fisher="exact")[""]
    >>> F.m, F.n
    (3, 4)
    >>> unregister_layer(Scaled)
    """
    types = module_type if isinstance(module_type, tuple) else (module_type,)
    unregister_types(types)
    register_rule(custom_rule(types, inputs))


def unregister_layer(module_type: Any) -> None:
    """Remove a rule added with :func:`register_layer` (nothing happens for another type).

    Examples
    --------
    >>> import torch
    >>> from kronsum.adapters.torch import coverage, register_layer, unregister_layer
    >>> class Lin(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.weight = torch.nn.Parameter(torch.ones(2, 3))
    ...     def forward(self, x):
    ...         return x @ self.weight.T
    >>> register_layer(Lin, lambda mod, args, out: args[0])
    >>> list(coverage(Lin()).layers)
    ['']
    >>> unregister_layer(Lin)
    >>> list(coverage(Lin()).layers)
    []
    """
    unregister_types(module_type if isinstance(module_type, tuple) else (module_type,))


# -- collect -------------------------------------------------------------------------------


def _check_finite(name: str, x: Any, what: str) -> None:
    if x.numel() and not all_finite(namespace(x), x):
        raise ValueError(f"layer {name!r}: its {what} hold NaN or inf")


def _check_statistic(layer: str, x: Any, name: str) -> None:
    """:func:`collect`'s checks of a statistic (``"G"`` or ``"A"``: float32 or float64, not
    empty) for a path that builds no :class:`~kronsum.KronSum`, the layer named."""
    try:
        check_array(x, name, ndim=x.ndim, what=f"{tuple(x.shape)} with no empty axis")
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"layer {layer!r}: {exc}") from None


def _batch_size(inputs: Any) -> int | None:
    shape = getattr(inputs, "shape", None)
    return None if shape is None or len(shape) == 0 else int(shape[0])


def collect(
    model: Any,
    loss_fn: Any,
    inputs: Any,
    targets: Any = None,
    *,
    fisher: str = "mc",
    n_samples: int = 1,
    generator: Any = None,
    layers: Iterable[str] | None = None,
    weight_sharing: str = "expand",
    class_dim: int = 1,
    check_finite: bool = True,
) -> dict[str, KronSum]:
    r"""Per-layer Fisher blocks of ``loss_fn(model(inputs), targets)`` as ``{name: KronSum}``.

    Parameters
    ----------
    model : torch.nn.Module
        Called once as ``model(inputs)``; its output is ``(N, C, ...)`` logits for
        cross-entropy (``(N, ..., C)`` with ``class_dim=-1``) or ``(N, ...)`` predictions for MSE.
        Train/eval mode is left as it is (a train-mode BatchNorm couples the samples: warned).
    loss_fn : torch.nn.CrossEntropyLoss, torch.nn.MSELoss, torch.nn.BCEWithLogitsLoss or NegativeLogLikelihood
        With ``reduction="sum"`` or ``"mean"``; the reduction sets the weights (module docstring).
        Any other likelihood: subclass :class:`NegativeLogLikelihood` (its per-sample NLL, a
        sampler for ``"mc"``, a square root of its output Fisher for ``"exact"``).
        No class weights, ``pos_weight`` or label smoothing (``NotImplementedError``).
        Cross-entropy's ``ignore_index`` drops those targets' positions (when targets are given).
    inputs : tensor
        One batch, ``N ≥ 1`` samples.
    targets : tensor, optional
        Class indices (the output's shape without the class axis, integer, in ``[0, C)`` or
        ``ignore_index``) or regression targets (the output's shape); needed for
        ``fisher="empirical"``, used by the other types only for ``ignore_index``.
    fisher : {"mc", "empirical", "exact"}
        ``"mc"``: ``n_samples`` labels drawn from the model's predictive distribution (weights
        ``1/n_samples``), independently per position. ``"empirical"``: the given labels.
        ``"exact"``: every class weighted by its predicted probability (cross-entropy; with
        ``P > 1`` positions one backward pass per class and position), every output with the
        Hessian ``2I`` (MSE) — the exact Fisher (= generalised Gauss-Newton) block.
    n_samples : int
        Monte-Carlo samples per input for ``fisher="mc"``.
    generator : torch.Generator, optional
        Random source of ``fisher="mc"``.
    layers : iterable of str, optional
        Names (as in ``model.named_modules()``) of the layers to cover; default every covered
        layer (see :func:`coverage`) whose weight requires a gradient. Trainable parameters left
        without a block for another reason than ``layers=`` raise an
        :class:`UncoveredParametersWarning` naming them.
    weight_sharing : {"expand", "sample", "reduce"}
        For a Linear, Embedding or attention projection applied to inputs ``(N, ..., d)``:
        ``"expand"`` (default) flattens the extra axes into the batch, one outer-form term per
        position (K-FAC-expand); ``"sample"`` keeps them as the positions of the conv form, one
        term ``vec(∇W_n)vec(∇W_n)ᵀ`` per sample, the exact per-sample Fisher. Both give the same
        :func:`~kronsum.kfac`; convolutions use the conv form for both. ``"reduce"``
        (K-FAC-reduce, Eschenhagen et al. 2023; also for convolutions): one outer-form term per
        sample, ``ĝ_n = Σ_t g_{n,t}`` ⊗ ``ā_n = mean_t a_{n,t}``, which replaces each sample's
        gradient ``Σ_t g_t a_tᵀ`` by ``T·ḡ āᵀ`` — exact when the inputs (or the output
        gradients) are the same at every position, as after a mean-pooling head.
    class_dim : int
        The axis of the model output that holds the classes (cross-entropy): ``1`` as
        ``CrossEntropyLoss`` expects, ``-1`` for ``(N, ..., C)`` logits such as a language
        model's ``(N, T, C)``.
    check_finite : bool
        Raise ``ValueError`` when the model output, an input or an output gradient of a layer
        holds NaN or inf (one sum per array; an entry-wise check only when a sum is not finite).

    Returns
    -------
    dict of str to KronSum
        ``from_outer`` (expand) or ``from_conv`` (convolutions, and ``"sample"``), with
        ``m`` the output size and ``n`` the input size (``in/groups·∏k`` for a convolution) plus
        one for a bias. Keys are the layers' names; a grouped convolution gives ``"name[g]"``
        per group, an attention layer ``"name.in_proj"`` (or ``".in_proj[q|k|v]"``,
        ``".q_proj"``…) and ``"name.out_proj"`` (module ``kronsum.adapters._torch_layers``
        describes each rule). ``num_terms`` is ``N`` times the number of backward passes (times
        the positions for ``"expand"``). Tensors on the model's device, in its dtype.

    Raises
    ------
    ValueError
        Bad options, an empty batch, targets of the wrong shape, dtype or range, a model output
        that is not ``N`` rows, NaN/inf (``check_finite``).
    RuntimeError
        A covered layer that ran twice in one forward pass, or not at all.

    Notes
    -----
    Cost: one forward pass, then one backward pass per gradient term (1 for ``"empirical"``,
    ``n_samples`` for ``"mc"``, ``C`` for ``"exact"`` — ``C·P`` with ``P`` positions of
    cross-entropy, ``D`` output entries for MSE) that computes no weight gradient. The inputs are
    kept once per layer (repeated for the ``K = N·passes`` terms).

    Examples
    --------
    >>> import torch
    >>> from kronsum.adapters.torch import collect
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Flatten(),
    ...                           torch.nn.Linear(2 * 4 * 4, 3, bias=False))
    >>> blocks = collect(net, torch.nn.CrossEntropyLoss(), torch.randn(5, 1, 4, 4), fisher="mc")
    >>> blocks["0"]
    KronSum(form='conv', K=5, T=16, m=2, n=10, dtype=torch.float32)
    """
    run = _forward(model, loss_fn, inputs, targets, fisher, n_samples, generator, layers,
                   weight_sharing, class_dim, check_finite, keep_inputs=True)
    return _blocks(run)


def _blocks(run: "_Run", keep_graph: bool = False) -> dict[str, KronSum]:
    """:func:`collect`'s result from a started run: its backward passes (the graph kept for a
    later backward with ``keep_graph``), then one KronSum per capture."""
    G_parts: list[list[Any]] = [[] for _ in run.captures]
    for _, grads in run.passes(keep_graph):
        for i, (cap, g) in enumerate(zip(run.captures, grads)):
            G_parts[i].append(run.arranged_G(cap, g))
    result: dict[str, KronSum] = {}
    for cap, Gs in zip(run.captures, G_parts):
        lay = run.layouts[cap.spec.key]
        S = len(Gs)
        G = Gs[0] if S == 1 else torch.cat(Gs)  # (S·B, T, m)
        A = cap.A if S == 1 else cap.A.repeat(S, 1, 1)
        wl = torch.cat([torch.full((lay.rows,), wt, dtype=A.dtype, device=A.device)
                        for wt in run.weights])
        if lay.sample:
            result[cap.spec.key] = KronSum.from_conv(G, A, wl, check_finite=False)
        else:
            result[cap.spec.key] = KronSum.from_outer(
                G.reshape(-1, G.shape[-1]), A.reshape(-1, A.shape[-1]), wl, check_finite=False
            )
    return result


def collect_kfac(
    model: Any,
    loss_fn: Any,
    inputs: Any,
    targets: Any = None,
    *,
    fisher: str = "mc",
    n_samples: int = 1,
    generator: Any = None,
    layers: Iterable[str] | None = None,
    weight_sharing: str = "expand",
    class_dim: int = 1,
    check_finite: bool = True,
) -> dict[str, Kron]:
    r"""K-FAC of every layer's Fisher block, accumulated without keeping the statistics.

    Equal to ``{name: kronsum.kfac(F) for name, F in collect(...).items()}`` (same
    ``left``, ``right`` and ``scale``, to rounding), but each layer's inputs are reduced to
    their Gram matrix ``Σ_k A_kᵀA_k`` in the forward hook (where it is smaller than the inputs,
    e.g. a convolution's unfolded patches; otherwise after the backward passes) and each
    backward pass's output gradients to ``Σ_k G_kᵀG_k`` as soon as the pass ends, as curvlinops
    and kfac-pytorch do it. Use it where only K-FAC is wanted (a K-FAC Laplace posterior, a K-FAC preconditioner
    refresh) and the per-sample statistics would not fit; :func:`~kronsum.tkfac`,
    :func:`~kronsum.kfoc` and the rank-r estimates need :func:`collect`'s ``KronSum``.

    Parameters
    ----------
    model, loss_fn, inputs, targets, fisher, n_samples, generator, layers, weight_sharing, class_dim, check_finite
        As for :func:`collect`, with the same blocks, weights and keys.

    Returns
    -------
    dict of str to Kron
        Per block: ``left`` (m×m, the gradient side: ``Σ w_k G_kᵀG_k / (T·Σ w_k)`` for the
        conv form, ``Σ w_k g_k g_kᵀ / Σ w_k`` for the outer form), ``right`` (n×n, the
        activation side, ``Σ w_k A_kᵀA_k / Σ w_k``) and ``scale = Σ w_k`` — :func:`~kronsum.kfac`'s
        split; ``info.method == "kfac"``. Tensors on the model's device, in its dtype.

    Raises
    ------
    ValueError, RuntimeError
        As :func:`collect`; also ``ValueError`` when an accumulated factor is not finite.

    Notes
    -----
    Memory beyond the forward pass: per block the left factor (``m²``) and the smaller of the
    right factor (``n²``) and the inputs (``N·T·n``), one layer's unfolded inputs at a time
    while its hook runs, and one backward pass's output gradients. :func:`collect` keeps every
    layer's inputs and all passes' output gradients. Cost: :func:`collect`'s passes plus the two Gram products per block, the same
    arithmetic as :func:`~kronsum.kfac` on its result (the inputs' Gram once, not once per pass).

    Examples
    --------
    >>> import torch
    >>> import kronsum as ks
    >>> from kronsum.adapters.torch import collect, collect_kfac
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Flatten(),
    ...                           torch.nn.Linear(2 * 4 * 4, 3)).double()
    >>> X, y = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    >>> est = collect_kfac(net, torch.nn.CrossEntropyLoss(), X, y, fisher="exact")
    >>> est["0"].left.shape, est["0"].right.shape
    (torch.Size([2, 2]), torch.Size([10, 10]))
    >>> blocks = collect(net, torch.nn.CrossEntropyLoss(), X, y, fisher="exact")
    >>> bool(torch.allclose(est["2"].to_dense(), ks.kfac(blocks["2"]).to_dense()))
    True
    """
    run = _forward(model, loss_fn, inputs, targets, fisher, n_samples, generator, layers,
                   weight_sharing, class_dim, check_finite, keep_inputs=False)
    return _kfac_estimates(run, check_finite)


def _kfac_estimates(run: "_Run", check_finite: bool, keep_graph: bool = False) -> dict[str, Kron]:
    """:func:`collect_kfac`'s result from a run started with ``keep_inputs=False``: its
    backward passes (the graph kept for a later backward with ``keep_graph``), each reduced to
    the output gradients' Gram matrix as it ends, then one :class:`~kronsum.Kron` per block.
    ``check_finite``: ``ValueError`` for a factor that is not finite — which a NaN or inf in
    the block's inputs or output gradients makes it (a diagonal entry is ``Σ x²``), so a run
    without its own checks (``run.check_finite`` false) still refuses them, one host read per
    block instead of two scans."""
    left: dict[str, Any] = {}
    for wt, grads in run.passes(keep_graph):
        for cap, g in zip(run.captures, grads):
            G = run.arranged_G(cap, g)
            _check_statistic(cap.spec.key, G, "G")
            P = gram(G.reshape(-1, G.shape[-1]))
            P *= wt
            key = cap.spec.key
            left[key] = P if key not in left else left[key].add_(P)
    W = float(sum(run.weights))
    result: dict[str, Kron] = {}
    for cap in run.captures:
        key = cap.spec.key
        lay = run.layouts[key]
        sw = W * lay.rows  # Σ w_k over the block's terms
        L = left[key]
        R = run.right.pop(key) if key in run.right else gram(cap.A.reshape(-1, cap.A.shape[-1]))
        _check_statistic(key, R, "A")  # R = AᵀA has A's dtype
        if R.dtype != L.dtype:  # one dtype per estimate, as for collect's KronSum
            L, R = (x.to(torch.promote_types(L.dtype, R.dtype)) for x in (L, R))
        if sw > 0:  # kfac's split: left Σw·GᵀG/(T·Σw) (T = 1 for the outer form), right Σw·AᵀA/Σw
            L.div_(sw * lay.positions)  # both made here: scaled in place
            R.div_(lay.rows)
        else:
            L.zero_()
            R.zero_()
        # one pass over each factor, one host read for the four extremes
        l0, l1, r0, r1 = torch.stack((*torch.aminmax(L), *torch.aminmax(R))).tolist()
        if check_finite and not all(math.isfinite(v) for v in (l0, l1, r0, r1)):
            raise ValueError(f"layer {key!r}: its K-FAC factors (shapes {tuple(L.shape)} and "
                             f"{tuple(R.shape)}) are not finite: its inputs or output gradients "
                             "hold NaN or inf, or the factors overflow")
        notes: tuple[str, ...] = ()
        zero_left, zero_right = l0 == l1 == 0, r0 == r1 == 0
        if not sw > 0:
            notes = ("all weights are zero: the estimate is zero",)
        elif zero_left or zero_right:
            which = "left (gradient-side)" if zero_left else "right (activation-side)"
            notes = (f"the {which} statistics are all zero: the estimate is zero",)
        result[key] = _new_kron(L, R, sw, KronInfo(method="kfac", notes=notes), namespace(L))
    return result


@dataclass(frozen=True)
class _Layout:
    """How one capture's statistics become a KronSum: ``B`` samples of ``T`` positions (before
    a reduce); ``reduce``: K-FAC-reduce (one outer term per sample); ``sample``: the conv form,
    one term per sample; otherwise the outer form, one term per sample and position."""

    B: int
    T: int
    reduce: bool
    sample: bool

    @property
    def rows(self) -> int:
        """Terms per backward pass: ``B`` for the conv form and a reduce, else ``B·T``."""
        return self.B if self.sample or self.reduce else self.B * self.T

    @property
    def positions(self) -> int:
        """The conv form's ``T`` (kfac divides its left factor by it); 1 for the outer form."""
        return self.T if self.sample else 1


class _Run:
    """One forward pass of :func:`collect` with its captures, layouts and output-gradient terms.

    ``passes()`` runs the backward passes one at a time, yielding ``(weight, grads)`` with
    ``grads[i]`` the output gradient of ``captures[i]``. With ``keep_inputs=False`` a capture's
    inputs larger than their Gram matrix are replaced in the forward hook by it, ``right[key]``
    (``Σ_rows a aᵀ`` of the arranged inputs, unweighted), and ``cap.A`` is set to ``None``.
    """

    def __init__(self, N, weight_sharing, check_finite, keep_inputs):
        self.N = N
        self.weight_sharing = weight_sharing
        self.check_finite = check_finite
        self.keep_inputs = keep_inputs
        self.captures: list[Capture] = []
        self.layouts: dict[str, _Layout] = {}
        self.right: dict[str, Any] = {}
        self.weights: list[float] = []
        self._seen: set[str] = set()
        self.ran: set[str] = set()
        self.modules: list[str] = []  # the covered layers' names (each must run)
        self.seq_first: set[str] = set()  # layers inside batch_first=False transformer layers

    def record(self, cap: Capture) -> None:
        key = cap.spec.key
        if key in self._seen:
            raise RuntimeError(
                f"layer {cap.spec.module!r} ran twice in one forward pass; a layer reused within "
                "a pass is not supported"
            )
        self._seen.add(key)
        self.ran.add(cap.spec.module)
        B, T = cap.A.shape[:2]  # B = N unless the layer's first axis is not the batch
        reduce = self.weight_sharing == "reduce" and not cap.exact and (cap.conv or T > 1)
        sample = not reduce and (cap.conv or (self.weight_sharing == "sample" and T > 1))
        seq_first = cap.spec.module in self.seq_first
        batch_first = self.N is None or (B == self.N and not seq_first)
        if not batch_first and B != self.N and self.N > 1 and (T != self.N or B == 1):
            # neither batch first (N, ...) nor sequence first (L, N, ...): an input without the
            # batch axis, broadcast over the samples later (its rows' gradients are sums over
            # the samples), or a layer that sees only some of them
            raise ValueError(
                f"layer {key!r}: its input is {B}×{T} (rows × positions) for a batch of {self.N}: "
                "neither axis is the batch. A layer applied to something without the batch axis "
                "(e.g. a positional embedding of torch.arange(T), broadcast over the samples) or "
                "to some of the samples only has no per-sample statistics here; leave it out with "
                "`layers=[...]`"
            )
        if (sample or reduce) and not batch_first:
            where = (" (it is inside a transformer layer built with batch_first=False: its first "
                     "axis is the sequence; build it with batch_first=True)" if seq_first else "")
            raise ValueError(
                f"layer {key!r}: its input's first axis has {B} entries for a batch of {self.N}; "
                f"weight_sharing={self.weight_sharing!r} needs batch-first layers{where}"
            )
        self.layouts[key] = _Layout(B, T, reduce, sample)
        if self.check_finite:
            _check_finite(key, cap.A, "inputs")
        if reduce:  # K-FAC-reduce: per sample, summed output gradients ⊗ mean inputs
            cap.A = cap.A.mean(dim=1, keepdim=True)
        n = cap.A.shape[-1]
        if not self.keep_inputs and cap.A.numel() > n * n:  # the Gram matrix is smaller: now
            self.right[key] = gram(cap.A.reshape(-1, n))
            cap.A = None
        self.captures.append(cap)

    def arranged_G(self, cap: Capture, g: Any) -> Any:
        """One pass's output gradient of ``cap`` as ``(B, T, m)`` (``T = 1`` after a reduce)."""
        key = cap.spec.key
        lay = self.layouts[key]
        G = cap.to_G(g)
        if tuple(G.shape[:2]) != (lay.B, lay.T):
            raise ValueError(
                f"layer {key!r}: inputs of {lay.B} samples × {lay.T} positions do not match its "
                f"output gradients {tuple(G.shape)} (samples, positions)"
            )
        if self.check_finite:
            _check_finite(key, G, "output gradients")
        return G.sum(dim=1, keepdim=True) if lay.reduce else G

    def start(self, out, terms) -> None:
        self._out = out
        self._terms = terms
        self.weights = [wt for _, wt in terms]
        self._eps: list[Any] = []
        for cap in self.captures:
            if not any(cap.eps is e for e in self._eps):
                self._eps.append(cap.eps)
        self._which = [next(j for j, e in enumerate(self._eps) if e is cap.eps)
                       for cap in self.captures]

    def passes(self, keep_graph: bool = False):
        out, terms, eps = self._out, self._terms, self._eps
        self._out = self._terms = None
        for s, (V, wt) in enumerate(terms):
            gs = torch.autograd.grad(out, eps, grad_outputs=V.to(out.dtype),
                                     retain_graph=keep_graph or s < len(terms) - 1,
                                     allow_unused=True)
            gs = [torch.zeros_like(e) if g is None else g for g, e in zip(gs, eps)]
            yield wt, [gs[j] for j in self._which]
            del gs


def _forward(model, loss_fn, inputs, targets, fisher, n_samples, generator, layers,
             weight_sharing, class_dim, check_finite, keep_inputs) -> _Run:
    """Check :func:`collect`'s options, run the forward pass with the layers' hooks and draw
    the output-gradient terms; the backward passes are left to ``_Run.passes``."""
    _require_torch()
    _check_options(fisher, weight_sharing, n_samples, class_dim)
    if fisher == "empirical" and targets is None:
        raise ValueError("fisher='empirical' needs the targets")
    spec = loss_spec(loss_fn)
    N = _batch_size(inputs)
    if N == 0:
        raise ValueError(f"inputs: an empty batch (shape {tuple(inputs.shape)})")
    run, handles = _install(model, layers, N, weight_sharing, check_finite, keep_inputs, stacklevel=4)
    try:
        with torch.enable_grad():
            out = model(inputs)
    finally:
        for h in handles:
            h.remove()
    _start(run, spec, out, targets, fisher, n_samples, generator, class_dim, check_finite)
    return run


def _sequence_first(model: Any, mods: dict) -> set:
    """The covered layers inside ``nn.TransformerEncoderLayer``/``DecoderLayer`` modules built
    with ``batch_first=False`` (PyTorch's default): their inputs are (L, N, E), sequence first."""
    layer_types = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    roots = [n for n, m in model.named_modules()
             if isinstance(m, layer_types) and not m.self_attn.batch_first]
    return {name for name in mods
            if any(r == "" or name.startswith(r + ".") for r in roots)}


def _check_options(fisher, weight_sharing, n_samples, class_dim) -> None:
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
    if weight_sharing not in _SHARING:
        raise ValueError(f"weight_sharing must be one of {_SHARING}, got {weight_sharing!r}")
    if fisher == "mc" and (isinstance(n_samples, bool) or not isinstance(n_samples, int)
                           or n_samples < 1):
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if isinstance(class_dim, bool) or not isinstance(class_dim, int):
        raise TypeError(f"class_dim must be an int, got {class_dim!r}")


@dataclass(frozen=True)
class _Plan:
    """What :func:`_install` needs of the model beyond one pass: the covered layers, the
    trainable parameters left out (with reasons), the sequence-first layers, and the modules
    whose train mode makes the statistics batch-dependent or random (BatchNorm; dropout and
    attention with a dropout probability), looked at again at every pass."""

    layers: dict
    left_out: dict
    seq_first: frozenset
    batch_norms: tuple = ()
    dropouts: tuple = ()


def _layout_key(model: Any) -> tuple:
    """Everything :func:`coverage`, the block specs and a :class:`_Plan` depend on: every
    module and parameter by name and identity (module type, whether the parameter trains,
    ties included) and the registered layer rules. Equal keys: a cached plan still holds."""
    return (tuple((n, id(m), type(m)) for n, m in model.named_modules(remove_duplicate=False)),
            tuple((n, id(q), q.requires_grad)
                  for n, q in model.named_parameters(remove_duplicate=False)),
            rules_version())


def _plan(model: Any, layers: Iterable[str] | None) -> _Plan:
    cov = coverage(model, layers)
    if not cov.layers:
        raise ValueError("the model has no layer kronsum covers (see kronsum.adapters.torch.coverage)")
    left_out = {p: why for p, why in cov.uncovered.items() if why != "its layer is not in `layers=`"}
    mods = list(model.modules())
    return _Plan(cov.layers, left_out, frozenset(_sequence_first(model, cov.layers)),
                 tuple(m for m in mods if isinstance(m, nn.modules.batchnorm._BatchNorm)),
                 tuple(m for m in mods if isinstance(m, (nn.modules.dropout._DropoutNd,
                                                         nn.MultiheadAttention))))


def _install(model, layers, N, weight_sharing, check_finite, keep_inputs, stacklevel,
             plan: _Plan | None = None) -> tuple:
    """``(run, hook handles)``: the covered layers' capture hooks on ``model`` for the next
    forward pass of a batch of ``N``, after the coverage and train-mode BatchNorm warnings
    (``plan``: :func:`_plan`'s result for this model and ``layers``, when the caller holds it)."""
    plan = _plan(model, layers) if plan is None else plan
    mods, others = plan.layers, plan.left_out
    if others:
        warnings.warn(
            "collect: trainable parameters without a Fisher block: "
            + "; ".join(f"{p} ({why})" for p, why in others.items()),
            UncoveredParametersWarning, stacklevel=stacklevel,
        )
    if any(m.training or not m.track_running_stats for m in plan.batch_norms):
        warnings.warn(
            "collect: a BatchNorm layer is in train mode (or keeps no running statistics), so "
            "each sample's output depends on the whole batch; the blocks treat the samples as "
            "independent (call model.eval() for per-sample statistics)", UserWarning,
            stacklevel=stacklevel,
        )
    if any(m.training and (m.dropout if isinstance(m, nn.MultiheadAttention) else m.p) > 0
           for m in plan.dropouts):
        warnings.warn(
            "collect: a dropout layer is in train mode, so the statistics are those of one random "
            "dropout mask (a different Fisher at every call); call model.eval() for the "
            "network's own Fisher", UserWarning, stacklevel=stacklevel,
        )
    run = _Run(N, weight_sharing, check_finite, keep_inputs)
    run.modules = list(mods)
    run.seq_first = set(plan.seq_first)
    handles = []
    try:
        for name, mod in mods.items():
            handles += rule_for(mod).install(name, mod, run.record)
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return run, handles


def _start(run, spec, out, targets, fisher, n_samples, generator, class_dim, check_finite) -> None:
    """After the forward pass: check that every covered layer ran and the output's batch axis
    and targets, then draw the output-gradient terms of ``out`` (``run.start``)."""
    N = run.N
    not_run = [name for name in run.modules if name not in run.ran]
    if not_run:
        raise RuntimeError(f"layers not called in the forward pass: {not_run}")
    if N is not None and (out.ndim == 0 or out.shape[0] != N):
        raise ValueError(
            f"the model output has shape {tuple(out.shape)} for a batch of {N} inputs; its first "
            "axis must be the batch (for (N, T, C) logits pass class_dim=-1 instead of flattening)"
        )
    if targets is not None:
        ny = _batch_size(torch.as_tensor(targets))
        if ny != out.shape[0]:
            raise ValueError(
                f"targets: {ny} rows for a batch of {out.shape[0]} inputs (shape "
                f"{tuple(torch.as_tensor(targets).shape)})"
            )
    run.start(out, output_grad_terms(spec, out, targets, fisher, n_samples, generator,
                                     class_dim, check_finite))


# -- precondition --------------------------------------------------------------------------


def _solve(est: Any, V: Any, damping: float, method: str) -> Any:
    """``(F̂ + λI)⁻¹`` applied to the block gradient ``V`` (a :class:`Kron` or ``EigenKron``)."""
    return est.solve(V, damping, method=method)


def precondition(model: Any, estimates: Mapping[str, Kron], damping: float, *,
                 method: str = "exact") -> None:
    r"""Replace each covered layer's gradient by ``(scale·L ⊗ R + λI)⁻¹ vec(∇W)``, in place.

    For every ``name, est`` in ``estimates`` (``name`` a key of :func:`collect`'s result) the
    block's weight gradient is viewed ``(m, n)`` as there — e.g. ``(out, in·kh·kw)`` — with the
    bias gradient as an extra last column when the layer has a bias, solved against the damped
    Kronecker product and written back to the gradients of those entries. Everything is checked
    and solved before the first gradient is written, so an error leaves every gradient as it
    was. Parameters of blocks not in ``estimates`` are untouched.

    Parameters
    ----------
    model : torch.nn.Module
        After ``loss.backward()``: the covered weights must have a ``.grad``.
    estimates : mapping of str to Kron or EigenKron
        E.g. ``{name: kronsum.kfac(F) for name, F in collect(...).items()}``; an
        :class:`~kronsum.EigenKron` (``kronsum.ekfac(F)``) is solved in its eigenbasis,
        ``U ((Uᵀ∇V) / (S + λ)) Vᵀ``.
    damping : float
        ``λ > 0`` (or ``≥ 0`` when the estimate is positive definite).
    method : str
        Passed to ``Kron.solve`` (``"exact"``, ``"factored"``, ``"tkfac"``); an ``EigenKron``
        takes ``"exact"`` only.

    Raises
    ------
    TypeError, ValueError
        For an estimate that is not a ``Kron`` or ``EigenKron``, a name that is no submodule or
        a layer without a weight, a missing gradient, mismatched sizes, a bad ``damping``, or
        a damped matrix that cannot be solved. Every layer is checked and solved before any
        gradient is written, so an error leaves all gradients as they were.

    Examples
    --------
    >>> import torch
    >>> import kronsum as ks
    >>> from kronsum.adapters.torch import collect, precondition
    >>> net = torch.nn.Linear(3, 2)
    >>> X, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    >>> est = {n: ks.kfac(F) for n, F in collect(net, torch.nn.CrossEntropyLoss(), X, y).items()}
    >>> torch.nn.functional.cross_entropy(net(X), y).backward()
    >>> precondition(net, est, damping=0.1)
    >>> net.weight.grad.shape, net.bias.grad.shape
    (torch.Size([2, 3]), torch.Size([2]))
    """
    _require_torch()
    if not isinstance(estimates, Mapping):
        raise TypeError(
            f"estimates must be a mapping of layer names to Kron estimates, got {type(estimates).__name__}"
        )
    from .._validation import check_real

    check_real(damping, "damping", minimum=0.0, array_ok=True)
    specs = _specs_by_key(model)
    jobs = []  # everything checked before any gradient is written
    for name, est in estimates.items():
        if not isinstance(est, (Kron, EigenKron)):
            raise TypeError(
                f"estimates[{name!r}] must be a Kron or an EigenKron (e.g. kronsum.kfac(F), "
                f"kronsum.ekfac(F)), got {type(est).__name__}"
            )
        if name not in specs:
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"estimates[{name!r}]: the model has no submodule {name!r} and "
                                 f"no block of that name (see collect's keys)") from None
            raise ValueError(
                f"estimates[{name!r}]: layer {name!r} ({type(mod).__name__}) has no weight with a "
                f"block (a layer without parameters, or of a kind collect does not cover: see "
                f"coverage(model))"
            )
        spec = specs[name]
        W = model.get_parameter(spec.weight)
        b = None if spec.bias is None else model.get_parameter(spec.bias)
        if W.grad is None:
            raise ValueError(f"layer {name!r} has no weight.grad: call loss.backward() first")
        V = _block_matrix(spec, W.grad, None if b is None else b.grad, b)
        if (est.m, est.n) != tuple(V.shape):
            raise ValueError(
                f"layer {name!r}: the estimate is for a ({est.m}, {est.n}) weight, the gradient "
                f"(with bias column) is {tuple(V.shape)}"
            )
        jobs.append((spec, est, W, b, V))
    results = [_solve(est, V.to(est.dtype), damping, method) for _, est, _, _, V in jobs]
    with torch.no_grad():
        for (spec, est, W, b, V), P in zip(jobs, results):
            _write_block(spec, P, W, b)


def _specs_by_key(model: Any) -> dict:
    """Every block key a covered module can give, with its :class:`BlockSpec`."""
    out = {}
    for name, mod in coverage(model).layers.items():
        for spec in rule_for(mod).specs(name, mod):
            out[spec.key] = spec
    return out


def _block_matrix(spec: Any, gW: Any, gb: Any, b: Any) -> Any:
    """The block's ``(m, n)`` gradient matrix: weight rows (transposed if so), bias last column."""
    if gW.layout != torch.strided:
        raise ValueError(
            f"block {spec.key!r}: its weight's gradient is sparse ({gW.layout}, e.g. "
            "Embedding(sparse=True)); a preconditioned gradient is dense: leave the layer out "
            "with `layers=[...]` or use a dense embedding")
    if spec.rows is None and not (spec.transpose or spec.vector) and gW.ndim == 2:
        M = gW  # a whole linear layer's weight: the common case, no views to take
    else:
        r0, r1 = spec.rows or (0, gW.shape[0])
        M = gW.T if spec.transpose else gW[r0:r1]
        M = M.reshape(-1, 1) if spec.vector else M.reshape(M.shape[0], -1)
    if b is None:
        return M
    bias = spec.bias_slice()
    gb = torch.zeros_like(b) if gb is None else gb
    if bias is not None:
        gb = gb[bias[0]:bias[1]]
    col = gb[:, None] if gb.ndim == 1 else gb.reshape(-1, 1)
    return torch.cat([M, col if col.dtype == M.dtype else col.to(M.dtype)], dim=1)


def _write_block(spec: Any, P: Any, W: Any, b: Any) -> None:
    """Write the ``(m, n)`` matrix ``P`` back into the gradients :func:`_block_matrix` read."""
    cols = P.shape[1] - (b is not None)
    if P.dtype != W.grad.dtype:
        P = P.to(W.grad.dtype)
    if spec.transpose:
        W.grad.copy_(P[:, :cols].T)
    elif spec.vector:
        W.grad.copy_(P[:, 0].reshape(W.shape))
    elif spec.rows is None:
        W.grad.copy_(P[:, :cols] if W.grad.ndim == 2 else P[:, :cols].reshape(W.grad.shape))
    else:
        r0, r1 = spec.rows
        W.grad[r0:r1].copy_(P[:, :cols].reshape(W.grad[r0:r1].shape))
    if b is not None:
        if b.grad is None:
            b.grad = torch.zeros_like(b)
        bias = spec.bias_slice()
        (b.grad if bias is None else b.grad[bias[0]:bias[1]]).copy_(P[:, cols])


from ._torch_precond import Preconditioner  # noqa: E402  (it uses the functions above)
