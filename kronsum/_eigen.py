r"""The eigensolver core: top eigenpairs of a symmetric PSD operator, and factors from them.

Every solver of :func:`kronsum.kfoc` and :func:`kronsum.kronecker_svd` is one of the routines
here, on one of two operator spaces (:class:`Space`):

* the contractions (:func:`contraction_space`): ``X ↦ 𝓡𝓡ᵀX`` on ``(m, m)`` factors (or
  ``𝓡ᵀ𝓡`` on ``(n, n)`` ones) through :meth:`KronSum.contract_left` and
  :meth:`KronSum.contract_right`; any form, any backend;
* the Gram space (:class:`GramSpace`, the one definition of the Gram operator): coefficient
  K-vectors ``α`` of ``L = Σ_k α_k L_k``, the operator ``α ↦ W S_Q W S_P α``, self-adjoint in
  the ``S_P`` inner product (``S_P = [⟨L_k, L_l⟩]``, ``S_Q = [⟨R_k, R_l⟩]``);
* the conv form's Gram space (:class:`ConvGramSpace`): per-sample ``T × T`` coefficient
  matrices ``C_k`` of ``L = Σ_k G_kᵀ C_k G_k``, the same operator with the ``KT × KT`` Gram
  matrices of the positions (:func:`conv_gram_solve`).

Solvers (block size 1 for K-FOC, r for the Kronecker SVD):

``lanczos``            restarted Lanczos with full reorthogonalisation (K-FOC's solver);
                       :func:`lanczos_two_precision` runs it in a lower precision first and
                       checks (and, if need be, continues) in the working one;
``power``              the power method (the paper's Algorithm 1, kept as the reference);
``deflated_top``       a few Lanczos steps on the operator deflated by a converged vector:
                       σ₂ when the solver itself saw none;
``block_lanczos``      block Lanczos with thick restarts for the top r pairs.

All iterative K-FOC solvers stop by one rule, :class:`Stop` (residual, or the error-gap bound
of :func:`kronsum._stopping.gap_bound`), and return an :class:`EigenResult`.

The Gram solve has one dispatch point, :func:`gram_solve`, which picks an accelerator where it
applies and the array-API Lanczos otherwise; every accelerator gives the array-API path's answer
(to rounding; the tests compare them):

* numba (NumPy on the CPU): the whole coefficient-space Lanczos as one compiled kernel
  (:func:`kronsum._numba_kernels.coef_lanczos`, the same arithmetic and stopping rule);
* repeated squaring (accelerators with K small beside m and n, or option ``gram_squaring``):
  the power method as ``B^(2^s)α₀`` by squaring the K×K operator, optionally replayed as a
  CUDA graph (option ``cuda_graphs``).

Factors are finished by :func:`finish` (a factor-space iterate), :func:`finish_coef` (a
Gram-space iterate) and :func:`finish_block` (the r Ritz vectors of the block solver: a last
Rayleigh–Ritz step in the factor space); all apply the library's sign rule (:func:`negative`):
``tr L ≥ 0`` for the first pair. The squaring route finishes on the device
(:func:`_squaring_finish`, the same formulas as :func:`finish_coef` without a host read).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ._accel import (cuda_graph, numba_enabled, numba_kernels, positive_definite, row_gram, row_sq_norms,
                     weighted_gram)
from ._compat import (Array, all_finite, device_of, eye_like, float64_available, fro_norm, host_floats, host_vector,
                      is_dask_namespace, materialize, on_accelerator, symmetrize, to_float, trace)
from ._config import _options
from ._stopping import ESTIMATE_SAFETY, gap_bound

KRYLOV_DIM = 20  # Lanczos basis size before a restart
APPLIES = 4  # products with B^(2^s) per check of the squaring route (32 steps after 3 squarings)


def rank_bound(Fn) -> int:
    """An upper bound of the rank of F's rearranged matrix ``𝓡 = Σ_k w_k vec(L_k) vec(R_k)ᵀ``:
    ``min(K, d_m, d_n)`` with ``d = m(m + 1)/2`` for symmetric terms (:attr:`KronSum.symmetric`),
    else ``m²``. A Krylov space of K-FOC's operator (on a factor, or in a Gram space) from any
    start has at most one dimension more."""
    m, n = Fn.m, Fn.n
    dm, dn = (m * (m + 1) // 2, n * (n + 1) // 2) if Fn.symmetric else (m * m, n * n)
    return min(Fn.num_terms, dm, dn)


def krylov_spans(Fn) -> bool:
    """Whether one Lanczos basis (``KRYLOV_DIM`` vectors) spans every Krylov space of K-FOC's
    operator on ``Fn`` (:func:`rank_bound` + 1 at most). The Gram route (applications of
    ``O(K²)``, far below its set-up) then runs on to the exact answer, and no estimate stops
    it (``Stop.estimates``)."""
    return rank_bound(Fn) + 1 <= KRYLOV_DIM


def default_tol(xp: Any, dtype: Any) -> float:
    """The default relative eigen-residual: 1e-10 (float64), 1e-5 (float32 and below)."""
    return 1e-10 if xp.finfo(dtype).eps < 1e-12 else 1e-5


def default_accuracy(xp: Any, dtype: Any) -> float:
    """The default error-gap accuracy: 1e-8 (float64), 1e-6 (float32 and below)."""
    return 1e-8 if xp.finfo(dtype).eps < 1e-12 else 1e-6


# -- the stopping rule and the results ---------------------------------------------------------


@dataclass
class Stop:
    """The iterative solvers' stopping rule, one for all of them: stop when the relative
    eigen-residual is at most ``tol``, or when :func:`kronsum._stopping.gap_bound` bounds the
    error gap by ``accuracy`` (``None``: the residual rule alone). ``f2`` is ``‖F‖²`` in the
    solver's units when known (it certifies the bound). :meth:`met` records the bound of its
    last call, which is the returned iterate's."""

    tol: float
    accuracy: float | None = None
    f2: float | None = None
    f2_err: float = 0.0  # a bound of f2's rounding error
    f2_abs: float | None = None  # the sum of the magnitudes of f2's terms (Gram routes, signed sums)
    bound: float | None = None
    certified: bool = False
    th1: float | None = None  # the Ritz value at the last call
    th2: float | None = None  # the second Ritz value and its residual at the last call
    r2: float = 0.0
    res: float = math.inf  # the relative residual at the last call
    # a low-precision solve whose own answer may be returned (:func:`lanczos_two_precision`):
    # ``answer_copy`` the low-precision copy F̃ it iterates on (:class:`LowPrecisionCopy`:
    # ‖F − F̃‖, and whether its answer may stop the solve even where a check in the working
    # precision would certify the bound; else only where it would not: no ‖F‖², or
    # θ₁ ≤ ‖F‖²/2), ``answer_slack`` the relative error of that precision's arithmetic on the
    # operator and the finish's half-step; ``answer`` records such a stop
    answer_copy: "LowPrecisionCopy | None" = None
    answer_slack: float = 0.0
    answer: bool = False
    low: "Stop | None" = None  # the low-precision solve's rule, when its answer stopped (answer_finish)
    # the rounding of the operator the solver applies, for sums whose terms can cancel (signed
    # weights or terms): ``‖ΔM x‖ ≤ op_scale·√θ`` for a unit x (``2·c·u·S`` with S the
    # inputs' magnitude, :meth:`KronSum._rounding_scale`; for conv positions that cancel
    # within a sample, S' of :meth:`KronSum._positions_scale`), passed to ``gap_bound`` as
    # ``th_err``; 0 for sums of PSD terms, whose rounding stays at F's own scale
    op_scale: float = 0.0
    # the relative rounding of the Rayleigh quotients the solver computes (``gap_bound``'s
    # ``th_round = th_rel·θ``): ``(K·T + m + n)·ε`` of the working precision (:func:`_stop`)
    th_rel: float = 0.0
    # whether an uncertified bound (an estimate) may stop the solver: not where one Krylov basis
    # of KRYLOV_DIM vectors exhausts the space (the answer is then exact) for at most that many
    # applications, where an early Krylov space can miss a nearly tied σ₂: a space of at most
    # KRYLOV_DIM dimensions (set by :func:`lanczos`) or an operator of rank below it
    # on the Gram route (:func:`krylov_spans`, set by :func:`gram_solve`)
    estimates: bool = True

    def op_error(self, th: float) -> float:
        """The operator's rounding at a unit vector of Rayleigh quotient ``th`` (``gap_bound``'s
        ``th_err``): ``op_scale·√th``."""
        return self.op_scale * math.sqrt(th) if self.op_scale > 0 and th > 0 else 0.0

    def met(self, th1: float, res: float, th2: float | None = None, r2: float = 0.0) -> bool:
        """Whether the Ritz pair ``(th1, relative residual res)`` stops the solver.

        With ``answer_copy`` (that allows any answer, or a bound that would not be certified):
        stop with ``answer = True`` once :meth:`answer_bound` meets ``accuracy``; while that
        is reachable (at most half of ``accuracy`` with a zero residual) the rule goes on
        toward it (or ``tol``); otherwise the plain rule applies."""
        self.th1, self.th2, self.r2, self.res = th1, th2, r2, res
        t2, f2 = -1.0 if th2 is None else th2, -1.0 if self.f2 is None else self.f2
        te, tr = self.op_error(th1), self.th_rel * th1
        self.bound, self.certified = gap_bound(th1, res * th1, t2, r2, f2, self.f2_err, te, tr)
        if (self.answer_copy is not None and self.accuracy is not None and th1 > 0 and self.estimates
                and (self.answer_copy.any_answer or not self.certified)):
            bound = self.answer_bound(th1, res, t2, r2)
            if bound <= self.accuracy:
                # an estimate: the slack for the low precision's arithmetic is measured, not
                # proven
                self.bound, self.certified, self.answer = bound, False, True
                return True
            if self.answer_bound(th1, 0.0, t2, r2) <= self.accuracy / 2:
                return res <= self.tol
        return res <= self.tol or (self.accuracy is not None and self.bound <= self.accuracy
                                   and (self.certified or self.estimates))

    def answer_bound(self, th1: float, res: float, t2: float, r2: float) -> float:
        """The error-gap bound of a low-precision solve's own answer (the Ritz pair ``th1``,
        relative residual ``res``, of the copy F̃ in that precision's arithmetic), for F.

        Its operator lies from F's by at most ``δ(2σ₁ + δ)`` (``δ ≥ ‖F − F̃‖`` of ``answer_copy``;
        ``σ₁ ≤ σ₁(F̃) + δ`` with ``σ₁(F̃)²`` from Temple's inequality, ``μ = ‖F‖² − θ₁`` where
        that bounds ``λ₂``, else the estimate's ``θ₂ + r₂``; at most ``‖F‖``) plus the
        arithmetic's ``answer_slack·θ₁``: :func:`kronsum._stopping.gap_bound`'s ``th_err``,
        which moves the bound quadratically; the finish's half-step, of F̃ in that arithmetic,
        lies within ``b = δ + answer_slack·√θ₁`` of F's (its ``half_err``, quadratic too unless
        F is nearly a Kronecker product). With ``half_first`` the answer's first factor is the
        half-step of the iterate, within ``b/σ`` of F's (whose Rayleigh quotient is at least
        the iterate's): :meth:`_project_cost` of that distance."""
        te, b, _ = self._answer_errors(th1, res, t2, r2)
        f2 = -1.0 if self.f2 is None else self.f2
        bound = gap_bound(th1, res * th1, t2, r2, f2, self.f2_err, te, self.th_rel * th1, half_err=b)[0]
        if self.answer_copy.half_first and th1 > 0:
            bound += self._project_cost(th1, res, t2, r2, b / math.sqrt(th1))
        return bound

    def _answer_errors(self, th1: float, res: float, t2: float, r2: float) -> tuple[float, float, float]:
        """``(th_err, half_err, σ₁)`` of :meth:`answer_bound`."""
        f2 = -1.0 if self.f2 is None else self.f2
        d, s = self.answer_copy.delta, self.answer_slack
        r = res * th1
        mu = math.inf
        if f2 >= 0 and f2 + self.f2_err - th1 < th1:
            mu = f2 + self.f2_err - th1
        elif t2 >= 0:
            mu = t2 + r2
        sigma1 = math.sqrt(th1 + r * r / (th1 - mu) + s * th1) + d if th1 > mu else math.inf
        if f2 >= 0:
            sigma1 = min(sigma1, math.sqrt(f2 + self.f2_err))
        return self.op_error(th1) + d * (2.0 * sigma1 + d) + s * th1, d + s * math.sqrt(th1), sigma1

    def _lower_scales(self, th1: float, t2: float, te: float) -> tuple[float, float, float]:
        """``(e, ‖F‖ lower bound, safety)`` as :func:`kronsum._stopping.gap_bound` takes them:
        ``e ≤ ‖F − F̂‖`` from ``‖F‖²`` (else ``√θ₂``, an estimate: safety ``ESTIMATE_SAFETY``)."""
        f2 = -1.0 if self.f2 is None else self.f2
        tr = self.th_rel * th1
        if f2 >= 0:
            return (math.sqrt(max(f2 - self.f2_err - th1 - te - tr, 0.0)),
                    math.sqrt(max(f2 - self.f2_err, th1 - te - tr, 0.0)), 1.0)
        return (math.sqrt(max(t2, 0.0)), math.sqrt(max(th1 - te - tr, 0.0) + max(t2, 0.0)),
                ESTIMATE_SAFETY)

    def _project_cost(self, th1: float, res: float, t2: float, r2: float, d: float) -> float:
        """The error-gap cost of an answer whose unit iterate ``u`` (Ritz value ``th1``,
        relative residual ``res``) is replaced by ``(u − Δ)/‖u − Δ‖`` with ``‖Δ‖ ≤ d`` (e.g.
        its PSD projection, or a half-step that lies near F's), finished by its own half-step:
        F's Rayleigh quotient drops by at most ``(2d·r_F + d²θ₁)/(1 − d)²`` (``r_F`` F's residual
        at ``u``; the first order in ``d`` cancels against the normalisation), which costs
        that over ``2e`` (``e ≤ ‖F − F̂‖``), at most its square root, relative to ``‖F‖``."""
        if not (d > 0 and th1 > 0):
            return 0.0
        if d >= 1:
            return math.inf
        te, _, _ = self._answer_errors(th1, res, t2, r2)
        e, nf, safety = self._lower_scales(th1, t2, te)
        if not nf > 0:
            return math.inf
        drop = (2 * d * (res * th1 + te) + d * d * th1) / (1 - d) ** 2
        cost = min(drop / (2 * e), math.sqrt(drop)) if e > 0 else math.sqrt(drop)
        return safety * cost / nf

    def answer_finish(self, projected: float, moved: float, sigma: float) -> float:
        """What finishing the low-precision answer that stopped the solve (its
        :meth:`answer_bound`) adds to the bound: the finish's projection of the iterate
        (``projected``: ``‖Δ‖`` of the removed part over ``‖u‖``, :meth:`_project_cost`) and
        then moving the finished unit factors by ``‖ΔL‖ + ‖ΔR‖ ≤ moved`` (e.g. making them PSD
        to the working precision; ``sigma`` the answer's scale ``‖S‖``,
        :meth:`_move_cost`), at the last call's Ritz pair."""
        t2 = -1.0 if self.th2 is None else self.th2
        return (self._project_cost(self.th1, self.res, t2, self.r2, projected)
                + self._move_cost(self.th1, self.res, t2, self.r2, moved, sigma))

    def _move_cost(self, th1: float, res: float, t2: float, r2: float, m: float, sigma: float) -> float:
        """The error-gap cost of moving the unit factors of an answer ``σ L⊗R`` (at the Ritz
        pair ``th1, res``, as in :meth:`answer_bound`) by ``‖ΔL‖ + ‖ΔR‖ ≤ m``. With ``E`` its
        error and ``c`` a bound of ``‖𝓡R − σL‖`` and ``‖𝓡ᵀL − σR‖`` (F's residual at the
        answer, ``|ρ_F − σ²|`` and the half-step's error ``b``, over σ),
        ``‖F − σL′⊗R′‖² ≤ E² + 2σm·c + 2σE·m²/4 + σ²(m + m²/4)²``: the first-order term is
        F's residual's, so the error grows by ``σm²/4 + (2σm·c + σ²(m + m²/4)²)/(2e)``
        (``e ≤ E``, :meth:`_lower_scales`), and never more than ``σ(m + m²/4)``; relative to
        ``‖F‖``."""
        if not (m > 0 and th1 > 0 and sigma > 0):
            return 0.0
        te, b, sigma1 = self._answer_errors(th1, res, t2, r2)
        e, nf, safety = self._lower_scales(th1, t2, te)
        if not nf > 0:
            return math.inf
        # ‖𝓡R − σL‖·σ ≤ F's residual at its Rayleigh quotient ρ_F = ‖𝓡ᵀL‖² (r₁ + th_err)
        # + |ρ_F − σ²| (≤ b(2σ + b): σ = ‖S‖, ‖S − 𝓡ᵀL‖ ≤ b) + σ₁·b, and ‖𝓡ᵀL − σR‖ ≤ b
        c = (res * th1 + te + b * (2 * sigma + b) + min(sigma1, 1e300) * b) / sigma
        lin = sigma * (m + m * m / 4)
        quad = sigma * m * m / 4 + (2 * sigma * m * c + (sigma * (m + m * m / 4)) ** 2) / (2 * e) if e > 0 else lin
        return safety * min(lin, quad) / nf


