r"""K-FAC, TKFAC and K-FOC of a sum whose terms are split over the ranks of a
``torch.distributed`` process group.

With the samples of a batch split over ranks (data parallelism), each rank holds a
:class:`~kronsum.KronSum` ``F_r`` of its own samples' terms and the layer's Fisher block is the
sum ``F = Σ_r F_r``. Every quantity the estimators need is linear in ``F`` — K-FAC's weighted
factor sums, TKFAC's two half-steps from the identity, each half-step of K-FOC's Lanczos
iteration — so each is one ``all_reduce`` (sum) of an ``m × m`` or ``n × n`` matrix: the
per-sample statistics never leave their rank. Every rank runs the same iteration on the same
reduced matrices and returns the same estimate, equal to the single-process estimate of the
gathered sum to rounding.

=========  ====================================================  ==========================
function   all-reduced per call                                   equals
=========  ====================================================  ==========================
kfac       ``Σ w L_k``, ``Σ w R_k``, ``Σ w`` (one call)            ``kronsum.kfac(F)``
tkfac      ``𝓡(F) vec I``, ``𝓡(F)ᵀ vec I`` (one call)              ``kronsum.tkfac(F)``
kfoc       two half-steps per Lanczos step, one each for the      ``kronsum.kfoc(F)``
           start and the finish
ekfac      the basis estimate's, then the ``m × n`` corrected     ``kronsum.ekfac(F)``
           eigenvalues ``S`` (the basis decomposed on one
           rank and broadcast from it)
=========  ====================================================  ==========================

``info.allreduces`` counts the all-reduces of the solve (one more for the shape check that
every call starts with). K-FOC here iterates Lanczos on the factors (the smaller one) and
stops on the relative eigen-residual ``tol``: the single-process Gram route and the error-gap
certificate need products between samples on different ranks (``‖F‖²`` is not a sum over
ranks), so they are not used. As the single-process estimators do, every rank first divides
its weights and statistics by powers of two (exact), the same on every rank: those of the
group's largest magnitudes, which ride on the shape check's all-reduce. So inputs of any
magnitude the dtype holds give the single-process answer where that answer fits (K-FAC's
factors must fit themselves, as for :func:`kronsum.kfac`); a ``"sum"``-form ``F``, or ranks
holding sums of different forms, are used at their own scale. A reduced result that is not
finite raises ``OverflowError``.

Examples
--------
In each process of a group (``torchrun --nproc-per-node 2 script.py``, or
``torch.multiprocessing``), with the rank's own samples::

    import torch.distributed as dist
    from kronsum import KronSum
    from kronsum.adapters import distributed as ksd

    dist.init_process_group("gloo")                 # or "nccl" for CUDA tensors
    F_r = KronSum.from_outer(G_local, A_local)      # this rank's samples
    est = ksd.kfoc(F_r)                             # the same Kron on every rank
    est.info.allreduces
"""

from __future__ import annotations

import math
from typing import Any

from .._closed_forms import _require_sum
from .._ekfac import BASES, EigenKron, _eigenbasis, diag_in_basis
from .._compat import to_float
from .._eigen import Stop, contraction_space, default_tol, finish, lanczos
from .._inverse import KronInverse, _Eig
from .._kron import Kron, KronInfo
from .._running import RunningEstimate as _RunningEstimate
from .._sum import KronSum, _ldexp1, _pow2_floats, times_scale
from .._validation import check_int, check_real

__all__ = ["RunningEstimate", "ekfac", "kfac", "kfoc", "spread_inverses", "tkfac"]


