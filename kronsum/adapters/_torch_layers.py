r"""The layers the PyTorch adapter covers: which blocks each gives, and their statistics.

A *block* is one weight matrix ``W`` (``m × n``, gradient-side × activation-side) whose
per-sample gradient is ``Σ_t g_t a_tᵀ`` over the positions ``t`` of one sample: the layer's
output gradients ``g_t`` (``m``) and inputs ``a_t`` (``n``, a last ``1`` for a bias). A
:class:`BlockSpec` says which parameter entries a block covers, so that ``precondition`` can read
and write them; a :class:`Capture` holds, for one forward pass, the inputs ``A`` (N, T, n) and the
zero perturbation whose gradient gives ``G`` (N, T, m).

Rules by module type (first match in :data:`_RULES`, user rules first):

* ``nn.Linear``: one block, ``W`` as stored ``(out, in)``; inputs ``(N, ..., in)`` give
  ``T = ∏ ...`` positions.
* ``nn.Conv1d/2d/3d``: the weight ``(out, in/groups, k…)`` viewed ``(out, in/groups·∏k)``; with
  ``groups = 1`` one block named like the layer; with ``groups > 1`` (depthwise included) one
  block per group, ``"{name}[g]"``, over the rows ``g·out/groups …`` and that group's input
  channels (the weight is block-diagonal across groups, so each group is its own matrix; the
  Fisher's coupling between groups is not kept). Any stride, padding (``"same"`` included),
  dilation and padding mode.
* ``nn.Embedding``: the weight ``(num, dim)`` is the transpose of a linear map of one-hot inputs,
  so its block is for ``Wᵀ`` (``dim × num``): output gradients ⊗ one-hot indices (the
  ``padding_idx`` row gets no gradient, so its one-hot column is zero). ``num × num`` factors.
* Normalisation layers with affine parameters (``LayerNorm``, ``BatchNorm1d/2d/3d``,
  ``GroupNorm``, ``InstanceNorm1d/2d/3d``, ``RMSNorm``): ``y = γ ∘ x̂ + β`` per channel ``c``
  (``x̂`` the normalised input), so the per-sample gradient of ``W = [γ β]`` (``C × 2``) is
  ``[Σ_t g_t ∘ x̂_t, Σ_t g_t] = G_nᵀ A_n`` with ``G_n`` the two rows ``Σ_t g_t ∘ x̂_t`` and
  ``Σ_t g_t`` and ``A_n = I₂``: an exact conv-form block with two "positions" (one column and
  ``A_n = 1`` without ``β``). ``x̂`` is recomputed with the layer's own statistics (running
  ones for an eval-mode BatchNorm; the batch's in train mode, where the samples are coupled).
* ``nn.MultiheadAttention``: the projections are computed as explicit linear maps (the module's
  own function is replaced during the pass by an equal one with perturbations). The out
  projection is ``"{name}.out_proj"``. A packed in-projection (``in_proj_weight``, ``3E × E``) fed
  one tensor as query, key and value (self-attention) *is* a linear layer ``E → 3E`` of that
  tensor: one block ``"{name}.in_proj"`` with ``m = 3E``, which keeps the coupling of q, k and v.
  Fed different tensors (cross-attention) it is three maps of three inputs: blocks
  ``"{name}.in_proj[q]"``, ``"[k]"``, ``"[v]"`` over its row thirds. Separate projection weights
  (``kdim``/``vdim`` set) give ``"{name}.q_proj"``, ``".k_proj"``, ``".v_proj"``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

try:
    import torch
    import torch.nn.functional as _tF
    from torch import nn
except ImportError:  # pragma: no cover - depends on the environment
    torch = None  # type: ignore[assignment]
    nn = None  # type: ignore[assignment]


@dataclass(frozen=True)
class BlockSpec:
    """Which entries of which parameters one block covers.

    The block's ``(m, n)`` matrix is ``weight[rows]`` viewed ``(m, -1)`` (transposed first when
    ``transpose``), then ``bias[bias_rows]`` as a last column when there is a bias
    (``bias_rows`` defaults to ``rows``; ``None`` means all rows).
    """

    key: str
    module: str
    weight: str
    bias: str | None = None
    rows: tuple[int, int] | None = None
    transpose: bool = False
    bias_rows: tuple[int, int] | None = None
    vector: bool = False  # the weight is a vector viewed as one column (m, 1)

    def bias_slice(self) -> tuple[int, int] | None:
        return self.bias_rows if self.bias_rows is not None else self.rows


@dataclass
class Capture:
    """One block's statistics of one forward pass: ``A`` (N, T, n) and the output perturbation."""

    spec: BlockSpec
    A: Any
    eps: Any
    to_G: Callable[[Any], Any]  # gradient of eps -> (N, T, m)
    conv: bool  # True: always the conv form (per-sample matrices), False: expand or sample
    exact: bool = False  # the positions are not weight sharing: always the conv form, never reduced