class MetricBreakdown(ArithmeticError):
    """A solve in a metric space (the Gram route's ``S_P`` inner product) whose iterate lost its
    length to rounding: the Gram matrix is numerically singular where the answer lives."""


@dataclass
class EigenResult:
    """A single-vector solver's answer.

    ``x``: the unit iterate (in the space's metric); ``iterations``: operator applications
    (probes included); ``converged``; ``residual``: the relative eigen-residual of ``x``;
    ``sigma2``: ``√θ₂`` (θ₂ the second Ritz value, or the deflated probe's), ``None`` when
    unknown; ``aux``: the half-step image of ``x`` when the space keeps them; ``image``: the
    full application of ``x`` when at hand (it replaces the finish's last contraction);
    ``low``: the answer is a low-precision solve's (:func:`lanczos_two_precision`), to be
    finished on that precision's operator.
    """

    x: Array
    iterations: int
    converged: bool
    residual: float
    sigma2: float | None
    aux: Array | None = None
    image: Array | None = None
    low: bool = False


@dataclass
class BlockResult:
    """:func:`block_lanczos`'s answer: the top ``p ≤ r`` Ritz values and vectors, operator
    applications, convergence, the largest relative residual of the top pairs, θ_{r+1}
    (``None`` when unknown) and whether the Krylov space was exhausted (the pairs are exact)."""

    thetas: list
    vectors: list
    iterations: int
    converged: bool
    residual: float
    theta_next: float | None
    exhausted: bool


@dataclass
class Factors:
    """Finished factors: unit-Frobenius ``left`` (m, m) and ``right`` (n, n) with the sign rule
    applied, ``sigma`` (0-d array or float, in the solved operator's units) and notes;
    ``moved``: the part :func:`finish`'s projection removed from the iterate, ``‖Δ‖/‖x‖`` (0
    without one)."""

    left: Array
    right: Array
    sigma: Any
    notes: tuple = ()
    moved: float = 0.0


@dataclass
class Solution:
    """A finished K-FOC solve: the factors, the solver's :class:`EigenResult` (``x`` may be
    ``None`` where only the factors were kept) and the route taken (``"gram"``,
    ``"gram[numba]"``, ``"gram-squaring"``, ``"lanczos"``, ``"lanczos[float32]"``, ``"power"``)."""

    factors: Factors
    eig: EigenResult
    route: str


# -- operator spaces ------------------------------------------------------------------------------


class Space:
    """A vector space for the iterative solvers: the operator and, optionally, a metric.

    Vectors are arrays of any shape (``(d, d)`` factors or ``(K,)`` coefficient vectors); the
    inner product is ``⟨x, y⟩ = Σ x ∘ M(y)`` with ``M`` the metric (identity when ``None``).
    ``half(x, Mx=None)`` is the half-step image of ``x``, linear in ``x``: the other factor
    (``𝓡ᵀvec x`` for a left factor, or its coefficients in the Gram space), so that the
    operator is a second half-step after it. ``apply_aux(x) -> (apply(x), half(x))``, when
    given, returns both from one pass: Lanczos then keeps one half-step image per basis vector
    and returns the answer's in :attr:`EigenResult.aux`, which saves the finish a contraction.
    """

    def __init__(self, apply, xp, metric=None, apply_M=None, safe_norm=False, apply_aux=None,
                 half=None, second=None):
        # every product is materialised: on Dask each step is then one map-reduce over the
        # persisted inputs rather than a graph re-running all earlier steps
        self.apply = None if apply is None else (lambda x: materialize(apply(x)))
        self.apply_aux = None if apply_aux is None else (
            lambda x: tuple(materialize(v) for v in apply_aux(x)))
        self.half = half
        self.second = second  # the half-step after ``half`` (apply = second ∘ half), if known
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
        return random_like(x, seed, symmetric, self.xp)


class GramSpace(Space):
    """The Gram operator ``B = W S_Q W S_P`` on coefficient K-vectors, in the ``S_P`` metric:
    its one definition (K-FOC's Gram solver and its squaring route, the Kronecker SVD; the
    numba kernel compiles the same products).

    ``L = Σ_k α_k L_k`` has ``‖L‖² = αᵀS_Pα``; :meth:`half` gives the coefficients
    ``β = W S_P α`` of ``R ∝ 𝓡ᵀvec L = Σ_k β_k R_k``, and ``Bα = W S_Q β``.
    """

    def __init__(self, SP, SQ, w, xp):
        self.SP, self.SQ, self.w = SP, SQ, w
        super().__init__(lambda a: w * (SQ @ (w * (SP @ a))), xp, metric=lambda a: SP @ a,
                         apply_M=lambda a, Ma: w * (SQ @ (w * Ma)),
                         half=lambda a, Ma=None: w * (SP @ a if Ma is None else Ma))

    def f2(self) -> Array:
        """``wᵀ(S_P ∘ S_Q)w = ‖F‖²`` (0-d array) in the space's units."""
        return self.xp.sum(self.w * ((self.SP * self.SQ) @ self.w))

    def matrix(self) -> Array:
        """``B = W S_Q W S_P`` as a K×K matrix (the squaring route)."""
        w = self.w
        return ((w[:, None] * self.SQ) * w[None, :]) @ self.SP


class ConvGramSpace(Space):
    """The Gram operator of the conv form on per-sample ``T × T`` coefficient matrices.

    ``L = Σ_k G_kᵀ C_k G_k`` (``C_k`` symmetric, the K matrices flattened into one vector of
    ``K·T²`` numbers) has ``‖L‖² = ⟨C, 𝒢C⟩`` with ``𝒢(C)_k = Σ_j S^G_{kj} C_j S^G_{jk}``, where
    ``S^G = G Gᵀ`` is the ``KT × KT`` Gram matrix of the positions' output gradients (``S^A``
    of the inputs likewise). :meth:`half` gives ``D = W𝒢C``, the coefficients of
    ``R ∝ 𝓡ᵀvec L = Σ_k A_kᵀ D_k A_k``, and one power step is ``C ↦ W 𝒜 W 𝒢 C``, self-adjoint
    in the ``𝒢`` metric. Each product costs ``2K²T³`` multiply-adds: cheap when ``K·T`` is
    small beside ``m`` and ``n`` (the deep layers of a CNN at a few positions).
    """

    def __init__(self, SG, SA, w, K, T, xp):
        self.SG, self.SA, self.K, self.T = SG, SA, K, T
        self.wv = xp.reshape(xp.broadcast_to(w[:, None], (K, T * T)), (K * T * T,))
        wv = self.wv
        super().__init__(lambda c: wv * self.op(SA, wv * self.op(SG, c)), xp,
                         metric=lambda c: self.op(SG, c),
                         apply_M=lambda c, Mc: wv * self.op(SA, wv * Mc),
                         half=lambda c, Mc=None: wv * (self.op(SG, c) if Mc is None else Mc))

    def op(self, S, c):
        """``(Σ_j S_kj C_j S_kjᵀ)_k`` for the flat coefficients ``c`` (block products only)."""
        xp, K, T = self.xp, self.K, self.T
        C = xp.reshape(c, (K, T, T))
        Sj = xp.permute_dims(xp.reshape(S, (K * T, K, T)), (1, 0, 2))  # (K_j, KT, T)
        Y = xp.permute_dims(Sj @ C, (1, 0, 2))  # (KT, K_j, T): S[:, block j] C_j
        Y = xp.reshape(Y, (K, T, K * T))
        out = Y @ xp.matrix_transpose(xp.reshape(S, (K, T, K * T)))
        return xp.reshape(out, (K * T * T,))

    def f2(self) -> Array:
        """``‖F‖² = Σ_kj w_k w_j ⟨S^G_kj, S^A_kj⟩²`` (0-d array) in the space's units."""
        xp, K, T = self.xp, self.K, self.T
        P = xp.sum(xp.reshape(self.SG * self.SA, (K, T, K, T)), axis=(1, 3))  # (K, K)
        w = self.wv[::T * T]
        return xp.sum(w * ((P * P) @ w))

    def start(self, which: str, w, R0=None, A=None) -> Array:
        """Start coefficients: ``"tkfac"`` (``C_k = w_k S^A_kk``, the half-step from ``R = I``),
        ``"kfac"`` (``C_k = w_k I``) or from a right factor ``R0`` (``C_k = w_k A_k R0 A_kᵀ``)."""
        xp, K, T = self.xp, self.K, self.T
        if R0 is not None:
            C = A @ R0 @ xp.matrix_transpose(A)
        elif which == "kfac":
            C = xp.broadcast_to(eye_like(T, w, xp)[None], (K, T, T))
        else:  # the diagonal blocks S^A_kk = A_k A_kᵀ
            C = A @ xp.matrix_transpose(A)
        return xp.reshape(w[:, None, None] * C, (K * T * T,))



def contraction_space(Fn, side: str, keep_aux: bool = False) -> Space:
    """``𝓡𝓡ᵀ`` on (m, m) factors (side="left") or ``𝓡ᵀ𝓡`` on (n, n) ones, through the two
    contractions of ``Fn``. ``half`` is the first contraction (``contract_left`` for
    side="left"): the other factor of an iterate. ``keep_aux``: Lanczos keeps that half-step
    image per basis vector, so the finish reads the other factor off the basis instead of
    contracting once more."""
    # below float64 the iterates' entries reach σ₁² and their squares overflow: safe norms
    safe = Fn.xp.finfo(Fn.dtype).bits < 64
    first, second = ((Fn.contract_left, Fn.contract_right) if side == "left"
                     else (Fn.contract_right, Fn.contract_left))

    def apply_aux(X):
        Y = materialize(first(X))
        return second(Y), Y

    return Space(lambda X: second(first(X)), Fn.xp, safe_norm=safe,
                 apply_aux=apply_aux if keep_aux else None, half=lambda X, _=None: first(X),
                 second=second)


def aux_fits(Fn, side: str) -> bool:
    """Whether keeping one half-step image per Lanczos vector (``KRYLOV_DIM + 1`` matrices of
    the other factor's size) costs at most the inputs' own size (or 2²² numbers)."""
    d = Fn.n if side == "left" else Fn.m
    inputs = sum(math.prod(a.shape) for a in Fn._arrays())
    return (KRYLOV_DIM + 1) * d * d <= max(1 << 22, inputs)


@functools.lru_cache(maxsize=64)
def _normal_draw(size: int, seed: tuple) -> np.ndarray:
    """:func:`random_like`'s draw of a float64 NumPy vector of ``size`` (read-only, cached)."""
    r = np.random.default_rng(list(seed)).standard_normal(size)
    r.flags.writeable = False
    return r


def random_like(x, seed, symmetric, xp):
    """A standard normal array of ``x``'s shape, dtype and device (``symmetric``: ``Z + Zᵀ``)."""
    r = np.random.default_rng(seed).standard_normal(tuple(x.shape))
    if symmetric and r.ndim == 2:
        r = r + r.T
    return xp.asarray(r, dtype=x.dtype, device=device_of(x))


# -- single-vector solvers -------------------------------------------------------------------------


def check_every(x) -> int:
    """Iterations between host reads of the convergence scalars (see :func:`kronsum.get_config`)."""
    k = _options()["check_every"]
    if k is not None:
        return k
    return 4 if on_accelerator(x) else 1


def _safe(xp, v):
    """``v`` with zero replaced by one (a device-side guard for a divisor read later)."""
    return xp.where(v > 0, v, xp.ones_like(v))


def _orthogonalize(space: Space, v, Q: list, MQ: list):
    """``v`` less its components along the ``M``-orthonormal ``Q`` (``MQ`` their metric
    images): classical Gram–Schmidt, twice (enough for full reorthogonalisation)."""
    for _ in range(2):
        for q, mq in zip(Q, MQ):
            v = v - space.dot(v, mq) * q
    return v


