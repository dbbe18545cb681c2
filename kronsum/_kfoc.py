r"""K-FOC: the Frobenius-optimal single Kronecker product (Schnaus, Lee & Triebel 2021).

``min_{L, R} ‖F − L ⊗ R‖_F`` is the best rank-one approximation of the rearranged matrix
``𝓡(F) = Σ_k w_k vec(L_k) vec(R_k)ᵀ`` (Van Loan & Pitsianis 1993). Three solvers:

``gram``     for the outer and terms forms: with ``P = [vec L_k]``, ``Q = [vec R_k]`` the
             rearrangement is ``P W Qᵀ``; the factor ``L = Σ_k α_k L_k`` has
             ``‖L‖² = αᵀS_Pα`` with ``S_P = PᵀP`` (outer form: the Hadamard square
             ``(GGᵀ)∘(GGᵀ)``), and a power step is ``α ↦ W S_Q W S_P α``, self-adjoint in the
             ``S_P`` inner product. Lanczos runs on these K-vectors at O(K²) per step after
             O(K²(m + n)) for the Gram matrices, then ``L = Gᵀdiag(α)G`` and
             ``R = Aᵀdiag(W S_P α)A``: about K-FAC's cost when K is not much larger than m, n.
             With numba the whole coefficient-space solve is one compiled kernel.
``lanczos``  Lanczos with full reorthogonalisation and explicit restarts on ``𝓡𝓡ᵀ`` (or
             ``𝓡ᵀ𝓡``, whichever acts on the smaller factor), applied through the two
             contractions of :class:`KronSum`; any form, any backend.
``power``    the paper's Algorithm 1/2: alternate ``R ← Σ_k w_k⟨L_k, L⟩R_k`` and
             ``L ← Σ_k w_k⟨R_k, R⟩L_k``. Kept as the reference; its error angle shrinks by
             ``(σ2/σ1)²`` per iteration, so Lanczos needs far fewer products on small gaps.

Stopping rule (iterative solvers, :class:`_Stop`): by default, as soon as the error gap
``(‖F − L⊗R‖ − optimal error)/‖F‖`` is bounded by ``accuracy`` (:mod:`kronsum._stopping`: Temple's
inequality with ``‖F‖²`` on the Gram solver, certified, or with the second Ritz value, an
estimate), or the relative eigen-residual ``‖𝓡𝓡ᵀu − θu‖ / θ ≤ tol`` of the normalised iterate
``u``. The residual bounds the angle to the optimum by ``tol / (1 − σ2²/σ1²)``; the error is
second order in that angle, which is why the error rule stops earlier. A rule on the change of
σ would stop far too early, since σ's error is the square of the angle's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ._accel import cuda_graph, numba_enabled, numba_kernels, via_numpy_on_cpu
from ._closed_forms import _new_kron, _require_sum, kfac
from ._compat import (Array, all_finite, counted, device_of, eye_like, fro_norm, host_floats, host_vector, is_dask_namespace,
                      is_numpy_namespace, materialize, on_accelerator, symmetrize, to_float, trace)
from ._config import get_config
from ._kron import Kron, KronInfo
from ._stopping import gap_bound
from ._sum import KronSum, times_scale
from ._validation import check_in_range, check_int, check_real, check_seed, underflow_notes

__all__ = ["kfoc"]

_METHODS = ("auto", "gram", "lanczos", "power")
_INITS = ("tkfac", "kfac", "identity", "random")
_KRYLOV_DIM = 20
_APPLIES = 4  # products with B^(2^s) per check of the squaring route (32 steps after 3 squarings)


def _default_tol(xp: Any, dtype: Any) -> float:
    return 1e-10 if xp.finfo(dtype).eps < 1e-12 else 1e-5


def _default_accuracy(xp: Any, dtype: Any) -> float:
    return 1e-8 if xp.finfo(dtype).eps < 1e-12 else 1e-6


@dataclass
class _Stop:
    """The iterative solvers' stopping rule, one for all of them: stop when the relative
    eigen-residual is at most ``tol``, or when :func:`kronsum._stopping.gap_bound` bounds the
    error gap by ``accuracy`` (``None``: the residual rule alone). ``f2`` is ``‖F‖²`` in the
    solver's units when known (it certifies the bound). :meth:`met` records the bound of its
    last call, which is the returned iterate's."""

    tol: float
    accuracy: float | None = None
    f2: float | None = None
    f2_err: float = 0.0  # a bound of f2's rounding error
    bound: float | None = None
    certified: bool = False
    th2: float | None = None  # the second Ritz value and its residual at the last call
    r2: float = 0.0

    def met(self, th1: float, res: float, th2: float | None = None, r2: float = 0.0) -> bool:
        """Whether the Ritz pair ``(th1, relative residual res)`` stops the solver."""
        self.th2, self.r2 = th2, r2
        self.bound, self.certified = gap_bound(
            th1, res * th1, -1.0 if th2 is None else th2, r2, -1.0 if self.f2 is None else self.f2,
            self.f2_err)
        return res <= self.tol or (self.accuracy is not None and self.bound <= self.accuracy)


@dataclass(frozen=True)
class MethodChoice:
    """What :func:`choose_method` decided and why.

    Attributes
    ----------
    method : str
        ``"gram"``, ``"lanczos"`` or ``"power"``.
    reason : str
        Why, in words.
    costs : dict
        The cost model's estimates in seconds (one BLAS thread on the machine the constants
        were measured on; only their ratio matters) per candidate solver, empty when the
        choice was not a comparison of costs.

    Examples
    --------
    >>> import numpy as np
    >>> import kronsum as ks
    >>> F = ks.KronSum.from_outer(np.ones((4096, 8)), np.ones((4096, 8)))
    >>> choice = ks.choose_method(F, explain=True)
    >>> choice.method, choice.costs["lanczos"] < choice.costs["gram"]
    ('lanczos', True)
    """

    method: str
    reason: str
    costs: dict = field(default_factory=dict)


# The cost model's constants, measured with one BLAS thread on a 2-core x86-64 VM (NumPy
# 2.4, OpenBLAS, numba; see docs/kfoc.md): seconds per multiply-add in a Gram product or a
# weighted Gram product (GEMM/syrk), per multiply-add in a contraction's thinner products,
# per entry of a K×K matrix for what is memory-bound there (the Hadamard squares and
# scaling, once, and two K×K matrix-vector products per Lanczos step), and per call.
_SEC_PER_GEMM_MAC = 1.0e-10
_SEC_PER_CONTRACTION_MAC = 1.5e-10
_SEC_PER_GRAM_ENTRY = 8e-9
_SEC_PER_GRAM_ENTRY_STEP = 1.6e-9
_SEC_PER_CALL = 5e-5  # Python and dispatch per contraction, or per call of the Gram solver
_SEC_PER_GRAM_STEP_CALL = 2e-5  # per Lanczos step on K-vectors outside the numba kernel
_EXPECTED_APPLICATIONS = 10  # the median over the benchmark's data families is 6-9


def _costs(F: KronSum) -> dict:
    """Modelled seconds of the Gram and the Lanczos solver on ``F`` (outer/terms parts)."""
    K, m, n = F.num_terms, F.m, F.n
    parts = [(P.num_terms, P.form) for P in (F.parts if F.form == "sum" else (F,))]
    # the two Gram matrices: outer × outer blocks from the statistics, the others from the terms
    build = sum(Ki * Kj * ((m + n) if fi == fj == "outer" else (m * m + n * n))
                for Ki, fi in parts for Kj, fj in parts) / 2
    its = _EXPECTED_APPLICATIONS
    finish = K * (m * m + n * n)  # the two weighted Gram products of the factors
    cached = min(1.0, 0.35 + 0.65 * K / 2000)  # K×K matrices within the caches cost less per entry
    gram = ((build + finish) * _SEC_PER_GEMM_MAC
            + K * K * cached * (_SEC_PER_GRAM_ENTRY + its * _SEC_PER_GRAM_ENTRY_STEP))
    # a contraction: K quadratic forms on one side, one weighted Gram product on the other
    contraction = K * (m * m + n * n) * 0.75
    lanczos = (2 * its + 2) * contraction * _SEC_PER_CONTRACTION_MAC
    if F.dtype == F.xp.float32:  # float32 halves the products; the numba Gram route is float64
        lanczos /= 2
        gram -= (build + finish) * _SEC_PER_GEMM_MAC / 2
    gram += _SEC_PER_CALL + (0 if numba_enabled(F.xp, F.weights) else its * _SEC_PER_GRAM_STEP_CALL)
    lanczos += (2 * its + 2) * _SEC_PER_CALL
    return {"gram": gram, "lanczos": lanczos}