@dataclass
class LayerRule:
    """How a module type is covered: its blocks and a forward hook that records captures.

    ``specs(name, mod)`` lists every block key the module can give (for ``precondition``);
    ``install(name, mod, record)`` registers hooks that call ``record(Capture)`` during a
    forward pass and returns their handles.
    """

    types: tuple
    specs: Callable[[str, Any], list]
    install: Callable[[str, Any, Callable], list]
    params: tuple = ("weight", "bias")


def _join(name: str, attr: str) -> str:
    return f"{name}.{attr}" if name else attr


def perturbation(y: Any) -> Any:
    """A zero the size of ``y`` to add to it, whose gradient is ``y``'s output gradient: one
    scalar leaf expanded (no memory of ``y``'s size; ``autograd.grad`` with respect to the
    expanded view returns the full gradient)."""
    return torch.zeros((), dtype=y.dtype, device=y.device, requires_grad=True).expand(y.shape)


def _with_ones(A: Any) -> Any:
    return _tF.pad(A, (0, 1), value=1.0)


def _trainable(mod: Any, attr: str) -> bool:
    p = getattr(mod, attr, None)
    return isinstance(p, torch.nn.Parameter) and p.requires_grad


# -- Linear ----------------------------------------------------------------------------------


def _linear_specs(name, mod):
    bias = _join(name, "bias") if _trainable(mod, "bias") else None
    return [BlockSpec(name, name, _join(name, "weight"), bias)]


def _linear_capture(spec: BlockSpec, x: Any, y: Any, has_bias: bool) -> tuple[Any, Capture]:
    """Perturb ``y = linear(x)`` (``(..., m)``) and record ``x`` (``(..., n)``) as ``(N, T, n)``."""
    eps = perturbation(y)
    N = x.shape[0]
    A = x.detach().reshape(N, -1, x.shape[-1])
    if has_bias:
        A = _with_ones(A)
    cap = Capture(spec, A, eps, lambda g: g.reshape(N, -1, g.shape[-1]), conv=False)
    return y + eps, cap


def _linear_install(name, mod, record):
    spec = _linear_specs(name, mod)[0]

    def hook(m, args, out):
        y, cap = _linear_capture(spec, args[0], out, spec.bias is not None)
        record(cap)
        return y

    return [mod.register_forward_hook(hook)]


# -- convolutions ----------------------------------------------------------------------------


def conv_padding(mod: Any) -> list[tuple[int, int]]:
    """``[(before, after)]`` per spatial axis, as PyTorch pads (``"same"``: the extra one after)."""
    d = len(mod.kernel_size)
    p = mod.padding
    if isinstance(p, str):
        if p == "valid":
            return [(0, 0)] * d
        out = []
        for k, dil in zip(mod.kernel_size, mod.dilation):
            total = dil * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(int(q), int(q)) for q in p]


