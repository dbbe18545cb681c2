r"""JAX adapter: per-layer Fisher blocks of a plain-JAX model as :class:`~kronsum.KronSum`.

JAX models are functions, so there are no hooks to install; instead the model writes its dense
and convolution layers through a *tape* it receives as an argument::

    def apply(params, x, tape):
        h = jnp.tanh(tape.dense("hidden", x, params["hidden"]["kernel"], params["hidden"]["bias"]))
        return tape.dense("out", h, params["out"]["kernel"])

Called with ``PLAIN`` it is the ordinary model (``apply(params, x, PLAIN)``, jit it as
usual). :func:`collect` calls it with a recording tape that adds a zero perturbation to every
layer's pre-activation and keeps the layer's inputs; one ``jax.vjp`` with respect to the
perturbations, vmapped over the output-gradient terms, gives the gradients with respect to the
pre-activations — no parameter gradient is formed.

Layouts are Flax's: a dense ``kernel`` is ``(in, out)``, a conv ``kernel`` ``(k…, in, out)``
(WIO, HWIO, DHWIO) with channels-last inputs (NWC, NHWC, NDHWC). The blocks follow kronsum's
conventions for the weight **stored (out, in)**, i.e. ``kernel.T`` for dense and, for a 2-D
conv, ``kernel.transpose(3, 2, 0, 1).reshape(out, -1)`` (input channel major, then kh, kw;
1-D and 3-D alike), with the bias as an extra last column:
gradient-side ⊗ activation-side in row-major vec. The Fisher types and the reduction weights are
those of :mod:`kronsum.adapters.torch`: ``loss="cross_entropy"`` (integer labels) or ``"mse"``
(``ℓ_n = ‖f_n − y_n‖²``, Fisher ``Σ 2 JᵀJ``), ``reduction="sum"`` or ``"mean"`` (``1/N`` for
cross-entropy, ``1/(N·D)`` for MSE, as ``optax``-style ``jnp.mean`` of the squared error over all
entries).

Examples
--------
>>> import jax
>>> import jax.numpy as jnp
>>> from kronsum.adapters.jax import collect
>>> def apply(params, x, tape):
...     h = jnp.tanh(tape.dense("hidden", x, params["w1"], params["b1"]))
...     return tape.dense("out", h, params["w2"])
>>> k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
>>> params = {"w1": jax.random.normal(k1, (4, 8)), "b1": jnp.zeros(8),
...           "w2": jax.random.normal(k2, (8, 3))}
>>> X = jax.random.normal(k3, (16, 4))
>>> blocks = collect(apply, params, X, fisher="exact")
>>> {name: (F.m, F.n) for name, F in blocks.items()}
{'hidden': (8, 5), 'out': (3, 8)}
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import numpy as np

try:  # importable without JAX (for its docs); its functions need it
    import jax
    import jax.numpy as jnp
    from jax import lax
except ImportError:  # pragma: no cover - depends on the environment
    jax = None  # type: ignore[assignment]

from .._sum import KronSum

__all__ = ["FISHER_TYPES", "PLAIN", "LayerCurvature", "Preconditioner", "Tape", "collect", "equinox_apply", "flax_apply",
           "nnx_apply"]

#: The Fisher types :func:`collect` knows.
FISHER_TYPES = ("mc", "empirical", "exact")
_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}  # the spatial axes' letters of 1-, 2- and 3-D convolutions


def _require_jax() -> None:
    if jax is None:  # pragma: no cover - depends on the environment
        raise ImportError("kronsum.adapters.jax needs JAX; install it with `pip install 'kronsum[jax]'`")


def _ints(v: Any, d: int, what: str, name: str) -> tuple[int, ...]:
    """An int or ``d`` ints as a ``d``-tuple (a convolution's stride or dilation)."""
    out = (int(v),) * d if isinstance(v, int) else tuple(int(a) for a in v)
    if len(out) != d:
        raise ValueError(f"layer {name!r}: {what} must be an int or {d} ints for a {d}-D "
                         f"convolution, got {v!r}")
    return out


def _padding(p: Any, d: int, name: str) -> Any:
    """``"SAME"``/``"VALID"``, or ``d`` ``(low, high)`` pairs, from a string, an int, or ``d``
    ints or pairs."""
    if isinstance(p, str):
        return p.upper()
    if isinstance(p, int):
        return ((p, p),) * d
    out = tuple((int(a), int(a)) if isinstance(a, int) else (int(a[0]), int(a[1])) for a in p)
    if len(out) != d:
        raise ValueError(f"layer {name!r}: padding must be a string, an int or {d} ints or "
                         f"pairs for a {d}-D convolution, got {p!r}")
    return out


class Tape:
    """The layers a model writes through; the plain tape (``PLAIN``) only computes them.

    ``dense(name, x, kernel, bias=None)``: ``x @ kernel + bias`` for ``x`` (N, ..., in) and
    ``kernel`` (in, out).
    ``conv(name, x, kernel, bias=None, *, stride=1, padding=0, dilation=1)``: a 1-, 2- or 3-D
    convolution of channels-last ``x`` (``(N, W, C)``, ``(N, H, W, C)``, ``(N, D, H, W, C)``)
    with a ``kernel`` of shape ``(k…, in, out)`` (Flax's WIO, HWIO, DHWIO); ``stride`` and
    ``dilation`` an int or one per spatial axis, ``padding`` an int, one int or pair per axis,
    ``"SAME"`` or ``"VALID"`` (as :func:`jax.lax.conv_general_dilated`). Its block is for the
    kernel viewed ``(out, in·∏k)``, input channel major. ``conv2d(...)``: the same for a 2-D
    kernel.
    ``embed(name, ids, table)``: ``table[ids]`` for integer ``ids`` (N, ...) and ``table``
    (num, dim): a dense layer of one-hot inputs whose kernel is ``table``, so its block is for
    ``table.T`` (``dim × num``, ``num × num`` activation factors). Ids follow ``jnp.take``
    (Flax's lookup): ``-num ≤ id < 0`` counts from the end, an id out of range gives a NaN row
    (``collect`` then refuses the non-finite statistics).
    ``norm(name, xhat, scale=None, bias=None)``: ``xhat * scale + bias`` over the last axis of
    the normalised input ``xhat`` (N, ..., C), ``scale``/``bias`` (C,) (one may be None): the
    affine part of LayerNorm / RMSNorm. Its block is for ``W = [scale bias]`` (``C × 2``, or
    ``C × 1``): the per-sample gradient ``[Σ_t g_t ∘ x̂_t, Σ_t g_t] = G_nᵀ I`` is an exact
    conv-form block with the two sums as positions and identity inputs.
    """

    def _out(self, name: str, y: Any, kind: str, a: Any) -> Any:  # the recording hook
        return y

    def _vmap(self, make: Callable[["Tape"], Callable[[Any], Any]], x: Any) -> Any:
        """``jax.vmap(make(tape))(x)``: a model written per sample (as Equinox models are),
        whose layers write through the tape ``make`` is given, mapped over the batch axis 0.
        Inside, each layer is called on a batch of one; a recording tape hands its statistics
        out of the map as batched arrays."""
        return jax.vmap(make(self))(x)

    def dense(self, name: str, x: Any, kernel: Any, bias: Any = None) -> Any:
        y = x @ kernel
        if bias is not None:
            y = y + bias
        return self._out(name, y, "dense", (x, bias is not None))

    def conv(self, name: str, x: Any, kernel: Any, bias: Any = None, *, stride: Any = 1,
             padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Any:
        d = jnp.ndim(kernel) - 2
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"layer {name!r}: groups must be an integer >= 1, got {groups!r}")
        if (d not in _SPATIAL or jnp.ndim(x) != d + 2
                or jnp.shape(x)[-1] != jnp.shape(kernel)[-2] * groups or jnp.shape(kernel)[-1] % groups):
            raise ValueError(f"layer {name!r}: conv takes x (N, spatial…, in) with 1 to 3 spatial "
                             f"axes and a kernel (k…, in/groups, out) of as many, out divisible by "
                             f"groups = {groups}; got x {jnp.shape(x)} and kernel {jnp.shape(kernel)}")
        stride, dilation = _ints(stride, d, "stride", name), _ints(dilation, d, "dilation", name)
        padding = _padding(padding, d, name)
        sp = _SPATIAL[d]
        y = lax.conv_general_dilated(x, kernel, window_strides=stride, padding=padding,
                                     rhs_dilation=dilation, feature_group_count=groups,
                                     dimension_numbers=("N" + sp + "C", sp + "IO", "N" + sp + "C"))
        if bias is not None:
            y = y + bias
        conv = (x, tuple(kernel.shape[:d]), stride, padding, dilation, sp)
        kind = "conv" if groups == 1 else ("conv", groups, bias is not None)
        return self._out(name, y, kind, (conv, bias is not None))

    def conv2d(self, name: str, x: Any, kernel: Any, bias: Any = None, *, stride: Any = 1,
               padding: Any = 0, dilation: Any = 1) -> Any:
        if jnp.ndim(kernel) != 4:
            raise ValueError(f"layer {name!r}: conv2d takes an HWIO kernel (kh, kw, in, out), got "
                             f"shape {jnp.shape(kernel)}; use tape.conv for 1-D and 3-D kernels")
        return self.conv(name, x, kernel, bias, stride=stride, padding=padding, dilation=dilation)

    def embed(self, name: str, ids: Any, table: Any) -> Any:
        if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
            raise TypeError(f"layer {name!r}: embed ids must be integers, got dtype "
                            f"{jnp.result_type(ids)}")
        if jnp.ndim(table) != 2:
            raise ValueError(f"layer {name!r}: embed table must be (num, dim), got shape "
                             f"{jnp.shape(table)}")
        # ``jnp.take``'s rule (Flax's lookup): a negative id counts from the end once, an id
        # out of range gives NaN rows; the recorded one-hot inputs index the same rows
        num = table.shape[0]
        ids = jnp.where(ids < 0, ids + num, ids)
        ids = jnp.where(ids < 0, num, ids)  # below -num: out of range, as jnp.take has it
        y = jnp.take(table, ids, axis=0, mode="fill")
        return self._out(name, y, "embed", (ids, num, table.dtype))

    def norm(self, name: str, xhat: Any, scale: Any = None, bias: Any = None) -> Any:
        C = jnp.shape(xhat)[-1]
        for arg, v in (("scale", scale), ("bias", bias)):
            if v is not None and jnp.shape(v) != (C,):
                raise ValueError(f"layer {name!r}: norm {arg} must be ({C},) for xhat of shape "
                                 f"{jnp.shape(xhat)}, got {jnp.shape(v)}")
        if scale is None and bias is None:
            raise ValueError(f"layer {name!r}: norm needs a scale or a bias (no parameters)")
        y = xhat
        if scale is not None:
            y = y * scale
        if bias is not None:
            y = y + bias
        return self._out(name, y, "norm", (xhat, scale is not None, bias is not None))


#: The tape of ordinary evaluation: ``apply(params, x, PLAIN)``.
PLAIN = Tape()


class _ShapeTape(Tape):
    def __init__(self):
        self.shapes: dict[str, Any] = {}
        self.kinds: dict[str, str] = {}

    def _out(self, name, y, kind, a):
        if name in self.shapes:
            raise RuntimeError(f"layer {name!r} is called twice in one pass; names must be unique")
        self.shapes[name] = jax.ShapeDtypeStruct(y.shape, y.dtype)
        self.kinds[name] = ("norm",) + a[1:] if kind == "norm" else kind  # grouped conv: a tuple
        return y

    def _vmap(self, make, x):
        N = jnp.shape(x)[0]
        inner = _ShapeTape()
        inner.parent = self  # see _RecordingTape._vmap

        def one(xi, marker):
            inner.marker = marker
            return make(inner)(xi)

        out = jax.vmap(one)(x, jnp.zeros((N,), jnp.float32))  # under eval_shape: shapes only
        inner.marker = None
        for name, s in inner.shapes.items():
            if name in self.shapes:
                raise RuntimeError(f"layer {name!r} is called twice in one pass; names must be unique")
            self.shapes[name] = jax.ShapeDtypeStruct((N,) + tuple(s.shape), s.dtype)
            self.kinds[name] = inner.kinds[name]
        return out


class _RecordingTape(Tape):
    def __init__(self, eps: dict[str, Any]):
        self.eps = eps
        self.inputs: dict[str, Any] = {}

    def _out(self, name, y, kind, a):
        if kind == "norm":  # the normalised input; the block is assembled in collect
            xhat = a[0]
            self.inputs[name] = lax.stop_gradient(jnp.reshape(xhat, (xhat.shape[0], -1, xhat.shape[-1])))
            return y + self.eps[name]
        if kind == "embed":  # one-hot inputs of a dense layer whose kernel is the table
            ids, num, dtype = a
            ids = jnp.reshape(ids, (ids.shape[0], -1))
            self.inputs[name] = jax.nn.one_hot(ids, num, dtype=dtype)
            return y + self.eps[name]
        payload, has_bias = a
        if isinstance(kind, tuple):  # a grouped conv: the bias column is appended per group in collect
            has_bias = False
        if kind == "dense":
            x = payload
            A = jnp.reshape(x, (x.shape[0], -1, x.shape[-1]))  # (N, T, in)
        else:
            x, ksize, stride, padding, dilation, sp = payload
            P = lax.conv_general_dilated_patches(  # (N, out positions…, in·∏k), in major
                x, ksize, stride, padding, rhs_dilation=dilation,
                dimension_numbers=("N" + sp + "C", "OI" + sp, "N" + sp + "C"))
            A = jnp.reshape(P, (P.shape[0], -1, P.shape[-1]))
        if has_bias:
            A = jnp.concatenate([A, jnp.ones(A.shape[:-1] + (1,), A.dtype)], axis=-1)
        self.inputs[name] = lax.stop_gradient(A)
        return y + self.eps[name]

    def _vmap(self, make, x):
        def one(xi, eps_i, marker):  # one sample: its layers' perturbations, inputs recorded inside
            inner = _RecordingTape(eps_i)
            # a layer wrapper that meets a map inside the model (jax.custom_batching) tells the
            # map over the samples (``marker`` mapped) from one over positions (not mapped)
            # and writes a whole batch through ``parent`` in the first case
            inner.parent, inner.marker = self, marker
            return make(inner)(xi), inner.inputs

        out, inputs = jax.vmap(one)(x, self.eps, jnp.zeros((jnp.shape(x)[0],), jnp.float32))
        for name, v in inputs.items():  # (N, 1, ...): each sample was a batch of one
            self.inputs[name] = jnp.reshape(v, (v.shape[0],) + v.shape[2:])
        return out


def _output_grad_terms(loss, f, targets, fisher, n_samples, key):
    """``(V (S, N, D), w (S, N))``: output gradients ``∇_f ℓ`` and their weights per term, for
    the sum reduction (the caller scales ``w`` for a mean)."""
    N = f.shape[0]
    f = jnp.reshape(f, (N, -1))
    D = f.shape[1]
    c = 1.0
    ones = jnp.ones((1, N), f.dtype)
    if loss == "cross_entropy":
        p = jax.nn.softmax(f, axis=1)
        eye = jnp.eye(D, dtype=f.dtype)
        if fisher == "empirical":
            return (p - eye[jnp.asarray(targets)])[None], c * ones
        if fisher == "mc":
            ys = jax.random.categorical(key, f, axis=1, shape=(n_samples, N))
            return p[None] - eye[ys], (c / n_samples) * jnp.ones((n_samples, N), f.dtype)
        return p[None] - eye[:, None, :], c * p.T  # exact: Σ_j p_j (p − e_j)(p − e_j)ᵀ
    if fisher == "empirical":
        y = jnp.reshape(jnp.asarray(targets, f.dtype), f.shape)
        return (2.0 * (f - y))[None], c * ones
    if fisher == "mc":
        eps = jax.random.normal(key, (n_samples, N, D), f.dtype)
        return math.sqrt(2.0) * eps, (c / n_samples) * jnp.ones((n_samples, N), f.dtype)
    V = jnp.broadcast_to(jnp.eye(D, dtype=f.dtype)[:, None, :], (D, N, D))
    return V, 2.0 * c * jnp.ones((D, N), f.dtype)


def _check_targets(loss: str, targets: Any, out_shape: tuple) -> None:
    """Class indices ``(N,)`` in ``[0, C)`` or regression targets of the output's shape."""
    y = np.asarray(targets)
    N = out_shape[0]
    if loss == "cross_entropy":
        if y.dtype.kind not in "iu":
            raise ValueError(
                f"cross_entropy: targets must be integer class indices, got dtype {y.dtype}"
            )
        if y.shape != (N,):
            raise ValueError(f"cross_entropy: targets must have shape ({N},), got {y.shape}")
        C = out_shape[1]
        bad = (y < 0) | (y >= C)
        if bad.any():
            raise ValueError(
                f"cross_entropy: targets must be class indices in [0, {C}); got {int(y[bad][0])}"
            )
    elif y.size != math.prod(out_shape) or y.ndim == 0 or y.shape[0] != N:
        raise ValueError(f"mse: targets must have the output's shape {out_shape}, got {y.shape}")
    elif y.dtype.kind not in "fiu":
        raise ValueError(f"mse: targets must be real numbers, got dtype {y.dtype}")


def _statistics_impl(apply, loss, fisher, n_samples, params, inputs, targets, key):
    """Inputs (per layer) and output gradients (per layer, per term) and the term weights."""
    shape_tape = _ShapeTape()
    jax.eval_shape(lambda p, x: apply(p, x, shape_tape), params, inputs)
    eps0 = {name: jnp.zeros(s.shape, s.dtype) for name, s in shape_tape.shapes.items()}

    def perturbed(eps):
        tape = _RecordingTape(eps)
        out = apply(params, inputs, tape)
        return out, tape.inputs

    out, vjp_fn, acts = jax.vjp(perturbed, eps0, has_aux=True)
    if loss == "cross_entropy" and out.ndim != 2:
        raise ValueError(f"cross_entropy: the model output must be (N, C), got {out.shape}")
    V, w = _output_grad_terms(loss, lax.stop_gradient(out), targets, fisher, n_samples, key)
    (grads,) = jax.vmap(vjp_fn)(jnp.reshape(V, (V.shape[0],) + out.shape).astype(out.dtype))
    return acts, grads, w


def _statistics(*args):
    global _statistics_jit
    if _statistics_jit is None:
        _statistics_jit = jax.jit(_statistics_impl, static_argnums=(0, 1, 2, 3))
    return _statistics_jit(*args)


_statistics_jit = None


def _check_options(fisher: str, loss: str, reduction: str, weight_sharing: str,
                   n_samples: Any) -> None:
    """``collect``'s options (also checked by the optax ``Preconditioner`` at construction)."""
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
    if loss not in ("cross_entropy", "mse"):
        raise ValueError(f"loss must be 'cross_entropy' or 'mse', got {loss!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if weight_sharing not in ("expand", "sample"):
        raise ValueError(f"weight_sharing must be 'expand' or 'sample', got {weight_sharing!r}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")


def collect(
    apply: Callable[..., Any],
    params: Any,
    inputs: Any,
    targets: Any = None,
    *,
    loss: str = "cross_entropy",
    reduction: str = "mean",
    fisher: str = "mc",
    n_samples: int = 1,
    key: Any = None,
    weight_sharing: str = "expand",
    check_finite: bool = True,
) -> dict[str, KronSum]:
    r"""Per-layer Fisher blocks of a tape-written JAX model as ``{name: KronSum}`` of JAX arrays.

    Parameters
    ----------
    apply : callable
        ``apply(params, inputs, tape) -> outputs``, ``(N, C)`` logits or ``(N, ...)``
        predictions; its layers go through ``tape.dense`` / ``tape.conv`` (see :class:`Tape`).
        Names must be unique within a pass.
    params : pytree
        Passed through to ``apply``.
    inputs : array
        One batch of ``N`` samples.
    targets : array, optional
        Class indices ``(N,)`` or regression targets; needed only for ``fisher="empirical"``.
    loss : {"cross_entropy", "mse"}
    reduction : {"mean", "sum"}
        The reduction of the loss as the user defines it; it sets the weights (module docstring).
    fisher : {"mc", "empirical", "exact"}
        As in :func:`kronsum.adapters.torch.collect`.
    n_samples : int
        Monte-Carlo samples per input for ``fisher="mc"``.
    key : jax.random.PRNGKey, optional
        Random key of ``fisher="mc"`` (default ``PRNGKey(0)``).
    weight_sharing : {"expand", "sample"}
        For a dense layer on ``(N, ..., in)`` inputs: positions flattened into the batch (outer
        form) or kept as the positions of the conv form (the exact per-sample block).
    check_finite : bool
        Passed to the ``KronSum`` constructors.

    Returns
    -------
    dict of str to KronSum
        In the order the layers are called; ``m = out``, ``n = in`` (``in·kh·kw`` for conv) plus
        one with a bias.
    
    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import kronsum as ks
    >>> from kronsum.adapters.jax import collect
    >>> def apply(params, x, tape):
    ...     return tape.dense("fc", x, params["w"], params["b"])
    >>> params = {"w": jnp.ones((3, 2)) / 3, "b": jnp.zeros(2)}
    >>> X, y = jnp.arange(12.0).reshape(4, 3) / 12, jnp.array([0, 1, 1, 0])
    >>> F = collect(apply, params, X, y, fisher="empirical", reduction="sum")["fc"]
    >>> F.form, F.m, F.n                      # out = 2; in = 3 plus the bias column
    ('outer', 2, 4)
    >>> float(ks.kfac(F).scale)               # sum reduction: weight 1 per sample
    4.0
    """
    return _collect(apply, params, inputs, targets, loss=loss, reduction=reduction, fisher=fisher,
                    n_samples=n_samples, key=key, weight_sharing=weight_sharing,
                    check_finite=check_finite)[0]


@contextlib.contextmanager
def _inner_transformations_refused():
    """A layer written inside a transformation of the model's own that the tape cannot see
    through leaks the recorded inputs as tracers: a ``ValueError`` that says so."""
    try:
        yield
    except jax.errors.UnexpectedTracerError as exc:
        raise ValueError(
            "a layer was called inside a JAX transformation of the model's own that kronsum "
            "cannot see through (jax.jit, jax.checkpoint, jax.lax.map/scan/cond/while_loop, "
            "custom_vjp/custom_jvp, jax.jvp/grad inside the model); its inputs cannot leave it. "
            "Call the layers outside such transformations (a jax.vmap over positions of an "
            "Equinox model's layers is supported)") from exc


def _collect(
    apply: Callable[..., Any],
    params: Any,
    inputs: Any,
    targets: Any = None,
    *,
    loss: str = "cross_entropy",
    reduction: str = "mean",
    fisher: str = "mc",
    n_samples: int = 1,
    key: Any = None,
    weight_sharing: str = "expand",
    check_finite: bool = True,
) -> tuple[dict[str, KronSum], dict[str, str]]:
    """:func:`collect` and each block's parameter layout (``"dense"``, ``"conv"``, ``"embed"``,
    ``"norm"``, or ``("conv", i, groups)`` for group ``i`` of a grouped convolution), which the
    optax preconditioner needs to find the parameters."""
    _require_jax()
    _check_options(fisher, loss, reduction, weight_sharing, n_samples)
    if fisher == "empirical" and targets is None:
        raise ValueError("fisher='empirical' needs the targets")

    N = int(jnp.shape(inputs)[0]) if jnp.ndim(inputs) else None
    if N == 0:
        raise ValueError(f"inputs: an empty batch (shape {tuple(jnp.shape(inputs))})")
    shape_tape = _ShapeTape()
    with _inner_transformations_refused():
        shape_tape.out_shape = jax.eval_shape(lambda p, x: apply(p, x, shape_tape), params, inputs).shape
    if not shape_tape.shapes:
        raise ValueError("apply called no tape layer (dense, conv, conv2d, embed, norm)")
    for name, sd in shape_tape.shapes.items():
        if N is not None and (len(sd.shape) == 0 or sd.shape[0] != N):
            raise ValueError(
                f"layer {name!r}: its output has shape {tuple(sd.shape)}, whose first axis is not "
                f"the batch of {N}: a layer applied to something without the batch axis (e.g. an "
                "embedding of jnp.arange(T) or a parameter table, broadcast over the samples) or "
                "to stacked members (a lifted vmap) has no per-sample statistics here")
    out_shape = tuple(shape_tape.out_shape)
    if loss == "cross_entropy" and len(out_shape) != 2:
        raise ValueError(f"cross_entropy: the model output must be (N, C), got {out_shape}")
    if targets is not None:
        _check_targets(loss, targets, out_shape)
    key = jax.random.PRNGKey(0) if key is None else key
    with _inner_transformations_refused():
        acts, grads, w = _statistics(apply, loss, fisher, int(n_samples), params, inputs, targets, key)

    S, N = w.shape
    if reduction == "mean":  # 1/N for cross-entropy, 1/(N·D) for MSE (the mean over all entries)
        D = math.prod(shape_tape.out_shape[1:])
        w = w / (N if loss == "cross_entropy" else N * D)
    wf = jnp.reshape(w, (S * N,))
    result: dict[str, KronSum] = {}
    layouts: dict[str, str] = {}
    for name in shape_tape.shapes:
        kind, A = shape_tape.kinds[name], acts[name]
        g = grads[name]  # (S, N, ..., out)
        G = jnp.reshape(g, (S * N, -1, g.shape[-1]))  # (S·N, T, out)
        if isinstance(kind, tuple) and kind[0] == "conv":  # groups: one block per group
            _, groups, has_bias = kind
            A = jnp.reshape(jnp.broadcast_to(A[None], (S,) + A.shape), (S * N,) + A.shape[1:])
            og, ig = G.shape[-1] // groups, A.shape[-1] // groups  # ig = in/groups·∏k columns
            for i in range(groups):
                Ai = A[..., i * ig:(i + 1) * ig]
                if has_bias:
                    Ai = jnp.concatenate([Ai, jnp.ones(Ai.shape[:-1] + (1,), Ai.dtype)], axis=-1)
                key = f"{name}[{i}]"
                result[key] = KronSum.from_conv(G[..., i * og:(i + 1) * og], Ai, wf, check_finite=check_finite)
                layouts[key] = ("conv", i, groups)
            continue
        if isinstance(kind, tuple):  # norm: rows Σ_t g_t ∘ x̂_t and Σ_t g_t, identity inputs
            _, has_scale, has_bias = kind
            X = jnp.reshape(jnp.broadcast_to(A[None], (S,) + A.shape), G.shape)
            rows = ([jnp.sum(G * X, axis=1)] if has_scale else []) + (
                [jnp.sum(G, axis=1)] if has_bias else [])
            p = len(rows)
            result[name] = KronSum.from_conv(
                jnp.stack(rows, axis=1), jnp.broadcast_to(jnp.eye(p, dtype=G.dtype), (S * N, p, p)),
                wf, check_finite=check_finite)
            layouts[name] = "norm"
            continue
        layouts[name] = "conv" if kind == "conv" else kind  # "dense" or "embed"
        A = jnp.reshape(jnp.broadcast_to(A[None], (S,) + A.shape), (S * N,) + A.shape[1:])
        T = A.shape[1]
        if kind == "conv" or (weight_sharing == "sample" and T > 1):
            result[name] = KronSum.from_conv(G, A, wf, check_finite=check_finite)
        else:
            result[name] = KronSum.from_outer(
                jnp.reshape(G, (-1, G.shape[-1])), jnp.reshape(A, (-1, A.shape[-1])),
                jnp.repeat(wf, T) if T > 1 else wf, check_finite=check_finite)
    return result, layouts


from ._equinox import equinox_apply  # noqa: E402
from ._flax import flax_apply, nnx_apply  # noqa: E402
from ._jax_precond import LayerCurvature, Preconditioner  # noqa: E402  (it uses collect above)