class _Reduced:
    """The sum ``Σ_r F_r`` over a process group as the solvers see it: the two contractions
    (and the attributes the eigensolver core reads) of the local ``F_r``, each contraction's
    result all-reduced. ``count`` is the number of all-reduces so far."""

    def __init__(self, F: KronSum, group: Any, exponents: tuple = (0, 0, 0)):
        import torch.distributed as dist

        self._dist, self.F, self.group = dist, F, group
        self.xp, self.m, self.n, self.dtype = F.xp, F.m, F.n, F.dtype
        self.symmetric, self.weights = F.symmetric, F.weights
        self.count = 0
        # F is this rank's part divided by 2^(e_w + e_L + e_R), the same powers on every rank
        self.exponents = tuple(exponents)
        ew, el, er = self.exponents
        self.scale = _prod(_pow2_floats(ew, el, er))  # 2^(e_w + e_L + e_R), inf/0 beyond float64

    def reduce(self, x: Any) -> Any:
        x = x.contiguous().clone()  # a fresh buffer: the caller's arrays are never written
        self._dist.all_reduce(x, op=self._dist.ReduceOp.SUM, group=self.group)
        self.count += 1
        return x

    def contract_left(self, X: Any = None) -> Any:
        return self.reduce(self.F.contract_left(X))

    def contract_right(self, Y: Any = None) -> Any:
        return self.reduce(self.F.contract_right(Y))


def _setup(F: Any, fname: str, group: Any) -> _Reduced:
    """Checks ``F`` (a KronSum of torch tensors), the process group, and that every rank's
    block has the same ``(m, n)`` and dtype (one all-reduce of four integers)."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"{fname} needs PyTorch: pip install torch") from exc
    F = _require_sum(F, fname)
    if not isinstance(F.weights, torch.Tensor):
        raise TypeError(f"{fname}: F must hold torch tensors (the process group reduces them), "
                        f"got {type(F.weights).__module__}.{type(F.weights).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{fname}: no torch.distributed process group; call "
                           "torch.distributed.init_process_group first")
    code = {torch.float64: 64, torch.float32: 32}.get(F.dtype, 0)
    # the inputs' largest magnitudes ride along: every rank rescales by the group's powers of
    # two (single-form sums of one kind on every rank; a "sum" form is used at its own scale)
    kind = 0 if F.form == "sum" else (2 if F.form == "terms" else 1)
    maxima = ([0.0] * 3 if kind == 0 else
              [float(F.xp.max(F.xp.abs(x))) if x.numel() else 0.0 for x in F._scaled_arrays()])
    maxima = [c if math.isfinite(c) else math.inf for c in maxima]  # NaN: no MAX of NaN
    v = torch.tensor([F.m, F.n, code, -F.m, -F.n, -code, kind, -kind, *maxima],
                     dtype=torch.float64, device=F.weights.device)
    dist.all_reduce(v, op=dist.ReduceOp.MAX, group=group)
    if (v[0] != F.m or -v[3] != F.m or v[1] != F.n or -v[4] != F.n or v[2] != code
            or -v[5] != code):
        raise ValueError(f"{fname}: the ranks' blocks differ: this rank's F is ({F.m}, {F.n}) "
                         f"{F.dtype}, others have m in [{int(-v[3])}, {int(v[0])}], n in "
                         f"[{int(-v[4])}, {int(v[1])}] or another dtype")
    exps = (0, 0, 0)
    if kind != 0 and v[6] == -v[7]:  # the same kind of sum on every rank
        F, *exps, _ = F._normalized_by([float(c) for c in v[8:]])
    R = _Reduced(F, group, exps)
    R.count += 1
    return R


def _prod(c: tuple) -> float:
    return c[0] * (c[1] * c[2])


def _finite(fname: str, what: str, *values: float) -> None:
    import math

    if not all(math.isfinite(v) for v in values):
        raise OverflowError(f"{fname}: {what} is not finite after the reduction over ranks "
                            "(NaN statistics, or values beyond the dtype's range)")


def kfac(F: KronSum, *, group: Any = None) -> Kron:
    r"""K-FAC of ``Σ_r F_r`` over the ranks of ``group`` (default: the world group).

    One all-reduce of ``(Σ w L_k, Σ w R_k, Σ w)`` packed in one buffer; the answer is
    :func:`kronsum.kfac` of the gathered sum (``scale = Σ w``, factors the weighted means).

    Parameters
    ----------
    F : KronSum
        This rank's terms, torch tensors (CPU with gloo, CUDA with NCCL).
    group : torch.distributed.ProcessGroup, optional

    Returns
    -------
    Kron
        The same on every rank; ``info.allreduces == 2`` (the shape check and the factors).
    """
    return _kfac(_setup(F, "kfac", group))


def _kfac(R: _Reduced) -> Kron:
    import torch

    from .. import kfac as local_kfac

    F = R.F
    est = local_kfac(F)  # Σw·(mean factors) of the rescaled part: the weighted sums
    sw = torch.as_tensor(est.scale, dtype=F.dtype, device=est.left.device)
    SL, SR = est.left * sw, est.right * sw
    buf = R.reduce(torch.cat([SL.reshape(-1), SR.reshape(-1), sw.reshape(1)]))
    m2 = F.m * F.m
    SL, SR, s = buf[:m2].reshape(F.m, F.m), buf[m2:-1].reshape(F.n, F.n), buf[-1]
    _finite("kfac", "Σ w", float(s))
    notes: tuple = ()
    if not float(s) > 0:
        notes = ("all weights are zero: the estimate is zero",)
        inv = 1.0
    else:
        inv = 1.0 / s
    # back to the true scale: left·2^e_L, right·2^e_R, Σw·2^e_w (each must fit, as for kfac)
    ew, el, er = R.exponents
    left, right = _times_pow2(SL * inv, el), _times_pow2(SR * inv, er)
    scale = _times_pow2(s, ew)
    for what, x in (("the left factor", left), ("the right factor", right), ("Σ w", scale)):
        _finite("kfac", what, float(x.abs().max()))
    return Kron(left, right, scale=scale,
                info=KronInfo(method="kfac", notes=notes, allreduces=R.count))


def _times_pow2(x: Any, e: int) -> Any:
    """``x · 2^e`` in steps that each stay within float64's exponent range."""
    while e != 0:
        step = max(-1000, min(1000, e))
        x = times_scale(x, _ldexp1(step))
        e -= step
    return x