def unfold(mod: Any, x: Any) -> Any:
    """Patches of a ``ConvNd`` input ``(N, C, *spatial)``: ``(N, T, C·∏k)``, channel-major like
    ``weight.reshape(out, -1)``, for any stride, padding, dilation and padding mode."""
    d = len(mod.kernel_size)
    pads = conv_padding(mod)
    flat = [v for before, after in reversed(pads) for v in (before, after)]
    if any(flat):
        mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
        x = _tF.pad(x, flat, mode=mode)
    for i in range(d):
        k, s, dil = mod.kernel_size[i], mod.stride[i], mod.dilation[i]
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)
        if dil > 1:
            x = x[..., ::dil]
    N, C = x.shape[:2]
    T = math.prod(x.shape[2:2 + d])
    x = x.permute(0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))  # (N, o…, C, k…)
    return x.reshape(N, T, C * math.prod(mod.kernel_size))


def _conv_specs(name, mod):
    has_bias = _trainable(mod, "bias")
    g = mod.groups
    if g == 1:
        return [BlockSpec(name, name, _join(name, "weight"), _join(name, "bias") if has_bias else None)]
    og = mod.out_channels // g
    return [
        BlockSpec(f"{name}[{i}]", name, _join(name, "weight"),
                  _join(name, "bias") if has_bias else None, rows=(i * og, (i + 1) * og))
        for i in range(g)
    ]


def _conv_install(name, mod, record):
    specs = _conv_specs(name, mod)

    def hook(m, args, out):
        eps = perturbation(out)
        A = unfold(m, args[0].detach())  # (N, T, in·∏k)
        N, T, n = A.shape
        ig = n // m.groups
        for i, spec in enumerate(specs):
            Ai = A if m.groups == 1 else A[:, :, i * ig:(i + 1) * ig]
            if spec.bias is not None:
                Ai = _with_ones(Ai)
            r0, r1 = spec.rows or (0, out.shape[1])

            def to_G(g, r0=r0, r1=r1):
                return g[:, r0:r1].flatten(2).transpose(1, 2)

            record(Capture(spec, Ai, eps, to_G, conv=True))
        return out + eps

    return [mod.register_forward_hook(hook)]


# -- Embedding -------------------------------------------------------------------------------


def _embedding_specs(name, mod):
    return [BlockSpec(name, name, _join(name, "weight"), transpose=True)]


def _embedding_install(name, mod, record):
    if mod.max_norm is not None:
        raise NotImplementedError(
            f"layer {name!r}: Embedding with max_norm rescales its weight in the forward pass; "
            "its Fisher block is not supported (leave it out with `layers=[...]`)"
        )
    if mod.scale_grad_by_freq:
        raise NotImplementedError(
            f"layer {name!r}: Embedding with scale_grad_by_freq divides each row's gradient by "
            "its count in the batch, which is not a per-sample gradient; its Fisher block is not "
            "supported (leave it out with `layers=[...]`)"
        )
    spec = _embedding_specs(name, mod)[0]

    def hook(m, args, out):
        idx = args[0]
        eps = perturbation(out)
        N = idx.shape[0]
        A = _tF.one_hot(idx.reshape(N, -1), m.num_embeddings).to(out.dtype)
        if m.padding_idx is not None:
            A[..., m.padding_idx] = 0
        record(Capture(spec, A, eps, lambda g: g.reshape(N, -1, g.shape[-1]), conv=False))
        return out + eps

    return [mod.register_forward_hook(hook)]


# -- normalisation layers ---------------------------------------------------------------------


def _norm_specs(name, mod):
    bias = _join(name, "bias") if _trainable(mod, "bias") else None
    return [BlockSpec(name, name, _join(name, "weight"), bias, vector=True)]


