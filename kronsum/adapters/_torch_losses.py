r"""The losses the PyTorch adapter knows: output gradients and weights of each backward pass.

A loss of the model output ``f`` (``N`` samples, each with ``P`` positions of ``D`` outputs) is a
sum of negative log-likelihoods ``ℓ_{n,t}``; its Fisher is ``Σ_s w_s Σ_n ∇_θ(v_{s,n}ᵀ f_n)
∇_θ(v_{s,n}ᵀ f_n)ᵀ`` over *terms* ``s``, each one backward pass with output gradients ``v_s``
(same shape as ``f``) and one weight ``w_s`` for all samples (so that a layer whose first axis
is not the batch, e.g. a sequence-first one, still gets the right weights):

* cross-entropy: ``"empirical"`` ``v = p − e_y`` (the given labels); ``"mc"`` the same with labels
  drawn from ``p`` independently per sample and position; ``"exact"`` one term per class ``j``
  with ``v = √p_j (p − e_j)`` (``P = 1``), and with several positions one term per class and
  position, ``v = √p_{t,j}(p_t − e_j)`` at position ``t`` and zero elsewhere — the positions' Hessians
  ``diag(p_t) − p_t p_tᵀ`` stay separate, so the block is exact for any network, at ``C·P``
  backward passes. Targets equal to ``ignore_index`` zero their position's output gradients
  (all types: the block is that of the batch without them); ``"mean"`` divides by the number
  of positions kept, as PyTorch does.
* binary cross-entropy with logits (``ℓ = −Σ_j y_j log σ(f_j) + (1 − y_j) log(1 − σ(f_j))``,
  independent Bernoulli outputs): ``"empirical"`` ``v = σ(f) − y``; ``"mc"`` the same with
  ``y ~ Bernoulli(σ(f))``; ``"exact"`` one term per output entry ``j`` with
  ``v = √(σ_j(1 − σ_j)) e_j`` (the Hessian ``diag(σ(1 − σ))``); ``"mean"`` divides by ``N·D``.
* MSE (``ℓ = ‖f − y‖²``, the Gaussian ``N(f, I/2)`` up to a constant): ``"empirical"``
  ``v = 2(f − y)``; ``"mc"`` ``v = √2 ε``; ``"exact"`` one term per output entry with weight 2
  (the Hessian ``2I``); ``"mean"`` divides by ``N·D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

try:
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - depends on the environment
    torch = None  # type: ignore[assignment]
    nn = None  # type: ignore[assignment]

from .._compat import all_finite, namespace
from ._torch_layers import _keeps_forward


class NegativeLogLikelihood:
    r"""Base class for a custom loss that :func:`~kronsum.adapters.torch.collect` (and the
    :class:`~kronsum.adapters.torch.Preconditioner`) can take: a negative log-likelihood
    ``ℓ_n = −log p(y_n | f_n)`` of each sample's model output ``f_n``.

    Subclass it and implement

    * ``nll(output, targets)``: the ``(N,)`` per-sample negative log-likelihoods, differentiable
      in ``output`` (summed over a sample's outputs and positions);
    * ``sample(output, generator)``: targets drawn from ``p(· | f_n)`` for every sample (needed
      by ``fisher="mc"``; ``generator`` is the one given to ``collect``, possibly ``None``);
    * ``fisher_sqrt(output)`` (optional, for ``fisher="exact"``): a tensor ``V`` of shape
      ``(S, *output.shape)`` with ``Σ_s v_{s,n} v_{s,n}ᵀ = E_{y∼p(·|f_n)}[∇_f ℓ_n ∇_f ℓ_nᵀ]``, the
      Fisher of ``ℓ_n`` with respect to ``f_n`` (for an exponential family in its natural
      parameters, the Hessian of ``ℓ_n``).

    The block is then ``F = c Σ_n E[∇_θ ℓ_n ∇_θ ℓ_nᵀ]`` with ``c = 1`` for ``reduction="sum"``
    and ``1/N`` for ``"mean"``: the output gradients of each backward pass are ``∇_f ℓ_n`` at the
    given targets (``"empirical"``), at ``n_samples`` draws of ``sample`` (``"mc"``, weights
    ``c/n_samples``), or the columns of ``fisher_sqrt`` (``"exact"``). Calling the object returns
    the reduced loss, so the same object trains the model.

    Examples
    --------
    A Poisson regression on log-rates ``f``: ``ℓ = e^f − y f`` (up to ``log y!``), whose Fisher
    with respect to ``f`` is ``diag(e^f)``.

    >>> import torch
    >>> from kronsum.adapters.torch import NegativeLogLikelihood, collect
    >>> class PoissonNLL(NegativeLogLikelihood):
    ...     def nll(self, output, targets):
    ...         return (torch.exp(output) - targets * output).sum(dim=1)
    ...     def sample(self, output, generator):
    ...         return torch.poisson(torch.exp(output), generator=generator)
    ...     def fisher_sqrt(self, output):
    ...         D = output.shape[1]
    ...         return torch.exp(output / 2)[None] * torch.eye(D, dtype=output.dtype)[:, None, :]
    >>> net = torch.nn.Linear(3, 2)
    >>> blocks = collect(net, PoissonNLL(), torch.randn(8, 3), fisher="exact")
    >>> blocks[""]
    KronSum(form='outer', K=16, m=2, n=4, dtype=torch.float32)
    """

    reduction: str = "sum"

    def __init__(self, reduction: str = "sum"):
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def nll(self, output: Any, targets: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement nll(output, targets)")

    def sample(self, output: Any, generator: Any) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} implements no sample(output, generator): fisher='mc' needs it")

    def fisher_sqrt(self, output: Any) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} implements no fisher_sqrt(output): fisher='exact' needs it")

    def __call__(self, output: Any, targets: Any) -> Any:
        total = self.nll(output, targets).sum()
        return total if self.reduction == "sum" else total / output.shape[0]


@dataclass(frozen=True)
class LossSpec:
    kind: str  # "ce", "mse", "bce" or "custom"
    reduction: str  # "sum" or "mean"
    ignore_index: int | None = None
    nll: Any = None  # the NegativeLogLikelihood (kind "custom")


def loss_spec(loss_fn: Any) -> LossSpec:
    """The kind and reduction of ``loss_fn``; ``TypeError``/``ValueError``/``NotImplementedError``
    for a loss that is not a plain negative log-likelihood kronsum knows."""
    if isinstance(loss_fn, NegativeLogLikelihood):
        if loss_fn.reduction not in ("sum", "mean"):
            raise ValueError(f"the loss's reduction must be 'sum' or 'mean', got {loss_fn.reduction!r}")
        return LossSpec("custom", loss_fn.reduction, None, loss_fn)
    for base in (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss):
        if isinstance(loss_fn, base) and not _keeps_forward(loss_fn, (base,)):
            raise TypeError(
                f"loss_fn is a {type(loss_fn).__name__}, a subclass of {base.__name__} with its own "
                "forward: kronsum cannot know its negative log-likelihood (a temperature or a "
                "factor changes the Fisher); wrap it as a kronsum.adapters.torch."
                "NegativeLogLikelihood, or use the plain loss")
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0:
            raise NotImplementedError(
                "CrossEntropyLoss with class weights or label smoothing is not a plain "
                "negative log-likelihood; its Fisher is not supported"
            )
        kind, ignore = "ce", loss_fn.ignore_index
    elif isinstance(loss_fn, nn.MSELoss):
        kind, ignore = "mse", None
    elif isinstance(loss_fn, nn.BCEWithLogitsLoss):
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            raise NotImplementedError(
                "BCEWithLogitsLoss with weight or pos_weight is not a plain negative "
                "log-likelihood; its Fisher is not supported"
            )
        kind, ignore = "bce", None
    else:
        raise TypeError(
            f"loss_fn must be torch.nn.CrossEntropyLoss, torch.nn.MSELoss, "
            f"torch.nn.BCEWithLogitsLoss or a kronsum.adapters.torch.NegativeLogLikelihood, "
            f"got {type(loss_fn).__name__}"
        )
    if loss_fn.reduction not in ("sum", "mean"):
        raise ValueError(f"the loss's reduction must be 'sum' or 'mean', got {loss_fn.reduction!r}")
    return LossSpec(kind, loss_fn.reduction, ignore)


def _class_targets(targets: Any, shape: tuple, C: int, ignore: int, device: Any,
                   class_dim: int) -> tuple:
    """``(y, ignored)``: ``targets`` as a ``(N, P)`` int64 tensor after checking dtype, shape
    and range, and whether any of them is ``ignore`` (one host read for both)."""
    y = torch.as_tensor(targets, device=device)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(
            f"CrossEntropyLoss: targets must be integer class indices, got dtype {y.dtype} "
            "(class probabilities are not supported)"
        )
    if tuple(y.shape) != shape:
        raise ValueError(
            f"CrossEntropyLoss: targets must have shape {shape} (the output without its class "
            f"axis, class_dim={class_dim}), got {tuple(y.shape)}"
        )
    y = y.reshape(shape[0], -1).to(torch.int64)
    skip = y == ignore
    bad = ((y < 0) | (y >= C)) & ~skip
    any_bad, any_skip = torch.stack((bad.any(), skip.any())).tolist()
    if any_bad:
        value = int(y[bad][0])
        raise ValueError(
            f"CrossEntropyLoss: targets must be class indices in [0, {C}) or ignore_index="
            f"{ignore}; got {value}"
        )
    return y, bool(any_skip)


def output_grad_terms(spec: LossSpec, out: Any, targets: Any, fisher: str, n_samples: int,
                      generator: Any, class_dim: int, check_finite: bool) -> list:
    """``[(v_s, w_s)]``: output gradients shaped like ``out`` and each term's weight (a float)."""
    f = out.detach()
    N = f.shape[0]
    if check_finite and f.numel() and not all_finite(namespace(f), f):
        raise ValueError("the model's outputs hold NaN or inf")
    if spec.kind == "custom":
        return _custom_terms(spec, f, targets, fisher, n_samples, generator)
    if spec.kind != "ce":
        return _elementwise_terms(spec, f, targets, fisher, n_samples, generator)
    if f.ndim < 2:
        raise ValueError(
            f"CrossEntropyLoss: the model output must be (N, C) or (N, C, ...) logits, got "
            f"{tuple(f.shape)}"
        )
    cd = class_dim % f.ndim
    if cd == 0:
        raise ValueError("class_dim must not be the batch axis 0")
    fc = torch.movedim(f, cd, -1)  # (N, ..., C)
    pos_shape = tuple(fc.shape[:-1])
    C = fc.shape[-1]
    fc = fc.reshape(N, -1, C)  # (N, P, C)
    P = fc.shape[1]
    keep = torch.ones(N, P, dtype=f.dtype, device=f.device)
    kept = float(N * P)
    y = None
    if targets is not None:
        y, ignored = _class_targets(targets, pos_shape, C, spec.ignore_index, f.device, class_dim)
        if ignored:  # the ignored positions weigh 0 (and draw class 0 as a placeholder)
            keep = (y != spec.ignore_index).to(f.dtype)
            y = torch.where(y == spec.ignore_index, torch.zeros_like(y), y)
            kept = float(keep.sum())
    if kept == 0:
        raise ValueError("CrossEntropyLoss: every target equals ignore_index; the loss is empty")
    c = 1.0 if spec.reduction == "sum" else 1.0 / kept
    p = torch.softmax(fc, dim=-1)
    eye = torch.eye(C, dtype=f.dtype, device=f.device)

    def back(V):  # (N, P, C) -> out's layout
        return torch.movedim(V.reshape(pos_shape + (C,)), -1, cd)

    terms = []
    if fisher == "empirical":
        terms.append((back((p - eye[y]) * keep[..., None]), c))
    elif fisher == "mc":
        for _ in range(n_samples):
            draw = torch.multinomial(p.reshape(-1, C), 1, generator=generator).reshape(N, P)
            terms.append((back((p - eye[draw]) * keep[..., None]), c / n_samples))
    elif P == 1:  # exact, Hessian diag(p) − p pᵀ = Σ_j p_j (e_j − p)(e_j − p)ᵀ
        for j in range(C):
            terms.append((back(torch.sqrt(p[..., j:j + 1] * keep[..., None]) * (p - eye[j])), c))
    else:  # exact, one pass per class and position
        for t in range(P):
            for j in range(C):
                V = torch.zeros_like(p)
                V[:, t] = torch.sqrt(p[:, t, j] * keep[:, t])[:, None] * (p[:, t] - eye[j])
                terms.append((back(V), c))
    return terms


def _elementwise_terms(spec, f, targets, fisher, n_samples, generator):
    """MSE and binary cross-entropy: every output entry is its own likelihood."""
    N = f.shape[0]
    D = math.prod(f.shape[1:])
    c = 1.0 if spec.reduction == "sum" else 1.0 / (N * D)
    name = "MSELoss" if spec.kind == "mse" else "BCEWithLogitsLoss"
    mean = f if spec.kind == "mse" else torch.sigmoid(f)
    terms = []
    if targets is not None:  # checked for every Fisher type, used by the empirical one
        y = torch.as_tensor(targets, device=f.device)
        if tuple(y.shape) != tuple(f.shape) and (y.numel() != f.numel() or y.ndim == 0
                                                 or y.shape[0] != N):
            raise ValueError(
                f"{name}: targets must have the output's shape {tuple(f.shape)}, got "
                f"{tuple(y.shape)}"
            )
        if not (y.is_floating_point() or y.dtype in (torch.int32, torch.int64, torch.bool)):
            raise ValueError(f"{name}: targets must be real numbers, got dtype {y.dtype}")
        y = y.to(f.dtype).reshape(f.shape)
        if spec.kind == "bce" and bool(((y < 0) | (y > 1)).any()):
            raise ValueError(f"{name}: targets must lie in [0, 1]")
    if fisher == "empirical":
        if targets is None:
            raise ValueError(f"{name}: fisher='empirical' needs the targets")
        terms.append(((2.0 if spec.kind == "mse" else 1.0) * (mean - y), c))
    elif fisher == "mc":
        for _ in range(n_samples):
            if spec.kind == "mse":  # y ~ N(f, I/2): ∇ℓ = 2(f − y) = −√2 ε
                eps = torch.randn(f.shape, dtype=f.dtype, device=f.device, generator=generator)
                terms.append((math.sqrt(2.0) * eps, c / n_samples))
            else:
                y = torch.bernoulli(mean, generator=generator)
                terms.append((mean - y, c / n_samples))
    else:  # exact: Hessian 2I (MSE) or diag(σ(1 − σ)) (BCE), one entry per pass
        flat = mean.reshape(N, D)
        for j in range(D):
            V = torch.zeros_like(flat)
            V[:, j] = math.sqrt(2.0) if spec.kind == "mse" else torch.sqrt(flat[:, j] * (1 - flat[:, j]))
            terms.append((V.reshape(f.shape), c))
    return terms


def _custom_terms(spec: LossSpec, f: Any, targets: Any, fisher: str, n_samples: int,
                  generator: Any) -> list:
    """The terms of a :class:`NegativeLogLikelihood` (see its docstring)."""
    nll, N = spec.nll, f.shape[0]
    name = type(nll).__name__
    c = 1.0 if spec.reduction == "sum" else 1.0 / N
    if fisher == "exact":
        V = nll.fisher_sqrt(f)
        if not isinstance(V, torch.Tensor) or V.ndim != f.ndim + 1 or tuple(V.shape[1:]) != tuple(f.shape):
            raise ValueError(f"{name}.fisher_sqrt must return a tensor of shape (S, *output.shape) = "
                             f"(S, {', '.join(map(str, f.shape))}), got "
                             f"{tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__}")
        return [(V[s].to(f.dtype), c) for s in range(V.shape[0])]
    if fisher == "empirical":
        draws, w = [targets], c
    else:
        draws, w = [nll.sample(f, generator) for _ in range(n_samples)], c / n_samples
    terms = []
    for y in draws:
        fr = f.detach().requires_grad_(True)
        with torch.enable_grad():
            ell = nll.nll(fr, y)
        if not isinstance(ell, torch.Tensor) or tuple(ell.shape) != (N,):
            raise ValueError(f"{name}.nll must return the per-sample losses, shape ({N},), got "
                             f"{tuple(ell.shape) if isinstance(ell, torch.Tensor) else type(ell).__name__}")
        (v,) = torch.autograd.grad(ell.sum(), fr)
        terms.append((v, w))
    return terms