def choose_method(F: KronSum, method: str = "auto", *, explain: bool = False) -> str | MethodChoice:
    """The solver :func:`kfoc` uses for ``F`` with ``method``; the rule of ``method="auto"``.

    ``"gram"`` for the outer and terms forms and sums whose parts all have those forms (e.g.
    K-FOC_running's previous estimate plus a batch) when a cost model says it is cheaper than
    ``"lanczos"``, and K ≤ 8192 (the Gram matrices take 2K² numbers); ``"lanczos"`` otherwise,
    for the conv form (alone or in a sum) and for Dask arrays (chunked along K, where a K×K
    matrix does not pay). A conv part of one position (T = 1) is an outer part here.

    The cost model, with constants measured on a CPU (docs/kfoc.md) and about 10 operator
    applications expected: the Gram solver costs its two Gram products (``K²(m + n)/2``
    multiply-adds for outer, ``K²(m² + n²)/2`` for terms), the factors' two weighted Gram
    products (``K(m² + n²)``), and a memory-bound pass per K×K entry, once and per Lanczos
    step; Lanczos costs two contractions per application, each about ``0.75·K(m² + n²)``
    multiply-adds in thinner products. Float32 inputs halve the products. The Gram
    solver wins when K is not much larger than m and n; the K² passes make it lose for
    K ≫ m + n (e.g. K = 2560 samples of a 10 × 129 layer).

    Parameters
    ----------
    F : KronSum
    method : {"auto", "gram", "lanczos", "power"}
        A named method is checked (``"gram"`` needs the outer/terms forms and no Dask) and
        returned as it is.
    explain : bool
        Return a :class:`MethodChoice` (method, reason, modelled costs) instead of the name.

    Examples
    --------
    >>> import numpy as np
    >>> import kronsum as ks
    >>> rng = np.random.default_rng(0)
    >>> ks.choose_method(ks.KronSum.from_outer(rng.standard_normal((256, 64)), rng.standard_normal((256, 64))))
    'gram'
    >>> ks.choose_method(ks.KronSum.from_outer(rng.standard_normal((4096, 8)), rng.standard_normal((4096, 8))))
    'lanczos'
    >>> prev = ks.KronSum.from_kron(ks.Kron(np.eye(64), np.eye(64)))
    >>> ks.choose_method(prev + ks.KronSum.from_outer(rng.standard_normal((128, 64)), rng.standard_normal((128, 64))))
    'gram'
    >>> one_position = ks.KronSum.from_conv(rng.standard_normal((64, 1, 512)), rng.standard_normal((64, 1, 512)))
    >>> choice = ks.choose_method(one_position, explain=True)
    >>> choice.method, choice.reason.endswith("(conv parts with T = 1 taken as outer)")
    ('gram', True)
    >>> ks.choose_method(ks.KronSum.from_outer(rng.standard_normal((2560, 10)), rng.standard_normal((2560, 129))))
    'lanczos'
    """
    choice = _choose(F, method)
    return choice if explain else choice.method


def _choose(F: KronSum, method: str) -> MethodChoice:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    F, given = F._outer_positions(), F
    if method == "gram":
        if not F._gram_able():
            raise ValueError(
                "method='gram' needs the outer or terms form, or a sum of such parts (a K-column "
                "rearrangement); use 'lanczos' for the conv form"
            )
        if is_dask_namespace(F.xp):
            raise ValueError("method='gram' needs linalg.eigh, which Dask arrays lack; use 'lanczos'")
        return MethodChoice(method, "requested")
    if method != "auto":
        return MethodChoice(method, "requested")
    if not F._gram_able():
        return MethodChoice("lanczos", "the conv form (T > 1 positions) has no K-column rearrangement "
                                       "for the Gram solver")
    if is_dask_namespace(F.xp):
        return MethodChoice("lanczos", "Dask arrays: chunked along K, a K×K Gram matrix does not pay")
    costs = _costs(F)
    note = " (conv parts with T = 1 taken as outer)" if F is not given else ""
    text = f"modelled cost: gram {costs['gram']:.2g} s, lanczos {costs['lanczos']:.2g} s{note}"
    if F.num_terms > 8192:
        return MethodChoice("lanczos", f"K = {F.num_terms} > 8192: the Gram matrices would take 2K² "
                                       f"numbers; {text}", costs)
    best = "gram" if costs["gram"] <= costs["lanczos"] else "lanczos"
    return MethodChoice(best, text, costs)