def _normalised(mod: Any, x: Any) -> tuple[Any, int]:
    """``(x̂, channel axis)``: the layer's input normalised as the layer does, before its affine map."""
    if isinstance(mod, nn.LayerNorm):
        return _tF.layer_norm(x, mod.normalized_shape, None, None, mod.eps), -1
    if isinstance(mod, nn.GroupNorm):
        return _tF.group_norm(x, mod.num_groups, None, None, mod.eps), 1
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        running = not mod.training and mod.track_running_stats
        return _tF.batch_norm(x, mod.running_mean if running else None,
                              mod.running_var if running else None, None, None,
                              not running, 0.0, mod.eps), 1
    if isinstance(mod, nn.modules.instancenorm._InstanceNorm):
        running = not mod.training and mod.track_running_stats
        return _tF.instance_norm(x, mod.running_mean if running else None,
                                 mod.running_var if running else None, None, None,
                                 not running, 0.0, mod.eps), 1
    # RMSNorm
    return _tF.rms_norm(x, mod.normalized_shape, None, mod.eps), -1


def _norm_install(name, mod, record):
    spec = _norm_specs(name, mod)[0]

    def hook(m, args, out):
        x = args[0]
        with torch.no_grad():
            xh, axis = _normalised(m, x.detach())
        eps = perturbation(out)
        N = x.shape[0]
        if axis == -1:  # LayerNorm/RMSNorm: the parameters' shape is the trailing axes
            C = m.weight.numel()
            xh2 = xh.reshape(N, -1, C)
        else:
            C = xh.shape[1]
            xh2 = xh.reshape(N, C, -1).transpose(1, 2)
        has_bias = spec.bias is not None
        A = torch.eye(2 if has_bias else 1, dtype=out.dtype, device=out.device)
        A = A.expand(N, -1, -1).contiguous()

        def to_G(g):
            g2 = g.reshape(N, -1, C) if axis == -1 else g.reshape(N, C, -1).transpose(1, 2)
            rows = [(g2 * xh2).sum(1)] + ([g2.sum(1)] if has_bias else [])
            return torch.stack(rows, dim=1)  # (N, 1 or 2, C)

        record(Capture(spec, A, eps, to_G, conv=True, exact=True))
        return out + eps

    return [mod.register_forward_hook(hook)]


# -- MultiheadAttention ----------------------------------------------------------------------


def _mha_specs(name, mod):
    E = mod.embed_dim
    in_b = _join(name, "in_proj_bias") if _trainable(mod, "in_proj_bias") else None
    out_b = _join(name, "out_proj.bias") if _trainable(mod.out_proj, "bias") else None
    out = [BlockSpec(_join(name, "out_proj"), name, _join(name, "out_proj.weight"), out_b)]
    if mod._qkv_same_embed_dim:
        W = _join(name, "in_proj_weight")
        specs = [BlockSpec(_join(name, "in_proj"), name, W, in_b)]
        specs += [BlockSpec(_join(name, f"in_proj[{s}]"), name, W, in_b, rows=(i * E, (i + 1) * E))
                  for i, s in enumerate("qkv")]
    else:
        specs = [BlockSpec(_join(name, f"{s}_proj"), name, _join(name, f"{s}_proj_weight"), in_b,
                           bias_rows=(i * E, (i + 1) * E)) for i, s in enumerate("qkv")]
    return specs + out


def _merge_masks(attn_mask, key_padding_mask, N, h, L, S, dtype):
    """One additive mask broadcastable to (N, h, L, S) (``None`` when there is none)."""
    def additive(mask):
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    out = None
    if attn_mask is not None:
        am = additive(attn_mask)
        am = am.reshape(N, h, L, S) if am.ndim == 3 else am.reshape(1, 1, L, S)
        out = am
    if key_padding_mask is not None:
        km = additive(key_padding_mask).reshape(N, 1, 1, S)
        out = km if out is None else out + km
    return out