def tkfac(F: KronSum, *, group: Any = None) -> Kron:
    r"""TKFAC of ``Σ_r F_r``: ``δ Φ ⊗ Ψ`` with ``δ = tr F``, ``Φ = 𝓡(F) vec I / δ`` and
    ``Ψ = 𝓡(F)ᵀ vec I / δ`` (:func:`kronsum.tkfac`, variant ``"trace"``), both half-steps
    all-reduced in one buffer.

    Returns
    -------
    Kron
        The same on every rank; ``info.allreduces == 2``. A zero trace gives ``scale = 0``
        with ``Φ = I/m``, ``Ψ = I/n`` and a note, as :func:`kronsum.tkfac` does.
    """
    return _tkfac(_setup(F, "tkfac", group))


def _tkfac(R: _Reduced) -> Kron:
    import torch

    F = R.F
    phi, psi = F.contract_right(), F.contract_left()
    m2 = F.m * F.m
    buf = R.reduce(torch.cat([phi.reshape(-1), psi.reshape(-1)]))
    phi, psi = buf[:m2].reshape(F.m, F.m), buf[m2:].reshape(F.n, F.n)
    delta = torch.trace(phi)
    d = float(delta)
    _finite("tkfac", "tr F", d, d * R.scale)
    if d == 0:
        eye = (lambda k: torch.eye(k, dtype=F.dtype, device=phi.device) / k)
        return Kron(eye(F.m), eye(F.n), scale=delta, info=KronInfo(
            method="tkfac/trace", notes=("zero trace (zero sum): the estimate is zero",),
            allreduces=R.count))
    return Kron(phi / delta, psi / delta, scale=times_scale(delta, R.scale),
                info=KronInfo(method="tkfac/trace", allreduces=R.count))


