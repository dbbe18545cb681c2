r"""Flax linen models through the JAX adapter's tape, without rewriting them (see :func:`flax_apply`)."""

from __future__ import annotations

import warnings
from typing import Any, Callable


def flax_apply(module: Any) -> Callable[[Any, Any, Any], Any]:
    r"""A tape-written ``apply(variables, inputs, tape)`` for a Flax linen module, unchanged.

    Every ``flax.linen.Dense`` and 2-D ``flax.linen.Conv`` (NHWC, ``feature_group_count=1``,
    padding ``"SAME"``, ``"VALID"``, an int or pairs) with the default product (no custom
    ``dot_general``/``conv_general_dilated``, default ``precision``, no ``mask``) the module
    calls is routed through ``tape.dense`` / ``tape.conv2d`` by ``flax.linen.intercept_methods``
    after the layer's own dtype promotion, named by its module path joined with ``"/"``
    (``"Dense_0"``, ``"block/Conv_1"``). With :data:`PLAIN` the result is
    ``module.apply(variables, inputs)``; with :func:`~kronsum.adapters.jax.collect` each such
    layer gets its block, in Flax's layout (kernel ``(in, out)`` or HWIO, bias as the last
    column). Other layers (``DenseGeneral``, ``Embed``, grouped, 1-D, 3-D, masked or circular
    convolutions, normalisation layers) are computed by Flax and get no block; a
    ``UserWarning`` names them once per ``apply`` function. A layer called twice in one pass
    (a shared module) is refused by ``collect`` (``RuntimeError``): one block per call site
    would be a different matrix.

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

    def apply(variables: Any, inputs: Any, tape: Any) -> Any:
        skipped: list = []

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name != "__call__" or kwargs or len(args) != 1:
                return next_fun(*args, **kwargs)
            name = "/".join(str(p) for p in mod.path)
            if type(mod) is nn.Dense and _plain(mod):
                x, kernel, bias = _promoted(mod, args[0])
                return tape.dense(name, x, kernel, bias)
            if type(mod) is nn.Conv and _plain(mod) and _conv2d_ok(mod, args[0]):
                x, kernel, bias = _promoted(mod, args[0])
                return tape.conv2d(name, x, kernel, bias, stride=mod.strides or 1,
                                   padding=_padding(mod.padding), dilation=mod.kernel_dilation or 1)
            if isinstance(mod, nn.Module) and mod.variables.get("params") and not _container(mod):
                skipped.append(f"{name} ({type(mod).__name__})")
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            out = module.apply(variables, inputs)
        new = sorted(set(skipped) - warned)
        if new:
            warned.update(new)
            warnings.warn(f"flax_apply: these layers get no Kronecker block (computed by Flax): "
                          f"{new}", UserWarning, stacklevel=2)
        return out

    return apply


def _container(mod: Any) -> bool:
    """A module whose own parameters are all in submodules (a parent, not a layer)."""
    own = mod.variables.get("params", {})
    return all(isinstance(v, dict) or hasattr(v, "keys") for v in own.values())


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


def _conv2d_ok(mod: Any, x: Any) -> bool:
    ks = mod.kernel_size
    ks = (ks,) if isinstance(ks, int) else tuple(ks)
    return (len(ks) == 2 and getattr(x, "ndim", 0) == 4 and mod.feature_group_count == 1
            and not (isinstance(mod.padding, str) and mod.padding.upper() not in ("SAME", "VALID"))
            and (mod.input_dilation in (None, 1) or tuple(mod.input_dilation) == (1, 1)))


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
    the module. Every ``nnx.Linear`` and 2-D ``nnx.Conv`` (NHWC with one batch axis,
    ``feature_group_count=1``, padding ``"SAME"``, ``"VALID"``, an int or pairs, no input
    dilation) with the default product (``jax.lax.dot_general`` /
    ``jax.lax.conv_general_dilated``, default ``precision``, no ``preferred_element_type``,
    no ``mask``) is routed through ``tape.dense`` / ``tape.conv2d`` after the layer's own dtype
    promotion, named by its attribute path joined with ``"/"`` (``"linear1"``,
    ``"blocks/0"``). Other layers with parameters are computed by NNX and named in a
    ``UserWarning`` once per ``apply`` function, as :func:`flax_apply` does for linen.

    The routing replaces ``nnx.Linear.__call__`` and ``nnx.Conv.__call__`` while ``apply``
    runs (for this call's modules only; other modules and threads see NNX's own calls
    dispatched through the same class attribute, so do not trace two models concurrently).

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

    def apply(state: Any, inputs: Any, tape: Any) -> Any:
        m = nnx.merge(graphdef, rest, state)
        names, skipped = {}, []
        for path, mod in nnx.iter_graph(m):
            if not isinstance(mod, nnx.Module):
                continue
            name = "/".join(str(p) for p in path)
            if type(mod) in (nnx.Linear, nnx.Conv):
                names[id(mod)] = name
            elif any(isinstance(v, nnx.Param) for v in vars(mod).values()):
                skipped.append(f"{name} ({type(mod).__name__})")

        def routed(cls, fallback):
            def call(self, inputs, out_sharding=None):
                name = names.get(id(self))
                if name is None or out_sharding is not None or not _nnx_plain(self):
                    if name is not None:
                        skipped.append(f"{name} ({type(self).__name__}, options kronsum does not mirror)")
                    return fallback(self, inputs, out_sharding)
                if cls is nnx.Linear:
                    x, kernel, bias = _nnx_promoted(self, inputs)
                    return tape.dense(name, x, kernel, bias)
                if not _nnx_conv2d_ok(self, inputs):
                    skipped.append(f"{name} (Conv: not a plain 2-D convolution)")
                    return fallback(self, inputs, out_sharding)
                x, kernel, bias = _nnx_promoted(self, inputs)
                return tape.conv2d(name, x, kernel, bias, stride=self.strides or 1,
                                   padding=_padding(self.padding),
                                   dilation=self.kernel_dilation or 1)
            return call

        saved = {cls: cls.__dict__["__call__"] for cls in (nnx.Linear, nnx.Conv)}
        try:
            for cls, fallback in saved.items():
                cls.__call__ = routed(cls, fallback)
            out = m(inputs)
        finally:
            for cls, fallback in saved.items():
                cls.__call__ = fallback
        new = sorted(set(skipped) - warned)
        if new:
            warned.update(new)
            warnings.warn(f"nnx_apply: these layers get no Kronecker block (computed by NNX): "
                          f"{new}", UserWarning, stacklevel=2)
        return out

    return apply


def _nnx_plain(mod: Any) -> bool:
    """An NNX Linear/Conv with the default product, precision and output type, no mask."""
    from jax import lax

    default = {"dot_general": lax.dot_general, "conv_general_dilated": lax.conv_general_dilated}
    return (all(getattr(mod, a, f) is f for a, f in default.items())
            and all(getattr(mod, a, None) is None for a in ("precision", "preferred_element_type",
                                                            "mask")))


def _nnx_promoted(mod: Any, x: Any) -> tuple:
    """Inputs, kernel and bias as NNX's own ``__call__`` promotes them."""
    kernel = mod.kernel[...]
    bias = mod.bias[...] if mod.bias is not None else None
    return tuple(mod.promote_dtype((x, kernel, bias), dtype=mod.dtype))


def _nnx_conv2d_ok(mod: Any, x: Any) -> bool:
    ks = tuple(mod.kernel_size)
    dil = mod.input_dilation
    pad = mod.padding
    return (len(ks) == 2 and getattr(x, "ndim", 0) == 4 and mod.feature_group_count == 1
            and not (isinstance(pad, str) and pad.upper() not in ("SAME", "VALID"))
            and (dil in (None, 1) or tuple(dil) == (1, 1)))