def _mha_forward(name, mod, specs, record, query, key, value, key_padding_mask=None,
                 need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    """``mod(query, key, value, ...)`` with its linear maps explicit and perturbed."""
    batched = query.dim() == 3
    # self-attention (one tensor as query, key and value: the packed in_proj block), told
    # before the layout changes below make three distinct views of it
    same = query is key and key is value
    if not batched:  # unbatched: (L, E)
        query, key, value = query[None], key[None], value[None]
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[None]
    elif not mod.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    if same:
        key = value = query
    N, L, E = query.shape
    S = key.shape[1]
    h, hd = mod.num_heads, E // mod.num_heads
    by_key = {s.key: s for s in specs}
    bias = mod.in_proj_bias
    bq, bk, bv = (None, None, None) if bias is None else bias.chunk(3)

    def proj(spec, x, W, b):
        y = _tF.linear(x, W, b)
        if spec is None:
            return y
        y, cap = _linear_capture(spec, x, y, spec.bias is not None)
        record(cap)
        return y

    if mod._qkv_same_embed_dim and query is key and key is value:
        qkv = proj(by_key[_join(name, "in_proj")], query, mod.in_proj_weight, bias)
        q, k, v = qkv.chunk(3, dim=-1)
    elif mod._qkv_same_embed_dim:
        Wq, Wk, Wv = mod.in_proj_weight.chunk(3)
        q = proj(by_key[_join(name, "in_proj[q]")], query, Wq, bq)
        k = proj(by_key[_join(name, "in_proj[k]")], key, Wk, bk)
        v = proj(by_key[_join(name, "in_proj[v]")], value, Wv, bv)
    else:
        q = proj(by_key[_join(name, "q_proj")], query, mod.q_proj_weight, bq)
        k = proj(by_key[_join(name, "k_proj")], key, mod.k_proj_weight, bk)
        v = proj(by_key[_join(name, "v_proj")], value, mod.v_proj_weight, bv)
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=query.device).triu(1)
    if mod.bias_k is not None:
        k = torch.cat([k, mod.bias_k.reshape(1, 1, E).expand(N, 1, E)], dim=1)
        v = torch.cat([v, mod.bias_v.reshape(1, 1, E).expand(N, 1, E)], dim=1)
        attn_mask = None if attn_mask is None else _tF.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else _tF.pad(key_padding_mask, (0, 1))
        S += 1
    if mod.add_zero_attn:
        k = torch.cat([k, k.new_zeros(N, 1, E)], dim=1)
        v = torch.cat([v, v.new_zeros(N, 1, E)], dim=1)
        attn_mask = None if attn_mask is None else _tF.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else _tF.pad(key_padding_mask, (0, 1))
        S += 1
    q = q.reshape(N, L, h, hd).transpose(1, 2)
    k = k.reshape(N, S, h, hd).transpose(1, 2)
    v = v.reshape(N, S, h, hd).transpose(1, 2)
    scores = (q / math.sqrt(hd)) @ k.transpose(-2, -1)  # (N, h, L, S)
    mask = _merge_masks(attn_mask, key_padding_mask, N, h, L, S, scores.dtype)
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    if mod.training and mod.dropout > 0:
        weights = _tF.dropout(weights, p=mod.dropout)
    ctx = (weights @ v).transpose(1, 2).reshape(N, L, E)
    out = proj(by_key[_join(name, "out_proj")], ctx, mod.out_proj.weight, mod.out_proj.bias)
    if not batched:
        out = out[0]
    elif not mod.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    w = weights.mean(dim=1) if average_attn_weights else weights
    return out, (w[0] if not batched else w)


def _mha_install(name, mod, record):
    specs = _mha_specs(name, mod)
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")

    def hook(m, args, kwargs, output):
        call = dict(zip(names, args))
        call.update(kwargs)
        return _mha_forward(name, m, specs, record, **call)

    return [mod.register_forward_hook(hook, with_kwargs=True)]


# -- the registry ----------------------------------------------------------------------------