def kfoc(F: KronSum, *, group: Any = None, tol: float | None = None, max_iter: int = 500,
         init: Kron | None = None) -> Kron:
    r"""K-FOC, the Frobenius-nearest ``σ₁ L ⊗ R`` to ``Σ_r F_r``, by Lanczos on the smaller
    factor with all-reduced half-steps.

    The iteration is :func:`kronsum.kfoc`'s ``method="lanczos"`` (the same solver, start —
    TKFAC's factor — finish and sign rule) on the operator ``𝓡𝓡ᵀ`` of the reduced sum: each
    application is two contractions of the local terms, each followed by one all-reduce of an
    ``m × m`` or ``n × n`` matrix.

    Parameters
    ----------
    F : KronSum
        This rank's terms (torch tensors).
    group : torch.distributed.ProcessGroup, optional
    tol : float, optional
        Relative eigen-residual to stop at; default 1e-10 (float64), 1e-5 (float32).
    max_iter : int, default 500
        Most operator applications.
    init : Kron, optional
        Start from this estimate's factor (the same on every rank, e.g. the previous
        estimate) instead of TKFAC's.

    Returns
    -------
    Kron
        The same on every rank: unit-Frobenius factors with the sign rule and
        ``scale = σ₁``; ``info.method == "kfoc/lanczos[distributed]"``, ``info.iterations``,
        ``info.residual``, ``info.sigma2`` (the second Ritz value) and ``info.allreduces``
        (about ``2 · iterations + 3``). ``info.error_gap_bound`` is ``None``: bounding the gap
        needs ``‖F‖²``, which is not a sum over ranks.

    Examples
    --------
    A group of one process, so that the example runs anywhere (with more ranks, each passes
    its own samples' sum and gets the estimate of all of them):

    >>> import tempfile
    >>> import torch
    >>> import torch.distributed as dist
    >>> import kronsum as ks
    >>> from kronsum.adapters import distributed as ksd
    >>> dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0,
    ...                         world_size=1)
    >>> g = torch.Generator().manual_seed(0)
    >>> G = torch.randn(32, 4, generator=g, dtype=torch.float64)
    >>> A = torch.randn(32, 6, generator=g, dtype=torch.float64)
    >>> F = ks.KronSum.from_outer(G, A)
    >>> est = ksd.kfoc(F)
    >>> ref = ks.kfoc(F, tol=1e-10, accuracy=None)
    >>> bool(torch.allclose(est.to_dense(), ref.to_dense(), rtol=1e-8, atol=1e-12))
    True
    >>> est.info.allreduces == 2 * est.info.iterations + 3
    True
    >>> dist.destroy_process_group()
    """
    R = _setup(F, "kfoc", group)
    tol = default_tol(R.xp, R.dtype) if tol is None else check_real(tol, "tol", positive=True)
    max_iter = check_int(max_iter, "max_iter", minimum=1)
    return _kfoc(R, tol, max_iter, init)


def _kfoc(R: _Reduced, tol: float, max_iter: int, init: Kron | None) -> Kron:
    F = R.F  # this rank's part, rescaled (R.scale restores σ₁)
    side = "left" if F.m <= F.n else "right"
    if init is not None:
        if not isinstance(init, Kron) or (init.m, init.n) != (F.m, F.n):
            raise ValueError(f"kfoc: init must be a Kron with factors of sizes ({F.m}, {F.n})")
        x0 = F.xp.astype(init.left if side == "left" else init.right, F.dtype)
    else:
        x0 = R.contract_right() if side == "left" else R.contract_left()  # TKFAC's factor
    _finite("kfoc", "the start (TKFAC's factor)", to_float(F.xp.max(F.xp.abs(x0))))
    if not bool(F.xp.any(x0 != 0)):
        x0 = F.xp.eye(x0.shape[0], dtype=F.dtype, device=x0.device)
    stop = Stop(float(tol), None)
    eig = lanczos(contraction_space(R, side), x0, stop, max_iter)
    fac = finish(R, side, eig)
    sigma = to_float(fac.sigma)
    _finite("kfoc", "σ₁", sigma, sigma * R.scale)
    notes = tuple(fac.notes)
    if not eig.converged:
        notes += (f"not converged: residual {eig.residual:.3g}, not below tol {tol:.3g} after "
                  f"{eig.iterations} applications",)
    info = KronInfo(method="kfoc/lanczos[distributed]", iterations=eig.iterations,
                    converged=eig.converged, residual=eig.residual,
                    sigma1=sigma * R.scale,
                    sigma2=None if eig.sigma2 is None else eig.sigma2 * R.scale,
                    notes=notes, allreduces=R.count)
    return Kron(fac.left, fac.right, scale=times_scale(fac.sigma, R.scale), info=info)


