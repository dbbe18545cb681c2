r"""Natural-gradient preconditioning for any ``torch.optim`` optimiser (see :class:`Preconditioner`)."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Mapping

try:
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None  # type: ignore[assignment]

from .._compat import namespace
from .._running import ESTIMATORS, RunningEstimate

_DAMPING_METHODS = ("exact", "factored", "tkfac")
_CAPTURES = ("batch", "hooks")


class Preconditioner:
    r"""Replace a model's gradients by ``(F̂ + λI)⁻¹ ∇`` between ``backward()`` and ``step()``.

    Every ``update_every`` steps the preconditioner takes the layer statistics of a batch —
    with ``capture="batch"`` the batch given to :meth:`step`, through
    :func:`~kronsum.adapters.torch.collect` (one extra forward pass and the backward passes of
    the Fisher type); with ``capture="hooks"`` your own forward pass, recorded by hooks, and
    the backward passes of the Fisher type run when ``loss_fn`` is called on its output — feeds
    each block to a
    :class:`~kronsum.RunningEstimate` (an exponential moving average of K-FAC, TKFAC or K-FOC
    estimates, or the eigenvalue-corrected EKFAC), and caches each block's damped inverse
    (:class:`~kronsum.KronInverse`: two eigendecompositions per refresh, reused across steps
    and dampings; for ``"ekfac"`` the eigenbasis is already at hand). Every step it rewrites
    the covered gradients with :func:`~kronsum.adapters.torch.precondition`'s convention,
    optionally scaled down by KL clipping. Any ``torch.optim`` optimiser then takes the step.

    Parameters
    ----------
    model : torch.nn.Module
    loss_fn : torch.nn.CrossEntropyLoss, torch.nn.MSELoss or torch.nn.BCEWithLogitsLoss
        The training loss, as for :func:`~kronsum.adapters.torch.collect`.
    estimator : {"kfoc_running", "kfoc_approx", "kfac", "tkfac", "ekfac"}
        The streaming estimator of each block (see :class:`~kronsum.RunningEstimate`).
        ``"ekfac"`` (George et al. 2018) refreshes K-FAC's eigenbasis every ``basis_every``
        refreshes and the corrected eigenvalues at every refresh; it takes
        ``damping_method="exact"`` only.
    fisher : {"mc", "empirical", "exact"}
        The Fisher type of the statistics (``"mc"``: labels sampled from the model,
        ``n_samples`` of them; ``"empirical"``: the batch's targets).
    update_every : int
        Refresh the estimates on steps ``0, update_every, 2·update_every, …`` (``step()``
        calls); the other steps reuse the cached inverses.
    decay : float
        The estimates' EMA decay in ``[0, 1)``.
    damping : float or callable
        ``λ > 0``, or ``damping(step) -> λ`` (a schedule, called every step; a changed value
        reuses the eigendecompositions).
    damping_method : {"exact", "factored", "tkfac"}
        How ``λ`` enters (:meth:`kronsum.Kron.inverse`).
    basis_every : int, optional
        For ``estimator="ekfac"``: refreshes between eigenbasis updates (default 1).
    kl_clip : float, optional
        When given, scale all preconditioned gradients by
        ``ν = min(1, √(kl_clip / (lr² Σ_blocks ⟨P∇, ∇⟩)))`` (Ba et al. 2017), which bounds the
        step's predicted KL divergence; ``step(lr=...)`` then needs the learning rate.
    layers : iterable of str, optional
        Module names to cover (default: every layer :func:`~kronsum.adapters.torch.coverage`
        covers); other parameters keep their gradients.
    n_samples, class_dim, weight_sharing
        Passed to :func:`~kronsum.adapters.torch.collect` (``class_dim`` with
        ``capture="batch"`` only: with ``"hooks"`` the logits are the tensor given to
        ``loss_fn``, class axis 1 as ``CrossEntropyLoss`` takes them).
    kfoc_options : mapping, optional
        Passed to :class:`~kronsum.RunningEstimate` (e.g. ``{"accuracy": 1e-4}``).
    generator : torch.Generator, optional
        Random source of ``fisher="mc"``.
    capture : {"batch", "hooks"}
        Where a refresh step's statistics come from. ``"batch"`` (default): :meth:`step` takes
        the batch, ``step(inputs, targets)``, and runs :func:`~kronsum.adapters.torch.collect`
        on it. ``"hooks"``: :meth:`step` takes no batch; on a refresh step (:meth:`due`) the
        next forward pass of ``model`` with gradients enabled records the covered layers'
        inputs (the hooks are installed for that pass only), and the call of ``loss_fn`` on
        its output runs the backward passes of the Fisher type at once (``torch.autograd.grad``
        with the graph kept for your ``loss.backward()``; one pass for ``"mc"`` with
        ``n_samples=1``), so the forward pass is not repeated. The loss must be computed by
        calling ``loss_fn`` — the object given here — on the model's output (as
        :func:`~kronsum.adapters.torch.collect` takes it: batch first) and the targets; the
        statistics are those of the last such forward pass before the refresh step
        (with gradient accumulation over micro-batches: the last micro-batch's). Forward
        passes under ``torch.no_grad()`` (evaluation) are not recorded. Call :meth:`remove`
        to take the hooks off.
    group : torch.distributed.ProcessGroup, optional
        Data parallelism (e.g. under ``DistributedDataParallel``, whose gradients are the
        ranks' average): each rank passes :meth:`step` its own part of the batch, and the
        estimates are those of the ranks' average Fisher, ``(1/world) Σ_r F_r``, the same on
        every rank (:class:`kronsum.adapters.distributed.RunningEstimate`: only factors are
        all-reduced). Each block's damped inverse is decomposed on one rank and broadcast
        (:func:`kronsum.adapters.distributed.spread_inverses`; :attr:`inverted_here` lists
        this rank's). Pass the wrapped module (``ddp.module``) as ``model``. ``None``
        (default): one process. With ``estimator="ekfac"`` each block's eigenbasis is
        decomposed on one rank (block ``i`` on rank ``i mod world``) and broadcast, and every
        rank forms the inverse in that basis itself (no decomposition; :attr:`inverted_here`
        lists the blocks whose bases this rank decomposes at their refreshes).

    Notes
    -----
    Cost per refresh: ``collect`` (one forward, one backward per Fisher term) and the estimator
    per block, then two ``m³ + n³`` eigendecompositions per block; per step: two small GEMMs per
    block (``O(mn(m + n))``). With ``estimator="kfac"`` (and no ``group``) the statistics are
    reduced to each block's two Gram matrices as they are recorded, as
    :func:`~kronsum.adapters.torch.collect_kfac` does, and only those are kept and averaged.
    Statistics that are not finite raise ``ValueError`` before any estimate changes, naming
    the layer (or the model's outputs, where they are not finite either; for ``"kfac"`` with
    ``capture="hooks"`` found in the block's factors, each of whose diagonals holds the
    squares of its statistics).

    Examples
    --------
    >>> import torch
    >>> from kronsum.adapters.torch import Preconditioner
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> loss_fn = torch.nn.CrossEntropyLoss()
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> pre = Preconditioner(model, loss_fn, estimator="kfac", update_every=2, damping=1e-2)
    >>> X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> for _ in range(3):
    ...     opt.zero_grad()
    ...     loss = loss_fn(model(X), y)
    ...     loss.backward()
    ...     pre.step(X, y)
    ...     opt.step()
    >>> pre.steps, pre.refreshes
    (3, 2)
    """

    def __init__(self, model: Any, loss_fn: Any, *, estimator: str = "kfoc_running",
                 fisher: str = "mc", update_every: int = 10, decay: float = 0.95,
                 damping: float | Callable[[int], float] = 1e-3, damping_method: str = "exact",
                 kl_clip: float | None = None, layers: Iterable[str] | None = None,
                 n_samples: int = 1, class_dim: int = 1, weight_sharing: str = "expand",
                 kfoc_options: Mapping[str, Any] | None = None, generator: Any = None,
                 basis_every: int | None = None, group: Any = None, capture: str = "batch"):
        from .torch import FISHER_TYPES, _require_torch, coverage
        from ._torch_losses import loss_spec

        _require_torch()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
        if damping_method not in _DAMPING_METHODS:
            raise ValueError(f"damping_method must be one of {_DAMPING_METHODS}, got {damping_method!r}")
        if estimator == "ekfac" and damping_method != "exact":
            raise ValueError(f"estimator='ekfac' takes damping_method='exact' only (its damped "
                             f"inverse lives in the eigenbasis), got {damping_method!r}")
        if not callable(damping):
            _positive("damping", damping)
        if kl_clip is not None:
            _positive("kl_clip", kl_clip)
        if capture not in _CAPTURES:
            raise ValueError(f"capture must be one of {_CAPTURES}, got {capture!r}")
        loss_spec(loss_fn)  # a loss collect knows, checked now
        self.model, self.loss_fn = model, loss_fn
        self.estimator, self.fisher, self.update_every = estimator, fisher, update_every
        self.decay, self.damping, self.damping_method, self.kl_clip = decay, damping, damping_method, kl_clip
        self.layers = None if layers is None else list(coverage(model, layers).layers)
        self._collect_kw = dict(n_samples=n_samples, class_dim=class_dim,
                                weight_sharing=weight_sharing, generator=generator)
        self._kfoc_options = dict(kfoc_options or {})
        self._running_kw = dict(kfoc_options=self._kfoc_options)
        if basis_every is not None:
            self._running_kw["basis_every"] = basis_every
        self.group = group
        # K-FAC needs only each block's two Gram matrices: the capture reduces the statistics
        # to them as they are recorded (collect_kfac's path), and the EMA takes that estimate
        self._grams = estimator == "kfac" and group is None
        self._running_cls = RunningEstimate
        if group is not None:
            from .distributed import RunningEstimate as SplitRunningEstimate

            self._running_cls = SplitRunningEstimate
            self._running_kw["group"] = group
        self._running_cls(estimator, decay, **self._running_kw)  # options checked now
        self.inverted_here: list[str] = []  # blocks whose inverse this process decomposed
        self._running: dict[str, RunningEstimate] = {}
        self._inverses: dict[str, Any] = {}
        self._params: dict[str, Any] | None = None  # block -> (spec, weight, bias), per refresh
        self._specs: tuple | None = None  # (the model's layout key, its block specs, their parameters)
        self._plan: tuple | None = None  # (the model's layout key, its capture plan)
        self._xp = namespace(torch.empty(0))  # the estimates' array-API namespace
        self.steps = 0
        self.refreshes = 0
        self.last_scale = 1.0  # ν of the last step (1 without KL clipping)
        self.capture = capture
        self._run: Any = None  # capture="hooks": the recording forward pass (layers' hooks on)
        self._layer_hooks: list = []
        self._captured: dict | None = None  # its blocks, once loss_fn ran on its output
        self._hooks: list = []  # on the model and the loss while a refresh step is next
        self._removed = False  # remove() was called: nothing is recorded any more
        if capture == "hooks":
            from .torch import _check_options

            _check_options(fisher, weight_sharing, n_samples, class_dim)
            if class_dim != 1:
                raise ValueError(
                    f"class_dim={class_dim} with capture='hooks': the statistics come from the "
                    "tensor given to loss_fn, which CrossEntropyLoss takes as (N, C, ...) logits, "
                    "so class_dim does not apply here (leave it 1; it describes the model's output "
                    "for capture='batch')")
            self._arm()

    # -- capture="hooks" -----------------------------------------------------------------
    def _arm(self) -> None:
        """Hooks on the model and the loss exactly while the next :meth:`step` refreshes
        (:meth:`due`): the other steps' passes run without any (no per-pass cost)."""
        want = self.capture == "hooks" and not self._removed and self.due()
        if want and not self._hooks:
            self._hooks = [
                self.model.register_forward_pre_hook(self._record_forward),
                self.model.register_forward_hook(self._end_forward, always_call=True),
                self.loss_fn.register_forward_hook(self._record_loss),
            ]
        elif not want and self._hooks:
            for h in self._hooks:
                h.remove()
            self._hooks = []

    def _record_forward(self, module: Any, args: tuple) -> None:
        """Before a forward pass of the model: on a refresh step, install the layers' hooks."""
        from .torch import _batch_size, _install, _layout_key, _plan

        self._drop_layer_hooks()
        self._run = None
        if not (self.due() and torch.is_grad_enabled()):
            return
        N = _batch_size(args[0]) if args else None
        if N == 0:
            raise ValueError(f"inputs: an empty batch (shape {tuple(args[0].shape)})")
        key = _layout_key(self.model)  # the coverage is worked out again when the model changed
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, _plan(self.model, self.layers))
        self._run, self._layer_hooks = _install(
            # the K-FAC path checks each block's factors instead of its statistics (a NaN or
            # inf in them makes a factor's diagonal one: one host read per block, not two scans)
            self.model, self.layers, N, self._collect_kw["weight_sharing"], not self._grams,
            not self._grams, stacklevel=6, plan=self._plan[1])

    def _end_forward(self, module: Any, args: tuple, out: Any) -> None:
        """After the model's forward pass (also when it raised): the layers' hooks come off."""
        self._drop_layer_hooks()

    def _record_loss(self, module: Any, args: tuple, loss: Any) -> None:
        """``loss_fn(output, targets)`` after a recording forward pass: the Fisher type's
        backward passes now, with the graph kept for the user's own backward."""
        run, self._run = self._run, None
        if run is None:
            return
        from .torch import _blocks, _kfac_estimates, _start
        from ._torch_losses import loss_spec

        out = args[0]
        targets = args[1] if len(args) > 1 else None
        kw = self._collect_kw
        if self.fisher == "empirical" and targets is None:
            raise ValueError("fisher='empirical' needs the targets: call loss_fn(output, targets)")
        _start(run, loss_spec(self.loss_fn), out, targets, self.fisher, kw["n_samples"],
               kw["generator"], kw["class_dim"], True)
        self._captured = (_kfac_estimates(run, True, keep_graph=True) if self._grams
                          else _blocks(run, keep_graph=True))

    def _drop_layer_hooks(self) -> None:
        for h in self._layer_hooks:
            h.remove()
        self._layer_hooks = []

    def remove(self) -> None:
        """Take every hook of ``capture="hooks"`` off the model and the loss (a no-op for
        ``capture="batch"``); :meth:`step` then needs the batch no more and records nothing."""
        self._removed = True
        self._drop_layer_hooks()
        self._arm()
        self._run = None

    # -- the step ------------------------------------------------------------------------
    @property
    def update_every(self) -> int:
        """Steps between refreshes (settable; ``capture="hooks"`` follows a change)."""
        return self._update_every

    @update_every.setter
    def update_every(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"update_every must be an integer >= 1, got {value!r}")
        self._update_every = value
        if hasattr(self, "_hooks"):
            self._arm()

    @property
    def steps(self) -> int:
        """Steps taken (settable; ``capture="hooks"`` follows a change)."""
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps = int(value)
        if hasattr(self, "_hooks"):
            self._arm()

    def due(self) -> bool:
        """Whether the next :meth:`step` refreshes the estimates (and needs the batch)."""
        return self.steps % self.update_every == 0

    def step(self, inputs: Any = None, targets: Any = None, *, lr: float | None = None) -> None:
        """Refresh the estimates if due (from ``inputs``/``targets``), then precondition.

        Call after ``loss.backward()`` and before ``optimizer.step()``. ``inputs`` (and
        ``targets`` for ``fisher="empirical"``) are needed on refresh steps (:meth:`due`);
        ``lr`` when ``kl_clip`` is set.
        """
        from .torch import _block_matrix, _layout_key, _specs_by_key, _write_block, collect, collect_kfac

        if self.kl_clip is not None and (lr is None or not lr > 0):
            raise ValueError(f"kl_clip needs the learning rate: step(..., lr=...) > 0, got {lr!r}")
        lam = self.damping(self.steps) if callable(self.damping) else self.damping
        layout = None  # the model's layout key, where this step already has it
        _positive("damping", lam)
        if self.capture == "hooks" and (inputs is not None or targets is not None):
            raise ValueError("capture='hooks' records the statistics of your forward pass: call "
                             "step() without the batch")
        if self.due():
            if self.capture == "hooks":
                if self._captured is None:
                    raise ValueError(
                        f"step {self.steps} refreshes the estimates (update_every="
                        f"{self.update_every}) but no statistics were recorded: with "
                        "capture='hooks', run the model's forward pass with gradients enabled and "
                        "compute the loss by calling the loss_fn given to the Preconditioner on "
                        "its output before step()" + ("" if not self._removed else
                                                      " (the hooks were removed by remove())"))
                blocks, self._captured = self._captured, None
                # the layout of the recorded pass, whose gradients these are: not walked again
                layout = self._plan[0]
            elif inputs is None:
                raise ValueError(
                    f"step {self.steps} refreshes the estimates (update_every={self.update_every}): "
                    "pass the batch, step(inputs, targets)"
                )
            else:
                blocks = (collect_kfac if self._grams else collect)(
                    self.model, self.loss_fn, inputs, targets, fisher=self.fisher,
                    layers=self.layers, **self._collect_kw)
            running = {k: self._running.get(k) or self._running_cls(
                self.estimator, self.decay, **self._running_kw, **self._placement(i))
                for i, k in enumerate(blocks)}
            # the running estimates of earlier refreshes are updated in place: what they held
            # is put back if a later block's update or inverse fails (nothing half-written)
            kept = {k: r._snapshot() for k, r in self._running.items() if running.get(k) is r}
            try:
                if self.group is None:
                    # a K-FAC block (self._grams) was made for this refresh: mixed in place
                    estimates = {k: running[k]._update(F, owned=True) for k, F in blocks.items()}
                    inverses = {k: _inverse(est, lam, self.damping_method)
                                for k, est in estimates.items()}
                    self.inverted_here = list(inverses)
                else:
                    from .distributed import spread_inverses

                    share = 1.0 / torch.distributed.get_world_size(self.group)  # DDP averages
                    estimates = {k: running[k].update(F.scaled(share)) for k, F in blocks.items()}
                    inverses, self.inverted_here = spread_inverses(
                        estimates, lam, self.damping_method, group=self.group)
                    if self.estimator == "ekfac":  # the eigenbases are what was decomposed, spread
                        self.inverted_here = [k for k, r in running.items() if r.basis_rank
                                              == torch.distributed.get_rank(self.group)]
            except BaseException:
                for k, snapshot in kept.items():
                    running[k]._restore(snapshot)
                raise
            self._running, self._inverses = running, inverses
            self._params = None  # looked up again below: the model may have changed
            self.refreshes += 1
        if not self._running:
            raise RuntimeError("no estimate yet: the first step needs the batch")
        if self._params is None:  # per block (spec, weight, bias), kept until the next refresh
            # the covered layers follow the modules and which parameters train (coverage keeps
            # layers with trainable parameters): a frozen or unfrozen layer changes them
            if layout is None:
                layout = _layout_key(self.model)
            if self._specs is None or self._specs[0] != layout or not set(self._inverses) <= set(self._specs[1]):
                self._specs = (layout, _specs_by_key(self.model), {})
            specs, found = self._specs[1], self._specs[2]  # found: parameters looked up (same layout)
            for k in self._inverses:
                if k not in found:
                    found[k] = (specs[k], self.model.get_parameter(specs[k].weight),
                                None if specs[k].bias is None else self.model.get_parameter(specs[k].bias))
            self._params = {k: found[k] for k in self._inverses}
        jobs = []  # every block solved and checked before any gradient is written
        lam, xp, inverses = float(lam), self._xp, self._inverses
        for key, (spec, W, b) in self._params.items():
            if W.grad is None:
                raise ValueError(f"block {key!r} has no weight.grad: call loss.backward() first")
            inv = inverses[key]
            if inv.damping != lam:
                inv = inverses[key] = inv.with_damping(lam)
            V = _block_matrix(spec, W.grad, None if b is None else b.grad, b)
            jobs.append((key, spec, W, b, V, inv._apply(V, xp)))  # shapes fixed at refresh
        # a NaN or inf in a gradient reaches its solve: one sum of all results, one host read
        # (NaN or inf when an entry is; a sum beyond the range alone is found finite below)
        if not math.isfinite(float(torch.cat([P.reshape(-1) for *_, P in jobs]).sum())):
            for key, *_, V, P in jobs:
                if not bool(torch.isfinite(V).all()):
                    raise ValueError(f"block {key!r}: its gradient holds NaN or inf")
            bad = next((key for key, *_, P in jobs if not bool(torch.isfinite(P).all())), None)
            if bad is not None:
                raise ValueError(f"block {bad!r}: the preconditioned gradient overflows (inf); "
                                 f"raise the damping")
        nu = 1.0
        if self.kl_clip is not None:
            quad = float(sum((P * V.to(P.dtype)).sum() for *_, V, P in jobs))
            if quad > 0:
                nu = min(1.0, math.sqrt(self.kl_clip / (lr * lr * quad)))
        self.last_scale = nu
        with torch.no_grad():
            for _, spec, W, b, _, P in jobs:
                _write_block(spec, P if nu == 1.0 else P * nu, W, b)
        self.steps += 1  # arms or disarms capture="hooks" for the next step

    @property
    def estimates(self) -> dict:
        """``{block: Kron}`` (``"ekfac"``: ``EigenKron``): the current estimates."""
        return {k: r.estimate for k, r in self._running.items()}

    # -- checkpoints ---------------------------------------------------------------------
    def _placement(self, i: int) -> dict:
        """Keyword of the ``i``-th block's running estimate under a process group: EKFAC's
        eigenbasis decomposed on rank ``i mod world`` (none without a group)."""
        if self.group is None or self.estimator != "ekfac":
            return {}
        return {"basis_rank": i % torch.distributed.get_world_size(self.group)}

    def state_dict(self) -> dict[str, Any]:
        """The step counters and every block's :meth:`RunningEstimate.state_dict`."""
        return {"steps": self.steps, "refreshes": self.refreshes, "estimator": self.estimator,
                "running": {k: r.state_dict() for k, r in self._running.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s counters and estimates (inverses are recomputed)."""
        if not isinstance(state, Mapping) or set(state) != {"steps", "refreshes", "estimator", "running"}:
            raise ValueError("state must be a Preconditioner.state_dict()")
        if state["estimator"] != self.estimator:
            raise ValueError(f"state is for estimator {state['estimator']!r}, this one is {self.estimator!r}")
        extra = {} if self.group is None else {"group": self.group}
        running = {k: self._running_cls.from_state_dict(s, kfoc_options=self._kfoc_options, **extra,
                                                        **self._placement(i))
                   for i, (k, s) in enumerate(state["running"].items())}
        lam = self.damping(int(state["steps"])) if callable(self.damping) else self.damping
        inverses = {k: r.estimate.inverse(lam, self.damping_method) for k, r in running.items()
                    if r.estimate is not None}
        self._running, self._inverses, self._params = running, inverses, None
        self.steps, self.refreshes = int(state["steps"]), int(state["refreshes"])

    def __repr__(self) -> str:
        return (f"Preconditioner(estimator={self.estimator!r}, fisher={self.fisher!r}, "
                f"update_every={self.update_every}, capture={self.capture!r}, "
                f"blocks={len(self._running)}, steps={self.steps})")


def _inverse(est: Any, lam: float, method: str) -> Any:
    """The cached damped inverse of a running estimate (made by the library: symmetric, finite)."""
    from .._inverse import KronInverse
    from .._kron import Kron

    return KronInverse._of_estimate(est, lam, method) if isinstance(est, Kron) else est.inverse(lam, method)


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