def _tridiagonal(alphas: list, betas: list) -> np.ndarray:
    """The Lanczos projection: ``alphas`` on the diagonal, ``betas`` (one fewer) beside it."""
    return np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)


def power(space: Space, x, stop: Stop, max_iter) -> EigenResult:
    """The paper's power method; stops on the relative eigen-residual.

    The scalars of each iteration stay on the device; they are read to the host (one
    transfer) every ``check_every`` iterations and the first iteration that met the rule is
    returned, so batching the reads changes the cost, not the answer.
    """
    every = check_every(x)
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
                require_finite(space.xp, ny)
                if not ny > 0:
                    return EigenResult(x, it + 1, True, 0.0, None)
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
                return EigenResult(x, it, True, r, _invariant_probe(space, x, it, r))
        if sync_each:
            res = batch[-1][3]
            continue
        vals = host_floats([v for b in batch for v in (b[2], b[3])])
        for i, (xb, y, _, _) in enumerate(batch):
            ny, r = vals[2 * i], vals[2 * i + 1]
            require_finite(space.xp, ny)
            if not ny > 0:
                return EigenResult(xb, it, True, 0.0, None)
            res = r if math.isfinite(r) else math.inf
            if stop.met(1.0, res):  # applications counted as performed, the unused ones included
                return EigenResult(y, it, True, res,
                                   _invariant_probe(space, y, it - len(batch) + i + 1, res))
    return EigenResult(x, max_iter, False, res, None)


def _invariant_probe(space: Space, x, its: int, res: float) -> float | None:
    """σ₂ from the deflated probe when the power method's start was already an eigenvector
    (converged at the first iteration with a residual at rounding level), else ``None``: an
    eigenvector of a smaller singular value then shows as σ₂ > σ₁ and kfoc solves again."""
    eps = float(space.xp.finfo(x.dtype).eps)
    if its != 1 or res > 64 * eps:
        return None
    return deflated_top(space, x, space.M(x))[0]


def lanczos(space: Space, x, stop: Stop, max_iter) -> EigenResult:
    """Restarted Lanczos with full reorthogonalisation for the top eigenpair of a PSD operator.

    The (j × j) tridiagonal projection is solved on the host with NumPy: only its 2j scalars,
    which the convergence check reads anyway, leave the device. With ``check_every = c > 1``
    (accelerators) the recurrence runs c steps on device scalars between reads, and the
    first step that met the rule is the one returned (up to c − 1 applications are wasted).
    On 1-D (coefficient) vectors the reorthogonalisation is two block products. A start that
    spans an invariant subspace is probed (:func:`deflated_top`) for σ₂. ``stop.bound`` is
    left ``None`` when the solver exits without a check (a zero operator or such a start).
    """
    xp = space.xp
    every = check_every(x)
    sync_each = every == 1
    n_apply = 0
    res = math.inf
    s2 = None
    stop.bound = None  # an exit without a check leaves the bound to the caller
    if math.prod(x.shape) <= KRYLOV_DIM:  # one Krylov basis spans the space: no estimate stops
        stop.estimates = False
    eps = float(xp.finfo(x.dtype).eps)
    Mx = space.M(x)
    nx = space.norm(x, Mx)
    if sync_each:
        nx = to_float(nx)
        if not nx > 0:
            return EigenResult(x, 0, True, 0.0, 0.0)
    else:  # a zero start stays zero: the first check sees theta = 0 and returns it
        nx = _safe(xp, nx)
    x, Mx = materialize(x / nx), materialize(Mx / nx)
    block = x.ndim == 1 and not is_dask_namespace(xp)
    keep_aux = space.apply_aux is not None and not block
    while True:
        Q, MQ = [x], [Mx]
        AUX: list = []  # half-step images of Q's vectors (keep_aux)
        alphas: list = []  # floats, or device scalars not yet read
        betas: list = []
        checked = 0  # steps whose scalars have been read and tested
        for j in range(KRYLOV_DIM):
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
                w = _orthogonalize(space, w, Q, MQ)
            w = materialize(w)
            Mw = materialize(space.M(w))
            b = space.norm(w, Mw)
            if sync_each:
                b = to_float(b)
            alphas.append(a)
            betas.append(b)
            last = j == KRYLOV_DIM - 1 or n_apply >= max_iter
            if sync_each or last or (j + 1 - checked) >= every:
                vals = host_floats(alphas[checked:] + betas[checked:])
                npend = len(alphas) - checked
                alphas[checked:], betas[checked:] = vals[:npend], vals[npend:]
                for i in range(checked, j + 1):
                    if not (math.isfinite(alphas[i]) and math.isfinite(betas[i])):
                        require_finite(xp, math.nan)
                    T = _tridiagonal(alphas[: i + 1], betas[:i])
                    theta, S = np.linalg.eigh(T)
                    th1 = float(theta[-1])
                    if th1 <= 0:
                        return EigenResult(Q[0], n_apply, True, 0.0, 0.0, AUX[0] if AUX else None)
                    bi = betas[i]
                    breakdown = bi <= 64 * eps * th1
                    if i == 0 and breakdown:
                        # the start vector spans an invariant subspace: Krylov sees no second
                        # value, so probe the deflated operator to learn whether sigma1 repeats
                        s2, k = deflated_top(space, Q[0], MQ[0], th1)
                        return EigenResult(Q[0], n_apply + k, True, 0.0, s2, AUX[0] if AUX else None)
                    s2 = math.sqrt(max(float(theta[-2]), 0.0)) if i > 0 else None
                    # a breakdown is a remainder below 64·ε·θ₁, not a zero one: the bound takes that
                    res = float(max(bi, 64 * eps * th1) if breakdown else bi) * abs(float(S[-1, -1])) / th1
                    met = stop.met(th1, res, float(theta[-2]) if i > 0 else None,
                                   float(bi * abs(S[-1, -2])) if i > 0 else 0.0)
                    done = bool(met or breakdown or (i == j and n_apply >= max_iter))
                    if done or i == KRYLOV_DIM - 1:
                        x, Mx, aux = _ritz(space, Q[: i + 1], MQ[: i + 1], S[:, -1],
                                           AUX[: i + 1] if keep_aux else None)
                        if done:
                            return EigenResult(x, n_apply, bool(met or breakdown), res, s2, aux)
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


def _ritz(space: Space, Q: list, MQ: list, coef, AUX: list | None = None) -> tuple:
    """``(x, M x, aux)``: the normalised Ritz vector ``Σ c_j q_j``, its image under the metric
    and, with ``AUX`` (the half-step images of the ``q_j``), the image of ``x`` by the same
    combination (else ``None``)."""
    coef = [float(c) for c in coef]
    x, Mx = coef[0] * Q[0], coef[0] * MQ[0]
    for cj, q, mq in zip(coef[1:], Q[1:], MQ[1:]):
        x, Mx = x + cj * q, Mx + cj * mq
    nx = to_float(space.norm(x, Mx))
    if not nx > 0:
        raise MetricBreakdown(
            "the Ritz vector has no length in the solver's metric (a Gram matrix of the terms, "
            "numerically singular: terms nearly collinear, their rounding hiding F)")
    aux = None
    if AUX:
        aux = coef[0] * AUX[0]
        for cj, a in zip(coef[1:], AUX[1:len(coef)]):
            aux = aux + cj * a
        aux = materialize(aux / nx)
    return materialize(x / nx), materialize(Mx / nx), aux


@dataclass(frozen=True)
class LowPrecisionCopy:
    """A low-precision copy F̃ of F with ``‖F − F̃‖ ≤ delta`` (in the solver's units of σ);
    ``any_answer``: its solve's own answer may be returned even where the working precision's
    check would certify the bound (else only where it would not); ``half_first``: that answer
    is ``(L, 𝓡ᵀL)`` with ``L`` the low precision's half-step of the iterate (the iterated factor
    is the right one), not the iterate itself."""

    delta: float
    any_answer: bool = True
    half_first: bool = False  # the answer's first factor is a half-step of the iterate (side="right")


def lanczos_two_precision(low: Space, x0, high: Space, resume: Callable[[], Space], dtype,
                          stop: Stop, max_iter: int, low_image: float | None = None,
                          symmetric: bool = False,
                          rounding: "LowPrecisionCopy | None" = None) -> EigenResult:
    """:func:`lanczos` on ``low`` (the operator in a lower precision, e.g. float32), checked
    and finished on ``high`` (the working precision, with ``apply_aux``).

    The low-precision answer is cast to ``dtype`` and applied once on ``high``: its Rayleigh
    quotient and residual there, with the low solve's second Ritz pair, give the error-gap
    bound (:class:`Stop`), and the application's half-step image and image finish the factors
    (:attr:`EigenResult.aux`, :attr:`EigenResult.image`). If the bound misses ``accuracy`` (a
    tiny gap, or an operator low precision cannot resolve), Lanczos continues from there on
    ``resume()`` (the working-precision space to iterate on).

    ``low_image`` (when the finish needs no image, i.e. ``x`` is the left factor): the check
    takes the half-step in the working precision (the other factor, and the Rayleigh quotient
    ``θ = ‖half‖²``) and no second one: the residual of ``x`` is at most the low solve's
    (its recurrence's ``r̃`` for the low-precision operator at its Ritz value) plus
    ``low_image·θ``, the low precision's relative error of the operator (the Rayleigh
    quotient minimises the residual over shifts). Only when that bound does not stop is the
    working-precision image computed, and the check goes on as above.

    ``symmetric`` (an operator that maps symmetric iterates to symmetric ones, e.g. a
    :attr:`KronSum.symmetric` sum's): the cast answer is symmetrised, removing the low
    precision's asymmetric rounding, so that the working-precision contractions may take their
    routes for symmetric matrices (:func:`kronsum._accel.symmetric_to_rounding`).

    ``rounding``: how far the low-precision copy of F lies from F (:class:`LowPrecisionCopy`).
    The low solve may then stop on its own answer's bound (:meth:`Stop.answer_bound`: the
    copy's distance and the low precision's arithmetic, ``low_image`` or 64·ε of the low
    precision, taken as operator errors), where the copy allows any answer or the working
    precision's check could not certify the bound anyway; that answer is returned with
    ``low=True``, without the working-precision check, and ``stop`` takes its bound, an
    estimate (the allowance for the low precision's arithmetic is measured, not proven).
    ``‖F‖²`` (``stop.f2``) stays F's: the bounds take the low solve's Ritz values as those of
    an operator within that distance of F's.
    """
    xp = high.xp
    stop_low = Stop(max(stop.tol, default_tol(xp, x0.dtype)), stop.accuracy,
                    th_rel=stop.th_rel * float(xp.finfo(x0.dtype).eps) / float(xp.finfo(dtype).eps),
                    estimates=stop.estimates)
    if stop.f2 is not None:  # ‖F‖², widened by the low precision's rounding of the operator
        stop_low.f2 = stop.f2
        stop_low.f2_err = stop.f2_err + 64 * float(xp.finfo(x0.dtype).eps) * abs(stop.f2)
    if rounding is not None and stop.accuracy is not None:
        stop_low.answer_copy = rounding
        stop_low.answer_slack = low_image if low_image is not None else 64 * float(xp.finfo(x0.dtype).eps)
        if stop.f2 is not None:  # the low solve's Ritz values are the copy's: | ‖F̃‖² − ‖F‖² | ≤ 2δ‖F‖ + δ²
            stop_low.f2_err += 2 * rounding.delta * math.sqrt(abs(stop.f2)) + rounding.delta ** 2
    lo = lanczos(low, x0, stop_low, max_iter)
    if stop_low.answer:
        stop.bound, stop.certified, stop.low = stop_low.bound, stop_low.certified, stop_low
        stop.th1, stop.th2, stop.r2 = stop_low.th1, stop_low.th2, stop_low.r2
        lo.converged, lo.low = True, True
        return lo
    x = xp.astype(lo.x, dtype)
    if symmetric:
        x = symmetrize(x, xp)
    x = materialize(x / high.norm(x))
    its = lo.iterations
    if low_image is not None and high.half is not None and high.second is not None:
        # the half-step in the working precision (the other factor — the finish's half-step,
        # not an application — and the Rayleigh quotient θ = ‖half‖²), the low solve's residual
        # widened by ``low_image`` × θ; the working-precision image only when that does not stop
        half = materialize(high.half(x))
        th = to_float(xp.sum(half * half))
        # a breakdown exit reports 0 for a remainder up to 64·ε·θ (the low precision's): take that
        eps_low = float(xp.finfo(x0.dtype).eps)
        r_low = (lo.residual * stop_low.th1 if stop_low.th1 else math.inf) if lo.residual else 64 * eps_low * th
        res = (r_low / th + low_image) if th > 0 else 0.0
        if th <= 0 or stop.met(th, res, stop_low.th2, stop_low.r2) or its >= max_iter:
            conv = th <= 0 or stop.bound <= stop.accuracy or res <= stop.tol
            return EigenResult(x, its, conv, res, lo.sigma2, half)
        Ax = high.second(half)
    else:
        Ax, half = high.apply_aux(x)
    its += 1
    th, rr = host_floats([xp.sum(x * Ax), xp.sum((Ax - xp.sum(x * Ax) * x) ** 2)])
    res = math.sqrt(max(rr, 0.0)) / th if th > 0 else 0.0
    if th > 0 and not stop.met(th, res, stop_low.th2, stop_low.r2) and its < max_iter:
        out = lanczos(resume(), x, stop, max_iter - its)
        out.iterations += its
        return out
    conv = th <= 0 or stop.bound <= stop.accuracy or res <= stop.tol
    return EigenResult(x, its, conv, res, lo.sigma2, half, Ax)


def deflated_top(space: Space, x, Mx, theta1: float | None = None, steps: int = 4, seed=0):
    """``(σ, k)``: sqrt of the top eigenvalue of the operator deflated by ``x``, by ``k ≤ steps``
    Lanczos steps (operator applications).

    ``theta1`` is the operator's top eigenvalue (σ₁² in the space's units; computed as the
    Rayleigh quotient of ``x`` when ``None``): rounding noise in a step comes at that scale,
    so a step whose remainder is within ``64 ε θ₁`` has exhausted the Krylov space (the
    deflated operator may be rank-deficient) and ends the probe rather than being normalised
    into a spurious direction. The Ritz value is never above the true one. ``seed`` draws
    the probe's random direction (a stream apart from the start's when that was random).
    """
    pr = _probe(space, x, Mx, theta1, steps, seed)
    if pr is None:
        return 0.0, 0
    k = len(pr.alphas)
    T = _tridiagonal(pr.alphas, pr.betas[: k - 1])
    return math.sqrt(max(float(np.linalg.eigvalsh(T)[-1]), 0.0)), k