@counted
@via_numpy_on_cpu
def kfoc(
    F: KronSum,
    *,
    method: str = "auto",
    tol: float | None = None,
    max_iter: int | None = None,
    init: str | Kron = "tkfac",
    seed: int | None = None,
    precision: str = "input",
    accuracy: float | None = None,
) -> Kron:
    r"""K-FOC: the Kronecker product ``σ₁ L ⊗ R`` nearest to F in Frobenius norm.

    .. math::

        (L, R) = \arg\min_{L, R} \Big\| \sum_k w_k L_k \otimes R_k - L \otimes R \Big\|_F,

    the top singular pair of the rearranged sum ``𝓡(F)``, found without forming F or 𝓡(F).

    Parameters
    ----------
    F : KronSum
    method : {"auto", "gram", "lanczos", "power"}
        Solver; see the module docstring and :func:`choose_method` for the ``"auto"`` rule.
    tol : float, optional
        Relative eigen-residual ``‖𝓡𝓡ᵀu − θu‖/θ`` at which the iterative solvers stop.
        Default 1e-10 for float64, 1e-5 for float32. Given without ``accuracy``, it is the
        only rule.
    accuracy : float, optional
        Stop as soon as ``(‖F − F̂‖ − optimal error)/‖F‖ ≤ accuracy`` is bounded from the
        solver's Ritz values (or the residual meets ``tol``). Default 1e-8 for float64, 1e-6
        for float32, unless ``tol`` is given. The error is second order in the factors'
        angle, so this stops well before a residual of 1e-10: the factors are then accurate
        to about ``√accuracy``, the error to ``accuracy``. The bound is **certified** on the
        Gram solver when K-FOC explains more than half of ``‖F‖²`` (it knows ``‖F‖²``
        there) and an estimate otherwise: see ``info.error_gap_bound`` and
        ``info.error_gap_certified``, and docs/kfoc.md for the inequalities. The power
        method has no second Ritz value and stops on ``tol`` alone.
    max_iter : int, optional
        Most operator applications (each = both contractions, the cost of one iteration of
        the paper's Algorithm 1). Default 500 (``lanczos``), 5000 (``power``).
    init : {"tkfac", "kfac", "identity", "random"} or Kron
        Starting factor of the iterative solvers. ``"tkfac"`` (default) starts from TKFAC's
        factor, itself one half-step from the identity; ``"random"`` uses ``seed``; a
        :class:`Kron` (e.g. the previous estimate) warm-starts from its factors.
    seed : int, optional
        Seed of ``init="random"``.
    precision : {"input", "float64"}
        ``"input"`` (default) computes in the inputs' dtype; ``"float64"`` casts float32 (or
        lower) inputs to float64 for the whole solve and returns factors in the input dtype
        (twice the memory of the inputs; for float32 statistics whose optimum is wanted to
        more than about 4 digits).

    Returns
    -------
    Kron
        ``left`` (m, m) and ``right`` (n, n) of unit Frobenius norm with ``tr(left) ≥ 0``,
        ``scale = σ₁``. Symmetric when the terms are (always for outer and conv; bit for bit
        on NumPy, to rounding where the weighted Gram products are GEMMs); both PSD when
        F is a PSD sum (non-negative weights, PSD terms, or the outer/conv forms).
        ``info`` holds the solver, iterations, convergence, estimates of σ₁ and σ₂ and notes:
        a zero sum gives ``scale = 0`` with identity-shaped factors; ``σ₁ = σ₂`` (the optimum
        is not unique) is noted and a finite optimal answer is still returned.

    Raises
    ------
    OverflowError
        When σ₁ (about ‖F‖) is beyond the range of the dtype (e.g. ``G·1e150`` with
        ``A·1e150`` in float64, ``1e20`` in float32). Inputs of any magnitude whose F fits,
        including opposite scales that cancel (``G·1e200`` with ``A/1e200``), give finite
        answers; a σ₁ below the smallest normal number is noted in ``info.notes``.
    ValueError
        When NaN or infinity reaches the iterates (statistics built with
        ``check_finite=False``), and for options out of range; ``TypeError`` for options of
        the wrong kind (``tol``, ``accuracy`` and ``max_iter`` take numbers, not ``bool``).

    Notes
    -----
    On accelerators the ``gram`` solver reads its convergence scalars every few steps
    (``kronsum.config(check_every=...)``) and, when ``10K² ≤ m² + n²``, replaces Lanczos by
    repeated squaring of the K×K operator (``info.method == "kfoc/gram-squaring"``; far fewer
    kernel launches, one host read when 32 power steps suffice; ``info.iterations`` counts
    the power steps it stands for). For PyTorch CUDA tensors,
    ``kronsum.config(cuda_graphs=True)`` replays that route's small kernels as one captured
    CUDA graph per input layout (see :func:`kronsum.get_config`).

    Cost: ``gram`` O(K²(m + n) + K³ + K(m² + n²)) for the outer form; ``lanczos`` and
    ``power`` O(K(m² + n²)) per application for outer/terms (conv: see
    :meth:`KronSum.contract_left`), typically 10–30 applications with Lanczos.

    Examples
    --------
    >>> import numpy as np
    >>> from kronsum import KronSum, kfoc, kfac, frobenius_error
    >>> rng = np.random.default_rng(0)
    >>> F = KronSum.from_outer(rng.standard_normal((32, 4)), rng.standard_normal((32, 5)))
    >>> best = kfoc(F)
    >>> bool(frobenius_error(F, best) <= frobenius_error(F, kfac(F)))
    True
    >>> best.info.converged, kfoc(F, method="lanczos").info.method
    (True, 'kfoc/lanczos')
    """
    F = _require_sum(F, "kfoc")._outer_positions()  # T = 1 conv parts: outer parts, same F
    method = choose_method(F, method)
    xp = F.xp
    if accuracy is None and tol is None:
        accuracy = _default_accuracy(xp, F.dtype)
    if tol is None:
        tol = _default_tol(xp, F.dtype)
    tol = check_real(tol, "tol", positive=True)
    if accuracy is not None:
        accuracy = check_real(accuracy, "accuracy", positive=True)
    if max_iter is None:
        max_iter = 5000 if method == "power" else 500
    max_iter = check_int(max_iter, "max_iter", minimum=1)
    seed = check_seed(seed)
    if isinstance(init, Kron):
        if (init.m, init.n) != (F.m, F.n):
            raise ValueError(
                f"init has factors of sizes ({init.m}, {init.n}) but F needs ({F.m}, {F.n})"
            )
    elif init not in _INITS:
        raise ValueError(f"init must be one of {_INITS} or a Kron, got {init!r}")

    if precision not in ("input", "float64"):
        raise ValueError(f"precision must be 'input' or 'float64', got {precision!r}")
    if precision == "float64" and F.dtype != xp.float64:
        out = kfoc(F.astype(xp.float64), method=method, tol=tol, max_iter=max_iter,
                   init=init, seed=seed, accuracy=accuracy)
        check_in_range(out.info.sigma1, "kfoc's scale σ₁ (the largest singular value of 𝓡(F))", xp, F.dtype)
        return _new_kron(xp.astype(out.left, F.dtype), xp.astype(out.right, F.dtype),
                         xp.astype(out.scale, F.dtype), out.info, xp)
    Fn, (cw, cl, cr) = F.normalized()
    Fn = Fn.persisted()  # Dask: inputs computed once, each iteration one map-reduce
    c = cw * (cl * cr)
    stop = _Stop(float(tol), None if accuracy is None else float(accuracy))
    requested = method
    if method == "gram":
        L, R, sigma, notes, its, conv, res, s2, method = _gram_solve(Fn, init, seed, stop, max_iter)
    else:
        side = "left" if Fn.m <= Fn.n else "right"
        if method == "lanczos" and _mixed_precision(Fn, stop):
            L, R, sigma, notes, its, conv, res, s2 = _lanczos_mixed(Fn, init, seed, side, stop, max_iter)
            method = "lanczos[float32]"
        else:
            x0 = _initial(Fn, init, seed, side)
            solver = _lanczos if method == "lanczos" else _power
            space = _operator_space(Fn, side, keep_aux=method == "lanczos" and _aux_fits(Fn, side))
            x, its, conv, res, s2 = solver(space, x0, stop, max_iter)
            L, R, sigma, notes = _finish(Fn, x, side, space.result_aux)
            if s2 is None and conv and method == "power":  # σ₂ for the tie note below
                s2 = _deflated_top(space, x, space.M(x), seed=[0x5EED, 2])[0]  # not init's stream
    sig1 = to_float(sigma)
    check_in_range(sig1 * c, "kfoc's scale σ₁ (the largest singular value of 𝓡(F))", xp, F.dtype)
    # a start that is an eigenvector of a smaller singular value (Krylov then sees nothing
    # else; the deflated probe finds the larger one) or orthogonal to the optimum (a zero
    # answer from a non-zero sum): solve again from a random start
    wrong = s2 is not None and s2 > sig1 * (1 + 1e-6)
    if (wrong or not sig1 > 0) and init != "random":
        why = (f"the start was an eigenvector of a smaller singular value ({sig1 * c:.6g}; the "
               f"deflated probe found {s2 * c:.6g})" if wrong else "the start gave a zero estimate")
        out = kfoc(F, method=requested, tol=tol, max_iter=max_iter, init="random",
                   seed=0 if seed is None else seed, precision=precision, accuracy=accuracy)
        if float(out.scale) > 0 or wrong:
            out.info = replace(out.info, notes=out.info.notes + (f"{why}: solved again from a random start",))
            return out
    if stop.bound is None:
        # the solver stopped at an invariant subspace (or a zero sum) without a bound: the
        # residual is 0, and Temple's inequality with the probe's σ₂ (an estimate) bounds the gap
        stop.met(sig1 * sig1, 0.0, None if s2 is None else s2 * s2)
    info = dict(method=f"kfoc/{method}", iterations=its, converged=conv, residual=res,
                error_gap_bound=stop.bound, error_gap_certified=stop.certified)
    if not conv:
        rule = f"tol {tol:.3g}" + ("" if accuracy is None else f" or an error-gap bound ≤ {accuracy:.3g}")
        notes = notes + (f"not converged: residual {res:.3g}, not below {rule} after {its} applications",)
    if s2 is not None and sig1 > 0 and s2 >= sig1 * (1 - math.sqrt(xp.finfo(F.dtype).eps)):
        notes = notes + ("sigma1 == sigma2 to working precision: the optimum is not unique; "
                         "one optimal pair is returned",)
    notes = notes + underflow_notes(sig1, c, "sigma1", xp, F.dtype)
    return _new_kron(L, R, times_scale(sigma, c), KronInfo(
        sigma1=sig1 * c, sigma2=None if s2 is None else s2 * c, notes=notes, **info), xp)


# -- solvers ------------------------------------------------------------------------------


