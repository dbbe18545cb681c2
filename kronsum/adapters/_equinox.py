r"""Equinox models through the JAX adapter's tape, without rewriting them (see :func:`equinox_apply`)."""

from __future__ import annotations

from typing import Any, Callable

_TAPED: dict[str, Any] = {}  # the wrapper module classes, made on first use (they need Equinox)


def equinox_apply(model: Any) -> tuple[Callable[[Any, Any, Any], Any], Any]:
    r"""``(apply, params)``: a tape-written ``apply(params, inputs, tape)`` for an Equinox model.

    Equinox models compute one sample (``model(x)``) and are mapped over a batch with
    ``jax.vmap(model)(X)``; ``apply(params, X, PLAIN)`` is exactly that, with the model's
    inexact arrays taken from ``params`` (``eqx.partition(model, eqx.is_inexact_array)``, so
    ``params`` is the model itself with its static parts replaced by ``None``). Under
    :func:`~kronsum.adapters.jax.collect`, the map over the batch is the tape's own, and these
    layers write through it, named by their path in the model (``"layers[0]"``,
    ``"encoder.conv"``), each with its block for the weight as Equinox stores it,
    ``(out, in)`` or ``(out, in/groups, k…)``, bias last:

    * ``eqx.nn.Linear`` (``"scalar"`` features included): ``tape.dense``;
    * ``eqx.nn.Conv`` (1-, 2- and 3-D, any stride, padding, dilation, ``groups`` — one block
      per group, ``"name[i]"`` — and padding mode; channels-first per sample as Equinox has
      it): ``tape.conv``;
    * ``eqx.nn.Embedding`` called on a sample's scalar index: ``tape.embed``;
    * ``eqx.nn.LayerNorm`` and ``eqx.nn.RMSNorm`` over a 1-D ``shape`` and ``eqx.nn.GroupNorm``
      with ``channelwise_affine`` (its spatial axes as positions): the exact ``[weight bias]``
      block of ``tape.norm``, the normalised input computed as Equinox computes it;
    * the four ``eqx.nn.Linear`` projections of ``eqx.nn.MultiheadAttention``, one block each
      (``"attn.query_proj"``, ``"attn.key_proj"``, ``"attn.value_proj"``,
      ``"attn.output_proj"``); the attention itself is Equinox's.

    A layer may be called directly on a sample's input or mapped over positions by the model's
    own ``jax.vmap`` (``jax.vmap(self.linear)(x)`` for ``x`` of shape ``(T, d)``, as
    ``eqx.nn.MultiheadAttention`` does with its four projections, and as transformers apply
    their embedding, LayerNorms and feed-forward layers): it is then one weight-shared layer of
    ``T`` positions per sample, whose block ``weight_sharing`` chooses (``"expand"``,
    ``"sample"``). The wrappers see both maps through :func:`jax.custom_batching.custom_vmap`.
    A convolution mapped over positions, a layer under nested maps inside the model or under
    another transformation of the model's own (``jax.lax.scan``/``map``/``cond``, ``jax.jit``,
    ``jax.checkpoint``), and a layer called twice in one pass raise ``ValueError`` in
    :func:`~kronsum.adapters.jax.collect`; reading a routed layer's ``weight`` outside its call
    (manual weight tying) raises ``AttributeError``. Layers of other types with parameters (and
    norms over more than one axis), subclasses that override a layer's ``__call__`` or add
    fields, and ``eqx.nn.Shared``, ``WeightNorm`` and ``SpectralNorm`` (which use a layer's
    parameters outside its call) are computed by Equinox and get no block
    (``eqx.nn.BatchNorm``, whose batch statistics couple the samples, among them): one
    ``UserWarning`` per ``apply`` function names them. Embedding ids are looked up as
    ``weight[x]`` does (negative from the end, out of range clamped). The optax
    :class:`~kronsum.adapters.jax.Preconditioner` of this ``apply`` finds each layer's
    ``weight`` and ``bias`` in ``params`` (and in the updates) by the same paths.

    Examples
    --------
    >>> import jax
    >>> import equinox as eqx
    >>> from kronsum.adapters.jax import PLAIN, collect, equinox_apply
    >>> model = eqx.nn.MLP(4, 3, width_size=8, depth=1, activation=jax.nn.tanh,
    ...                    key=jax.random.PRNGKey(0))
    >>> X = jax.random.normal(jax.random.PRNGKey(1), (16, 4))
    >>> apply, params = equinox_apply(model)
    >>> bool(jax.numpy.allclose(apply(params, X, PLAIN), jax.vmap(model)(X)))
    True
    >>> {k: (F.m, F.n) for k, F in collect(apply, params, X, fisher="exact").items()}
    {'layers[0]': (8, 5), 'layers[1]': (3, 9)}
    """
    try:
        import equinox as eqx
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("equinox_apply needs Equinox: pip install equinox") from exc
    from ._flax import _warn_once

    params, static = eqx.partition(model, eqx.is_inexact_array)
    warned: set = set()

    def apply(params: Any, inputs: Any, tape: Any) -> Any:
        m = eqx.combine(params, static)
        skipped: list = []
        out = tape._vmap(lambda t: _routed(m, t, skipped), inputs)
        _warn_once(skipped, warned, "equinox_apply", "Equinox")
        return out

    apply._kronsum_layout = "equinox"  # the optax Preconditioner finds the weights by path
    return apply, params