def ekfac(F: KronSum, *, basis: str | Kron = "kfac", group: Any = None) -> EigenKron:
    r"""EKFAC (George et al. 2018) of ``Σ_r F_r``: the eigenbasis ``U ⊗ V`` of the distributed
    ``basis`` estimate (:func:`kfac`, :func:`tkfac` or :func:`kfoc` over the group, or a
    :class:`~kronsum.Kron` that is the same on every rank) and the corrected eigenvalues
    ``S_ij = Σ_r Σ_{k∈r} w_k (u_i ⊗ v_j)ᵀ (L_k ⊗ R_k) (u_i ⊗ v_j)``: each rank's ``(m, n)``
    share from its own samples, all-reduced (:func:`kronsum.ekfac`'s ``diag_in_basis``).

    The basis is decomposed on the group's first rank only and broadcast from it, so every
    rank holds the same bits whatever its LAPACK threads do and the others spend nothing on
    the two eigendecompositions (one broadcast of ``m² + n²`` numbers, not counted in
    ``info.allreduces``).

    Parameters
    ----------
    F : KronSum
        This rank's terms (torch tensors).
    basis : {"kfac", "tkfac", "kfoc"} or Kron
    group : torch.distributed.ProcessGroup, optional

    Returns
    -------
    EigenKron
        The same on every rank, equal to :func:`kronsum.ekfac` of the gathered sum to
        rounding; ``info.method == "ekfac/<basis>[distributed]"``, ``info.allreduces`` the
        basis estimate's plus one.
    """
    if not (isinstance(basis, Kron) or (isinstance(basis, str) and basis in BASES)):
        raise ValueError(f"ekfac: basis must be one of {BASES} or a kronsum.Kron, got {basis!r}")
    R = _setup(F, "ekfac", group)
    if isinstance(basis, Kron):
        if (basis.m, basis.n) != (F.m, F.n):
            raise ValueError(f"ekfac: basis has factor sizes ({basis.m}, {basis.n}) but F has "
                             f"({F.m}, {F.n})")
        est, name = basis, basis.info.method
    else:
        if basis == "kfoc":
            est = _kfoc(R, default_tol(F.xp, F.dtype), 500, None)
        else:
            est = (_kfac if basis == "kfac" else _tkfac)(R)
        name = basis
    U, V = _shared_basis(est, group)
    S = R.reduce(diag_in_basis(R.F, U, V))
    _finite("ekfac", "S", float(S.abs().max()), float(S.abs().max()) * R.scale)
    S = times_scale(S, R.scale)
    info = KronInfo(method=f"ekfac/{name}[distributed]", notes=tuple(est.info.notes),
                    allreduces=R.count)
    return EigenKron._new(U, V, S, info, F.xp)


def _shared_basis(est: Kron, group: Any, owner: int = 0) -> tuple:
    """The eigenvectors ``(U, V)`` of an estimate every rank holds alike, decomposed on the
    group's rank ``owner`` only and broadcast from it: the same bits on every rank whatever
    each rank's LAPACK threads do (one broadcast of ``1 + m² + n²`` numbers). A decomposition
    that fails on the owner raises ``ValueError`` on every rank (its first number is the
    owner's failure flag), not a hang."""
    import torch
    import torch.distributed as dist

    m, n = est.m, est.n
    world = dist.get_world_size(group)
    if not 0 <= owner < world:
        raise ValueError(f"basis_rank must be a rank of the group (an int in [0, {world})), got {owner}")
    buf = torch.zeros(1 + m * m + n * n, dtype=est.left.dtype, device=est.left.device)
    error = None
    if dist.get_rank(group) == owner:
        try:
            U, V = _eigenbasis(est, est._xp)
            buf[1:] = torch.cat([U.reshape(-1), V.reshape(-1)])
        except (ValueError, RuntimeError) as exc:  # DecompositionError is a ValueError
            error = exc
            buf[0] = 1.0
    dist.broadcast(buf, src=dist.get_global_rank(group, owner) if group is not None else owner,
                   group=group)
    if error is not None:
        raise error
    if bool(buf[0] != 0):
        raise ValueError(f"the eigendecomposition of the basis estimate ({m}, {m}) ⊗ ({n}, {n}) "
                         f"failed on rank {owner}, which decomposes it (its error names why)")
    return buf[1:1 + m * m].reshape(m, m), buf[1 + m * m:].reshape(n, n)