class _Space:
    """A vector space for the iterative solvers: the operator and, optionally, a metric.

    Vectors are arrays of any shape (``(d, d)`` factors or ``(K,)`` coefficient vectors); the
    inner product is ``⟨x, y⟩ = Σ x ∘ M(y)`` with ``M`` the metric (identity when ``None``).
    """

    def __init__(self, apply, xp, metric=None, apply_M=None, safe_norm=False, apply_aux=None):
        # every product is materialised: on Dask each step is then one map-reduce over the
        # persisted inputs rather than a graph re-running all earlier steps
        self.apply = None if apply is None else (lambda x: materialize(apply(x)))
        # apply_aux(x) -> (apply(x), aux(x)) with aux linear in x (the half-step image): Lanczos
        # then also returns aux of its answer in ``result_aux``, which saves a contraction
        self.apply_aux = None if apply_aux is None else (
            lambda x: tuple(materialize(v) for v in apply_aux(x)))
        self.result_aux = None
        self.xp, self.metric, self.safe_norm = xp, metric, safe_norm
        self._apply_M = None if apply_M is None else (lambda x, Mx: materialize(apply_M(x, Mx)))

    def apply_M(self, x, Mx):
        """``apply(x)`` when ``Mx = M(x)`` is at hand (saves a product for the Gram space)."""
        return self.apply(x) if self._apply_M is None else self._apply_M(x, Mx)

    def M(self, x):
        return x if self.metric is None else self.metric(x)

    def dot(self, x, My):
        return self.xp.sum(x * My)

    def norm(self, x, Mx=None):
        if self.safe_norm and self.metric is None:
            return fro_norm(x, self.xp)  # scaled by max|x| first: no overflow in the squares
        v = self.dot(x, self.M(x) if Mx is None else Mx)
        return self.xp.sqrt(self.xp.where(v > 0, v, self.xp.zeros_like(v)))

    def random_like(self, x, seed, symmetric):
        r = np.random.default_rng(seed).standard_normal(tuple(x.shape))
        if symmetric and r.ndim == 2:
            r = r + r.T
        return self.xp.asarray(r, dtype=x.dtype, device=device_of(x))


def _gram_solve(Fn: KronSum, init, seed, stop: _Stop, max_iter):
    """Exact K-FOC for the outer and terms forms, iterating on K-vectors of coefficients.

    ``L = Σ α_k L_k`` has ``‖L‖² = αᵀS_Pα`` and one step of the power method maps
    ``α ↦ W S_Q W S_P α``, self-adjoint in the ``S_P`` inner product: Lanczos runs there at
    O(K²) per step, after O(K²(m + n)) (outer) for the two Gram matrices. Returns the finished
    ``(L, R, σ, notes)`` and the solver's ``(iterations, converged, residual, σ₂, kernel)``.
    """
    xp = Fn.xp
    w = Fn.weights
    if isinstance(init, Kron):
        R0 = xp.astype(xp.asarray(init.right), Fn.dtype)
    elif init == "kfac":
        R0 = kfac(Fn).right
    elif init == "random":
        R0 = _Space(None, xp).random_like(eye_like(Fn.n, w, xp), seed, Fn.symmetric)
    else:  # "tkfac" and "identity" coincide after the half-step into coefficient space
        R0 = None
    alpha0 = w * (Fn._traces("right") if R0 is None else Fn._inner("right", R0))

    if numba_enabled(xp, w):  # float64 arithmetic inside the kernel: no range concern
        # the Gram matrices in float64 straight away (one pass each, no cast of a copy)
        SP, SQ = Fn._gram("left", float64=True), Fn._gram("right", float64=True)
        w64 = xp.astype(w, xp.float64, copy=False)
        space = _gram_space(SP, SQ, w64, xp)
        alpha0 = xp.astype(alpha0, xp.float64)
        if not bool(space.norm(alpha0) > 0):
            alpha0 = w64
            if not bool(space.norm(alpha0) > 0):  # every term is zero (S_P = 0) or NaN
                _require_finite(xp, SP)
                _require_finite(xp, SQ)
                return (*_zero_answer(Fn), 0, True, 0.0, 0.0, "gram[numba]")
        alpha, its, conv, res, s2 = _lanczos_numba(space, SP, SQ, w64, alpha0, stop, max_iter,
                                                   xp.finfo(Fn.dtype).eps)
        dt = Fn.dtype
        MA = SP @ alpha
        beta = w64 * MA
        # norms and sign in coefficient space (‖L‖² = αᵀS_Pα, ‖R‖² = βᵀS_Qβ, tr L = Σ α_k tr L_k):
        # the weighted Gram products then give unit factors, with no pass over their results
        nls2, nrs2, tr = (float(v) for v in (alpha @ MA, beta @ (SQ @ beta),
                                             alpha @ xp.astype(Fn._traces("left"), xp.float64)))
        if math.isfinite(nls2 * nrs2 * tr) and nls2 > 0 and nrs2 > 0:
            sign = -1.0 if tr < 0 else 1.0
            nls, nrs = math.sqrt(nls2), math.sqrt(nrs2)
            L = Fn._combine("left", xp.astype(alpha * (sign / nls), dt))
            R = Fn._combine("right", xp.astype(beta * (sign / nrs), dt))
            return L, R, nrs / nls, (), its, conv, res, s2, "gram[numba]"
        L, R, sigma, notes = _finish_pair(Fn, Fn._combine("left", xp.astype(alpha, dt)),
                                          Fn._combine("right", xp.astype(beta, dt)))
        return L, R, sigma, notes, its, conv, res, s2, "gram[numba]"

    st = None
    if _use_squaring(Fn):
        done, st = _squaring(Fn, alpha0, stop, max_iter)
        if done is not None:
            return done
    if st is None:
        st = _SquaringState()
        _scaled_grams(Fn, st)
    # Lanczos (after the squaring route if it ran: its scaled Gram matrices are at hand)
    SPs, SQs, ws, cP, cQ, cw = st.SPs, st.SQs, st.ws, st.cP, st.cQ, st.cw
    space = _gram_space(SPs, SQs, ws, xp)
    # a start with ‖L₀‖ = 0 (e.g. traceless terms) falls back to the weights, on the device;
    # if that is zero too, every term is zero (S_P = 0) and the solve returns a zero vector
    alpha0 = xp.where(space.norm(alpha0) > 0, alpha0, w)
    # ‖F̃‖² in scaled units: it certifies the stop, and bounds σ₂ when the solver gave none
    stop.f2 = to_float(xp.sum(ws * ((SPs * SQs) @ ws)))
    stop.f2_err = Fn.num_terms * float(xp.finfo(Fn.dtype).eps) * abs(stop.f2)
    alpha, its, conv, res, s2 = _lanczos(space, alpha0, stop, max_iter)
    kernel = "gram"
    # finish in coefficient space: ‖L‖² = αᵀS_Pα, R ∝ Σ β_k R_k with β = w∘S_Pα,
    # ‖R‖² = βᵀS_Qβ, tr L = Σ α_k tr L_k; one host read, then the two weighted Gram products
    MA = SPs @ alpha
    beta = ws * MA
    vals = host_floats([xp.sum(alpha * MA), xp.sum(beta * (SQs @ beta)),
                        xp.sum(alpha * Fn._traces("left")), stop.f2, cP, cQ, cw])
    nls2, nrs2, tr, f2s, fP, fQ, fw = vals
    if not all(math.isfinite(v) for v in vals):
        _require_finite(xp, math.nan)
    if not (nls2 > 0 and nrs2 > 0):
        return (*_zero_answer(Fn), its, True, 0.0, 0.0, kernel)
    sign = -1.0 if tr < 0 else 1.0
    nls, nrs = math.sqrt(nls2), math.sqrt(nrs2)
    unit = math.sqrt(fw * fw * fQ * fP)  # scaled → true units of σ
    sigma = unit * nrs / nls
    if s2 is not None:
        s2 = s2 * unit
    elif not f2s - nrs2 / nls2 < (nrs2 / nls2) * (1 - math.sqrt(xp.finfo(Fn.dtype).eps)):
        # ‖F‖² − σ₁² bounds σ₂²; when it cannot rule out σ₂ = σ₁, probe the deflated operator
        x = alpha / nls
        s2, k = _deflated_top(space, x, space.M(x), nrs2 / nls2)
        s2, its = s2 * unit, its + k
    L = Fn._combine("left", alpha * (sign / (nls * math.sqrt(fP))))
    R = Fn._combine("right", beta * (sign / (nrs * math.sqrt(fQ))))
    return L, R, sigma, (), its, conv, res, s2, kernel