def _routed(model: Any, tape: Any, skipped: list) -> Any:
    """``model`` with every covered layer replaced by a module that writes through ``tape``
    (the same arrays); the modules holding other parameters appended to ``skipped``."""
    import equinox as eqx
    import jax

    nn = eqx.nn
    cls = _classes()
    layers = (nn.Linear, nn.Conv, nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)

    def route(path, leaf):
        name = jax.tree_util.keystr(path).lstrip(".")
        if _plain(leaf, nn.Linear):
            return cls["linear"](leaf, name, tape)
        if _plain(leaf, nn.Conv) and not isinstance(leaf, nn.ConvTranspose):
            return cls["conv"](leaf, name, tape)
        if _plain(leaf, nn.Embedding):
            return cls["embed"](leaf, name, tape)
        if ((_plain(leaf, nn.LayerNorm) or _plain(leaf, nn.RMSNorm)) and len(leaf.shape) == 1
                and (leaf.use_weight or leaf.use_bias)):
            return cls["norm"](leaf, name, tape)
        if _plain(leaf, nn.GroupNorm) and leaf.channelwise_affine:
            return cls["group"](leaf, name, tape)
        return leaf  # an array, a static value, or a module left to Equinox (named if it trains)

    # modules that use a layer's parameters outside its call (tied weights, reparametrised
    # weights) are left to Equinox whole: a block of the inner layer would not be the Fisher
    # of the parameters they train
    opaque = tuple(getattr(nn, n) for n in ("Shared", "WeightNorm", "SpectralNorm") if hasattr(nn, n))
    routed = (route((), model) if isinstance(model, layers)
              else jax.tree_util.tree_map_with_path(route, model,
                                                     is_leaf=lambda x: isinstance(x, layers + opaque)))
    taped = cls["base"]
    flat, _ = jax.tree_util.tree_flatten_with_path(routed, is_leaf=lambda x: isinstance(x, taped))
    for path, leaf in flat:  # parameters outside the routed layers: their modules, named
        if not isinstance(leaf, taped) and eqx.is_inexact_array(leaf):
            owner = jax.tree_util.keystr(path[:-1]).lstrip(".") or "the model"
            skipped.append(owner)
    return routed


def _plain(leaf: Any, base: type) -> bool:
    """Whether ``leaf`` computes what the Equinox layer ``base`` computes: an instance of it or
    of a subclass (e.g. ``nn.Conv1d`` of ``nn.Conv``) that keeps ``__call__`` and adds no
    fields. A user's subclass that overrides the call (padding first, an extra learned scale)
    is left to Equinox, so its parameters are reported instead of blocked wrongly."""
    import dataclasses

    if not isinstance(leaf, base):
        return False
    cls = type(leaf)
    if cls is base:
        return True
    fields = {f.name for f in dataclasses.fields(cls)} == {f.name for f in dataclasses.fields(base)}
    return fields and cls.__call__ is base.__call__