class RunningEstimate(_RunningEstimate):
    r""":class:`kronsum.RunningEstimate` of batches split over the ranks of ``group``.

    Each rank passes :meth:`update` its own part of the batch; the estimate is that of the
    whole batch, the same on every rank: ``"kfac"`` and ``"tkfac"`` average the all-reduced
    estimates of :func:`kfac` / :func:`tkfac`, ``"kfoc_approx"`` those of :func:`kfoc`, and
    ``"kfoc_running"`` solves :func:`kfoc` for ``decay · previous + (1 − decay) · batch``,
    each rank adding ``1/world`` of the previous estimate to its part (warm started from the
    previous estimate). ``"ekfac"`` averages the all-reduced K-FAC factors, refreshes their
    eigenbasis as :class:`kronsum.RunningEstimate` does (decomposed on the group's rank
    ``basis_rank`` only and broadcast from it) and averages the batch's corrected eigenvalues,
    one all-reduce of each rank's ``(m, n)`` share. ``kfoc_options`` may hold ``tol`` and
    ``max_iter``. Checkpoints are those of :class:`kronsum.RunningEstimate`.

    Parameters
    ----------
    estimator, decay
        As for :class:`kronsum.RunningEstimate`.
    group : torch.distributed.ProcessGroup, optional
        Default: the world group.
    basis_rank : int, optional
        ``"ekfac"``: the rank (within ``group``) that decomposes the eigenbasis, default 0.
        Give the layers of a network different ranks to spread the decompositions, as
        :class:`~kronsum.adapters.torch.Preconditioner` does (layer ``i`` on rank
        ``i mod world``).
    **kw
        The other options of :class:`kronsum.RunningEstimate` (``update_every``,
        ``kfoc_options``, ``basis_every``, ...).
    """

    def __init__(self, estimator: str = "kfoc_running", decay: float = 0.95, *,
                 group: Any = None, basis_rank: int = 0, **kw: Any):
        extra = set(kw.get("kfoc_options") or {}) - {"tol", "max_iter"}
        if extra:
            raise ValueError(f"kfoc_options over a process group take 'tol' and 'max_iter' "
                             f"only, got {sorted(extra)}")
        super().__init__(estimator, decay, **kw)
        self.group = group
        self.basis_rank = _check_rank(basis_rank, group)

    @classmethod
    def from_state_dict(cls, state: Any, *, kfoc_options: Any = None,
                        group: Any = None, basis_rank: int = 0) -> "RunningEstimate":
        """:meth:`kronsum.RunningEstimate.from_state_dict`, over ``group``; ``basis_rank`` is
        where the process runs, not part of the checkpoint: give it again (default 0)."""
        out = super().from_state_dict(state, kfoc_options=kfoc_options)
        out.group = group
        out.basis_rank = _check_rank(basis_rank, group)
        return out

    def _check_batch(self, F: object) -> None:
        if isinstance(F, Kron):  # the all-reduce happens in the estimator, on the statistics
            raise TypeError(
                "F is a Kron: over a process group update() takes each rank's part of the "
                "batch's statistics as a KronSum (its estimate is that of the whole batch; a "
                "rank's own K-FAC estimate would not be all-reduced)")
        super()._check_batch(F)

    def _kfac(self, F: KronSum) -> Kron:
        return kfac(F, group=self.group)

    def _tkfac(self, F: KronSum) -> Kron:
        return tkfac(F, group=self.group)

    def _kfoc(self, S: KronSum, prev: Kron | None = None) -> Kron:
        return kfoc(S, group=self.group, init=prev, **self._kfoc_options)

    def _prev_share(self) -> float:
        import torch.distributed as dist

        return 1.0 / dist.get_world_size(self.group)

    def _ekfac_basis(self, kron: Kron) -> tuple:
        return _shared_basis(kron, self.group, self.basis_rank)

    def _ekfac_diag(self, F: KronSum, U: Any, V: Any) -> Any:
        return _Reduced(F, self.group).reduce(super()._ekfac_diag(F, U, V))