@dataclass
class _ProbeSteps:
    """:func:`_probe`'s Lanczos steps on the operator deflated by ``x``: the basis ``Q`` (``x``
    first, then the probe's vectors), their metric images, the recurrence's ``alphas`` and
    ``betas``, ``coupling[i] = ⟨A q_i, x⟩_M`` and ``x``'s Rayleigh quotient ``theta1``."""

    Q: list
    MQ: list
    alphas: list
    betas: list
    coupling: list
    theta1: float


def _probe(space: Space, x, Mx, theta1: float | None, steps: int, seed) -> _ProbeSteps | None:
    """The steps of :func:`deflated_top` (``None`` when the deflated space is empty)."""
    dim = math.prod(x.shape)
    if dim == 1:
        return None
    steps = min(steps, dim - 1)  # the deflated space has dim − 1 dimensions at most
    eps = float(space.xp.finfo(x.dtype).eps)
    if theta1 is None:
        theta1 = to_float(space.dot(space.apply(x), Mx))
    floor = 64 * eps * abs(theta1)
    q = space.random_like(x, seed, symmetric=True)
    q = q - space.dot(q, Mx) * x
    nq = space.norm(q)
    if not bool(nq > 0):
        return None
    q = q / nq
    pr = _ProbeSteps([x, q], [Mx, space.M(q)], [], [], [], theta1)
    for _ in range(steps):
        w = space.apply(pr.Q[-1])
        a, h = space.dot(w, pr.MQ[-1]), space.dot(w, Mx)
        w = _orthogonalize(space, w, pr.Q, pr.MQ)
        Mw = space.M(w)
        a, h, b = host_floats([a, h, space.norm(w, Mw)])  # one read per step
        pr.alphas.append(a)
        pr.betas.append(b)
        pr.coupling.append(h)
        if b <= floor or b <= 1e-300:  # exhausted: the remainder is rounding noise
            break
        pr.Q.append(w / b)
        pr.MQ.append(Mw / b)
    return pr


def _probe_ritz(space: Space, x, theta1: float, steps: int, seed: tuple, kernel: bool) -> tuple:
    """``(k, θ₁', θ₂, z)``: :func:`_probe`'s ``k`` steps from the unit ``x`` (Rayleigh quotient
    ``theta1``), then the Rayleigh–Ritz problem on ``x`` and the probe's basis (the couplings
    ``⟨A q_i, x⟩`` border the probe's tridiagonal matrix): its top two Ritz values, and ``z()``
    its top Ritz vector. ``kernel``: ``space`` is a float64 NumPy :class:`GramSpace` and the
    whole of it runs in :func:`kronsum._numba_kernels.coef_probe` (same draw, same arithmetic).
    ``k = 0``: the deflated space is empty."""
    Mx = space.M(x)
    if kernel:  # the same draw as random_like's, kept per size (a generator costs ~30 µs)
        q = _normal_draw(int(x.shape[0]), seed)
        eps = float(np.finfo(np.float64).eps)
        k, t1, t2, z = numba_kernels().coef_probe(space.SP, space.SQ, space.w, x, Mx, q, float(theta1),
                                                  int(min(steps, x.shape[0] - 1)), eps)
        return max(int(k), 0), float(t1), float(t2), lambda: z
    pr = _probe(space, x, Mx, theta1, steps, list(seed))
    if pr is None:
        return 0, -1.0, -1.0, None
    k = len(pr.alphas)
    H = np.zeros((k + 1, k + 1))
    H[0, 0] = pr.theta1
    H[0, 1:] = H[1:, 0] = pr.coupling
    H[1:, 1:] = _tridiagonal(pr.alphas, pr.betas[: k - 1])
    theta, S = np.linalg.eigh(H)
    return (k, float(theta[-1]), float(theta[-2]),
            lambda: _ritz(space, pr.Q[: k + 1], pr.MQ[: k + 1], S[:, -1])[0])


def verify_estimate(space: Space, eig: EigenResult, stop: Stop, max_iter: int,
                    resume: Callable[[Any, int], EigenResult], rounds: int = 6,
                    steps: int = 6, kernel: bool = False) -> EigenResult:
    """Check a stop that reports an uncertified bound (an estimate, :class:`Stop`) by the
    deflated probe, and go on where it fails.

    A single-vector Krylov space can blend two nearly tied top directions into its Ritz
    vector ``x``: the residual is then small, and the second Ritz value (the estimate's ``λ₂``)
    far below ``λ₂``, so the estimate can be below the true gap by orders of magnitude at any
    accuracy (by ``(σ₁ − σ₂)/σ₁`` of about the square root of the accuracy). ``steps`` Lanczos
    steps on the operator deflated by ``x`` find such a direction (the deflated operator's top
    eigenvalue is at least ``λ₂``); the Rayleigh–Ritz problem on ``x`` and the probe's basis
    (its couplings to ``x`` are read in the same pass) gives a second Ritz value, which
    replaces the estimate's when larger; a top Ritz value above the answer's shows that the
    answer is not the top eigenvector (e.g. the lower one of a tied pair, whose residual is
    tiny), and its bound becomes ``inf``. Every such stop is checked, on ``accuracy`` or on
    the residual (``tol``, which a vector of a nearly tied pair meets too). If a bound that
    met ``accuracy`` then misses it, or the answer is not the top, the solve resumes
    (``resume(z, applications left)``) from the top Ritz vector ``z`` of that space, which
    resolves the two directions; at most ``rounds`` times, after which the answer is returned as not converged, with the probe's
    bound. Probes count as applications, within ``max_iter`` (a probe that does not fit is
    not run, and the bound stays the estimate). ``kernel``: the probe runs in the numba
    kernel (:func:`_probe_ritz`).
    """
    its = eig.iterations
    for r in range(rounds + 1):
        budget = min(steps, max_iter - its)
        if not (eig.converged and budget > 0 and stop.estimates and not stop.certified
                and stop.bound is not None and stop.th1 is not None and stop.th1 > 0):
            break
        k, t1, t2, z = _probe_ritz(space, eig.x, stop.th1, budget, (0x5EED, 3, r), kernel)
        if k <= 0:
            break
        its += k
        eig.iterations = its
        # a direction with a larger Rayleigh quotient than the answer's bounds its gap from
        # below, λ₁ − θ₁ ≥ θ₁' − θ₁: above the estimate, the answer is not what the estimate
        # says (e.g. the lower vector of a tied pair, whose residual is tiny) and the solve goes
        # on from the better vector (the error gap is (λ₁ − θ₁)/(‖F − F̂‖ + opt), opt ≤ ‖F − F̂‖)
        if stop.f2 is not None and stop.f2 > stop.th1:
            above = (t1 - stop.th1) / (2 * math.sqrt((stop.f2 - stop.th1) * stop.f2)) > stop.bound
        else:
            above = t1 > stop.th1 * (1 + 1e3 * float(space.xp.finfo(eig.x.dtype).eps))
        mu = -1.0 if stop.th2 is None else stop.th2 + stop.r2
        if not (t2 > mu or above):  # the probe saw nothing above the estimate's values
            break
        met_before = stop.accuracy is not None and stop.bound <= stop.accuracy
        stop.met(stop.th1, stop.res, max(t2, mu), 0.0)  # the bound with the probe's second value
        if above:
            stop.bound, stop.certified = math.inf, False
        eig.sigma2 = math.sqrt(max(t2, 0.0))
        if not (met_before or above):
            break  # a stop on tol keeps its answer; the bound now says what it is
        if not above and stop.bound <= stop.accuracy:
            break
        if r == rounds or its >= max_iter:
            eig.converged = False
            break
        eig = resume(z(), max_iter - its)
        its += eig.iterations
        eig.iterations = its
    return eig


# -- the block solver (rank r) ------------------------------------------------------------------