@functools.cache
def _rules() -> tuple:
    """The built-in rules (made once: every covered-layer lookup walks them)."""
    return (
        LayerRule((nn.Linear,), _linear_specs, _linear_install),
        LayerRule((nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv_specs, _conv_install),
        LayerRule((nn.Embedding,), _embedding_specs, _embedding_install, params=("weight",)),
        LayerRule(_norm_types(), _norm_specs, _norm_install),
        LayerRule((nn.MultiheadAttention,), _mha_specs, _mha_install,
                  params=("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                          "in_proj_bias", "out_proj.weight", "out_proj.bias")),
    )


def _norm_types() -> tuple:
    types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm,
             nn.modules.instancenorm._InstanceNorm)  # SyncBatchNorm: its own forward, same map
    return types + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


_USER_RULES: list = []


def rule_for(mod: Any) -> LayerRule | None:
    """The first rule (user-registered ones first) whose types include ``type(mod)``: one of
    them or a subclass that keeps its ``forward`` (e.g. attention's out-projection, a
    ``Linear`` subclass). A subclass with its own ``forward`` (a scaled or padded output)
    computes something else, whose weight gradient the hooks' statistics would not give:
    no rule (its parameters are reported, :func:`uncovered_reason`)."""
    for rule in (*_USER_RULES, *_rules()):
        if isinstance(mod, rule.types) and _keeps_forward(mod, rule.types):
            return rule
    return None


def _keeps_forward(mod: Any, types: tuple) -> bool:
    cls = type(mod)
    return any(isinstance(mod, t) and getattr(cls, "forward", None) is getattr(t, "forward", None)
               for t in types)


def custom_rule(types: tuple, inputs: Callable) -> LayerRule:
    """A rule for a user layer with a ``weight`` (viewed ``(m, n)``) and maybe a ``bias`` (m,).

    ``inputs(module, args, output) -> A`` gives the per-sample, per-position inputs ``(N, T, n)``
    of the weight (without the bias column, added when the module has a trainable ``bias``);
    the output gradients are the gradient of the module's output ``(N, ..., m)`` viewed
    ``(N, T, m)``: the layer must compute ``output[n, t] = W a[n, t] (+ b)``.
    """

    def install(name, mod, record):
        spec = _linear_specs(name, mod)[0]

        def hook(m, args, out):
            A = inputs(m, args, out)
            N = out.shape[0]
            if A.ndim < 2 or A.shape[0] != N:
                raise ValueError(
                    f"layer {name!r}: its inputs function returned shape {tuple(A.shape)}; "
                    f"expected (N, T, n) with N = {N}"
                )
            y, cap = _linear_capture(spec, A, out, spec.bias is not None)
            record(cap)
            return y

        return [mod.register_forward_hook(hook)]

    return LayerRule(tuple(types), _linear_specs, install)


_RULES_CHANGED = [0]  # counts register_rule/unregister_types calls (see rules_version)


def rules_version() -> int:
    """A number that changes whenever the registered rules do (cached coverage is stale)."""
    return _RULES_CHANGED[0]


def register_rule(rule: LayerRule) -> None:
    _USER_RULES.insert(0, rule)
    _RULES_CHANGED[0] += 1


def unregister_types(types: tuple) -> None:
    _USER_RULES[:] = [r for r in _USER_RULES if tuple(r.types) != tuple(types)]
    _RULES_CHANGED[0] += 1


_UNCOVERED_REASONS = (
    ("ConvTranspose", "transposed convolutions are not covered"),
    ("ParametrizationList", "a tensor of a parametrized weight (weight_norm, spectral_norm, ...): "
                            "its gradient is not a layer weight's"),
)


def uncovered_reason(mod: Any) -> str:
    kind = type(mod).__name__
    for rule in (*_USER_RULES, *_rules()):
        base = next((t for t in rule.types if isinstance(mod, t)), None)
        if base is not None and not _keeps_forward(mod, rule.types):
            return (f"a parameter of {kind}, a subclass of {base.__name__} with its own forward "
                    "(register_layer adds a rule for it)")
    for prefix, why in _UNCOVERED_REASONS:
        if kind.startswith(prefix):
            return why
    return f"a parameter of {kind}, which has no layer rule (register_layer adds one)"