def _check_rank(rank: Any, group: Any) -> int:
    """``rank`` as a rank of ``group`` (an integer in ``[0, world)``; before the group exists,
    any non-negative integer, checked again at its first use), or ``ValueError``."""
    import operator

    import torch.distributed as dist

    try:
        if isinstance(rank, bool):
            raise TypeError
        rank = operator.index(rank)
    except TypeError:
        raise ValueError(f"basis_rank must be a rank of the group (an integer), got {rank!r}") from None
    world = dist.get_world_size(group) if dist.is_initialized() else None
    if rank < 0 or (world is not None and rank >= world):
        raise ValueError(f"basis_rank must be a rank of the group (an int in [0, {world})), got {rank!r}")
    return rank


def spread_inverses(estimates: dict, damping: float, method: str = "exact", *,
                    group: Any = None) -> tuple[dict, list]:
    r"""Damped inverses of estimates that every rank holds alike, each decomposed on one rank.

    Block ``i`` (in the dict's order, which must be the same on every rank) is decomposed on
    rank ``i mod world`` (:meth:`kronsum.Kron.inverse`: two eigendecompositions) and its
    eigenvectors, eigenvalues and scale broadcast to the others in one buffer, as KAISA
    spreads K-FAC's inversions. An :class:`~kronsum.EigenKron` (EKFAC) is already in its
    eigenbasis: every rank forms its inverse itself, nothing is decomposed or sent (its basis
    is decomposed on one rank by :class:`RunningEstimate`, ``basis_rank``). A block
    whose decomposition fails raises ``ValueError`` on every rank (one all-reduce of failure
    flags first), naming the block.

    Returns
    -------
    (dict, list)
        ``{block: KronInverse}`` (the same on every rank; notes such as clipped eigenvalues
        are kept on the owner only) and the blocks decomposed on this rank.
    """
    import torch
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local = {k: e.inverse(damping, method) for k, e in estimates.items() if isinstance(e, EigenKron)}
    keys = [k for k in estimates if k not in local]
    eigs, mine, errors = {}, [], {}
    for i, k in enumerate(keys):
        if i % world == rank:
            mine.append(k)
            try:
                eigs[k] = estimates[k].inverse(damping, method)
            except ValueError as exc:
                errors[k] = str(exc)
    if not keys:
        return local, mine
    ref = estimates[keys[0]].left
    failed = torch.tensor([1.0 if k in errors else 0.0 for k in keys], dtype=torch.float64,
                          device=ref.device)
    dist.all_reduce(failed, group=group)
    if bool((failed > 0).any()):
        k = keys[int(torch.nonzero(failed > 0)[0])]
        raise ValueError(f"block {k!r}: its damped inverse failed"
                         + (f": {errors[k]}" if k in errors else " on another rank"))
    out = {}
    for i, k in enumerate(keys):
        est = estimates[k]
        m, n = est.m, est.n
        owner = dist.get_global_rank(group, i % world) if group is not None else i % world
        if k in eigs:
            inv = eigs[k]
            buf = torch.cat([inv.eigvecs_left.reshape(-1), inv.eigvals_left,
                             inv.eigvecs_right.reshape(-1), inv.eigvals_right,
                             torch.tensor([inv.scale], dtype=inv.eigvals_left.dtype,
                                          device=inv.eigvals_left.device)])
        else:
            buf = torch.empty(m * m + m + n * n + n + 1, dtype=est.left.dtype,
                              device=est.left.device)
        dist.broadcast(buf, src=owner, group=group)
        if k in eigs:
            out[k] = eigs[k]
            continue
        o = 0
        parts = []
        for size, shape in ((m * m, (m, m)), (m, (m,)), (n * n, (n, n)), (n, (n,))):
            parts.append(buf[o:o + size].reshape(shape))
            o += size
        eig = _Eig.assembled(est._xp, parts[0], parts[1], parts[2], parts[3], float(buf[o]))
        out[k] = KronInverse._from_eig(eig, method, float(damping))
    return {k: out[k] if k in out else local[k] for k in estimates}, mine
