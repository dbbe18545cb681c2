r"""Flax linen models through the JAX adapter's tape, without rewriting them (see :func:`flax_apply`)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable


def flax_apply(module: Any) -> Callable[[Any, Any, Any], Any]:
    r"""A tape-written ``apply(variables, inputs, tape)`` for a Flax linen module, unchanged.

    The layers the module calls go through the tape by ``flax.linen.intercept_methods``, after
    the layer's own dtype promotion, named by their module path joined with ``"/"``
    (``"Dense_0"``, ``"block/Conv_1"``, ``"MultiHeadDotProductAttention_0/query"``):
    ``nn.Dense`` and ``nn.DenseGeneral`` contracting trailing axes without ``batch_dims``
    (``tape.dense``, a general kernel ``(in…, out…)`` as the ``(∏in, ∏out)`` matrix it is),
    1-, 2- and 3-D ``nn.Conv`` on batched channels-last inputs (padding ``"SAME"``, ``"VALID"``,
    an int or pairs, ``"CIRCULAR"``, ``"REFLECT"`` and 1-D ``"CAUSAL"`` — the input padded as
    Flax pads it; with ``feature_group_count = g > 1`` one block per group, ``"name[i]"``;
    ``tape.conv``), all with the default product (no custom ``dot_general`` /
    ``conv_general_dilated``, default ``precision``, no ``mask``); ``nn.Embed`` on integer ids
    (``tape.embed``); ``nn.LayerNorm`` and ``nn.RMSNorm`` over the last axis, ``nn.GroupNorm``
    over its default axes and ``nn.BatchNorm`` normalising with its running statistics
    (``use_running_average``, as at evaluation; a per-sample map) over the last axis
    (``tape.norm``, the normalised input recomputed as Flax computes it). With ``PLAIN`` the result is
    ``module.apply(variables, inputs)`` (to rounding); with
    :func:`~kronsum.adapters.jax.collect` each such layer gets its block, in Flax's layout
    (:class:`~kronsum.adapters.jax.Tape`). Other layers with parameters (masked convolutions,
    convolutions with input dilation, unbatched inputs, a ``BatchNorm`` with batch statistics, whose
    statistics couple the samples, ``Einsum``) are computed by Flax and get
    no block; a ``UserWarning`` names them once per ``apply`` function. A layer called twice in one pass
    (a shared module) is refused by ``collect`` (``RuntimeError``): one block per call site
    would be a different matrix; so is an ``nn.Embed`` whose table also serves ``attend``
    (tied embeddings).

    Examples
    --------
    >>> import jax
    >>> import flax.linen as nn
    >>> import jax.numpy as jnp
    >>> from kronsum.adapters.jax import PLAIN, collect, flax_apply
    >>> class MLP(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         h = nn.tanh(nn.Dense(8)(x))
    ...         return nn.Dense(3)(h)
    >>> model, X = MLP(), jnp.ones((16, 4))
    >>> variables = model.init(jax.random.PRNGKey(0), X)
    >>> apply = flax_apply(model)
    >>> bool(jnp.allclose(apply(variables, X, PLAIN), model.apply(variables, X)))
    True
    >>> {k: (F.m, F.n) for k, F in collect(apply, variables, X, fisher="exact").items()}
    {'Dense_0': (8, 5), 'Dense_1': (3, 9)}
    """
    try:
        import flax.linen as nn
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("flax_apply needs Flax: pip install flax") from exc
    warned: set = set()
    routed = _routed_linen()

    def apply(variables: Any, inputs: Any, tape: Any) -> Any:
        skipped: list = []

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name == "attend" and type(mod) is nn.Embed:
                _refuse_tied("/".join(str(p) for p in mod.path), tape)
            name = "/".join(str(p) for p in mod.path)
            if context.method_name == "__call__" and type(mod) is nn.BatchNorm and args:
                running = _running_average(mod.use_running_average, args[1:], kwargs)
                stats = mod.variables.get("batch_stats", {})
                if running and "mean" in stats:
                    p = mod.variables.get("params", {})
                    y = _batch_norm(tape, name, mod, args[0], stats["mean"], stats["var"],
                                    p.get("scale"), p.get("bias"), linen=True)
                    if y is not None:
                        return y
            if context.method_name != "__call__" or kwargs or len(args) != 1:
                if (context.method_name == "__call__" and type(mod) in routed
                        and mod.variables.get("params")):
                    skipped.append(f"{name} ({type(mod).__name__}, options kronsum does not mirror)")
                return next_fun(*args, **kwargs)
            if type(mod) in routed and not _own_params(mod, variables):
                # WeightNorm, SpectralNorm, map_variables, lifted vmap: the layer sees parameters
                # computed from the stored ones, whose gradient its block would not be
                skipped.append(f"{name} ({type(mod).__name__}, parameters transformed before it)")
                return next_fun(*args, **kwargs)
            if type(mod) is nn.Dense and _plain(mod):
                x, kernel, bias = _promoted(mod, args[0])
                return tape.dense(name, x, kernel, bias)
            if type(mod) is nn.Conv and _plain(mod) and _conv_ok(mod.kernel_size, mod.feature_group_count,
                                                                 mod.padding, mod.input_dilation, args[0]):
                x, kernel, bias = _promoted(mod, args[0])
                x, padding = _pre_pad(x, mod.padding, mod.kernel_size, mod.kernel_dilation)
                return tape.conv(name, x, kernel, bias, stride=mod.strides or 1,
                                 padding=_padding(padding), dilation=mod.kernel_dilation or 1,
                                 groups=mod.feature_group_count)
            if type(mod) is nn.DenseGeneral and _plain(mod) and not tuple(mod.batch_dims):
                k = _trailing(mod.axis, getattr(args[0], "ndim", 0))
                if k is not None:
                    x, kernel, bias = _promoted(mod, args[0])
                    return _general(tape, name, x, kernel, bias, k)
            if type(mod) is nn.Embed and _integer(args[0]):
                (table,) = mod.promote_dtype(mod.variables["params"]["embedding"], dtype=mod.dtype,
                                             inexact=False)
                return tape.embed(name, args[0], table)
            if type(mod) in (nn.LayerNorm, nn.RMSNorm) and mod.variables.get("params"):
                p = mod.variables["params"]
                y = _norm(tape, name, mod, args[0], p.get("scale"), p.get("bias"),
                          use_mean=type(mod) is nn.LayerNorm)
                if y is not None:
                    return y
            if type(mod) is nn.GroupNorm and mod.variables.get("params"):
                p = mod.variables["params"]
                y = _group_norm(tape, name, mod, args[0], p.get("scale"), p.get("bias"))
                if y is not None:
                    return y
            if isinstance(mod, nn.Module) and mod.variables.get("params") and not _container(mod):
                skipped.append(f"{name} ({type(mod).__name__})")
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            out = module.apply(variables, inputs)
        _warn_once(skipped, warned, "flax_apply", "Flax")
        return out

    return apply


def _routed_linen() -> tuple:
    import flax.linen as nn

    return (nn.Dense, nn.Conv, nn.DenseGeneral, nn.Embed, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm,
            nn.BatchNorm)


def _warn_once(skipped: list, warned: set, who: str, framework: str) -> None:
    """One ``UserWarning`` (at the caller of ``apply``) naming the layers left to the
    framework that this ``apply`` function has not warned about yet."""
    new = sorted(set(skipped) - warned)
    if new:
        warned.update(new)
        warnings.warn(f"{who}: these layers get no Kronecker block (computed by {framework}): "
                      f"{new}", UserWarning, stacklevel=3)


def _container(mod: Any) -> bool:
    """A module whose own parameters are all in submodules (a parent, not a layer)."""
    own = mod.variables.get("params", {})
    return all(isinstance(v, dict) or hasattr(v, "keys") for v in own.values())


def _own_params(mod: Any, variables: Any) -> bool:
    """Whether the linen module ``mod`` sees its stored parameters themselves (the leaves of
    ``variables["params"]`` at its path, the same arrays or tracers), not ones computed from
    them by a wrapper (``nn.WeightNorm``, ``nn.SpectralNorm``, ``nn.map_variables``, a lifted
    ``nn.vmap`` slicing stacked parameters)."""
    stored: Any = variables.get("params", {}) if hasattr(variables, "get") else {}
    for part in mod.path:
        stored = stored.get(part, {}) if hasattr(stored, "get") else {}
    seen = mod.variables.get("params", {})
    return bool(seen) and all(hasattr(stored, "get") and stored.get(k) is v for k, v in seen.items())


def _plain(mod: Any) -> bool:
    """The layer computes what the tape computes: the default product (no custom
    ``dot_general`` / ``conv_general_dilated``, default precision, no kernel mask)."""
    custom = ("dot_general", "dot_general_cls", "conv_general_dilated", "conv_general_dilated_cls",
              "precision", "mask")
    return all(getattr(mod, a, None) is None for a in custom)


def _promoted(mod: Any, x: Any) -> tuple:
    """Inputs, kernel and bias in the layer's computation dtype, as Flax's own ``__call__``
    promotes them (``mod.promote_dtype(..., dtype=mod.dtype)``)."""
    p = mod.variables["params"]
    return tuple(mod.promote_dtype(x, p["kernel"], p.get("bias"), dtype=mod.dtype))


_PADDED = {"CIRCULAR": "wrap", "REFLECT": "reflect", "CAUSAL": "constant"}


def _conv_ok(kernel_size: Any, groups: int, padding: Any, input_dilation: Any, x: Any) -> bool:
    """A Flax (linen or NNX) ``Conv`` that ``tape.conv`` computes: 1 to 3 spatial axes and a
    batch axis, any feature groups, ``"SAME"``/``"VALID"``/explicit padding or the input
    paddings ``"CIRCULAR"``, ``"REFLECT"`` and (1-D) ``"CAUSAL"`` (:func:`_pre_pad`), no input
    dilation."""
    ks = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    mode = padding.upper() if isinstance(padding, str) else None
    return (1 <= len(ks) <= 3 and getattr(x, "ndim", 0) == len(ks) + 2
            and mode in (None, "SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL")
            and not (mode == "CAUSAL" and len(ks) != 1)
            and (input_dilation in (None, 1) or (not isinstance(input_dilation, int)
                                                 and all(int(v) == 1 for v in input_dilation))))


def _pre_pad(x: Any, padding: Any, kernel_size: Any, kernel_dilation: Any) -> tuple:
    """``(x, padding)`` for ``tape.conv``: Flax's ``"CIRCULAR"``/``"REFLECT"`` padding (the
    dilated kernel's ``((k−1)//2, k//2)`` on each spatial axis, wrapped or reflected) and
    ``"CAUSAL"`` (``dilation·(k−1)`` zeros before a 1-D input) applied to the input, then
    ``"VALID"``, as Flax's ``Conv`` computes them; other paddings unchanged. The block is then
    that of the padded input's patches: exact."""
    mode = padding.upper() if isinstance(padding, str) else None
    if mode not in _PADDED:
        return x, padding
    import jax.numpy as jnp

    ks = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    dil = (1,) * len(ks) if kernel_dilation is None else (
        (kernel_dilation,) * len(ks) if isinstance(kernel_dilation, int) else tuple(kernel_dilation))
    if mode == "CAUSAL":
        pads = [(0, 0), (dil[0] * (ks[0] - 1), 0), (0, 0)]
    else:
        dilated = [(k - 1) * d + 1 for k, d in zip(ks, dil)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    return jnp.pad(x, pads, mode=_PADDED[mode]), "VALID"


def _padding(p: Any) -> Any:
    if isinstance(p, str) or isinstance(p, int):
        return p
    return tuple((a, a) if isinstance(a, int) else tuple(a) for a in p)


def nnx_apply(model: Any) -> Callable[[Any, Any, Any], Any]:
    r"""A tape-written ``apply(state, inputs, tape)`` for a Flax NNX module, unchanged.

    ``state`` is the model's parameters, ``nnx.state(model, nnx.Param)`` — the tree
    ``nnx.grad`` differentiates and an ``nnx.Optimizer`` updates; ``apply`` merges it with the
    module's graph and its other variables (batch statistics, RNG state) as they were when
    ``nnx_apply`` was called (pass the full ``nnx.state(model)`` to use newer ones), and calls
    the module. The NNX counterparts of the layers :func:`flax_apply` routes — ``nnx.Linear``,
    ``nnx.LinearGeneral`` (so ``nnx.MultiHeadAttention``'s projections), 1- to 3-D ``nnx.Conv``,
    ``nnx.Embed``, ``nnx.LayerNorm``, ``nnx.RMSNorm``, ``nnx.GroupNorm``, ``nnx.BatchNorm``
    (running statistics), on the same conditions (no
    ``preferred_element_type``, no ``out_sharding``) — go through the tape, named by their
    attribute path joined with ``"/"`` (``"linear1"``, ``"blocks/0"``, ``"attn/query"``). Other
    layers with parameters are computed by NNX and named in a ``UserWarning`` once per
    ``apply`` function, as :func:`flax_apply` does for linen.

    The routing replaces those classes' ``__call__`` (and ``nnx.Embed.attend``, to refuse tied
    embeddings) while ``apply`` runs (for this call's modules only; other modules and threads
    see NNX's own calls dispatched through the same class attribute, so do not trace two
    models concurrently).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from kronsum.adapters.jax import PLAIN, collect, nnx_apply
    >>> class MLP(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.hidden = nnx.Linear(4, 8, rngs=rngs)
    ...         self.out = nnx.Linear(8, 3, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.out(nnx.tanh(self.hidden(x)))
    >>> model, X = MLP(nnx.Rngs(0)), jnp.ones((16, 4))
    >>> apply, params = nnx_apply(model), nnx.state(model, nnx.Param)
    >>> bool(jnp.allclose(apply(params, X, PLAIN), model(X)))
    True
    >>> {k: (F.m, F.n) for k, F in collect(apply, params, X, fisher="exact").items()}
    {'hidden': (8, 5), 'out': (3, 9)}
    """
    try:
        from flax import nnx
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("nnx_apply needs Flax: pip install flax") from exc
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    warned: set = set()
    routes = _nnx_routes(nnx)

    def apply(state: Any, inputs: Any, tape: Any) -> Any:
        m = nnx.merge(graphdef, rest, state)
        names, skipped, holders = {}, [], {}
        for path, mod in nnx.iter_graph(m):
            if not isinstance(mod, nnx.Module):
                continue
            name = "/".join(str(p) for p in path)
            if type(mod) in routes:
                names[id(mod)] = name
                for v in vars(mod).values():
                    if isinstance(v, nnx.Param):
                        holders.setdefault(id(v), []).append(id(mod))
            elif any(isinstance(v, nnx.Param) for v in vars(mod).values()):
                skipped.append(f"{name} ({type(mod).__name__})")
        for owners in holders.values():  # one Param held by two layers (tied): neither gets a block
            if len(owners) > 1:
                for o in owners:
                    if o in names:
                        skipped.append(f"{names.pop(o)} (tied: a parameter held by another layer too)")

        def routed(cls, fallback):
            def call(self, inputs, *args, **kwargs):
                name = names.get(id(self))
                y = None
                opts = {k: v for k, v in kwargs.items() if v is not None}
                if name is not None and not args and not opts:
                    y = routes[cls](self, inputs, name, tape)
                elif name is not None and cls is nnx.BatchNorm and _running_average(None, args, kwargs):
                    y = routes[cls](self, inputs, name, tape, running=True)
                if y is None:
                    if name is not None:
                        skipped.append(f"{name} ({cls.__name__}, options kronsum does not mirror)")
                    return fallback(self, inputs, *args, **kwargs)
                return y
            return call

        def attend(fallback):
            def call(self, *args, **kwargs):
                if id(self) in names:
                    _refuse_tied(names[id(self)], tape)
                return fallback(self, *args, **kwargs)
            return call

        saved = [(cls, "__call__", cls.__dict__["__call__"], routed) for cls in routes]
        saved.append((nnx.Embed, "attend", nnx.Embed.__dict__["attend"], lambda c, f: attend(f)))
        try:
            for cls, attr, fallback, wrap in saved:
                setattr(cls, attr, wrap(cls, fallback))
            out = m(inputs)
        finally:
            for cls, attr, fallback, _ in saved:
                setattr(cls, attr, fallback)
        _warn_once(skipped, warned, "nnx_apply", "NNX")
        return out

    return apply


def _nnx_plain(mod: Any) -> bool:
    """An NNX Linear/Conv with the default product, precision and output type, no mask."""
    from jax import lax

    default = {"dot_general": lax.dot_general, "conv_general_dilated": lax.conv_general_dilated}
    return (all(getattr(mod, a, None) in (None, f) for a, f in default.items())
            and all(getattr(mod, a, None) is None for a in (
                "precision", "preferred_element_type", "mask", "dot_general_cls",
                "conv_general_dilated_cls")))


def _nnx_promoted(mod: Any, x: Any) -> tuple:
    """Inputs, kernel and bias as NNX's own ``__call__`` promotes them."""
    kernel = mod.kernel[...]
    bias = mod.bias[...] if mod.bias is not None else None
    return tuple(mod.promote_dtype((x, kernel, bias), dtype=mod.dtype))


def _nnx_routes(nnx: Any) -> dict:
    """NNX layer class → ``route(module, inputs, name, tape)``, the tape's output or None (the
    layer is left to NNX)."""

    def linear(mod, x, name, tape):
        if not _nnx_plain(mod):
            return None
        x, kernel, bias = _nnx_promoted(mod, x)
        return tape.dense(name, x, kernel, bias)

    def conv(mod, x, name, tape):
        if not (_nnx_plain(mod) and _conv_ok(mod.kernel_size, mod.feature_group_count, mod.padding,
                                             mod.input_dilation, x)):
            return None
        x, kernel, bias = _nnx_promoted(mod, x)
        x, padding = _pre_pad(x, mod.padding, mod.kernel_size, mod.kernel_dilation)
        return tape.conv(name, x, kernel, bias, stride=mod.strides or 1,
                         padding=_padding(padding), dilation=mod.kernel_dilation or 1,
                         groups=mod.feature_group_count)

    def general(mod, x, name, tape):
        k = _trailing(mod.axis, getattr(x, "ndim", 0))
        if not _nnx_plain(mod) or len(mod.batch_axis) or k is None:
            return None
        x, kernel, bias = _nnx_promoted(mod, x)
        return _general(tape, name, x, kernel, bias, k)

    def embed(mod, ids, name, tape):
        if not _integer(ids):
            return None
        (table,) = mod.promote_dtype((mod.embedding[...],), dtype=mod.dtype, inexact=False)
        return tape.embed(name, ids, table)

    def affine(mod):
        scale = mod.scale[...] if getattr(mod, "scale", None) is not None else None
        bias = mod.bias[...] if getattr(mod, "bias", None) is not None else None
        return scale, bias

    def norm(use_mean):
        def route(mod, x, name, tape):
            return _norm(tape, name, mod, x, *affine(mod), use_mean)
        return route

    def batch_norm(mod, x, name, tape, running=None):
        if not (mod.use_running_average if running is None else running):
            return None
        return _batch_norm(tape, name, mod, x, mod.mean[...], mod.var[...], *affine(mod))

    def group_norm(mod, x, name, tape):
        return _group_norm(tape, name, mod, x, *affine(mod))

    return {nnx.Linear: linear, nnx.Conv: conv, nnx.LinearGeneral: general, nnx.Embed: embed,
            nnx.LayerNorm: norm(True), nnx.RMSNorm: norm(False), nnx.BatchNorm: batch_norm,
            nnx.GroupNorm: group_norm}


def _integer(x: Any) -> bool:
    import jax.numpy as jnp

    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.integer)


def _trailing(axis: Any, ndim: int) -> int | None:
    """How many axes a general linear layer contracts if ``axis`` names the trailing axes of
    an ``ndim``-array in order (and leaves a batch axis), else None."""
    ax = (axis,) if isinstance(axis, int) else tuple(axis)
    if not ax or ndim < 2:
        return None
    ax = tuple(a % ndim for a in ax)
    k = len(ax)
    return k if k < ndim and ax == tuple(range(ndim - k, ndim)) else None


def _general(tape: Any, name: str, x: Any, kernel: Any, bias: Any, k: int) -> Any:
    """A general linear layer contracting the last ``k`` axes (kernel ``(in…, out…)``) as the
    dense layer ``(∏in, ∏out)`` it is, its output reshaped back."""
    lead, out = x.shape[:-k], kernel.shape[k:]
    n_in = math.prod(x.shape[-k:])
    y = tape.dense(name, x.reshape(lead + (n_in,)), kernel.reshape(n_in, -1),
                   None if bias is None else bias.reshape(-1))
    return y.reshape(lead + tuple(out))


def _last_axis(a: Any, ndim: int) -> bool:
    ax = (a,) if isinstance(a, int) else tuple(a)
    return len(ax) == 1 and ax[0] % ndim == ndim - 1


def _norm(tape: Any, name: str, mod: Any, x: Any, scale: Any, bias: Any, use_mean: bool) -> Any:
    """LayerNorm (``use_mean``) / RMSNorm over the last axis, as Flax computes it (statistics
    in at least float32 unless ``force_float32_reductions=False``, the fast variance
    ``E[x²] − E[x]²`` clipped at 0 where chosen), its affine part through ``tape.norm``; None
    for other axes, a named parallel axis or no parameters."""
    import jax.numpy as jnp
    from jax import lax

    ndim = getattr(x, "ndim", 0)
    if (ndim < 2 or not (_last_axis(mod.reduction_axes, ndim) and _last_axis(mod.feature_axes, ndim))
            or mod.axis_name is not None or (scale is None and bias is None)
            or jnp.iscomplexobj(x)):
        return None
    dt = mod.dtype or jnp.result_type(x)
    if getattr(mod, "force_float32_reductions", True):
        dt = jnp.promote_types(dt, jnp.float32)
    xs = x.astype(dt)
    if use_mean:
        mu = jnp.mean(xs, axis=-1, keepdims=True)
        if mod.use_fast_variance:
            var = jnp.maximum(0.0, jnp.mean(xs * xs, axis=-1, keepdims=True) - mu * mu)
        else:
            var = jnp.mean((xs - mu) ** 2, axis=-1, keepdims=True)
        xhat = (xs - mu) * lax.rsqrt(var + mod.epsilon)
    else:
        xhat = xs * lax.rsqrt(jnp.mean(xs * xs, axis=-1, keepdims=True) + mod.epsilon)
    return _norm_out(tape, name, mod, x, xhat, scale, bias)


def _running_average(attribute: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a BatchNorm call normalises with its running statistics: the call's
    ``use_running_average`` (positional or keyword) or else the attribute, and no ``mask``."""
    if kwargs.get("mask") is not None or len(args) > 1 or set(kwargs) - {"use_running_average", "mask"}:
        return False
    call = args[0] if args else kwargs.get("use_running_average")
    return bool(attribute if call is None else call)


def _norm_out(tape: Any, name: str, mod: Any, x: Any, xhat: Any, scale: Any, bias: Any) -> Any:
    """The affine part ``xhat·scale + bias`` through ``tape.norm``, in the layer's output dtype."""
    import jax.numpy as jnp

    params = [v for v in (scale, bias) if v is not None]
    out = mod.dtype or jnp.result_type(x, *params)
    cast = (lambda v: None if v is None else jnp.asarray(v, out))
    return tape.norm(name, xhat.astype(out), cast(scale), cast(bias))


def _batch_norm(tape: Any, name: str, mod: Any, x: Any, mean: Any, var: Any, scale: Any,
                bias: Any, *, linen: bool = False) -> Any:
    """BatchNorm normalising with its running statistics (evaluation mode): a per-sample map,
    ``x̂ = (x − mean)/√(var + ε)`` over the last (feature) axis, whose affine part goes through
    ``tape.norm``; None for another feature axis, a named parallel axis or no parameters. (With
    batch statistics the samples are coupled: left to Flax.)"""
    import jax.numpy as jnp
    from jax import lax

    ndim = getattr(x, "ndim", 0)
    if (ndim < 2 or not _last_axis(mod.axis, ndim) or mod.axis_name is not None
            or (scale is None and bias is None) or jnp.iscomplexobj(x)):
        return None
    dt = jnp.result_type(x, mean, var) if mod.dtype is None else jnp.promote_types(mod.dtype, jnp.result_type(mean))
    # linen takes 1/√(var + ε) in the statistics' own dtype (float32 batch_stats of a float64
    # model stay float32 there) and then promotes; NNX promotes the statistics first
    inv = lax.rsqrt(var + mod.epsilon).astype(dt) if linen else lax.rsqrt(var.astype(dt) + mod.epsilon)
    xhat = (x.astype(dt) - mean) * inv
    return _norm_out(tape, name, mod, x, xhat, scale, bias)


def _group_norm(tape: Any, name: str, mod: Any, x: Any, scale: Any, bias: Any) -> Any:
    """GroupNorm over the default axes (every non-batch axis of each group of channels; the
    statistics are per sample), as Flax computes it (at least float32, its fast variance where
    chosen), its affine part through ``tape.norm``; None for other reduction axes, a named
    parallel axis or no parameters."""
    import jax.numpy as jnp
    from jax import lax

    ndim = getattr(x, "ndim", 0)
    if ndim < 2 or mod.axis_name is not None or (scale is None and bias is None) or jnp.iscomplexobj(x):
        return None
    default = list(range(1, ndim - 1)) + [ndim - 1]
    if mod.reduction_axes is not None:
        axes = [mod.reduction_axes] if isinstance(mod.reduction_axes, int) else list(mod.reduction_axes)
        if sorted(a % ndim for a in axes) != default:
            return None
    C = x.shape[-1]
    groups = C // mod.group_size if mod.group_size is not None else mod.num_groups
    dt = mod.dtype or jnp.result_type(x)
    if getattr(mod, "force_float32_reductions", True):
        dt = jnp.promote_types(dt, jnp.float32)
    xg = jnp.reshape(x.astype(dt), x.shape[:-1] + (groups, C // groups))
    axes = tuple(range(1, ndim - 1)) + (ndim,)  # the spatial axes and the channels within a group
    mu = jnp.mean(xg, axis=axes, keepdims=True)
    if mod.use_fast_variance:
        var = jnp.maximum(0.0, jnp.mean(xg * xg, axis=axes, keepdims=True) - mu * mu)
    else:
        var = jnp.mean((xg - mu) ** 2, axis=axes, keepdims=True)
    xhat = jnp.reshape((xg - mu) * lax.rsqrt(var + mod.epsilon), x.shape)
    return _norm_out(tape, name, mod, x, xhat, scale, bias)


def _refuse_tied(name: str, tape: Any) -> None:
    """An ``Embed`` whose table also serves ``attend`` (tied output weights): its Fisher block
    couples both uses, which one block of the embedding alone would not be."""
    from .jax import Tape

    if type(tape) is not Tape:
        raise RuntimeError(f"layer {name!r}: its embedding table is also used by Embed.attend "
                           "(tied weights); the Fisher block of a shared table couples both "
                           "uses, which kronsum does not model: untie them or leave the layer out")