def _use_squaring(Fn: KronSum) -> bool:
    """The squaring route (option ``gram_squaring``; by default: arrays on an accelerator and
    its 4 K×K products (8K³ flops) at most two fifths of the final weighted Gram products'
    2K(m² + n²), ``10K² ≤ m² + n²``)."""
    forced = get_config()["gram_squaring"]
    if forced is not None:
        return forced
    K = Fn.num_terms
    return on_accelerator(Fn.weights) and 10 * K * K <= Fn.m * Fn.m + Fn.n * Fn.n


def _squaring(Fn: KronSum, alpha0, stop: _Stop, max_iter):
    """The power method by repeated squaring of the K×K operator ``B = W S_Q W S_P``, finished
    on the device before its first host read.

    For accelerators with K small beside m and n: every Lanczos step is a dozen tiny kernels,
    each a launch and a Python dispatch, while ``M = B^(2^s)`` costs s GEMMs of 2K³ flops and
    ``x = M⁴α₀`` four matrix-vector products more (four products stand in for the last two
    squarings at a few percent of their cost). After 3, 6 and 9 squarings (32, 256, 2048 power
    steps) :func:`_squaring_finish` queues the answer for ``x`` and its checks without a
    read, then the scalars are read. At the first check the two final weighted Gram products
    are queued before that read: when 32 steps meet ``tol`` (the usual case) the device never
    waits on the host between the Gram matrices and the factors (:func:`_squaring_pass`, the
    part up to the first read, has no host read at all); when they do not, that pair of
    products is dropped (one pair at most: later checks read first). Returns
    ``(_gram_solve's tuple, state)``, the tuple ``None`` when ``tol`` is not met (or
    ``max_iter`` caps the steps) or anything is not finite (a zero operator included): then
    Lanczos takes over, on the state's scaled Gram matrices (``None`` if no pass ran).
    """
    xp = Fn.xp
    if _APPLIES * 2**3 > max_iter:
        return None, None
    # option cuda_graphs (PyTorch CUDA): the pass replayed as one graph; a copy of its state,
    # whose arrays the graph's next replay overwrites (all read within this call)
    st = cuda_graph(("kfoc-squaring", _structure(Fn)),
                    lambda a: _squaring_pass(_rebuilt(Fn, a[:-1]), a[-1]), [*Fn._arrays(), alpha0])
    st = _squaring_pass(Fn, alpha0) if st is None else st.copy()
    for target in (3, 6, 9):
        if _APPLIES * 2**target > max_iter:
            return None, st
        if target > st.level:
            _squaring_more(Fn, st, target - st.level)
        first = target == 3  # queue the final products before the read (dropped if it fails)
        LR = (Fn._combine("left", st.cL), Fn._combine("right", st.cR)) if first else None
        th, rr, f2s, fP, fQ, fw = vals = host_vector(st.scalars)
        if not (all(math.isfinite(v) for v in vals) and th > 0):
            return None, st
        res = math.sqrt(max(rr, 0.0)) / th
        stop.f2, stop.f2_err = f2s, Fn.num_terms * float(xp.finfo(Fn.dtype).eps) * abs(f2s)
        if not stop.met(th, res):
            continue
        L, R = LR if first else (Fn._combine("left", st.cL), Fn._combine("right", st.cR))
        unit = math.sqrt(fw * fw * fQ * fP)  # scaled → true units of σ
        its, s2 = _APPLIES * 2**st.level + 1, None
        if not f2s - th < th * (1 - math.sqrt(xp.finfo(Fn.dtype).eps)):
            # ‖F‖² − σ₁² cannot rule out σ₂ = σ₁: probe the deflated operator
            s2, k = _deflated_top(_gram_space(st.SPs, st.SQs, st.ws, xp), st.x, st.Mx, th)
            s2, its = s2 * unit, its + k
        return (L, R, unit * math.sqrt(th), (), its, True, res, s2, "gram-squaring"), st
    return None, st


def _rebuilt(Fn: KronSum, arrays: list) -> KronSum:
    """``Fn`` over ``arrays`` (in the order of ``Fn._arrays()``); a sum's own weights, the
    concatenation of its parts', are concatenated again from the new parts."""
    it = iter(arrays)

    def rebuild(P: KronSum) -> KronSum:
        if P.form == "sum":
            return KronSum.concat(*(rebuild(Q) for Q in P.parts))
        return P._map(lambda _: next(it))

    return rebuild(Fn)


def _structure(Fn: KronSum) -> tuple:
    """The forms of ``Fn`` (a sum: of its parts), which with the arrays' layouts fix what the
    squaring pass computes (part of its CUDA graph's key)."""
    return tuple(P.form for P in Fn.parts) if Fn.form == "sum" else (Fn.form,)


class _SquaringState:
    """The device arrays of the array-API Gram solver: the scaled Gram matrices
    (:func:`_scaled_grams`) and the squaring route's state (:func:`_squaring_pass`)."""

    __slots__ = ("M", "level", "a0", "SPs", "SQs", "ws", "tl", "tiny", "f2", "cP", "cQ", "cw",
                 "x", "Mx", "cL", "cR", "scalars")

    def copy(self) -> "_SquaringState":
        out = _SquaringState()
        for k in self.__slots__:
            setattr(out, k, getattr(self, k))
        return out


def _squaring_pass(Fn: KronSum, alpha0, squarings: int = 3) -> _SquaringState:
    """The squaring route up to its first host read, as device work only (no read, no
    transfer, shapes fixed by the inputs'): Gram matrices, ``M = B^(2^squarings)``, the
    answer for ``x ∝ M⁴α₀``: coefficients of the factors and scalars (:func:`_squaring_finish`).

    A zero operator gives θ = 0, which the caller reads.
    """
    xp = Fn.xp
    st = _SquaringState()
    _scaled_grams(Fn, st)
    SPs, SQs, ws, tiny = st.SPs, st.SQs, st.ws, st.tiny
    outer = Fn.form == "outer"
    a0 = alpha0 / xp.maximum(xp.max(xp.abs(alpha0)), tiny)  # a start's scale is free
    # a start with ‖L₀‖ = 0 (e.g. traceless terms) falls back to the weights
    st.a0 = xp.where(xp.sum(a0 * (SPs @ a0)) > 0, a0, ws)
    # the sign of tr L = Σ x_k tr L_k; outer: tr(g gᵀ) = ‖g‖² = S_P[k, k]^½ (no pass over G)
    st.tl = xp.sqrt(xp.linalg.diagonal(SPs)) if outer else Fn._traces("left")
    st.f2 = xp.sum(ws * ((SPs * SQs) @ ws))  # ‖F̃‖² in scaled units: bounds σ₂
    st.M, st.level = ((ws[:, None] * SQs) * ws[None, :]) @ SPs, 0
    _squaring_more(Fn, st, squarings)
    return st


def _scaled_grams(Fn: KronSum, st: _SquaringState) -> None:
    """``st.SPs, st.SQs, st.ws`` = S_P, S_Q, w over their largest magnitudes ``st.cP, st.cQ,
    st.cw`` (device scalars, no host read), and ``st.tiny``, float's smallest normal number.

    The Gram-space operator multiplies four K-scale quantities (entries of S_P ~ ‖g‖⁴): in
    float32 it would overflow for large layers; scaled, its eigenvector is the same. Divisors
    are bounded below by ``tiny``, one kernel each (no clip: array-api-compat's clip costs
    ~0.3 ms a call on CuPy); the outer form's Gram entries (g_kᵀg_l)² need no ``abs``.
    """
    xp = Fn.xp
    w = Fn.weights
    st.tiny = tiny = xp.full((), xp.finfo(w.dtype).smallest_normal, dtype=w.dtype,
                             device=device_of(w))
    SP, SQ = Fn._gram("left"), Fn._gram("right")
    if Fn.form != "outer":
        SP_abs, SQ_abs = xp.abs(SP), xp.abs(SQ)
    else:
        SP_abs, SQ_abs = SP, SQ
    st.cP, st.cQ, st.cw = (xp.maximum(xp.max(S), tiny) for S in (SP_abs, SQ_abs, xp.abs(w)))
    st.SPs, st.SQs, st.ws = SP / st.cP, SQ / st.cQ, w / st.cw


