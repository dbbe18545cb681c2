r"""PyTorch adapter: per-layer Fisher blocks of a model as :class:`~kronsum.KronSum`, and back.

Two functions and no training loop:

:func:`collect`
    one forward pass with hooks on every supported layer (``nn.Linear``, ``nn.Conv2d``), then
    one backward pass per output-gradient term (one for ``"empirical"``, ``n_samples`` for
    ``"mc"``, one per class/output for ``"exact"``), returning ``{layer name: KronSum}`` with the
    model's device and dtype.
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
>>> import pytest; torch = pytest.importorskip("torch")
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
from typing import Any, Iterable, Mapping

try:  # the adapter is importable (for its docs) without torch; its functions are not usable
    import torch
    import torch.nn.functional as _tF
    from torch import nn
except ImportError:  # pragma: no cover - depends on the environment
    torch = None  # type: ignore[assignment]
    nn = None  # type: ignore[assignment]

from .._compat import all_finite, namespace
from .._kron import Kron
from .._sum import KronSum

__all__ = ["FISHER_TYPES", "collect", "precondition", "supported_layers"]

#: The Fisher types :func:`collect` knows.
FISHER_TYPES = ("mc", "empirical", "exact")
_SHARING = ("expand", "sample")


def _require_torch() -> None:
    if torch is None:  # pragma: no cover - depends on the environment
        raise ImportError(
            "kronsum.adapters.torch needs PyTorch; install it with `pip install 'kronsum[torch]'`"
        )


# -- layers --------------------------------------------------------------------------------


def _conv_padding(mod: Any) -> tuple[int, int]:
    p = mod.padding
    if isinstance(p, str):
        if p == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(mod.kernel_size, mod.dilation):
            total = d * (k - 1)
            if total % 2:
                raise ValueError(
                    "padding='same' with an even effective kernel size pads asymmetrically, "
                    "which unfold cannot express; use explicit padding"
                )
            pads.append(total // 2)
        return (pads[0], pads[1])
    return (int(p[0]), int(p[1]))


def _check_conv(name: str, mod: Any) -> None:
    if mod.groups != 1:
        raise NotImplementedError(
            f"layer {name!r}: Conv2d with groups={mod.groups} is not supported (its weight is "
            "block-diagonal across groups, so its block is not one Kronecker product of the "
            "unfolded input); leave it out with `layers=[...]`"
        )
    _conv_padding(mod)


def supported_layers(model: Any, layers: Iterable[str] | None = None) -> dict[str, Any]:
    """The layers :func:`collect` covers: ``{name: module}`` in ``model.named_modules()`` order.

    Every ``nn.Linear`` and ``nn.Conv2d`` whose weight requires a gradient, or exactly those
    named in ``layers`` (``KeyError`` for a name that is not a supported layer). A grouped
    convolution raises ``NotImplementedError``.

    Examples
    --------
    >>> import pytest; torch = pytest.importorskip("torch")
    >>> from torch import nn
    >>> from kronsum.adapters.torch import supported_layers
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    >>> list(supported_layers(model))
    ['0', '3']
    """
    _require_torch()
    wanted = None if layers is None else list(layers)
    found: dict[str, Any] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        if wanted is None and not mod.weight.requires_grad:
            continue
        if wanted is not None and name not in wanted:
            continue
        if isinstance(mod, nn.Conv2d):
            _check_conv(name, mod)
        found[name] = mod
    if wanted is not None:
        missing = [n for n in wanted if n not in found]
        if missing:
            raise KeyError(f"not a Linear or Conv2d layer of the model: {missing}")
    return found


def _unfold(mod: Any, x: Any) -> Any:
    """Patches of a Conv2d input: (N, T, in·kh·kw), channel-major like ``weight.reshape(out, -1)``."""
    padding = _conv_padding(mod)
    if mod.padding_mode != "zeros" and any(padding):
        x = _tF.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
        padding = (0, 0)
    cols = _tF.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=padding, stride=mod.stride)
    return cols.transpose(1, 2)


# -- loss ----------------------------------------------------------------------------------


def _loss_kind(loss_fn: Any) -> tuple[str, str]:
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0:
            raise NotImplementedError(
                "CrossEntropyLoss with class weights or label smoothing is not a plain "
                "negative log-likelihood; its Fisher is not supported"
            )
        kind = "ce"
    elif isinstance(loss_fn, nn.MSELoss):
        kind = "mse"
    else:
        raise TypeError(
            f"loss_fn must be torch.nn.CrossEntropyLoss or torch.nn.MSELoss, got "
            f"{type(loss_fn).__name__}"
        )
    if loss_fn.reduction not in ("sum", "mean"):
        raise ValueError(f"the loss's reduction must be 'sum' or 'mean', got {loss_fn.reduction!r}")
    return kind, loss_fn.reduction


def _output_grad_terms(kind, reduction, out, targets, fisher, n_samples, generator):
    """``[(V_s, w_s)]``: output gradients ``∇_f ℓ`` (N, D) and their weights (N,) per backward."""
    f = out.detach().reshape(out.shape[0], -1)
    N, D = f.shape
    c = 1.0 if reduction == "sum" else 1.0 / (N if kind == "ce" else N * D)
    ones = torch.ones(N, dtype=f.dtype, device=f.device)
    terms = []
    if kind == "ce":
        if out.ndim != 2:
            raise ValueError(f"CrossEntropyLoss: the model output must be (N, C), got {tuple(out.shape)}")
        p = torch.softmax(f, dim=1)
        eye = torch.eye(D, dtype=f.dtype, device=f.device)
        if fisher == "empirical":
            y = torch.as_tensor(targets, device=f.device)
            if y.shape != (N,) or y.is_floating_point():
                raise ValueError("CrossEntropyLoss: targets must be class indices of shape (N,)")
            terms.append((p - eye[y], c * ones))
        elif fisher == "mc":
            for _ in range(n_samples):
                y = torch.multinomial(p, 1, generator=generator).squeeze(-1)
                terms.append((p - eye[y], (c / n_samples) * ones))
        else:  # exact: Hessian diag(p) − p pᵀ = Σ_j p_j (e_j − p)(e_j − p)ᵀ
            for j in range(D):
                terms.append((p - eye[j], c * p[:, j]))
    else:
        if fisher == "empirical":
            y = torch.as_tensor(targets, dtype=f.dtype, device=f.device).reshape(N, -1)
            if y.shape != f.shape:
                raise ValueError(f"MSELoss: targets must have the output's shape {tuple(out.shape)}")
            terms.append((2.0 * (f - y), c * ones))
        elif fisher == "mc":  # y ~ N(f, I/2): ∇ℓ = 2(f − y) = −√2 ε
            for _ in range(n_samples):
                eps = torch.randn(f.shape, dtype=f.dtype, device=f.device, generator=generator)
                terms.append((math.sqrt(2.0) * eps, (c / n_samples) * ones))
        else:  # exact: Hessian 2I = Σ_j 2 e_j e_jᵀ
            eye = torch.eye(D, dtype=f.dtype, device=f.device)
            for j in range(D):
                terms.append((eye[j].expand(N, D), 2.0 * c * ones))
    return terms


def _check_finite(name: str, x: Any, what: str) -> None:
    if x.numel() and not all_finite(namespace(x), x):
        raise ValueError(f"layer {name!r}: its {what} hold NaN or inf")


# -- collect -------------------------------------------------------------------------------


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
    check_finite: bool = True,
) -> dict[str, KronSum]:
    r"""Per-layer Fisher blocks of ``loss_fn(model(inputs), targets)`` as ``{name: KronSum}``.

    Parameters
    ----------
    model : torch.nn.Module
        Called once as ``model(inputs)``; its output is ``(N, C)`` logits for cross-entropy or
        ``(N, ...)`` predictions for MSE. Train/eval mode is left as it is.
    loss_fn : torch.nn.CrossEntropyLoss or torch.nn.MSELoss
        With ``reduction="sum"`` or ``"mean"``; the reduction sets the weights (module docstring).
    inputs : tensor
        One batch, ``N`` samples.
    targets : tensor, optional
        Class indices ``(N,)`` or regression targets; needed only for ``fisher="empirical"``.
    fisher : {"mc", "empirical", "exact"}
        ``"mc"``: ``n_samples`` labels drawn from the model's predictive distribution (weights
        ``1/n_samples``). ``"empirical"``: the given labels. ``"exact"``: every class weighted by
        its predicted probability (cross-entropy), every output with the Hessian ``2I`` (MSE) —
        the exact Fisher (= generalised Gauss-Newton) block.
    n_samples : int
        Monte-Carlo samples per input for ``fisher="mc"``.
    generator : torch.Generator, optional
        Random source of ``fisher="mc"``.
    layers : iterable of str, optional
        Names (as in ``model.named_modules()``) of the layers to cover; default every
        ``nn.Linear`` and ``nn.Conv2d`` whose weight requires a gradient.
    weight_sharing : {"expand", "sample"}
        For an ``nn.Linear`` applied to inputs ``(N, ..., d)``: ``"expand"`` (default) flattens the
        extra axes into the batch, one outer-form term per position (exact when every position is
        its own loss term, as for a position-wise network); ``"sample"`` keeps them as the
        positions of the conv form, one term ``vec(∇W_n)vec(∇W_n)ᵀ`` per sample, the exact
        per-sample Fisher. Both give the same :func:`~kronsum.kfac`. Conv2d layers always use
        the conv form. Ignored for 2-D inputs.
    check_finite : bool
        Raise ``ValueError`` when an input or output gradient of a layer holds NaN or inf
        (one sum per array; an entry-wise check only when a sum is not finite).

    Returns
    -------
    dict of str to KronSum
        ``from_outer`` (Linear) or ``from_conv`` (Conv2d, and Linear with ``"sample"``), with
        ``m = out_features`` / ``out_channels`` and ``n = in_features`` / ``in·kh·kw``, plus one
        for a bias; ``num_terms`` is ``N`` times the number of backward passes (times the
        positions for ``"expand"``). Tensors on the model's device, in its dtype.

    Notes
    -----
    Cost: one forward pass, then one backward pass per gradient term (1 for ``"empirical"``,
    ``n_samples`` for ``"mc"``, ``C`` for ``"exact"``) that stops at the first covered layer and
    computes no weight gradient. The inputs are kept once per backward pass (repeated for the
    ``K = N·passes`` terms). A layer called twice in one forward pass raises ``RuntimeError``.

    Examples
    --------
    >>> import pytest; torch = pytest.importorskip("torch")
    >>> from kronsum.adapters.torch import collect
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Flatten(),
    ...                           torch.nn.Linear(2 * 4 * 4, 3, bias=False))
    >>> blocks = collect(net, torch.nn.CrossEntropyLoss(), torch.randn(5, 1, 4, 4), fisher="mc")
    >>> blocks["0"]
    KronSum(form='conv', K=5, T=16, m=2, n=10, dtype=torch.float32)
    """
    _require_torch()
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
    if weight_sharing not in _SHARING:
        raise ValueError(f"weight_sharing must be one of {_SHARING}, got {weight_sharing!r}")
    if fisher == "mc" and (int(n_samples) != n_samples or n_samples < 1):
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if fisher == "empirical" and targets is None:
        raise ValueError("fisher='empirical' needs the targets")
    kind, reduction = _loss_kind(loss_fn)
    mods = supported_layers(model, layers)
    if not mods:
        raise ValueError("the model has no Linear or Conv2d layer to cover")

    records: dict[str, tuple[Any, Any]] = {}

    def make_hook(name):
        def hook(mod, args, output):
            if name in records:
                raise RuntimeError(
                    f"layer {name!r} ran twice in one forward pass; a layer reused within a pass "
                    "is not supported"
                )
            eps = torch.zeros_like(output, requires_grad=True)
            records[name] = (args[0].detach(), eps)
            return output + eps

        return hook

    handles = [mod.register_forward_hook(make_hook(name)) for name, mod in mods.items()]
    try:
        with torch.enable_grad():
            out = model(inputs)
    finally:
        for h in handles:
            h.remove()
    not_run = [name for name in mods if name not in records]
    if not_run:
        raise RuntimeError(f"layers not called in the forward pass: {not_run}")

    names = list(mods)
    perturbations = [records[name][1] for name in names]
    terms = _output_grad_terms(kind, reduction, out, targets, fisher, n_samples, generator)
    grads: dict[str, list[Any]] = {name: [] for name in names}
    for s, (V, _) in enumerate(terms):
        gs = torch.autograd.grad(
            out, perturbations, grad_outputs=V.reshape(out.shape).to(out.dtype),
            retain_graph=s < len(terms) - 1, allow_unused=True,
        )
        for name, g, eps in zip(names, gs, perturbations):
            grads[name].append(torch.zeros_like(eps) if g is None else g)
    del out, perturbations
    w = torch.cat([wt for _, wt in terms])
    S = len(terms)

    result: dict[str, KronSum] = {}
    for name, mod in mods.items():
        x = records[name][0]
        if isinstance(mod, nn.Conv2d):
            A = _unfold(mod, x)  # (N, T, in·kh·kw)
            Gs = [g.flatten(2).transpose(1, 2) for g in grads[name]]  # (N, T, out) each
        else:
            A = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, T, in)
            Gs = [g.reshape(g.shape[0], -1, g.shape[-1]) for g in grads[name]]
        G = Gs[0] if S == 1 else torch.cat(Gs)  # (S·N, T, out)
        if mod.bias is not None:  # one copy: the inputs and a last column of ones
            A = _tF.pad(A, (0, 1), value=1.0)
        if S > 1:
            A = A.repeat(S, 1, 1)
        if check_finite:
            _check_finite(name, x, "inputs")
            _check_finite(name, G, "output gradients")
        wl = w.to(dtype=A.dtype)
        T = A.shape[1]
        if isinstance(mod, nn.Conv2d) or (weight_sharing == "sample" and x.ndim > 2):
            result[name] = KronSum.from_conv(G, A, wl, check_finite=False)
        else:
            if T > 1:
                wl = wl.repeat_interleave(T)
            result[name] = KronSum.from_outer(
                G.reshape(-1, G.shape[-1]), A.reshape(-1, A.shape[-1]), wl, check_finite=False
            )
    return result


# -- precondition --------------------------------------------------------------------------


def _damped_kron_solve_exact(est: Kron, V: Any, damping: float) -> Any:
    """``(scale·L ⊗ R + λI)⁻¹ vec(V)`` by eigendecompositions of the symmetric factors."""
    a, UL = torch.linalg.eigh(est.left)
    b, UR = torch.linalg.eigh(est.right)
    core = (UL.mT @ V @ UR) / (est.scale * a[:, None] * b[None, :] + damping)
    return UL @ core @ UR.mT


def _solve(est: Kron, V: Any, damping: float, method: str) -> Any:
    if hasattr(Kron, "solve"):
        return est.solve(V, damping, method=method)
    if method != "exact":  # pragma: no cover - only before Kron.solve exists
        raise NotImplementedError(f"method={method!r} needs Kron.solve; only 'exact' is available")
    return _damped_kron_solve_exact(est, V, damping)


def precondition(model: Any, estimates: Mapping[str, Kron], damping: float, *,
                 method: str = "exact") -> None:
    r"""Replace each covered layer's gradient by ``(scale·L ⊗ R + λI)⁻¹ vec(∇W)``, in place.

    For every ``name, est`` in ``estimates`` the layer ``model.get_submodule(name)`` has its
    weight gradient viewed ``(out, in·kh·kw)``, with ``bias.grad`` as an extra last column when
    the layer has a bias, solved against the damped Kronecker product and written back to
    ``weight.grad`` and ``bias.grad``. Parameters of layers not in ``estimates`` are untouched.

    Parameters
    ----------
    model : torch.nn.Module
        After ``loss.backward()``: the covered weights must have a ``.grad``.
    estimates : mapping of str to Kron
        E.g. ``{name: kronsum.kfac(F) for name, F in collect(...).items()}``.
    damping : float
        ``λ > 0`` (or ``≥ 0`` when the estimate is positive definite).
    method : str
        Passed to ``Kron.solve`` (``"exact"``, ``"factored"``, ``"tkfac"``); without
        ``Kron.solve`` only ``"exact"``, by eigendecompositions of the factors.

    Raises
    ------
    TypeError, ValueError
        For an estimate that is not a :class:`~kronsum.Kron`, a name that is no submodule or
        a layer without a weight, a missing gradient, mismatched sizes, a bad ``damping``, or
        a damped matrix that cannot be solved. Every layer is checked and solved before any
        gradient is written, so an error leaves all gradients as they were.

    Examples
    --------
    >>> import pytest; torch = pytest.importorskip("torch")
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
    # every check and every solve first, the writes last: a bad estimate of any layer leaves
    # all gradients as they were
    plans = []
    for name, est in estimates.items():
        if not isinstance(est, Kron):
            raise TypeError(
                f"estimates[{name!r}] must be a Kron (e.g. kronsum.kfac(F)), got {type(est).__name__}"
            )
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"estimates[{name!r}]: the model has no submodule {name!r}") from None
        W, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
        if not isinstance(W, torch.Tensor):
            raise ValueError(
                f"estimates[{name!r}]: layer {name!r} ({type(mod).__name__}) has no weight tensor; "
                f"precondition covers layers with a weight (e.g. Linear, Conv2d)"
            )
        if W.grad is None:
            raise ValueError(f"layer {name!r} has no weight.grad: call loss.backward() first")
        if b is not None and not isinstance(b, torch.Tensor):
            b = None
        gw = W.grad.reshape(W.shape[0], -1)
        cols = gw.shape[1]
        if b is not None:
            gb = b.grad if b.grad is not None else torch.zeros_like(b)
            V = torch.cat([gw, gb.reshape(-1, 1)], dim=1)
        else:
            V = gw
        if (est.m, est.n) != tuple(V.shape):
            raise ValueError(
                f"layer {name!r}: the estimate is for a ({est.m}, {est.n}) weight, the gradient "
                f"(with bias column) is {tuple(V.shape)}"
            )
        plans.append((W, b, cols, est, V))
    solved = [(W, b, cols, _solve(est, V.to(est.dtype), damping, method)) for W, b, cols, est, V in plans]
    with torch.no_grad():
        for W, b, cols, P in solved:
            W.grad.copy_(P[:, :cols].reshape(W.shape))
            if b is not None:
                if b.grad is None:
                    b.grad = P[:, cols].clone().to(b.dtype)
                else:
                    b.grad.copy_(P[:, cols])
