r"""Natural-gradient preconditioning for optax (see :class:`Preconditioner`)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

try:
    import jax
    import jax.numpy as jnp
except ImportError:  # pragma: no cover - depends on the environment
    jax = None  # type: ignore[assignment]

from .._ekfac import EigenKron
from .._running import ESTIMATORS, RunningEstimate
from ._torch_precond import _positive  # the same check for both frameworks (no torch needed)

Path = tuple  # keys into the params pytree, e.g. ("params", "Dense_0", "kernel")


class LayerCurvature(NamedTuple):
    """One block's damped-inverse data, a pytree of arrays: the factors' eigenvectors
    ``UL`` ``(m, m)``, ``UR`` ``(n, n)`` and the undamped eigenvalue grid ``E`` ``(m, n)``
    (``σ a_i b_j`` for a :class:`~kronsum.Kron`, the corrected eigenvalues for an
    :class:`~kronsum.EigenKron`): ``(F̂ + λI)⁻¹ vec V = vec(UL ((ULᵀ V UR) / (E + λ)) URᵀ)``."""

    UL: Any
    UR: Any
    E: Any


class Preconditioner:
    r"""K-FAC-style preconditioning of a tape-written JAX model for optax, with kronsum's
    running K-FAC, TKFAC, K-FOC or EKFAC estimates.

    Two halves: :meth:`refresh` (eager, outside ``jit``) takes a batch's Fisher blocks with
    :func:`~kronsum.adapters.jax.collect`, updates each block's
    :class:`~kronsum.RunningEstimate` and decomposes its damped inverse once; :meth:`transform`
    is an ``optax.GradientTransformationExtraArgs`` whose ``update`` (pure ``jax.numpy``,
    jittable) replaces each covered gradient by ``(F̂ + λI)⁻¹ ∇`` from the ``curvature=``
    pytree it is given (:meth:`curvature`), so the jitted step never recompiles when the
    estimates change::

        pre = Preconditioner(apply, estimator="kfoc_running", fisher="mc")
        tx = optax.chain(pre.transform(damping=1e-3), optax.sgd(0.1, momentum=0.9))
        opt_state = tx.init(params)

        @jax.jit
        def train_step(params, opt_state, curvature, x, y):
            grads = jax.grad(loss)(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params, curvature=curvature)
            return optax.apply_updates(params, updates), opt_state

        for step, (x, y) in enumerate(batches):
            if step % 10 == 0:
                pre.refresh(params, x, y, key=jax.random.PRNGKey(step))
            params, opt_state = train_step(params, opt_state, pre.curvature(), x, y)

    Parameters
    ----------
    apply : callable
        ``apply(params, inputs, tape)``, as for :func:`~kronsum.adapters.jax.collect`.
    layers : mapping, optional
        ``{tape layer name: (kernel path, bias path or None)}``, paths being tuples of keys
        into the params pytree. Default (Flax's layout): ``params[name]["kernel"]`` and
        ``params[name]["bias"]`` when present (or the same under ``params["params"]``, Flax's
        variables dict, or with NNX's trailing ``"value"`` in an ``nnx.State``), for every
        layer the tape records. Parameters not
        named keep their gradients.
    estimator : {"kfoc_running", "kfoc_approx", "kfac", "tkfac", "ekfac"}
        The streaming estimator (:class:`~kronsum.RunningEstimate`).
    fisher : {"mc", "empirical", "exact"}
    loss, reduction, n_samples, weight_sharing
        Passed to :func:`~kronsum.adapters.jax.collect`.
    decay : float
        The EMA decay of the running estimates, in ``[0, 1)``.
    kfoc_options : mapping, optional
        Keyword arguments of :func:`kronsum.kfoc` for the K-FOC estimators.
    basis_every : int, optional
        ``estimator="ekfac"``: refreshes between eigenbasis updates.

    Notes
    -----
    Layouts are the JAX adapter's: a dense kernel ``(in, out)`` has the block of ``kernel.T``
    with the bias as the last column; a conv kernel ``(k…, in, out)`` that of its
    ``(out, in·∏k)`` view (2-D: ``kernel.transpose(3, 2, 0, 1).reshape(out, -1)``). The damping enters exactly
    (``E + λ``); ``damping`` may be a schedule ``λ(count)`` (optax style, ``count`` the number
    of ``update`` calls). Cost per refresh: ``collect`` and the estimator per block and two
    eigendecompositions (``m³ + n³``); per update: four GEMMs per block (``O(mn(m + n))``).
    Statistics that are not finite raise ``ValueError`` in :meth:`refresh`; a non-finite
    gradient in the jitted ``update`` propagates, as in optax's own transformations (wrap the
    chain in ``optax.apply_if_finite`` to skip such steps). Refreshed on a Flax variables dict
    (``{"params": ...}``, as :func:`~kronsum.adapters.jax.flax_apply` needs), ``update`` takes
    the gradients of either that dict or of the bare ``params`` tree. ``curvature`` is an extra
    argument of ``update``: call ``tx.update`` yourself (``flax.training.TrainState.
    apply_gradients`` does not pass it through).

    Examples
    --------
    >>> import jax
    >>> import optax
    >>> import jax.numpy as jnp
    >>> from kronsum.adapters.jax import PLAIN, Preconditioner
    >>> def apply(params, x, tape):
    ...     h = jnp.tanh(tape.dense("hidden", x, params["hidden"]["kernel"], params["hidden"]["bias"]))
    ...     return tape.dense("out", h, params["out"]["kernel"])
    >>> k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    >>> params = {"hidden": {"kernel": jax.random.normal(k1, (4, 8)) / 2, "bias": jnp.zeros(8)},
    ...           "out": {"kernel": jax.random.normal(k2, (8, 3)) / 3}}
    >>> X, y = jax.random.normal(k3, (32, 4)), jnp.arange(32) % 3
    >>> def loss(p):
    ...     logits = apply(p, X, PLAIN)
    ...     return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(32), y])
    >>> pre = Preconditioner(apply, estimator="kfac")
    >>> tx = optax.chain(pre.transform(damping=1e-2), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> pre.refresh(params, X, y)
    >>> updates, state = jax.jit(tx.update)(jax.grad(loss)(params), state, params,
    ...                                     curvature=pre.curvature())
    >>> float(loss(optax.apply_updates(params, updates))) < float(loss(params))
    True
    """

    def __init__(self, apply: Callable[..., Any], layers: Mapping[str, tuple] | None = None, *,
                 estimator: str = "kfoc_running", fisher: str = "mc", loss: str = "cross_entropy",
                 reduction: str = "mean", decay: float = 0.95, n_samples: int = 1,
                 weight_sharing: str = "expand", kfoc_options: Mapping[str, Any] | None = None,
                 basis_every: int | None = None):
        from .jax import _check_options, _require_jax

        _require_jax()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        _check_options(fisher, loss, reduction, weight_sharing, n_samples)
        self.apply, self.estimator, self.fisher = apply, estimator, fisher
        self.layers = None if layers is None else _check_layers(layers)
        self._collect_kw = dict(loss=loss, reduction=reduction, fisher=fisher, n_samples=n_samples,
                                weight_sharing=weight_sharing)
        self._running_kw: dict[str, Any] = dict(kfoc_options=dict(kfoc_options or {}))
        if basis_every is not None:
            self._running_kw["basis_every"] = basis_every
        self.decay = decay
        RunningEstimate(estimator, decay, **self._running_kw)  # options checked now
        self._running: dict[str, RunningEstimate] = {}
        self._curvature: dict[str, LayerCurvature] = {}
        self._paths: dict[str, tuple] = {}
        self.refreshes = 0

    def refresh(self, params: Any, inputs: Any, targets: Any = None, *, key: Any = None) -> None:
        """Update the running estimates from one batch and recompute :meth:`curvature`.

        Eager (not jittable): one :func:`~kronsum.adapters.jax.collect` (``key`` seeds
        ``fisher="mc"``), the estimator per block, two eigendecompositions per block. Nothing
        changes when it raises.
        """
        from .jax import _collect

        blocks, layouts = _collect(self.apply, params, inputs, targets, key=key, **self._collect_kw)
        if self.layers is not None:
            paths = self.layers
        elif getattr(self.apply, "_kronsum_layout", None) == "equinox":
            paths = _equinox_paths(params, blocks, layouts)
        else:
            paths = _flax_paths(params, blocks, layouts)
        missing = [k for k in paths if k not in blocks]
        if missing:
            raise ValueError(f"layers {missing} were not recorded by the tape (recorded: {list(blocks)})")
        running = {k: self._running.get(k) or RunningEstimate(self.estimator, self.decay, **self._running_kw)
                   for k in paths}
        # the estimates and decompositions of every block first: a failure leaves all unchanged
        states = {k: running[k].state_dict() if k in self._running else None for k in paths}
        try:
            estimates = {k: running[k].update(blocks[k]) for k in paths}
            curvature = {k: _layer_curvature(est, k) for k, est in estimates.items()}
        except Exception:
            for k, s in states.items():
                if s is not None:
                    self._running[k] = RunningEstimate.from_state_dict(
                        s, kfoc_options=self._running_kw["kfoc_options"])
            raise
        self._running, self._curvature, self._paths = running, curvature, dict(paths)
        self.refreshes += 1

    def curvature(self) -> dict[str, LayerCurvature]:
        """``{layer: LayerCurvature}``, the pytree to pass as ``update(..., curvature=...)``."""
        if not self._curvature:
            raise RuntimeError("no estimate yet: call refresh(params, inputs, targets) first")
        return dict(self._curvature)

    @property
    def estimates(self) -> dict:
        """``{layer: Kron}`` (``"ekfac"``: ``EigenKron``): the current running estimates."""
        return {k: r.estimate for k, r in self._running.items()}

    def transform(self, damping: float | Callable[[Any], Any] = 1e-3, *,
                  kl_clip: float | None = None, learning_rate: float | None = None) -> Any:
        """The optax transformation: ``update(updates, state, params=None, *, curvature)``
        replaces each covered block of ``updates`` by ``(F̂ + λI)⁻¹`` times it.

        ``damping``: ``λ > 0`` or a schedule ``λ(count)``. ``kl_clip``: scale all preconditioned
        blocks by ``ν = min(1, √(kl_clip / (lr² Σ ⟨P∇, ∇⟩)))`` (Ba et al. 2017), with
        ``learning_rate`` the step size the chain applies afterwards.
        """
        import optax

        if not callable(damping):
            _positive("damping", damping)
        if kl_clip is not None:
            _positive("kl_clip", kl_clip)
            _positive("learning_rate (needed by kl_clip)", learning_rate)
        pre = self

        def init(params):
            del params
            return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

        def update(updates, state, params=None, *, curvature=None, **extra):
            del params, extra
            if curvature is None:
                raise ValueError("update needs curvature=pre.curvature() (after pre.refresh(...))")
            lam = damping(state.count) if callable(damping) else damping
            paths = pre._paths or pre.layers or {}
            unknown = [k for k in curvature if k not in paths]
            if unknown:
                raise ValueError(f"curvature has layers {unknown} this preconditioner has no "
                                 "parameter paths for: refresh it first")
            leaves = dict(_leaves(updates))
            new, quad = {}, 0.0
            for name, cur in curvature.items():
                kpath, bpath = _in_tree(leaves, paths[name])
                V = _block(name, leaves, kpath, bpath, paths[name][2], cur)
                W = jnp.swapaxes(cur.UL, -1, -2) @ V @ cur.UR
                P = cur.UL @ (W / (cur.E + lam)) @ jnp.swapaxes(cur.UR, -1, -2)
                quad = quad + jnp.sum(P * V)
                new[name] = P
            nu = 1.0
            if kl_clip is not None:
                nu = jnp.minimum(1.0, jnp.sqrt(kl_clip / (learning_rate ** 2 * jnp.maximum(quad, 1e-300))))
            repl = {}
            for name, P in new.items():
                kpath, bpath = _in_tree(leaves, paths[name])
                repl.update(_unblock(P * nu, leaves, kpath, bpath, paths[name][2], repl))
            out = jax.tree_util.tree_map_with_path(
                lambda kp, x: repl.get(_keys(kp), x).astype(x.dtype), updates)
            return out, optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))

        return optax.GradientTransformationExtraArgs(init, update)

    def __repr__(self) -> str:
        return (f"Preconditioner(estimator={self.estimator!r}, fisher={self.fisher!r}, "
                f"blocks={len(self._running)}, refreshes={self.refreshes})")


def _check_layers(layers: Mapping[str, tuple]) -> dict[str, tuple]:
    out = {}
    for name, spec in layers.items():
        if not (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], tuple)
                and (spec[1] is None or isinstance(spec[1], tuple))):
            raise ValueError(f"layers[{name!r}] must be (kernel path, bias path or None), paths "
                             f"being tuples of keys, got {spec!r}")
        out[name] = (*spec, None)  # the layout follows the kernel's rank (dense or HWIO conv)
    return out


def _flax_paths(params: Any, blocks: Mapping[str, Any], layouts: Mapping[str, str]) -> dict[str, tuple]:
    """Flax's layout: ``params[name]["kernel"]`` (and ``["bias"]``) for every recorded dense or
    conv layer, ``["embedding"]`` for an embedding, ``["scale"]`` and/or ``["bias"]`` for a
    normalisation layer; ``name`` split at ``"/"`` and matched key by key as strings (NNX's
    list indices are ints), optionally under ``"params"`` (linen's variables) and with NNX's
    trailing ``"value"``. Each entry: ``(kernel path or None, bias path or None, layout)``."""
    by_str = {tuple(str(k) for k in path): path for path, _ in _leaves(params)}
    keys_of = {"embed": ("embedding", None), "norm": ("scale", "bias")}
    out = {}
    for name in blocks:
        layout = layouts.get(name, "dense")
        kkey, bkey = keys_of.get(layout, ("kernel", "bias")) if isinstance(layout, str) else ("kernel", "bias")
        base = name if isinstance(layout, str) else name.rsplit("[", 1)[0]  # a conv group "name[i]"
        keys = tuple(base.split("/"))  # flax_apply / nnx_apply name nested modules "outer/inner"
        for root in ((), ("params",)):  # a bare tree, or Flax's variables {"params": ...}
            for tail in ((), ("value",)):  # NNX's State: a Variable's array under "value"
                k = by_str.get((*root, *keys, kkey, *tail))
                b = None if bkey is None else by_str.get((*root, *keys, bkey, *tail))
                if k is not None or (layout == "norm" and b is not None):
                    out[name] = (k, b, layout)
                    break
            if name in out:
                break
        else:
            raise ValueError(f"layer {name!r}: no params[{name!r}][{kkey!r}] (Flax's layout, also "
                             "under 'params'); pass layers={name: (kernel path, bias path or None)}")
    return out


def _equinox_paths(params: Any, blocks: Mapping[str, Any], layouts: Mapping[str, Any]) -> dict[str, tuple]:
    """Equinox's layout (:func:`~kronsum.adapters.jax.equinox_apply`): the layer at the block's
    path (``"layers[0]"``, ``"encoder.conv[1]"`` for group 1) with its ``weight`` stored
    ``(out, …)`` (layout ``"stored"``, or ``("stored", i, groups)``) and ``bias``; an
    embedding's ``weight`` (num, dim); a LayerNorm's ``weight`` and ``bias``."""
    import re

    by_str = {tuple(str(k) for k in path): path for path, _ in _leaves(params)}
    out = {}
    for name in blocks:
        layout = layouts.get(name, "dense")
        base = name.rsplit("[", 1)[0] if isinstance(layout, tuple) else name
        keys = tuple(re.findall(r"[^.\[\]]+", base))
        k, b = by_str.get((*keys, "weight")), by_str.get((*keys, "bias"))
        if layout == "embed":
            b, new = None, "embed"
        elif layout == "norm":
            new = "norm"
        elif isinstance(layout, tuple):
            new = ("stored", layout[1], layout[2])
        else:
            new = "stored"
        if k is None and b is None:
            raise ValueError(f"layer {name!r}: no weight at {keys} in the Equinox parameters; pass "
                             "layers={name: (kernel path, bias path or None)}")
        out[name] = (k, b, new)
    return out


def _keys(keypath) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in keypath)


def _leaves(tree) -> list:
    return [(_keys(kp), x) for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _in_tree(leaves: dict, paths: tuple) -> tuple:
    """The layer's (kernel, bias) paths in the tree being updated: as recorded, or without a
    leading ``"params"`` (refreshed on Flax's variables dict, updating the bare params tree,
    as ``jax.grad`` of a loss of ``params`` gives), and with or without NNX's trailing
    ``"value"`` (an ``nnx.State`` against its pure-dict form, which ``nnx.Optimizer`` updates)."""
    def variants(p):
        yield p
        if p[:1] == ("params",):
            yield p[1:]
        for q in ((p, p[1:]) if p[:1] == ("params",) else (p,)):
            yield q[:-1] if q[-1:] == ("value",) else (*q, "value")

    kpath, bpath = paths[:2]
    ref = kpath if kpath is not None else bpath
    for i, k in enumerate(variants(ref)):
        if k in leaves:
            return tuple(None if p is None else list(variants(p))[i] for p in (kpath, bpath))
    return kpath, bpath


def _block(name, leaves, kpath, bpath, layout, cur) -> Any:
    """The block's ``(m, n)`` gradient matrix: the kernel's ``(out, in[·kh·kw])`` view (a
    general dense kernel ``(in…, out…)`` flattened, an embedding table transposed), the bias as
    the last column; a normalisation layer's ``[scale bias]`` columns."""
    for p in (kpath, bpath):
        if p is not None and p not in leaves:
            raise ValueError(f"layer {name!r}: updates have no leaf at {p}")
    m, n = cur.E.shape
    if layout == "norm":
        V = jnp.stack([leaves[p] for p in (kpath, bpath) if p is not None], axis=1)
    elif _stored(layout):  # Equinox: the weight stored (out, …), bias of any shape with out entries
        K = leaves[kpath]
        rows = _group(layout, K.shape[0]) if isinstance(layout, tuple) else slice(None)
        V = jnp.reshape(K[rows], (-1, n - (bpath is not None)))
        if bpath is not None:
            V = jnp.concatenate([V, jnp.reshape(jnp.reshape(leaves[bpath], (-1,))[rows], (-1, 1))], axis=1)
    else:
        K = leaves[kpath]
        if isinstance(layout, tuple):  # group i of a grouped conv: its output channels' slice
            K = K[..., _group(layout, K.shape[-1])]
        if layout == "conv" or isinstance(layout, tuple) or (layout is None and K.ndim == 4):
            d = K.ndim - 2  # (k…, in, out) → (out, in·∏k)
            V = jnp.reshape(jnp.transpose(K, (d + 1, d, *range(d))), (K.shape[-1], -1))
        elif K.ndim >= 2 and K.size % m == 0 and (layout is not None or K.ndim == 2):
            V = jnp.reshape(K, (-1, m)).T
        else:
            raise ValueError(f"layer {name!r}: a kernel of shape {K.shape} is neither dense "
                             f"(in, out) nor conv (k…, in, out) for a ({m}, {n}) block")
        if bpath is not None:
            b = leaves[bpath]
            b = b[_group(layout, b.shape[-1])] if isinstance(layout, tuple) else b
            V = jnp.concatenate([V, jnp.reshape(b, (-1, 1))], axis=1)
    if V.shape != (m, n):
        raise ValueError(f"layer {name!r}: the estimate is for a ({m}, {n}) block, the gradient "
                         f"(with bias column) is {tuple(V.shape)}")
    return V.astype(cur.E.dtype)


def _stored(layout: Any) -> bool:
    return layout == "stored" or (isinstance(layout, tuple) and layout[0] == "stored")


def _group(layout: tuple, out: int) -> slice:
    """The output channels of group ``i`` of ``groups`` (layout ``("conv", i, groups)``)."""
    _, i, groups = layout
    size = out // groups
    return slice(i * size, (i + 1) * size)


def _unblock(P, leaves, kpath, bpath, layout, done: Mapping | None = None) -> dict:
    """The leaves of one block's result ``P``: the kernel (and bias) in their own layout. A
    group of a grouped conv writes its slice into the leaf as ``done`` (the other groups'
    results so far) holds it."""
    if layout == "norm":
        cols = [p for p in (kpath, bpath) if p is not None]
        return {p: P[:, i] for i, p in enumerate(cols)}
    K = leaves[kpath]
    cols = P.shape[1] - (bpath is not None)
    Pw = P[:, :cols]
    if _stored(layout):
        done = done or {}
        rows = _group(layout, K.shape[0]) if isinstance(layout, tuple) else slice(None)
        kernel = done.get(kpath, K).at[rows].set(jnp.reshape(Pw, K[rows].shape).astype(K.dtype))
        out = {kpath: kernel}
        if bpath is not None:
            b = leaves[bpath]
            flat = jnp.reshape(done.get(bpath, b), (-1,)).at[rows].set(P[:, cols].astype(b.dtype))
            out[bpath] = jnp.reshape(flat, b.shape)
        return out
    if layout == "conv" or isinstance(layout, tuple) or (layout is None and K.ndim == 4):
        d = K.ndim - 2
        cin, cout = K.shape[-2], P.shape[0]
        kernel = jnp.transpose(jnp.reshape(Pw, (cout, cin, *K.shape[:d])), (*range(2, d + 2), 1, 0))
    else:
        kernel = jnp.reshape(Pw.T, K.shape)
    bias = None if bpath is None else P[:, cols]
    if isinstance(layout, tuple):
        done = done or {}
        sl = _group(layout, K.shape[-1])
        kernel = done.get(kpath, K).at[..., sl].set(kernel.astype(K.dtype))
        if bpath is not None:
            bias = done.get(bpath, leaves[bpath]).at[sl].set(bias.astype(leaves[bpath].dtype))
    out = {kpath: kernel}
    if bpath is not None:
        out[bpath] = jnp.reshape(bias, leaves[bpath].shape)
    return out


def _layer_curvature(est: Any, name: str) -> LayerCurvature:
    """Eigenvectors and the undamped eigenvalue grid of an estimate (PSD-checked, with
    :class:`~kronsum.KronInverse`'s clipping of rounding-level negative eigenvalues)."""
    if isinstance(est, EigenKron):
        inv = est.inverse(1.0)
        E = jnp.maximum(jnp.asarray(est.S), 0.0)  # the corrected eigenvalues (≥ 0 up to rounding)
    else:
        inv = est.inverse(1.0)
        a, b = inv.eigvals_left, inv.eigvals_right
        E = inv.scale * (a[:, None] * b[None, :])
    return LayerCurvature(jnp.asarray(inv.eigvecs_left), jnp.asarray(inv.eigvecs_right), jnp.asarray(E))