def _gram_space(SPs, SQs, ws, xp) -> _Space:
    """The power step ``α ↦ W S_Q W S_P α`` on coefficient vectors, in the ``S_P`` metric."""
    return _Space(lambda a: ws * (SQs @ (ws * (SPs @ a))), xp, metric=lambda a: SPs @ a,
                  apply_M=lambda a, Ma: ws * (SQs @ (ws * Ma)))


def _squaring_more(Fn: KronSum, st: _SquaringState, squarings: int) -> None:
    """``squarings`` more squarings of ``st.M`` (rescaled to a largest entry of 1), then
    :func:`_squaring_finish`."""
    xp = Fn.xp
    M = st.M
    for _ in range(squarings):
        M = M @ M
        M = M / xp.maximum(xp.max(xp.abs(M)), st.tiny)
    st.M, st.level = M, st.level + squarings
    _squaring_finish(Fn, st)


def _squaring_finish(Fn: KronSum, st: _SquaringState) -> None:
    """Queue everything the answer for ``x ∝ M⁴a₀`` needs, without a host read.

    (``M`` and ``a₀`` have largest entries of 1, so ``|M⁴a₀| ≤ K⁴`` entrywise, within float32
    for K < 2³¹; ``x`` is rescaled to a largest entry of 1 before its quadratic forms.)

    ``x`` is normalised to ``xᵀS_Px = 1`` (so ``‖L‖ = 1`` in scaled units); ``β = W S_P x``;
    the Rayleigh quotient ``θ = βᵀS_Qβ`` is σ₁² in scaled units; the metric residual
    ``‖Bx − θx‖²_{S_P}`` with ``Bx = W S_Q β``; the sign of ``tr L``; the coefficients of
    ``L = Σ_k cL_k L_k`` and ``R = Σ_k cR_k R_k``, both of unit norm. Sets ``st.x``, ``st.Mx``
    (``S_P x``), ``st.cL``, ``st.cR`` and ``st.scalars = [θ, residual², ‖F̃‖², c_P, c_Q, c_w]``,
    stacked for one transfer.
    """
    xp = Fn.xp
    SPs, ws, tiny = st.SPs, st.ws, st.tiny
    x = st.a0
    for _ in range(_APPLIES):
        x = st.M @ x
    x = x / xp.maximum(xp.max(xp.abs(x)), tiny)
    Mx = SPs @ x
    nx = xp.sqrt(xp.maximum(xp.sum(x * Mx), tiny))
    st.x, st.Mx = x, Mx = x / nx, Mx / nx
    beta = ws * Mx
    Qb = st.SQs @ beta
    th = xp.sum(beta * Qb)
    r = ws * Qb - th * x  # B x − θ x
    rr = xp.sum(r * (SPs @ r))
    sign = 1 - 2 * xp.astype(xp.sum(x * st.tl) < 0, x.dtype)
    st.cL = x * (sign / xp.sqrt(st.cP))
    # (√θ·√c_Q, not √(θ c_Q): the product may pass float32's range where σ₁ itself does not)
    st.cR = beta * (sign / (xp.sqrt(xp.maximum(th, tiny)) * xp.sqrt(st.cQ)))
    st.scalars = xp.stack([th, rr, st.f2, st.cP, st.cQ, st.cw])


def _operator_space(Fn: KronSum, side: str, keep_aux: bool = False) -> _Space:
    """``𝓡𝓡ᵀ`` on (m, m) factors (side="left") or ``𝓡ᵀ𝓡`` on (n, n) ones. ``keep_aux``: the
    half-step image (``contract_left(X)`` for side="left") is kept per Lanczos vector, so the
    finish reads the other factor off the basis instead of contracting once more."""
    # below float64 the iterates' entries reach σ₁² and their squares overflow: safe norms
    safe = Fn.xp.finfo(Fn.dtype).bits < 64
    first, second = ((Fn.contract_left, Fn.contract_right) if side == "left"
                     else (Fn.contract_right, Fn.contract_left))

    def apply_aux(X):
        Y = materialize(first(X))
        return second(Y), Y

    return _Space(lambda X: second(first(X)), Fn.xp, safe_norm=safe,
                  apply_aux=apply_aux if keep_aux else None)


def _mixed_precision(Fn: KronSum, stop: _Stop) -> bool:
    """Whether Lanczos on the contractions iterates in float32 (:func:`_lanczos_mixed`):
    float64 inputs under the accuracy rule, contractions of at least 2²⁶ multiply-adds
    (below, the copy and the float64 check cost more than the float32 steps save), not Dask
    (whose contractions are bound by the map-reduce, not the arithmetic)."""
    xp = Fn.xp
    large = Fn.num_terms * Fn.num_positions * (Fn.m * Fn.m + Fn.n * Fn.n) >= 1 << 26
    return (large and stop.accuracy is not None and Fn.dtype == xp.float64
            and not is_dask_namespace(xp) and get_config()["mixed_precision"])


def _lanczos_mixed(Fn: KronSum, init, seed, side: str, stop: _Stop, max_iter: int):
    """Lanczos in float32 on float64 inputs, then checked and finished in float64.

    The float32 iterations cost about half of float64 ones. Their answer ``x`` is then
    applied once in float64: the Rayleigh quotient and residual of ``x`` in float64 with the
    float32 solve's second Ritz pair give the error-gap bound (:class:`_Stop`), and the
    application's half-step image finishes the factors. If the bound misses ``accuracy`` (a
    tiny gap, or an F that is nearly one Kronecker product, where float32 cannot resolve the
    optimum), float64 Lanczos continues from ``x``. Returns ``_finish``'s ``(L, R, σ, notes)``
    and ``(iterations, converged, residual, σ₂)``. Memory: a float32 copy of the inputs.
    """
    xp = Fn.xp
    F32 = Fn.astype(xp.float32)
    stop32 = _Stop(max(stop.tol, _default_tol(xp, xp.float32)), stop.accuracy)
    x0 = _initial(F32, init, seed, side)  # a Kron warm start is cast to float32 there
    x32, its, _, _, s2 = _lanczos(_operator_space(F32, side), x0, stop32, max_iter)
    x = xp.astype(x32, xp.float64)
    space = _operator_space(Fn, side, keep_aux=True)
    x = materialize(x / space.norm(x))
    Ax, half = space.apply_aux(x)
    its += 1
    th, rr = host_floats([xp.sum(x * Ax), xp.sum((Ax - xp.sum(x * Ax) * x) ** 2)])
    res = math.sqrt(max(rr, 0.0)) / th if th > 0 else 0.0
    if th > 0 and not stop.met(th, res, stop32.th2, stop32.r2) and its < max_iter:
        space = _operator_space(Fn, side, keep_aux=_aux_fits(Fn, side))
        x, more, conv, res, s2 = _lanczos(space, x, stop, max_iter - its)
        return (*_finish(Fn, x, side, space.result_aux), its + more, conv, res, s2)
    conv = th <= 0 or stop.bound <= stop.accuracy or res <= stop.tol
    return (*_finish(Fn, x, side, half, Ax), its, conv, res, s2)


def _aux_fits(Fn: KronSum, side: str) -> bool:
    """Whether keeping one half-step image per Lanczos vector (``_KRYLOV_DIM + 1`` matrices of
    the other factor's size) costs at most the inputs' own size (or 2²² numbers)."""
    d = Fn.n if side == "left" else Fn.m
    inputs = sum(math.prod(a.shape) for a in Fn._arrays())
    return (_KRYLOV_DIM + 1) * d * d <= max(1 << 22, inputs)


def _initial(Fn: KronSum, init, seed, side: str) -> Array:
    xp = Fn.xp
    d = Fn.m if side == "left" else Fn.n
    if isinstance(init, Kron):
        x = init.left if side == "left" else init.right
        x = xp.astype(xp.asarray(x), Fn.dtype)
    elif init == "tkfac":
        x = Fn.contract_right() if side == "left" else Fn.contract_left()
    elif init == "kfac":
        est = kfac(Fn)
        x = est.left if side == "left" else est.right
    elif init == "identity":
        x = eye_like(d, Fn.weights, xp)
    else:
        x = _Space(None, xp).random_like(eye_like(d, Fn.weights, xp), seed, Fn.symmetric)
    if not bool(fro_norm(x, xp) > 0):  # e.g. tkfac of a zero-trace sum: use the identity
        x = eye_like(d, Fn.weights, xp)
    return x


