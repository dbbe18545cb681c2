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