def block_lanczos(space: Space, starts, r: int, stop: Stop, max_iter: int, draw, max_dim: int,
                  floor=None) -> BlockResult:
    """Top ``r`` eigenpairs of the PSD operator of ``space``: block Lanczos with thick restarts.

    The basis is kept with the operator's images ``A q``; the projection ``T = Qᵀ M A Q`` grows
    a column per new vector (full reorthogonalisation, twice), the Ritz pairs of the top r give
    the next block (their residuals, which span the block Krylov extension), and when the basis
    would exceed ``max_dim`` it is restarted to the top ``max_dim // 2`` Ritz vectors. When no new
    direction remains (an invariant subspace) random vectors (``draw()``) are tried; if they too
    lie in the basis, the space is exhausted and the Ritz pairs are exact. Stops when
    :meth:`Stop.met` holds for every one of the top r pairs, each residual taken relative to
    ``max(θ_i, 1e3·ε·θ_1/tol)`` (``stop.accuracy`` is for a single pair and left ``None`` here).

    ``floor(v)``, for a metric space, is the size ``‖v‖_M`` cannot be told from rounding below
    (``sqrt(‖S_P‖)·‖v‖₂``): a new vector is kept only when its metric norm is well above it, so
    that directions in (or next to) the null space of a singular metric are not normalised into
    noise.
    """
    xp = space.xp
    ref = starts[0]
    eps = float(xp.finfo(ref.dtype).eps)
    drop = 100 * math.sqrt(eps)
    rfloor = 1e3 * eps / stop.tol
    Q: list = []
    MQ: list = []
    AQ: list = []
    T = np.zeros((0, 0))
    n_apply = 0

    def add(cands) -> int:
        nonlocal T, n_apply
        added = 0
        for v in cands:
            Mv = space.M(v)
            n0 = to_float(space.norm(v, Mv))
            if not (n0 > 0 and math.isfinite(n0)):
                continue
            v = _orthogonalize(space, v / n0, Q, MQ)
            Mv = space.M(v)
            nv = to_float(space.norm(v, Mv))
            if not nv > drop or (floor is not None and not nv > drop * floor(v)):
                continue
            v, Mv = materialize(v / nv), materialize(Mv / nv)
            Av = space.apply_M(v, Mv)
            n_apply += 1
            col = host_floats([space.dot(Av, mq) for mq in MQ] + [space.dot(Av, Mv)])  # one read
            k = len(Q)
            T2 = np.zeros((k + 1, k + 1))
            T2[:k, :k] = T
            T2[:k, k] = T2[k, :k] = col[:k]
            T2[k, k] = col[k]
            T = T2
            Q.append(v)
            MQ.append(Mv)
            AQ.append(Av)
            added += 1
        return added

    def combos(vecs, C):
        shape = tuple(vecs[0].shape)
        V = xp.reshape(xp.stack(vecs), (len(vecs), -1))
        # a copy in C order: a 1x1 view with negative strides passes NumPy's contiguity test,
        # and torch refuses it
        Cx = xp.asarray(np.array(C.T, order="C"), dtype=V.dtype, device=device_of(V))
        out = materialize(Cx @ V)
        return [xp.reshape(out[i, ...], shape) for i in range(C.shape[1])]

    add(starts)
    exhausted = False
    probes = 0  # Lanczos steps spent estimating θ_{r+1} after convergence (at most 4)
    zero_tries = 0
    while True:
        k = len(Q)
        if k == 0 or not float(np.max(np.abs(np.diag(T)), initial=0.0)) > 0:
            # the operator vanishes on the basis: try random directions once, else F is zero
            if zero_tries == 0 and not exhausted:
                zero_tries += 1
                add([draw() for _ in range(max(1, r))])
                continue
            S = np.eye(k)
            p = min(k, r)
            return BlockResult([0.0] * p, (combos(Q, S[:, :p]) if p else []), n_apply, True, 0.0,
                               0.0, True)
        theta, S = np.linalg.eigh((T + T.T) / 2)
        theta, S = theta[::-1], S[:, ::-1]
        p = min(k, r)
        top = min(k, r + 1)
        th_ref = max(float(theta[0]), 0.0)
        X = combos(Q, S[:, :top])
        AX = combos(AQ, S[:, :top])
        resid = [AX[i] - float(theta[i]) * X[i] for i in range(top)]
        # per pair, relative to its own eigenvalue (σ_i is then accurate to about tol² relative,
        # even for σ_i ≪ σ_1), down to the rounding floor ~ε·θ_1 that no iteration can pass
        res = [to_float(space.norm(resid[i])) / max(float(theta[i]), rfloor * th_ref)
               for i in range(p)]
        conv = [stop.met(float(theta[i]), res[i]) for i in range(p)]
        done = exhausted or (k >= r and all(conv))
        if done and not exhausted and (k == r or probes > 0) and probes < 4 and n_apply < max_iter:
            # converged, but no estimate of θ_{r+1} yet: a few Lanczos steps on the complement
            probes += 1
            cand = draw() if k == r else resid[r]
            if add([cand]) == 0:
                exhausted = True
            continue
        if done or n_apply >= max_iter:
            theta_next = float(theta[r]) if k > r else (0.0 if exhausted else None)
            return BlockResult([float(t) for t in theta[:p]], X[:p], n_apply, bool(done),
                               max(res) if res else 0.0, theta_next, exhausted)
        cands = [resid[i] for i in range(p) if not conv[i]]
        if k + len(cands) > max_dim:  # thick restart to the top Ritz vectors
            keep = min(k, max(p, max_dim // 2))
            Sk = S[:, :keep]
            Q, MQ, AQ = combos(Q, Sk), combos(MQ, Sk), combos(AQ, Sk)
            T = np.diag(theta[:keep])
        added = add(cands) if cands else 0
        if added == 0:
            if add([draw() for _ in range(max(1, r - k))]) == 0:
                exhausted = True


# -- the Gram solve: one dispatch point for its accelerators ------------------------------------


def gram_solve(Fn, alpha0, stop: Stop, max_iter: int) -> Solution:
    """K-FOC's top eigenpair in the Gram space of ``Fn`` (outer/terms forms and sums of them)
    from the start coefficients ``alpha0``, finished into factors.

    The dispatch point of the accelerators: the numba kernel (NumPy, option ``use_numba``),
    else the squaring route (:func:`use_squaring`), which hands over to the array-API Lanczos
    when 32 (256, 2048) power steps do not meet the rule; all three stop by ``stop`` and
    finish with the sign rule. ``Solution.route``: ``"gram[numba]"``, ``"gram-squaring"`` or
    ``"gram"``.
    """
    xp = Fn.xp
    w = Fn.weights
    if krylov_spans(Fn):  # an operator of small rank: solved exactly, for little more work
        stop.estimates = False
    if numba_enabled(xp, w):  # float64 arithmetic inside the kernel: no range concern
        # the Gram matrices in float64 straight away (one pass each, no cast of a copy)
        SP, SQ = Fn._gram("left", float64=True), Fn._gram("right", float64=True)
        space = GramSpace(SP, SQ, xp.astype(w, xp.float64, copy=False), xp)
        alpha0 = xp.astype(alpha0, xp.float64, copy=False)  # the kernel does not write to it
        if not float(alpha0 @ (SP @ alpha0)) > 0:  # NumPy float64: ‖L₀‖² = α₀ᵀS_Pα₀ (or NaN)
            alpha0 = space.w
            if not bool(space.norm(alpha0) > 0):  # every term is zero (S_P = 0) or NaN
                require_finite(xp, SP)
                require_finite(xp, SQ)
                if not psd_sum(Fn) and bool(xp.any(xp.linalg.diagonal(SP) > 0)):
                    raise MetricBreakdown(  # non-zero terms whose metric rounding made indefinite
                        "the start has no length in the Gram matrices' metric, which the terms' "
                        "rounding made indefinite (terms nearly collinear and cancelling)")
                return Solution(zero_answer(Fn), EigenResult(None, 0, True, 0.0, 0.0), "gram[numba]")
        eps = xp.finfo(Fn.dtype).eps

        def resume(z, its):
            return _numba_lanczos(space, Fn, z, stop, its, eps)

        eig = verify_estimate(space, resume(alpha0, max_iter), stop, max_iter, resume, kernel=True)
        if _tighten_for_psd(Fn, eig, stop, True):  # a tighter answer is checked the same way
            tight = _tightened(eig, stop, lambda its: resume(eig.x, its), max_iter)
            if tight is not eig:
                eig = verify_estimate(space, tight, stop, max_iter, resume, kernel=True)
        return finish_coef(Fn, space, eig, stop, "gram[numba]", on_host=True)

    st = None
    if use_squaring(Fn):
        done, st = _squaring(Fn, alpha0, stop, max_iter)
        if done is not None:
            return done
    if st is None:
        st = _SquaringState()
        _scaled_grams(Fn, st, float64=_gram_float64(Fn))
        alpha0 = xp.astype(alpha0, st.SPs.dtype, copy=False)
    # Lanczos (after the squaring route if it ran: its scaled Gram matrices are at hand)
    space = GramSpace(st.SPs, st.SQs, st.ws, xp)
    # a start with ‖L₀‖ = 0 (e.g. traceless terms) falls back to the weights, on the device;
    # if that is zero too, every term is zero (S_P = 0) and the solve returns a zero vector
    alpha0 = xp.where(space.norm(alpha0) > 0, alpha0, st.ws)
    # ‖F̃‖² in scaled units: it certifies the stop, and bounds σ₂ when the solver gave none
    stop.f2 = to_float(space.f2())
    stop.f2_err = Fn.num_terms * float(xp.finfo(Fn.dtype).eps) * _f2_scale(space, Fn, stop)

    def resume(z, its):
        return lanczos(space, z, stop, its)

    eig = verify_estimate(space, resume(alpha0, max_iter), stop, max_iter, resume)
    if _tighten_for_psd(Fn, eig, stop, False):  # a tighter answer is checked the same way
        tight = _tightened(eig, stop, lambda its: resume(eig.x, its), max_iter)
        if tight is not eig:
            eig = verify_estimate(space, tight, stop, max_iter, resume)
    return finish_coef(Fn, space, eig, stop, "gram", (st.cP, st.cQ, st.cw))


def _tighten_for_psd(Fn, eig: EigenResult, stop: Stop, on_host: bool) -> bool:
    """Whether a Gram-route answer ``eig`` (unit coefficients ``α``) of a :func:`psd_sum` should
    iterate on to the residual rule before its finish: it stopped on ``accuracy`` short of
    ``tol`` and ``α`` takes both signs, so the formed ``L = Σ α_k L_k`` may be indefinite (the
    optimum's is PSD; an iterate at an angle of about ``√accuracy`` to it is not, where the
    optimum's eigenvalues are near zero). More coefficient steps (K × K products) cost less
    than the check and projection of ``L`` (:func:`_psd_projection`: a Cholesky factorisation,
    an ``eigvalsh`` and an ``eigh`` of the ``m × m`` factor, and a contraction for the other
    factor), and the optimum's coefficients are of one sign where the terms are independent
    (``L = Gᵀ diag(α) G`` with G of full row rank is PSD iff α ≥ 0)."""
    if not (psd_sum(Fn) and stop.accuracy is not None and eig.x is not None
            and eig.converged and eig.residual > stop.tol):
        return False
    return _both_signs(eig.x, Fn.xp, on_host)


def _tightened(eig: EigenResult, stop: Stop, solve, max_iter: int) -> EigenResult:
    """``solve(iterations)`` from ``eig.x`` with ``stop``'s residual rule alone (its accuracy
    restored after; the bound is the new iterate's), the applications added up; ``eig`` itself
    when it used up ``max_iter``."""
    if eig.iterations >= max_iter:
        return eig
    accuracy, stop.accuracy = stop.accuracy, None
    try:
        out = solve(max_iter - eig.iterations)
    finally:
        stop.accuracy = accuracy
    out.iterations += eig.iterations
    out.converged = out.residual <= stop.tol or (stop.bound is not None and stop.bound <= accuracy)
    return out


def conv_gram_solve(Fn, start: str | Array, stop: Stop, max_iter: int, seed=None) -> Solution:
    """K-FOC's top eigenpair of a conv-form ``Fn`` in its :class:`ConvGramSpace` (``K·T`` Gram
    matrices of both sides), finished into factors by weighted Gram products; ``start`` is
    ``"tkfac"``, ``"kfac"``, ``"random"`` (with ``seed``) or a right factor ``R0`` (an array).
    Route ``"gram"``."""
    xp = Fn.xp
    K, T, m, n = Fn.num_terms, Fn.num_positions, Fn.m, Fn.n
    G, A, w = Fn.G, Fn.A, Fn.weights
    Gf, Af = xp.reshape(G, (K * T, m)), xp.reshape(A, (K * T, n))
    SG = materialize(row_gram(Gf, xp))
    SA = materialize(row_gram(Af, xp))
    space = ConvGramSpace(SG, SA, w, K, T, xp)
    if isinstance(start, str) and start == "random":
        c0 = space.random_like(xp.zeros((K, T, T), dtype=Fn.dtype), seed, False)
        c0 = xp.reshape(c0 + xp.matrix_transpose(c0), (K * T * T,))
    elif isinstance(start, str):
        c0 = space.start(start, w, A=A)
    else:
        c0 = space.start("", w, R0=start, A=A)
    if not bool(space.norm(c0) > 0):
        c0 = space.start("kfac", w)
        if not bool(space.norm(c0) > 0):  # every term is zero or NaN
            require_finite(xp, SG)
            require_finite(xp, SA)
            return Solution(zero_answer(Fn), EigenResult(None, 0, True, 0.0, 0.0), "gram")
    stop.f2 = to_float(space.f2())
    stop.f2_err = K * T * T * float(xp.finfo(Fn.dtype).eps) * abs(stop.f2)
    eig = lanczos(space, c0, stop, max_iter)
    eig = verify_estimate(space, eig, stop, max_iter, lambda z, its: lanczos(space, z, stop, its))
    return _finish_conv_coef(Fn, space, eig, stop)


def _finish_conv_coef(Fn, space: ConvGramSpace, eig: EigenResult, stop: Stop) -> Solution:
    """Factors from a :class:`ConvGramSpace` iterate ``C``, in coefficient space: ``‖L‖² =
    ⟨C, 𝒢C⟩``, ``D = W𝒢C``, ``‖R‖² = ⟨D, 𝒜D⟩``, ``tr L = Σ_k ⟨C_k, S^G_kk⟩``; then
    ``L = Σ_k G_kᵀ C_k G_k`` and ``R = Σ_k A_kᵀ D_k A_k`` as weighted Gram products of the
    eigenvectors of the ``T × T`` blocks (signed weights: BLAS ``syrk`` on NumPy), with the
    sign rule."""
    xp = Fn.xp
    K, T = space.K, space.T
    c = eig.x
    MC = space.M(c)
    D = space.half(c, MC)
    diag = Fn.G @ xp.matrix_transpose(Fn.G)  # the diagonal blocks S^G_kk = G_k G_kᵀ
    nls2, nrs2, tr = host_floats([xp.sum(c * MC), xp.sum(D * space.op(space.SA, D)),
                                  xp.sum(xp.reshape(c, (K, T, T)) * diag)])
    if not all(math.isfinite(v) for v in (nls2, nrs2, tr)):
        require_finite(xp, math.nan)
    if not (nls2 > 0 and nrs2 > 0):
        return Solution(zero_answer(Fn), EigenResult(c, eig.iterations, True, 0.0, 0.0), "gram")
    if eig.sigma2 is None and stop.f2 is not None:
        nl = math.sqrt(nls2)
        s2, k = _probe_unless_proven(space, c / nl, MC / nl, nrs2 / nls2, stop.f2,
                                     float(xp.finfo(Fn.dtype).eps))
        if s2 is not None:
            eig.sigma2, eig.iterations = s2, eig.iterations + k
    sign = -1.0 if tr < 0 else 1.0
    nls, nrs = math.sqrt(nls2), math.sqrt(nrs2)
    eC, eD = xp.linalg.eigh(xp.reshape(c, (K, T, T))), xp.linalg.eigh(xp.reshape(D, (K, T, T)))
    psd = psd_sum(Fn)
    eps = float(xp.finfo(Fn.dtype).eps)
    # forming a factor from the blocks' eigenpairs rounds each at ε·max|λ_k|, which reaches
    # the unit factor through the block's rows, amplified by at most
    # amp = Σ_k max|λ_k|·‖G_k‖² / ‖Σ_k G_kᵀC_kG_k‖ (1–200 on a ResNet's blocks). Positions of
    # very different magnitudes give blocks whose eigenvalues span as wide a range, and amp far
    # beyond: there (amp > 10⁴) the factors are formed by products instead and checked
    nG = xp.sum(xp.linalg.diagonal(diag), axis=-1)  # ‖G_k‖²_F
    nA = row_sq_norms(xp.reshape(Fn.A, (K, T * Fn.n)), xp)
    sC, sD = eC[0] * sign, eD[0] * sign
    loC, hiC, loD, hiD, ampL, ampR = host_floats([
        xp.min(sC), xp.max(xp.abs(sC)), xp.min(sD), xp.max(xp.abs(sD)),
        xp.sum(xp.max(xp.abs(sC), axis=-1) * nG), xp.sum(xp.max(xp.abs(sD), axis=-1) * nA)])
    unstable = not ampL / nls + ampR / nrs <= _FORMING_AMPLIFICATION
    # beyond rounding (−10Tε of the largest magnitude): C_k are not unique where positions
    # repeat a direction, and an iterate near a singular optimum is indefinite
    indefinite = psd and min(loC + 10 * T * eps * hiC, loD + 10 * T * eps * hiD) < 0
    if unstable or _gram_blind(stop, K * T, nrs2 / nls2):
        # L formed by products over the positions' rows (rounding ε·Σ_k |G_k|ᵀ|C_k||G_k|), and
        # checked and finished on the contractions (one application)
        Gf = xp.reshape(Fn.G, (K * T, Fn.m))
        Y = xp.reshape(xp.reshape(c, (K, T, T)) @ Fn.G, (K * T, Fn.m))
        L = symmetrize(xp.matrix_transpose(Gf) @ Y * (sign / nls), xp)
        return Solution(_verified_finish(Fn, L, stop, eig, psd), eig, "gram")
    # coefficient matrices PSD to rounding: their eigenvalues below zero are dropped, the
    # factors are PSD by construction, and what that moves them is added to the bound
    # (σ‖L⊗R − L′⊗R′‖ ≤ σ(‖ΔL‖ + ‖ΔR‖), σ ≤ ‖F‖)
    L, moved = _blocks_gram(eC, Fn.G, sign / nls, xp, clip=psd and loC < 0 and not indefinite)
    L = symmetrize(L, xp)
    if indefinite:
        # the formed L is checked (projected where indefinite) and R is its half-step on the
        # contractions, which D = W𝒢C would carry C's indefiniteness into
        fac = finish(Fn, "left", EigenResult(L, eig.iterations, eig.converged, eig.residual,
                                              eig.sigma2), psd=True)
        return Solution(fac, eig, "gram")
    R, moved_R = _blocks_gram(eD, Fn.A, sign / nrs, xp, clip=psd and loD < 0)
    _widen(stop, eig, moved + moved_R)
    return Solution(Factors(L, symmetrize(R, xp), nrs / nls), eig, "gram")


# the conv Gram route forms its factors by products over the rows, and checks them on the
# contractions, where forming them from the blocks' eigenpairs would amplify rounding more
_FORMING_AMPLIFICATION = 1e4


def _widen(stop: Stop, eig: EigenResult, by: float) -> None:
    """``stop``'s bound widened by what finishing the factors moved them (``‖ΔL‖ + ‖ΔR‖``, which
    moves the error by at most ``σ`` times that, ``σ ≤ ‖F‖``), and ``eig.converged`` by the
    rule again."""
    if stop.bound is not None and by > 0:
        stop.bound += by
        eig.converged = eig.residual <= stop.tol or (stop.accuracy is not None and stop.bound <= stop.accuracy)


def _f2_scale(space: "GramSpace", Fn, stop: Stop) -> float:
    """The magnitude ``‖F‖²`` (``stop.f2``)'s rounding is relative to, in the space's units:
    ``|f2|`` for a sum of PSD terms (every term of ``wᵀ(S_P∘S_Q)w`` is non-negative), else the
    sum of the terms' magnitudes ``|w|ᵀ(|S_P|∘|S_Q|)|w|`` (one more pass over the K×K
    matrices), which terms that cancel leave far above ``‖F‖²``; recorded as ``stop.f2_abs``."""
    if psd_sum(Fn):
        return abs(stop.f2)
    xp = space.xp
    aw = xp.abs(space.w)
    stop.f2_abs = to_float(xp.sum(aw * ((xp.abs(space.SP) * xp.abs(space.SQ)) @ aw)))
    return stop.f2_abs


def _blocks_gram(eig_C, V, scale: float, xp, clip: bool = False) -> tuple:
    """``(scale · Σ_k V_kᵀ C_k V_k, moved)`` for symmetric ``C`` (K, T, T) given as its batched
    ``eigh`` ``(λ, U)``, and ``V`` (K, T, d): the eigenvectors of each ``C_k`` turn it into one
    weighted Gram product over ``K·T`` rows. ``clip``: the weights ``scale·λ`` below zero are
    dropped (a PSD result for blocks PSD to rounding) and ``moved`` bounds what that changes,
    ``Σ |w⁻|·‖row‖²`` (one host read; 0 without ``clip``)."""
    lam, U = eig_C
    K, T, d = V.shape
    rows = xp.reshape(xp.matrix_transpose(U) @ V, (K * T, d))  # u_kiᵀ V_k
    w = xp.reshape(lam, (K * T,)) * scale
    if not clip:
        return weighted_gram(rows, w, xp), 0.0
    neg = xp.where(w < 0, -w, xp.zeros_like(w))
    moved = to_float(xp.sum(neg * row_sq_norms(rows, xp)))
    return weighted_gram(rows, w + neg, xp), moved


def _numba_lanczos(space: GramSpace, Fn, x0, stop: Stop, max_iter, eps) -> EigenResult:
    """:func:`lanczos` on a float64 NumPy :class:`GramSpace`, as the compiled kernel
    :func:`kronsum._numba_kernels.coef_lanczos` (same recurrence, same :class:`Stop` rule);
    ``eps`` of the inputs' dtype (the breakdown threshold), ``Fn`` the sum (whether its terms can
    cancel, :func:`_f2_scale`). Sets ``stop.f2``
    (``wᵀ(S_P∘S_Q)w``, one pass in the kernel) and the bound of the returned iterate."""
    kern = numba_kernels()
    SP, SQ, w = space.SP, space.SQ, space.w
    stop.f2 = float(kern.weighted_hadamard_sum(SP, SQ, w))
    # the Gram matrices and the sum are float64, from inputs of precision eps
    stop.f2_err = (SP.shape[0] * max(float(eps), float(np.finfo(np.float64).eps))
                   * _f2_scale(space, Fn, stop))
    acc = -1.0 if stop.accuracy is None else stop.accuracy
    if SP.shape[0] <= KRYLOV_DIM:  # as lanczos: one Krylov basis spans the space
        stop.estimates = False
    x, its, conv, res, s2, bound, certified, th1, th2, r2 = kern.coef_lanczos(
        SP, SQ, w, x0, float(stop.tol), acc, stop.f2, stop.f2_err, float(stop.th_rel), int(max_iter), KRYLOV_DIM,
        float(eps), bool(stop.estimates))
    stop.bound, stop.certified = float(bound), bool(certified)
    stop.th1, stop.th2, stop.r2, stop.res = float(th1), (None if th2 < 0 else float(th2)), float(r2), float(res)
    if s2 < 0 and its == 1 and res == 0.0:  # invariant start vector: probe for a repeated sigma1
        s2, k = deflated_top(space, x, space.M(x))
        its += k
        stop.bound = None  # the caller bounds the gap with the probe's σ₂
    return EigenResult(x, int(its), bool(conv), float(res), None if s2 < 0 else float(s2))


def _probe_unless_proven(space: Space, x, Mx, th: float, f2: float, eps: float):
    """``(σ₂ or None, applications)`` after a solve that gave no second Ritz value: ``‖F‖² − θ``
    bounds σ₂² and proves σ₂ < σ₁ when it is below ``θ(1 − √ε)``; otherwise the deflated probe
    (:func:`deflated_top`) estimates σ₂ (in the space's units)."""
    if f2 - th < th * (1 - math.sqrt(eps)):
        return None, 0
    return deflated_top(space, x, Mx, th)


def use_squaring(Fn) -> bool:
    """The squaring route (option ``gram_squaring``; by default: arrays on an accelerator and
    its 4 K×K products (8K³ flops) at most two fifths of the final weighted Gram products'
    2K(m² + n²), ``10K² ≤ m² + n²``)."""
    forced = _options()["gram_squaring"]
    if forced is not None:
        return forced
    K = Fn.num_terms
    return on_accelerator(Fn.weights) and 10 * K * K <= Fn.m * Fn.m + Fn.n * Fn.n


def _squaring(Fn, alpha0, stop: Stop, max_iter):
    """The power method by repeated squaring of the K×K operator ``B = W S_Q W S_P``, finished
    on the device before its first host read.

    For accelerators with K small beside m and n: every Lanczos step is a dozen tiny kernels,
    each a launch and a Python dispatch, while ``M = B^(2^s)`` costs s GEMMs of 2K³ flops and
    ``x = M⁴α₀`` four matrix-vector products more (four products stand in for the last two
    squarings at a few percent of their cost). After 3, 6 and 9 squarings (32, 256, 2048 power
    steps) :func:`_squaring_finish` queues the answer for ``x`` and its checks without a
    read, then the scalars are read. At the first check the two final weighted Gram products
    are queued before that read: when 32 steps meet ``tol`` (the usual case) the device never
    waits on the host between the Gram matrices and the factors (:func:`squaring_pass`, the
    part up to the first read, has no host read at all); when they do not, that pair of
    products is dropped (one pair at most: later checks read first). Returns
    ``(Solution, state)``, the solution ``None`` when ``tol`` is not met (or ``max_iter`` caps
    the steps) or anything is not finite (a zero operator included): then Lanczos takes over,
    on the state's scaled Gram matrices (``None`` if no pass ran).
    """
    xp = Fn.xp
    if APPLIES * 2**3 > max_iter:
        return None, None
    # option cuda_graphs (PyTorch CUDA): the pass replayed as one graph; a copy of its state,
    # whose arrays the graph's next replay overwrites (all read within this call)
    st = cuda_graph(("kfoc-squaring", structure(Fn)),
                    lambda a: squaring_pass(rebuilt(Fn, a[:-1]), a[-1]), [*Fn._arrays(), alpha0])
    st = squaring_pass(Fn, alpha0) if st is None else st.copy()
    for target in (3, 6, 9):
        if APPLIES * 2**target > max_iter:
            return None, st
        if target > st.level:
            squaring_more(Fn, st, target - st.level)
        first = target == 3  # queue the final products before the read (dropped if it fails)
        LR = _squaring_factors(Fn, st) if first else None
        th, rr, f2s, fP, fQ, fw = vals = host_vector(st.scalars)
        if not (all(math.isfinite(v) for v in vals) and th > 0):
            return None, st
        res = math.sqrt(max(rr, 0.0)) / th
        stop.f2, stop.f2_err = f2s, Fn.num_terms * float(xp.finfo(Fn.dtype).eps) * abs(f2s)
        if not stop.met(th, res):
            continue
        L, R = LR if first else _squaring_factors(Fn, st)
        unit = math.sqrt(fw * fw * fQ * fP)  # scaled → true units of σ
        its = APPLIES * 2**st.level + 1
        s2, k = _probe_unless_proven(GramSpace(st.SPs, st.SQs, st.ws, xp), st.x, st.Mx, th, f2s,
                                     float(xp.finfo(Fn.dtype).eps))
        eig = EigenResult(st.x, its + k, True, res, None if s2 is None else s2 * unit)
        _rescale_f2(stop, unit * unit)  # in the units of F's σ², as the caller's
        return Solution(Factors(L, R, unit * math.sqrt(th)), eig, "gram-squaring"), st
    return None, st


def rebuilt(Fn, arrays: list):
    """``Fn`` over ``arrays`` (in the order of ``Fn._arrays()``); a sum's own weights, the
    concatenation of its parts', are concatenated again from the new parts."""
    from ._sum import KronSum

    it = iter(arrays)

    def rebuild(P):
        if P.form == "sum":
            return KronSum.concat(*(rebuild(Q) for Q in P.parts))
        return P._map(lambda _: next(it))

    return rebuild(Fn)


def structure(Fn) -> tuple:
    """The forms of ``Fn`` (a sum: of its parts), which with the arrays' layouts fix what the
    squaring pass computes (part of its CUDA graph's key)."""
    return tuple(P.form for P in Fn.parts) if Fn.form == "sum" else (Fn.form,)


class _SquaringState:
    """The device arrays of the array-API Gram solver: the scaled Gram matrices
    (:func:`_scaled_grams`) and the squaring route's state (:func:`squaring_pass`)."""

    __slots__ = ("M", "level", "a0", "SPs", "SQs", "ws", "tl", "tiny", "f2", "cP", "cQ", "cw",
                 "x", "Mx", "cL", "cR", "scalars")

    def copy(self) -> "_SquaringState":
        out = _SquaringState()
        for k in self.__slots__:
            setattr(out, k, getattr(self, k))
        return out


def _squaring_factors(Fn, st: _SquaringState) -> tuple:
    """The squaring route's factors ``(Σ_k cL_k L_k, Σ_k cR_k R_k)`` in the inputs' dtype."""
    xp, dt = Fn.xp, Fn.dtype
    return (Fn._combine("left", xp.astype(st.cL, dt, copy=False)),
            Fn._combine("right", xp.astype(st.cR, dt, copy=False)))


def squaring_pass(Fn, alpha0, squarings: int = 3) -> _SquaringState:
    """The squaring route up to its first host read, as device work only (no read, no
    transfer, shapes fixed by the inputs'): Gram matrices, ``M = B^(2^squarings)``, the
    answer for ``x ∝ M⁴α₀``: coefficients of the factors and scalars (:func:`_squaring_finish`).

    A zero operator gives θ = 0, which the caller reads.
    """
    xp = Fn.xp
    st = _SquaringState()
    _scaled_grams(Fn, st, float64=_gram_float64(Fn))
    space = GramSpace(st.SPs, st.SQs, st.ws, xp)
    outer = Fn.form == "outer"
    alpha0 = xp.astype(alpha0, st.SPs.dtype, copy=False)
    a0 = alpha0 / xp.maximum(xp.max(xp.abs(alpha0)), st.tiny)  # a start's scale is free
    # a start with ‖L₀‖ = 0 (e.g. traceless terms) falls back to the weights
    st.a0 = xp.where(xp.sum(a0 * (st.SPs @ a0)) > 0, a0, st.ws)
    # the sign of tr L = Σ x_k tr L_k; outer: tr(g gᵀ) = ‖g‖² = S_P[k, k]^½ (no pass over G)
    st.tl = xp.sqrt(xp.linalg.diagonal(st.SPs)) if outer else xp.astype(Fn._traces("left"), st.SPs.dtype)
    st.f2 = space.f2()  # ‖F̃‖² in scaled units: bounds σ₂
    st.M, st.level = space.matrix(), 0
    squaring_more(Fn, st, squarings)
    return st


def _gram_float64(Fn) -> bool:
    """Whether the array-API Gram routes do their K×K work in float64: below float64 (as the
    numba kernel does), where the namespace has it. The Gram matrices, scaled by their largest
    entries, would otherwise lose the terms of rows far smaller than the largest (entries ~‖g‖⁴:
    rows 10⁸ apart) below the lower precision's range."""
    xp = Fn.xp
    return Fn.dtype != xp.float64 and float64_available(xp)


def _scaled_grams(Fn, st: _SquaringState, float64: bool = False) -> None:
    """``st.SPs, st.SQs, st.ws`` = S_P, S_Q, w over their largest magnitudes ``st.cP, st.cQ,
    st.cw`` (device scalars, no host read), and ``st.tiny``, float's smallest normal number;
    ``float64``: all of them in float64.

    The Gram-space operator multiplies four K-scale quantities (entries of S_P ~ ‖g‖⁴): in
    float32 it would overflow for large layers; scaled, its eigenvector is the same. Divisors
    are bounded below by ``tiny``, one kernel each (no clip: array-api-compat's clip costs
    ~0.3 ms a call on CuPy); the outer form's Gram entries (g_kᵀg_l)² need no ``abs``.
    """
    xp = Fn.xp
    w = xp.astype(Fn.weights, xp.float64) if float64 else Fn.weights
    st.tiny = tiny = xp.full((), xp.finfo(w.dtype).smallest_normal, dtype=w.dtype,
                             device=device_of(w))
    SP, SQ = Fn._gram("left", float64=float64), Fn._gram("right", float64=float64)
    if Fn.form != "outer":
        SP_abs, SQ_abs = xp.abs(SP), xp.abs(SQ)
    else:
        SP_abs, SQ_abs = SP, SQ
    st.cP, st.cQ, st.cw = (xp.maximum(xp.max(S), tiny) for S in (SP_abs, SQ_abs, xp.abs(w)))
    st.SPs, st.SQs, st.ws = SP / st.cP, SQ / st.cQ, w / st.cw


def squaring_more(Fn, st: _SquaringState, squarings: int) -> None:
    """``squarings`` more squarings of ``st.M`` (rescaled to a largest entry of 1), then
    :func:`_squaring_finish`."""
    xp = Fn.xp
    M = st.M
    for _ in range(squarings):
        M = M @ M
        M = M / xp.maximum(xp.max(xp.abs(M)), st.tiny)
    st.M, st.level = M, st.level + squarings
    _squaring_finish(Fn, st)


def _squaring_finish(Fn, st: _SquaringState) -> None:
    """Queue everything the answer for ``x ∝ M⁴a₀`` needs, without a host read.

    :func:`finish_coef` on the device: it cannot serve here, since it reads its norms and
    sign to the host before it forms the factors, and this route queues the factors' products
    before its one read (and, with option ``cuda_graphs``, captures all of it as a graph).

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
    for _ in range(APPLIES):
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


# -- finishing: factors from eigenvectors ----------------------------------------------------------


def negative(L, xp, first: bool = True) -> bool:
    """The sign rule of every returned factor pair ``(L, R)``, flipped together when ``True``:
    the first (K-FOC's) pair has ``tr L ≥ 0``; later pairs of a Kronecker SVD have the entry of
    largest magnitude of ``L`` positive (the first in row-major order on exact ties)."""
    if first:
        return to_float(trace(L, xp)) < 0
    flat = xp.reshape(L, (-1,))
    j = int(to_float(xp.argmax(xp.abs(flat))))
    return to_float(flat[j]) < 0


def psd_sum(Fn) -> bool:
    """Whether ``Fn`` is a sum of PSD terms by its form (outer and conv forms, whose weights are
    non-negative; terms known PSD by construction, ``KronSum._psd_terms``; and sums of such
    parts): its K-FOC factors are then PSD."""
    if Fn.form == "sum":
        return all(psd_sum(P) for P in Fn.parts)
    return Fn.form in ("outer", "conv") or (Fn.form == "terms" and Fn._psd_terms)


@dataclass
class PsdSplit:
    """A symmetric iterate split by its PSD projection: ``sign·x = proj + V diag(d) Vᵀ``,
    ``proj`` PSD, ``d`` (r,) the negative eigenvalues removed and ``V`` (p, r) their
    eigenvectors (to the rounding of one ``eigh``)."""

    proj: Array
    sign: float
    d: Array
    V: Array


def _psd_split(x, xp, strict: bool = False) -> PsdSplit | None:
    """``x`` (symmetric, of either sign: an eigenvector's sign is arbitrary) turned to
    ``tr ≥ 0`` and, when it has eigenvalues below ``−10·d·ε·max|λ|`` (``strict``:
    ``−ε·max|λ|``), split into its PSD projection (every negative eigenvalue set to 0) and the
    part removed; ``None`` when it has none. The projection is the nearest PSD matrix in
    Frobenius norm, never farther from a PSD optimum than ``±x`` (projection onto a convex
    set). A Cholesky factorisation where it shows ``±x`` positive definite
    (:func:`kronsum._accel.positive_definite`), else one ``eigvalsh`` of the ``d × d``
    iterate, and an ``eigh`` when it needs the projection (and one host read of the number of
    negative eigenvalues)."""
    if is_dask_namespace(xp):  # no linalg.eigh: the small d × d iterate in NumPy, wrapped back
        import array_api_compat.numpy as npx

        out = _psd_split(np.asarray(x.compute()), npx, strict)
        if out is not None:
            out.proj, out.d, out.V = xp.asarray(out.proj), xp.asarray(out.d), xp.asarray(out.V)
        return out
    if positive_definite(x, xp):
        return None
    lam = xp.linalg.eigvalsh(x)  # the check alone: eigenvectors only when it fails
    lo, top, hi, tr = host_floats([xp.min(lam), xp.max(lam), xp.max(xp.abs(lam)), xp.sum(lam)])
    if tr < 0:
        lo = -top
    if lo >= -(1 if strict else 10 * x.shape[0]) * float(xp.finfo(x.dtype).eps) * hi:
        return None
    lam, V = xp.linalg.eigh(x)
    sign = -1.0 if tr < 0 else 1.0
    if tr < 0:
        lam = -lam
    neg = lam < 0
    proj = symmetrize((V * xp.where(neg, xp.zeros_like(lam), lam)) @ xp.matrix_transpose(V), xp)
    # the r negative eigenpairs, whatever order eigh returned (one more host read: r)
    r = int(to_float(xp.sum(xp.astype(neg, lam.dtype))))
    idx = xp.argsort(lam)[:r]
    return PsdSplit(proj, sign, xp.take(lam, idx), xp.take(V, idx, axis=1))


def _psd_projection(x, xp, strict: bool = False):
    """The projection of :func:`_psd_split` (``None`` when ``±x`` needs none)."""
    split = _psd_split(x, xp, strict)
    return None if split is None else split.proj


def finish(Fn, side: str, eig: EigenResult, psd: bool = False, strict: bool = False) -> Factors:
    """Factors from a factor-space iterate ``eig.x``: ``L`` (unit), ``R = 𝓡ᵀvec(L)/σ``,
    ``σ = ‖𝓡ᵀvec L‖``, with the sign rule.

    ``side`` says which factor ``eig.x`` is (``"left"``: ``L``; ``"right"``: ``R``, and ``L``
    is its half-step image). ``eig.aux``, the solver's half-step image of ``x``
    (``contract_left(x)`` for side="left", ``contract_right(x)`` for side="right"), replaces
    one contraction: by linearity, and for symmetric F the image of ``x``'s antisymmetric
    rounding is antisymmetric and removed by the symmetrisation of ``R`` below.
    ``eig.image`` (side="right", with ``aux``) is the full application ``contract_left(aux)``,
    which replaces the last contraction too. The side="left" form with ``aux`` also finishes
    an unnormalised pair ``(L, R ∝ 𝓡ᵀvec L)``: ``σ = ‖R‖/‖L‖``.
    ``psd`` (for a :func:`psd_sum` ``Fn``): an iterate with eigenvalues below rounding (a
    lower precision's, or an accuracy-stopped iterate's near a singular optimum) is first
    projected onto the PSD cone (:func:`_psd_split`), so that both factors are PSD to
    rounding: with ``aux``, the projection's half-step is ``aux`` less the image of the removed
    negative part, a contraction of its ``r`` eigenpairs (:meth:`KronSum._contract_eig`, ``r``
    of the factor's ``p`` rows), and without, the contraction of the projection.
    ``strict``: eigenvalues below one ε of the largest are projected (a lower
    precision's answer handed on in a higher one).
    """
    xp = Fn.xp
    x, aux, image = eig.x, eig.aux, eig.image
    moved = 0.0
    if psd and Fn.symmetric:
        split = _psd_split(symmetrize(x, xp), xp, strict)
        if split is not None:
            nd, nx = host_floats([fro_norm(split.d, xp), fro_norm(x, xp)])
            moved = nd / nx if nx > 0 else 0.0  # ‖±x − proj‖ = ‖d‖
            x, image = split.proj, None
            if aux is not None:  # the projection's half-step by linearity: ±x's less the removed part's
                aux = split.sign * aux - Fn._contract_eig(side, split.d, split.V)
    L = x if side == "left" else (Fn.contract_right(x) if aux is None else aux)
    if Fn.symmetric:
        L = symmetrize(L, xp)
    nl = to_float(fro_norm(L, xp))
    require_finite(xp, nl)
    if not nl > 0:
        return zero_answer(Fn)
    L = materialize(L / nl)
    sign = 1.0
    if negative(L, xp):
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
    require_finite(xp, sigma)
    if not sigma > 0:
        return zero_answer(Fn)
    return Factors(L, materialize(v / sigma), sigma, moved=moved)


def finish_coef(Fn, space: GramSpace, eig: EigenResult, stop: Stop, route: str,
                scales=(1.0, 1.0, 1.0), on_host: bool = False) -> Solution:
    """Factors from a Gram-space iterate ``α = eig.x``, in coefficient space, and σ₂.

    ``‖L‖² = αᵀS_Pα``, ``R ∝ Σ β_k R_k`` with ``β = W S_P α`` (:meth:`GramSpace.half`),
    ``‖R‖² = βᵀS_Qβ``, ``tr L = Σ α_k tr L_k``: one host read, then the two weighted Gram
    products give unit factors with the sign rule, without a pass over them. ``scales``
    ``(c_P, c_Q, c_w)`` are the largest magnitudes the space's ``S_P``, ``S_Q``, ``w`` were
    divided by (read in the same transfer). When the solver gave no σ₂ and ``‖F‖² − σ₁²``
    cannot rule out σ₂ = σ₁, the deflated probe estimates it. Quadratic forms beyond the
    range of the space's dtype finish in factor space (:func:`finish`); non-finite values
    raise. ``on_host``: the space's arrays are NumPy arrays the caller computed on the host
    (the numba route), converted rather than counted as host reads.
    """
    xp = Fn.xp
    dt = Fn.dtype
    alpha = eig.x
    # PSD terms with coefficients of one sign give PSD factors by construction; where both signs
    # occur (an iterate near a singular optimum, or terms that repeat a direction, whose
    # coefficients are not unique), the formed factor is checked below
    mixed = psd_sum(Fn) and _both_signs(alpha, xp, on_host)
    MA = space.SP @ alpha
    beta = space.half(alpha, MA)
    tl = xp.astype(Fn._traces("left"), alpha.dtype, copy=False)
    vals = [alpha @ MA, beta @ (space.SQ @ beta), alpha @ tl, *scales]
    vals = [float(v) for v in vals] if on_host else host_floats(vals)
    nls2, nrs2, tr, fP, fQ, fw = vals
    if not math.isfinite(nls2 * nrs2 * tr):
        if not all(math.isfinite(v) for v in (fP, fQ, fw)):
            require_finite(xp, math.nan)
        # σ₁² beyond the range: the factor-space finish with its overflow-safe norms
        fac = finish(Fn, "left", EigenResult(Fn._combine("left", xp.astype(alpha, dt, copy=False)),
                                             0, True, 0.0, None,
                                             aux=Fn._combine("right", xp.astype(beta, dt, copy=False))))
        fac.sigma = fac.sigma * (fw * fP)  # R's coefficients are β / (c_w c_P)
        stop.f2 = stop.f2_abs = None  # its units are out of range too: no ‖F‖² for the caller
        return Solution(fac, eig, route)
    if not (nls2 > 0 and nrs2 > 0):
        if stop.f2_abs is not None and stop.f2_abs > 0:  # terms that are not zero: rounding
            raise MetricBreakdown(
                "the answer's coefficients have no length in the Gram matrices' metric, which "
                "the terms' rounding made indefinite (terms nearly collinear and cancelling)")
        return Solution(zero_answer(Fn), EigenResult(alpha, eig.iterations, True, 0.0, 0.0), route)
    sign = -1.0 if tr < 0 else 1.0
    nls, nrs = math.sqrt(nls2), math.sqrt(nrs2)
    unit = math.sqrt(fw * fw * fQ * fP)  # scaled → true units of σ
    if eig.sigma2 is not None:
        eig.sigma2 = eig.sigma2 * unit
    elif stop.f2 is not None:
        x = alpha / nls
        s2, k = _probe_unless_proven(space, x, space.M(x), nrs2 / nls2, stop.f2,
                                     float(xp.finfo(dt).eps))
        if s2 is not None:
            eig.sigma2, eig.iterations = s2 * unit, eig.iterations + k
    _rescale_f2(stop, unit * unit)  # from here on in the units of F's σ², as the caller's
    L = Fn._combine("left", xp.astype(alpha * (sign / (nls * math.sqrt(fP))), dt, copy=False))
    if _gram_blind(stop, Fn.num_terms, unit * unit * nrs2 / nls2):
        # the Gram entries' rounding can move the coefficient problem far more than its residual
        # shows: the answer is checked and finished on the contractions instead (one
        # application in the working precision)
        return Solution(_verified_finish(Fn, L, stop, eig, mixed), eig, route)
    fac = _psd_finish(Fn, L, eig) if mixed else None
    if fac is not None:
        return Solution(fac, eig, route)
    R = Fn._combine("right", xp.astype(beta * (sign / (nrs * math.sqrt(fQ))), dt, copy=False))
    return Solution(Factors(L, R, unit * nrs / nls), eig, route)


def _rescale_f2(stop: Stop, u2: float) -> None:
    """``stop``'s ``‖F‖²``, its rounding and its terms' magnitudes multiplied by ``u2`` (a Gram
    space's scaled units → those of F's σ²)."""
    if stop.f2 is not None:
        stop.f2, stop.f2_err = stop.f2 * u2, stop.f2_err * u2
    if stop.f2_abs is not None:
        stop.f2_abs = stop.f2_abs * u2


def _verified_finish(Fn, L, stop: Stop, eig: EigenResult, project_left: bool) -> Factors:
    """The factors of a Gram-space answer's formed left factor ``L`` checked on the contractions
    (:func:`verified_left`, which sets ``stop``'s bound; ``stop.f2`` in the units of F's σ²),
    with ``eig``'s residual and convergence updated. For a :func:`psd_sum` both factors are made
    PSD to rounding: ``L`` projected where ``project_left`` and it is indefinite (finished
    again from it), the half-step ``R`` (PSD in exact arithmetic, not where the arithmetic runs
    at a scale far above F's, e.g. conv positions that cancel) made PSD by :func:`psd_factors`,
    the move added to the bound (σ‖ΔR‖ ≤ ‖F‖·‖ΔR‖)."""
    xp = Fn.xp
    fac, res = verified_left(Fn, L, stop, stop.f2, stop.f2_err,
                             None if eig.sigma2 is None else eig.sigma2 * eig.sigma2)
    eig.residual = res
    eig.converged = res <= stop.tol or (stop.accuracy is not None and stop.bound <= stop.accuracy)
    if not psd_sum(Fn) or not fac.sigma > 0:
        return fac
    proj = _psd_finish(Fn, fac.left, eig) if project_left else None
    fac = fac if proj is None else proj
    if Fn.symmetric:
        L, R, sigma, moved = psd_factors(fac.left, symmetrize(fac.right, xp), fac.sigma, xp, "left",
                                         float(xp.finfo(Fn.dtype).eps))
        stop.bound += moved
        fac = Factors(L, R, sigma, fac.notes)
    return fac


def psd_factors(L, R, sigma: float, xp, iterated: str, eps_low: float) -> tuple:
    """Unit factors made PSD to the working precision's rounding, as their inverses need:
    ``(L, R, σ, ‖ΔL‖ + ‖ΔR‖)``, ``σ`` taking the new norms. The ``iterated`` factor (``"left"``
    or ``"right"``; already projected) is projected onto the PSD cone where the working
    precision sees it indefinite; the other, its half-step (PSD in exact arithmetic), is PSD up
    to the rounding ``eps_low`` of the arithmetic that formed it (a lower precision's, or the
    positions' scale of conv blocks whose positions cancel): where a Cholesky factorisation fails it
    is shifted by the least of ``ε_low·10^j·I`` (``j ≤ 3``) that makes it positive definite (a
    move of ``τ√d``; one more factorisation a try), and projected only when none does."""
    moved, out = 0.0, []
    for name, M in (("left", L), ("right", R)):
        P = None
        if name != iterated and not positive_definite(M, xp):
            d = M.shape[0]
            eye = eye_like(d, M, xp)
            for j in range(4):
                tau = eps_low * 10.0 ** j
                if positive_definite(M + tau * eye, xp):
                    P, moved = M + tau * eye, moved + tau * math.sqrt(d)
                    break
        if P is None:
            P = _psd_projection(M, xp)
            if P is not None:
                moved += to_float(fro_norm(M - P, xp))
        if P is not None:
            n = to_float(fro_norm(P, xp))
            M, sigma = P / n, sigma * n
        out.append(M)
    return out[0], out[1], sigma, moved


def psd_to_inverse_tolerance(L, R, sigma: float, xp, rows: int) -> tuple:
    """Unit factors of a sum of PSD terms, each formed as a weighted sum over ``rows`` terms
    (K, or K·T positions), made PSD to the tolerance damped inverses allow (eigenvalues above
    ``−10·d·ε·max|λ|``, :class:`kronsum.KronInverse`): ``(L, R, σ, ‖ΔL‖ + ‖ΔR‖)``. Their
    rounding, up to ``rows·ε``, can exceed that only where ``10·d < rows``; such a factor is
    checked by a Cholesky factorisation (``d³/3``, below the ``rows·d²/2`` that formed it) and
    projected (:func:`_psd_projection`) where it fails beyond the tolerance, ``σ`` taking its
    new norm. Larger factors are returned as they are."""
    moved, out = 0.0, []
    for M in (L, R):
        P = _psd_projection(M, xp) if 10 * M.shape[0] < rows else None
        if P is not None:
            moved += to_float(fro_norm(M - P, xp))
            n = to_float(fro_norm(P, xp))
            M, sigma = P / n, sigma * n
        out.append(M)
    return out[0], out[1], sigma, moved


def _gram_blind(stop: Stop, dim: int, th: float) -> bool:
    """Whether a Gram-space answer of Ritz value ``th`` (in the units of ``stop.f2``) needs
    checking on the contractions (:func:`verified_left`): where the sum's terms cancel (their
    magnitudes exceed ``2‖F‖²``: the Gram entries round at the terms' scale, not F's), or where
    F is so nearly a Kronecker product that ``‖F‖² − θ`` (the optimal error², what separates the
    coefficients' directions) is within the Gram matrices' rounding ``stop.f2_err`` of zero:
    those matrices are products of F's data, so they resolve directions only to about the
    square root of their rounding, and a coefficient space of ``dim`` > 1 directions can then
    hold an answer whose residual in that metric is zero but whose error gap is not."""
    if stop.f2_abs is not None and stop.f2_abs > 2 * abs(stop.f2):
        return True
    return dim > 1 and stop.f2 is not None and stop.f2 - th <= stop.f2_err


def verified_left(Fn, L, stop: Stop, f2: float, f2_err: float, th2: float | None) -> tuple:
    """``(factors, relative residual)`` from a left factor ``L`` (with the sign rule) found by
    a solve whose arithmetic F's cancelling terms may have spoiled (the Gram route of a signed
    sum), checked on the contractions in the working precision: ``L`` normalised as formed,
    ``R = 𝓡ᵀvec L/σ`` with ``σ = ‖𝓡ᵀvec L‖`` (the best right factor for ``L``), and
    ``stop``'s bound from ``L``'s residual ``‖𝓡𝓡ᵀvec L − σ²L‖`` with the contractions' own
    rounding (``stop.op_scale``), ``‖F‖² = f2`` (error ``f2_err``) and ``th2`` (σ₂², an
    estimate) in the units of the contractions."""
    xp = Fn.xp
    nl = to_float(fro_norm(L, xp))  # unit in the solve's arithmetic, perhaps not as formed
    require_finite(xp, nl)
    if not nl > 0:
        stop.bound, stop.certified = 0.0 if f2 == 0 else math.inf, f2 == 0
        return zero_answer(Fn), 0.0
    L = materialize(L / nl)
    half = Fn.contract_left(L)
    if Fn.symmetric:
        half = symmetrize(half, xp)
    # σ = ‖half‖ and the residual σ‖𝓡𝓡ᵀL/σ − σL‖ from the unit half-step, so that neither
    # θ = σ² nor 𝓡𝓡ᵀL (of order θ) is formed in the working precision, where a θ below its
    # range (float32 blocks of widely scaled rows) would read as a zero sum
    sigma = to_float(fro_norm(half, xp))
    require_finite(xp, sigma)
    if not sigma > 0:
        stop.bound, stop.certified = 0.0 if f2 == 0 else math.inf, f2 == 0
        return zero_answer(Fn), 0.0
    R = materialize(half / sigma)
    back = Fn.contract_right(R)
    if Fn.symmetric:
        back = symmetrize(back, xp)
    th = sigma * sigma
    r = to_float(fro_norm(back - sigma * L, xp)) * sigma
    stop.bound, stop.certified = gap_bound(th, r, -1.0 if th2 is None else th2, 0.0, f2, f2_err,
                                           stop.op_error(th), stop.th_rel * th)
    return Factors(L, R, sigma), r / th


def _both_signs(alpha, xp, on_host: bool) -> bool:
    """Whether the coefficient vector ``alpha`` has entries of both signs (two reductions)."""
    if on_host:  # a NumPy array the caller computed on the host: its own methods
        return float(alpha.min()) < 0 < float(alpha.max())
    lo, hi = host_floats([xp.min(alpha), xp.max(alpha)])
    return lo < 0 < hi


def _psd_finish(Fn, L, eig: EigenResult) -> Factors | None:
    """The factors from the formed left factor ``L`` of a :func:`psd_sum` ``Fn``, projected onto
    the PSD cone (:func:`_psd_projection`) with its half-step, when ``L`` has eigenvalues below
    rounding; ``None`` when it has none. The optimum's factors are PSD; an iterate stopped at
    an error-gap accuracy has an angle of about its square root, which shows as negative
    eigenvalues where the optimum's are near zero (a factor of rank below its size)."""
    if not Fn.symmetric:
        return None
    proj = _psd_projection(symmetrize(L, Fn.xp), Fn.xp)
    if proj is None:
        return None
    return finish(Fn, "left", EigenResult(proj, eig.iterations, eig.converged, eig.residual, eig.sigma2))


def finish_block(Fn, side: str, space: Space, vecs, rank: int, rng, unit_terms, kind: str):
    """``(lefts, rights, sigmas, notes)``: the rank-r finish, factors, singular values and
    signs from :func:`block_lanczos`'s basis-side Ritz vectors ``vecs`` (``side``: ``"gram"``,
    ``"left"`` or ``"right"``, the factor they stand for).

    Each vector ``v`` of the solver's space gives a basis-side matrix ``B`` (``v`` itself, or
    ``Σ_k v_k L_k/‖L_k‖`` for the Gram space, ``unit_terms = (1/‖L_k‖, 1/‖R_k‖)``) and the
    other side ``𝓡ᵀB`` from the space's half-step (:meth:`kronsum._eigen.Space.half`). The
    basis-side matrices are orthonormalised in the factor space and a last Rayleigh–Ritz
    step, the SVD of the small projection ``𝓡ᵀ[B_1 … B_k]``, gives the singular values
    ``σ_i = ‖𝓡ᵀB_i‖`` and rotates the pairs (per parity class for symmetric F whose terms are
    not symmetric: symmetric and antisymmetric singular vectors never mix). Signs follow
    :func:`kronsum._eigen.negative`.
    """
    xp = Fn.xp
    eps = float(xp.finfo(Fn.dtype).eps)
    if side != "gram" and len(vecs) < rank:
        # the solver exhausted its space with fewer vectors: the complement joins the
        # Rayleigh–Ritz step with its own half-steps, so that the energy the solver rounded away
        # is not lost (at r = min(m², n²) the basis spans every factor and the answer is F)
        d = Fn.m if side == "left" else Fn.n
        vecs = list(vecs) + _complete(list(vecs), rank - len(vecs), d, kind in ("sym", "parity"),
                                      rng, xp, Fn.weights)
    Bs, Os = [], []
    for v in vecs:
        if side == "gram":
            dl, dr = unit_terms
            B = Fn._combine("left", v * dl)
            O = Fn._combine("right", dr * space.half(v))
        else:
            B, O = v, space.half(v)
        Bs.append(B)
        Os.append(O)
    classes: dict = {}
    for B, O in zip(Bs, Os):
        if kind == "sym":
            B, O, cls = symmetrize(B, xp), symmetrize(O, xp), 0
        elif kind == "parity":
            Bsym, Banti = symmetrize(B, xp), antisymmetrize(B, xp)  # each exact in floating point
            if to_float(fro_norm(Bsym, xp)) >= to_float(fro_norm(Banti, xp)):
                B, O, cls = Bsym, symmetrize(O, xp), 0
            else:
                B, O, cls = Banti, antisymmetrize(O, xp), 1
        else:
            cls = 0
        classes.setdefault(cls, []).append((B, O))
    basis, other, sig = [], [], []
    for pairs in classes.values():
        # orthonormalise the basis side (twice), carrying the other side along linearly
        QB, QO = [], []
        for B, O in pairs:
            nb0 = to_float(fro_norm(B, xp))
            if not nb0 > 0:
                continue
            B, O = B / nb0, O / nb0
            for _ in range(2):
                for qb, qo in zip(QB, QO):
                    c = xp.sum(B * qb)
                    B, O = B - c * qb, O - c * qo
            nb = to_float(fro_norm(B, xp))
            if nb > 1e3 * eps:
                QB.append(B / nb)
                QO.append(O / nb)
        if not QB:
            continue
        # the SVD of the projection M = [𝓡ᵀB_1 … 𝓡ᵀB_k] from a Householder QR, M = QR, and the
        # SVD of the small R = PΣWᵀ: 𝓡ᵀ(Σ_i W_ij B_i) = σ_j (QP)_j. Unlike the eigenvalues of
        # MᵀM, σ_j is then accurate to ε·σ₁ (not √(ε)·σ₁), and so is the rotation of the B_i
        k = len(QB)
        M = xp.stack([xp.reshape(o, (-1,)) for o in QO], axis=1)
        if is_dask_namespace(xp):  # tall-and-skinny QR wants one chunk along the columns
            M = M.rechunk({0: "auto", 1: -1})
        R = np.asarray(host_vector(xp.reshape(xp.linalg.qr(M)[1], (-1,)))).reshape(k, k)
        _, svals, Wt = np.linalg.svd(R)
        for j in range(k):
            col = [float(c) for c in Wt[j, :]]
            B = col[0] * QB[0]
            O = col[0] * QO[0]
            for cj, qb, qo in zip(col[1:], QB[1:], QO[1:]):
                B, O = B + cj * qb, O + cj * qo
            B = B / fro_norm(B, xp)
            no = fro_norm(O, xp)
            basis.append(B)
            sig.append(xp.asarray(float(svals[j]), dtype=Fn.dtype, device=Fn.device))
            other.append(O / no if bool(no > 0) and svals[j] > 0 else None)
    order = sorted(range(len(basis)), key=lambda i: -to_float(sig[i]))[:rank]
    basis = [basis[i] for i in order]
    other = [other[i] for i in order]
    sig = [sig[i] for i in order]
    sym_pad = kind in ("sym", "parity")
    notes = []
    # the other side, in σ-descending order, made exactly orthonormal: for small σ_i its
    # direction carries an error ~ ε σ₁/σ_i, so the correction moves σ_i L_i ⊗ R_i by ~ε σ₁ only;
    # a direction lost in rounding (σ_i at the level of ε σ₁) becomes a σ = 0 term
    zero = xp.zeros((), dtype=Fn.dtype, device=Fn.device)
    kept: list = []
    tiny = 1e3 * eps * max([to_float(v) for v in sig], default=0.0)  # σ at the rounding floor
    for i, O in enumerate(other):
        if O is None:
            continue
        if not to_float(sig[i]) > tiny:
            other[i], sig[i] = None, zero
            continue
        for _ in range(2):
            for q in kept:
                O = O - xp.sum(O * q) * q
        no = to_float(fro_norm(O, xp))
        if no > 1e-3:
            other[i] = O / no
            kept.append(other[i])
        else:
            other[i], sig[i] = None, zero
    order = sorted(range(len(basis)), key=lambda i: (other[i] is None, -to_float(sig[i])))
    basis = [basis[i] for i in order]
    other = [other[i] for i in order]
    sig = [sig[i] for i in order]
    found = len(basis)
    dB = Fn.m if side in ("gram", "left") else Fn.n
    dO = Fn.n if side in ("gram", "left") else Fn.m
    if found < rank:
        basis = basis + _complete(basis, rank - found, dB, sym_pad, rng, xp, Fn.weights)
        other = other + [None] * (rank - found)
        sig = sig + [zero] * (rank - found)
    nonzero = sum(1 for o in other if o is not None)
    if nonzero < rank:
        notes.append(f"the rearrangement has rank {nonzero} < {rank}: terms {nonzero + 1}..{rank} "
                     "have sigma = 0 and arbitrary orthonormal factors")
        fill = iter(_complete([o for o in other if o is not None], rank - nonzero, dO, sym_pad, rng,
                              xp, Fn.weights))
        other = [o if o is not None else next(fill) for o in other]
        sig = [s if o is not None else zero for s, o in zip(sig, other)]
    if side in ("gram", "left"):
        Ls, Rs = basis, other
    else:
        Ls, Rs = other, basis
    for i in range(rank):
        if negative(Ls[i], xp, first=i == 0):
            Ls[i], Rs[i] = -Ls[i], -Rs[i]
    return Ls, Rs, sig, tuple(notes)


def antisymmetrize(x: Array, xp: Any) -> Array:
    """``(x − xᵀ) / 2``: exactly antisymmetric in floating point (``x − sym(x)`` is not)."""
    return (x - xp.matrix_transpose(x)) / 2


def _complete(found, count: int, d: int, symmetric: bool, rng, xp, ref):
    """``count`` unit (d, d) matrices orthonormal to ``found`` and each other.

    With ``symmetric``, symmetric candidates are tried first, then antisymmetric ones (the two
    together span every (d, d) matrix), so that symmetric sums get factors of a definite parity.
    """
    out: list = []
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > 60 * (count + 1):  # pragma: no cover - a random draw never fails this often
            raise RuntimeError("could not complete an orthonormal set of factors")
        Z = rng.standard_normal((d, d))
        if symmetric:
            Z = Z + Z.T if tries % 6 < 3 else Z - Z.T
        nz = np.linalg.norm(Z)
        if not nz > 0:
            continue
        v = xp.asarray(Z / nz, dtype=ref.dtype, device=device_of(ref))
        for _ in range(2):
            for q in list(found) + out:
                v = v - xp.sum(v * q) * q
        nv = fro_norm(v, xp)
        if to_float(nv) > 1e-4:
            out.append(materialize(v / nv))
            tries = 0
    return out


def require_finite(xp, value) -> None:
    """A NaN/inf iterate means non-finite statistics (passed with check_finite=False): say so
    rather than mistaking it for a zero sum."""
    if not (math.isfinite(value) if isinstance(value, float) else all_finite(xp, value)):
        raise ValueError(
            "kfoc met non-finite values: the statistics contain NaN or infinity (the constructors' "
            "check_finite=True would have said which array) or their products overflow the dtype"
        )


def zero_answer(Fn) -> Factors:
    """The answer for a zero sum: identity-shaped unit factors, ``σ = 0``, and a note."""
    xp = Fn.xp
    Il = eye_like(Fn.m, Fn.weights, xp)
    Ir = eye_like(Fn.n, Fn.weights, xp)
    zero = xp.zeros((), dtype=Fn.dtype, device=device_of(Fn.weights))
    return Factors(Il / math.sqrt(Fn.m), Ir / math.sqrt(Fn.n), zero,
                   ("zero sum (sigma1 = 0): the estimate is zero",))