def _check_every(x) -> int:
    """Iterations between host reads of the convergence scalars (see :func:`kronsum.get_config`)."""
    k = get_config()["check_every"]
    if k is not None:
        return k
    return 4 if on_accelerator(x) else 1


def _power(space: _Space, x, stop: _Stop, max_iter):
    """The paper's power method; stops on the relative eigen-residual.

    The scalars of each iteration stay on the device; they are read to the host (one
    transfer) every ``check_every`` iterations and the first iteration that met the rule is
    returned, so batching the reads changes the cost, not the answer.
    """
    every = _check_every(x)
    sync_each = every == 1
    x = materialize(x / to_float(space.norm(x)))
    res = math.inf
    it = 0
    while it < max_iter:
        batch = []  # (x_before, y_normalised, ‖y‖, residual) per iteration, device scalars
        for _ in range(min(every, max_iter - it)):
            y = space.apply(x)
            ny = space.norm(y)
            if sync_each:  # CPU / Dask: scalars read as floats at once (no re-submitted keys)
                ny = to_float(ny)
                _require_finite(space.xp, ny)
                if not ny > 0:
                    return x, it + 1, True, 0.0, None
            y = materialize(y / (ny if sync_each else _safe(space.xp, ny)))
            c = space.dot(y, space.M(x))
            if sync_each:
                c = to_float(c)
                r = to_float(space.norm(y - c * x)) / abs(c) if c != 0 else math.inf
            else:
                r = space.norm(y - c * x) / _safe(space.xp, space.xp.abs(c))
            batch.append((x, y, ny, r))
            x = y
            it += 1
            if sync_each and stop.met(1.0, r):
                return x, it, True, r, _invariant_probe(space, x, it, r)
        if sync_each:
            res = batch[-1][3]
            continue
        vals = host_floats([v for b in batch for v in (b[2], b[3])])
        for i, (xb, y, _, _) in enumerate(batch):
            ny, r = vals[2 * i], vals[2 * i + 1]
            _require_finite(space.xp, ny)
            if not ny > 0:
                return xb, it, True, 0.0, None
            res = r if math.isfinite(r) else math.inf
            if stop.met(1.0, res):  # applications counted as performed, the unused ones included
                return y, it, True, res, _invariant_probe(space, y, it - len(batch) + i + 1, res)
    return x, max_iter, False, res, None


def _invariant_probe(space: _Space, x, its: int, res: float) -> float | None:
    """σ₂ from the deflated probe when the power method's start was already an eigenvector
    (converged at the first iteration with a residual at rounding level), else ``None``: an
    eigenvector of a smaller singular value then shows as σ₂ > σ₁ and kfoc solves again."""
    eps = float(space.xp.finfo(x.dtype).eps)
    if its != 1 or res > 64 * eps:
        return None
    return _deflated_top(space, x, space.M(x))[0]


def _lanczos(space: _Space, x, stop: _Stop, max_iter):
    """Restarted Lanczos with full reorthogonalisation for the top eigenpair of a PSD operator.

    Returns ``(x, applications, converged, residual, sqrt(second Ritz value))``. The (j × j)
    tridiagonal projection is solved on the host with NumPy: only its 2j scalars, which the
    convergence check reads anyway, leave the device. With ``check_every = c > 1``
    (accelerators) the recurrence runs c steps on device scalars between reads, and the
    first step that met the rule is the one returned (up to c − 1 applications are wasted).
    On 1-D (coefficient) vectors the reorthogonalisation is two block products.
    """
    xp = space.xp
    every = _check_every(x)
    sync_each = every == 1
    n_apply = 0
    res = math.inf
    s2 = None
    stop.bound = None  # an exit without a check leaves the bound to kfoc
    eps = float(xp.finfo(x.dtype).eps)
    Mx = space.M(x)
    nx = space.norm(x, Mx)
    if sync_each:
        nx = to_float(nx)
        if not nx > 0:
            return x, 0, True, 0.0, 0.0
    else:  # a zero start stays zero: the first check sees theta = 0 and returns it
        nx = _safe(xp, nx)
    x, Mx = materialize(x / nx), materialize(Mx / nx)
    block = x.ndim == 1 and not is_dask_namespace(xp)
    keep_aux = space.apply_aux is not None and not block
    space.result_aux = None
    while True:
        Q, MQ = [x], [Mx]
        AUX: list = []  # half-step images of Q's vectors (keep_aux)
        alphas: list = []  # floats, or device scalars not yet read
        betas: list = []
        checked = 0  # steps whose scalars have been read and tested
        for j in range(_KRYLOV_DIM):
            if keep_aux:
                w, aux = space.apply_aux(Q[j])
                AUX.append(aux)
            else:
                w = space.apply_M(Q[j], MQ[j])
            n_apply += 1
            if block:
                # coefficient vectors: the three-term recurrence and the full
                # reorthogonalisation as two block Gram-Schmidt passes against all of Q
                # (twice is enough); α_j is the coefficient on q_j
                Qs, MQs = xp.stack(Q), xp.stack(MQ)
                c1 = MQs @ w
                w = w - c1 @ Qs
                c2 = MQs @ w
                w = w - c2 @ Qs
                a = c1[j] + c2[j]
                if sync_each:
                    a = to_float(a)
            else:
                a = space.dot(w, MQ[j])
                if sync_each:
                    a = to_float(a)
                w = w - a * Q[j]
                if j > 0:
                    w = w - betas[-1] * Q[j - 1]
                for _ in range(2):
                    for q, mq in zip(Q, MQ):
                        w = w - space.dot(w, mq) * q
            w = materialize(w)
            Mw = materialize(space.M(w))
            b = space.norm(w, Mw)
            if sync_each:
                b = to_float(b)
            alphas.append(a)
            betas.append(b)
            last = j == _KRYLOV_DIM - 1 or n_apply >= max_iter
            if sync_each or last or (j + 1 - checked) >= every:
                vals = host_floats(alphas[checked:] + betas[checked:])
                npend = len(alphas) - checked
                alphas[checked:], betas[checked:] = vals[:npend], vals[npend:]
                for i in range(checked, j + 1):
                    if not (math.isfinite(alphas[i]) and math.isfinite(betas[i])):
                        _require_finite(xp, math.nan)
                    T = np.diag(alphas[: i + 1]) + np.diag(betas[:i], 1) + np.diag(betas[:i], -1)
                    theta, S = np.linalg.eigh(T)
                    th1 = float(theta[-1])
                    if th1 <= 0:
                        space.result_aux = AUX[0] if AUX else None
                        return Q[0], n_apply, True, 0.0, 0.0
                    bi = betas[i]
                    breakdown = bi <= 64 * eps * th1
                    if i == 0 and breakdown:
                        # the start vector spans an invariant subspace: Krylov sees no second
                        # value, so probe the deflated operator to learn whether sigma1 repeats
                        s2, k = _deflated_top(space, Q[0], MQ[0], th1)
                        space.result_aux = AUX[0] if AUX else None
                        return Q[0], n_apply + k, True, 0.0, s2
                    s2 = math.sqrt(max(float(theta[-2]), 0.0)) if i > 0 else None
                    res = float(bi * abs(S[-1, -1]) / th1)
                    met = stop.met(th1, res, float(theta[-2]) if i > 0 else None,
                                   float(bi * abs(S[-1, -2])) if i > 0 else 0.0)
                    done = bool(met or breakdown or (i == j and n_apply >= max_iter))
                    if done or i == _KRYLOV_DIM - 1:
                        x, Mx = _ritz(space, Q[: i + 1], MQ[: i + 1], S[:, -1],
                                      AUX[: i + 1] if keep_aux else None)
                        if done:
                            return x, n_apply, bool(met or breakdown), res, s2
                        break
                else:
                    checked = j + 1
                    Q.append(materialize(w / b))
                    MQ.append(materialize(Mw / b))
                    continue
                break  # restart from the Ritz vector
            b = _safe(xp, b)  # b = 0 is a breakdown the next read catches: no 0/0 meanwhile
            Q.append(materialize(w / b))
            MQ.append(materialize(Mw / b))