def _classes() -> dict[str, Any]:
    """The wrapper modules (one class per layer type, made once)."""
    if _TAPED:
        return _TAPED
    import equinox as eqx
    import jax.numpy as jnp

    import jax

    class _Taped(eqx.Module):
        layer: Any
        name: str = eqx.field(static=True)
        tape: Any = eqx.field(static=True)

        def __getattr__(self, attr):  # only for names the wrapper lacks: the layer's own
            layer = self.__dict__.get("layer")
            if attr.startswith("__") or attr not in getattr(type(layer), "__dataclass_fields__", {}):
                raise AttributeError(attr)
            value = getattr(layer, attr)
            if eqx.is_array(value):  # a parameter used outside the layer's call
                raise AttributeError(
                    f"layer {self.__dict__.get('name')!r} is routed through kronsum's tape: its "
                    f"{attr!r} was read outside its call (weight tying, a reparametrised weight), "
                    "which its Kronecker block would not account for; such uses are not supported "
                    "(eqx.nn.Shared, WeightNorm and SpectralNorm are left to Equinox)")
            return value  # configuration (in_features, kernel_size, ...) reads through

    class _Linear(_Taped):
        def __call__(self, x, *, key=None):
            lin = self.layer
            if lin.in_features == "scalar" and jnp.shape(x) != ():
                raise ValueError(f"layer {self.name!r}: x must have scalar shape")

            def write(tape, xs, lead):  # xs: (A, ...) samples or positions; lead: (1, A) or (A, 1)
                xb = jnp.reshape(xs, lead + (-1,))
                return tape.dense(self.name, xb, lin.weight.T, lin.bias)

            y = _mapped(self, x, write)
            return jnp.squeeze(y, -1) if lin.out_features == "scalar" else y

    class _Conv(_Taped):
        def __call__(self, x, *, key=None):
            c = self.layer
            d = c.num_spatial_dims
            if x.ndim != d + 1:
                raise ValueError(f"layer {self.name!r}: Conv takes an input of rank {d + 1} "
                                 f"(channels, spatial…), got shape {x.shape}")
            kernel = jnp.transpose(c.weight, tuple(range(2, d + 2)) + (1, 0))  # (k…, in/g, out)
            bias = None if c.bias is None else jnp.reshape(c.bias, (-1,))

            def write(tape, xs, lead):
                if lead[0] == 1 and xs.shape[0] > 1:
                    raise ValueError(f"layer {self.name!r}: a convolution under a map over "
                                     "positions inside the model is not supported")
                padding = c.padding
                if c.padding_mode != "ZEROS":
                    xs, padding = jax.vmap(c._nonzero_pad)(xs), "VALID"
                xb = jnp.moveaxis(xs, 1, -1)  # (A, spatial…, in): channels-last
                y = tape.conv(self.name, xb, kernel, bias, stride=c.stride, padding=padding,
                              dilation=c.dilation, groups=c.groups)
                return jnp.moveaxis(y, -1, 1)[:, None]  # (A, 1, out, spatial…)

            return _mapped(self, x, write)

    class _Embed(_Taped):
        def __call__(self, x, *, key=None):
            if jnp.shape(x) != ():
                raise ValueError(f"layer {self.name!r}: eqx.nn.Embedding takes a scalar index, "
                                 f"got shape {jnp.shape(x)}")

            def write(tape, xs, lead):
                # Equinox looks up ``weight[x]``: JAX indexing wraps a negative index once and
                # clamps one out of range; the same rows are looked up (and recorded) here
                num = self.layer.weight.shape[0]
                ids = jnp.clip(jnp.where(xs < 0, xs + num, xs), 0, num - 1)
                return tape.embed(self.name, jnp.reshape(ids, lead), self.layer.weight)

            return _mapped(self, x, write)

    def _dtype(x):  # the normalisation's dtype, as Equinox takes it
        with jax.numpy_dtype_promotion("standard"):
            return jnp.result_type(x.dtype, jnp.float32)

    class _Norm(_Taped):  # LayerNorm and RMSNorm over one axis
        def __call__(self, x, state=None, *, key=None):
            ln = self.layer
            kind = type(ln).__name__
            if x.shape != ln.shape:
                raise ValueError(f"layer {self.name!r}: {kind}({ln.shape}) got shape {x.shape}")
            orig = x.dtype

            def write(tape, xs, lead):
                dtype = _dtype(xs)
                xs = xs.astype(dtype)
                if isinstance(ln, eqx.nn.RMSNorm):
                    xhat = xs * jax.lax.rsqrt(jnp.mean(xs**2, axis=-1, keepdims=True) + ln.eps)
                else:
                    mean = jnp.mean(xs, axis=-1, keepdims=True)
                    var = jnp.maximum(0.0, jnp.var(xs, axis=-1, keepdims=True))
                    xhat = (xs - mean) * jax.lax.rsqrt(var + ln.eps)
                w = ln.weight.astype(dtype) if ln.use_weight else None
                b = ln.bias.astype(dtype) if ln.use_bias else None
                return tape.norm(self.name, jnp.reshape(xhat, lead + (-1,)), w, b).astype(orig)

            y = _mapped(self, x, write)
            return y if state is None else (y, state)

    class _GroupNorm(_Taped):  # channel-first (C, spatial…) per sample, per-channel affine
        def __call__(self, x, state=None, *, key=None):
            gn = self.layer
            if x.ndim < 1 or x.shape[0] != gn.channels:
                raise ValueError(f"layer {self.name!r}: GroupNorm({gn.groups}, {gn.channels}) got "
                                 f"shape {x.shape}")
            orig = x.dtype

            def write(tape, xs, lead):  # xs (A, C, spatial…)
                dtype = _dtype(xs)
                xs = xs.astype(dtype)
                A, C = xs.shape[0], xs.shape[1]
                g = jnp.reshape(xs, (A, gn.groups, -1))
                mean = jnp.mean(g, axis=-1, keepdims=True)
                var = jnp.maximum(0.0, jnp.var(g, axis=-1, keepdims=True))
                xhat = jnp.reshape((g - mean) * jax.lax.rsqrt(var + gn.eps), xs.shape)
                xl = jnp.moveaxis(xhat, 1, -1)  # (A, spatial…, C)
                y = tape.norm(self.name, jnp.reshape(xl, lead + (-1, C)), gn.weight.astype(dtype),
                              gn.bias.astype(dtype))
                y = jnp.moveaxis(jnp.reshape(y, (A,) + xl.shape[1:]), -1, 1)  # (A, C, spatial…)
                return jnp.reshape(y, lead + xs.shape[1:]).astype(orig)

            y = _mapped(self, x, write)
            return y if state is None else (y, state)

    _TAPED.update(base=_Taped, linear=_Linear, conv=_Conv, embed=_Embed, norm=_Norm, group=_GroupNorm)
    return _TAPED