def _safe(xp, v):
    """``v`` with zero replaced by one (a device-side guard for a divisor read later)."""
    return xp.where(v > 0, v, xp.ones_like(v))


def _ritz(space: _Space, Q: list, MQ: list, coef, AUX: list | None = None) -> tuple:
    """The normalised Ritz vector ``Σ c_j q_j`` (and its image under the metric); with
    ``AUX`` (the half-step images of the ``q_j``) also sets ``space.result_aux`` to the image
    of the returned vector, by the same combination."""
    coef = [float(c) for c in coef]
    x, Mx = coef[0] * Q[0], coef[0] * MQ[0]
    for cj, q, mq in zip(coef[1:], Q[1:], MQ[1:]):
        x, Mx = x + cj * q, Mx + cj * mq
    nx = to_float(space.norm(x, Mx))
    if AUX:
        aux = coef[0] * AUX[0]
        for cj, a in zip(coef[1:], AUX[1:len(coef)]):
            aux = aux + cj * a
        space.result_aux = materialize(aux / nx)
    return materialize(x / nx), materialize(Mx / nx)


def _lanczos_numba(space: _Space, SP, SQ, w, x0, stop: _Stop, max_iter, eps):
    """:func:`_lanczos` for the Gram space, compiled: float64 NumPy arrays in and out; ``eps``
    of the inputs' dtype (the breakdown threshold). Sets ``stop.f2`` (``wᵀ(S_P∘S_Q)w``, one
    pass in the kernel) and the bound of the returned iterate."""
    kern = numba_kernels()
    stop.f2 = float(kern.weighted_hadamard_sum(SP, SQ, w))
    # the Gram matrices and the sum are float64, from inputs of precision eps
    stop.f2_err = SP.shape[0] * max(float(eps), float(np.finfo(np.float64).eps)) * abs(stop.f2)
    acc = -1.0 if stop.accuracy is None else stop.accuracy
    x, its, conv, res, s2, bound, certified = kern.coef_lanczos(
        SP, SQ, w, x0, float(stop.tol), acc, stop.f2, stop.f2_err, int(max_iter), _KRYLOV_DIM,
        float(eps))
    stop.bound, stop.certified = float(bound), bool(certified)
    if s2 < 0 and its == 1 and res == 0.0:  # invariant start vector: probe for a repeated sigma1
        s2, k = _deflated_top(space, x, space.M(x))
        its += k
        stop.bound = None  # kfoc bounds the gap with the probe's σ₂
    return x, int(its), bool(conv), float(res), (None if s2 < 0 else float(s2))


def _deflated_top(space: _Space, x, Mx, theta1: float | None = None, steps: int = 4, seed=0):
    """sqrt of the top eigenvalue of the operator deflated by ``x``, by a few Lanczos steps.

    ``theta1`` is the operator's top eigenvalue (σ₁² in the space's units; computed as the
    Rayleigh quotient of ``x`` when ``None``): rounding noise in a step comes at that scale,
    so a step whose remainder is within ``64 ε θ₁`` has exhausted the Krylov space (the
    deflated operator may be rank-deficient) and ends the probe rather than being normalised
    into a spurious direction.
    """
    dim = math.prod(x.shape)
    if dim == 1:
        return 0.0, 0
    steps = min(steps, dim - 1)  # the deflated space has dim − 1 dimensions at most
    eps = float(space.xp.finfo(x.dtype).eps)
    if theta1 is None:
        theta1 = to_float(space.dot(space.apply(x), Mx))
    floor = 64 * eps * abs(theta1)
    q = space.random_like(x, seed, symmetric=True)
    q = q - space.dot(q, Mx) * x
    nq = space.norm(q)
    if not bool(nq > 0):
        return 0.0, 0
    q = q / nq
    Q, MQ = [x, q], [Mx, space.M(q)]
    alphas, betas = [], []
    for _ in range(steps):
        w = space.apply(Q[-1])
        a = to_float(space.dot(w, MQ[-1]))
        for _ in range(2):
            for v, mv in zip(Q, MQ):
                w = w - space.dot(w, mv) * v
        Mw = space.M(w)
        b = to_float(space.norm(w, Mw))
        alphas.append(a)
        betas.append(b)
        if b <= floor or b <= 1e-300:  # exhausted: the remainder is rounding noise
            break
        Q.append(w / b)
        MQ.append(Mw / b)
    k = len(alphas)
    T = np.diag(alphas) + np.diag(betas[: k - 1], 1) + np.diag(betas[: k - 1], -1)
    return math.sqrt(max(float(np.linalg.eigvalsh(T)[-1]), 0.0)), k


def _finish(Fn: KronSum, x: Array, side: str, aux: Array | None = None, image: Array | None = None):
    """Factors from the converged iterate: ``L`` (unit), ``R = 𝓡ᵀvec(L)/σ``, ``σ = ‖𝓡ᵀvec L‖``.

    ``aux`` is the solver's half-step image of ``x`` (``contract_left(x)`` for side="left",
    ``contract_right(x)`` for side="right"), which replaces one contraction: by linearity,
    and for symmetric F the image of ``x``'s antisymmetric rounding is antisymmetric and
    removed by the symmetrisation of ``R`` below. ``image`` (side="right", with ``aux``) is
    the full application ``contract_left(aux)``, which replaces the last contraction too.
    """
    xp = Fn.xp
    L = x if side == "left" else (Fn.contract_right(x) if aux is None else aux)
    if Fn.symmetric:
        L = symmetrize(L, xp)
    nl = to_float(fro_norm(L, xp))
    _require_finite(xp, nl)
    if not nl > 0:
        return _zero_answer(Fn)
    L = materialize(L / nl)
    sign = 1.0
    if to_float(trace(L, xp)) < 0:
        L, sign = materialize(-L), -1.0
    if aux is not None and side == "left":
        v = aux * (sign / nl)
    elif aux is not None and image is not None:
        v = image * (sign / nl)
    else:
        v = Fn.contract_left(L)
    if Fn.symmetric:
        v = symmetrize(v, xp)
    v = materialize(v)
    sigma = to_float(fro_norm(v, xp))
    _require_finite(xp, sigma)
    if not sigma > 0:
        return _zero_answer(Fn)
    return L, materialize(v / sigma), sigma, ()


def _finish_pair(Fn: KronSum, L: Array, R: Array):
    """Normalised, sign-fixed factors from unnormalised ``L`` and ``R ∝ 𝓡ᵀvec L`` (the numba
    route: NumPy's syrk-based weighted Gram products are exactly symmetric already).

    ``σ = ‖R‖/‖L‖`` is then the optimal scale for this ``L`` (and σ₁ at the optimum).
    """
    xp = Fn.xp
    nl, nr, tr = host_floats([xp.sqrt(xp.sum(L * L)), xp.sqrt(xp.sum(R * R)), trace(L, xp)])
    if not math.isfinite(nl * nr):  # σ₁² beyond the dtype's range: the scaled norm
        _require_finite(xp, L)
        _require_finite(xp, R)
        nl, nr = host_floats([fro_norm(L, xp), fro_norm(R, xp)])
    if not (nl > 0 and nr > 0):
        return _zero_answer(Fn)
    sign = -1.0 if tr < 0 else 1.0
    return L * (sign / nl), R * (sign / nr), nr / nl, ()


def _require_finite(xp, value) -> None:
    """A NaN/inf iterate means non-finite statistics (passed with check_finite=False): say so
    rather than mistaking it for a zero sum."""
    if not (math.isfinite(value) if isinstance(value, float) else all_finite(xp, value)):
        raise ValueError(
            "kfoc met non-finite values: the statistics contain NaN or infinity (the constructors' "
            "check_finite=True would have said which array) or their products overflow the dtype"
        )


def _zero_answer(Fn: KronSum):
    xp = Fn.xp
    Il = eye_like(Fn.m, Fn.weights, xp)
    Ir = eye_like(Fn.n, Fn.weights, xp)
    zero = xp.zeros((), dtype=Fn.dtype, device=device_of(Fn.weights))
    return (Il / math.sqrt(Fn.m), Ir / math.sqrt(Fn.n), zero,
            ("zero sum (sigma1 = 0): the estimate is zero",))