def _mapped(wrapper: Any, x: Any, write: Callable) -> Any:
    """One sample's call of a layer wrapper, written through its tape.

    ``write(tape, xs, lead)`` writes the layer for ``xs`` of shape ``(A, …)`` (``A`` samples
    or positions, each an input of the layer's per-sample shape), reshaped with ``lead``, and
    returns the output of shape ``lead + (…)``: ``lead = (A, 1)`` for ``A`` samples of one
    position each, ``(1, A)`` for one sample of ``A`` positions.

    Without a recording tape (``PLAIN``) the layer is computed directly. Under
    :func:`~kronsum.adapters.jax.collect` the call is a :func:`jax.custom_batching.custom_vmap`
    function whose batching rule sees the maps it is under: the tape's map over the samples
    (the tape's ``marker`` is mapped) writes all samples at once through the tape's
    ``parent``; a map of the model's own over positions (``jax.vmap(layer)(x)``, as in
    ``eqx.nn.MultiheadAttention``; the marker is not mapped) writes this sample's positions
    as one weight-shared layer call (``T`` positions) through the sample's own tape.
    """
    import jax.numpy as jnp
    from jax.custom_batching import custom_vmap

    from .jax import PLAIN

    tape = wrapper.tape
    parent = getattr(tape, "parent", None)
    if parent is None:  # PLAIN, or a tape used without its per-sample map
        return write(tape, x[None], (1, 1))[0, 0]

    @custom_vmap
    def call(marker, x):  # traced for its output's shape; under collect it always runs mapped
        return write(PLAIN, x[None], (1, 1))[0, 0]

    @call.def_vmap
    def rule(axis_size, in_batched, marker, x):
        mapped_marker, mapped_x = in_batched
        if not mapped_x:
            x = jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))
        if mapped_marker:  # the tape's map over the samples: all of them at once
            if wrapper.name in getattr(parent, "shapes", ()) or wrapper.name in getattr(parent, "inputs", ()):
                raise ValueError(  # a second trace of the call: lax.scan, or a shared layer
                    f"layer {wrapper.name!r} was called twice in one pass, or inside a "
                    "transformation of its own (e.g. jax.lax.scan over positions): its inputs "
                    "cannot leave it; such layers are not supported here")
            return write(parent, x, (axis_size, 1))[:, 0], True
        return write(tape, x, (1, axis_size))[0], True  # positions of one sample

    return call(tape.marker, x)
