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

Stopping rule (iterative solvers, :class:`kronsum._eigen.Stop`): by default, as soon as the error gap
``(‖F − L⊗R‖ − optimal error)/‖F‖`` is bounded by ``accuracy`` (:mod:`kronsum._stopping`: Temple's
inequality with ``‖F‖²`` where the solver has it, certified, or with the second Ritz value, an
estimate), or the relative eigen-residual ``‖𝓡𝓡ᵀu − θu‖ / θ ≤ tol`` of the normalised iterate
``u``. The residual bounds the angle to the optimum by ``tol / (1 − σ2²/σ1²)``; the error is
second order in that angle, which is why the error rule stops earlier. A rule on the change of
σ would stop far too early, since σ's error is the square of the angle's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

from ._accel import TRMM_TIME, numba_enabled, row_sq_norms, syrk_available, trmm_pays, via_numpy_on_cpu
from ._closed_forms import _new_kron, _require_sum, kfac
from ._compat import Array, counted, dtype_name, eye_like, fro_norm, host_floats, is_dask_namespace, symmetrize, to_float
from ._config import _options
from ._eigen import (Factors, LowPrecisionCopy, MetricBreakdown, Solution, Stop, aux_fits, contraction_space, conv_gram_solve, deflated_top, finish, gram_solve,
                     _widen, psd_factors, psd_sum, psd_to_inverse_tolerance,
                     lanczos, lanczos_two_precision,
                     power, random_like)
from ._eigen import default_accuracy as _default_accuracy
from ._eigen import default_tol as _default_tol
from ._kron import Kron, KronInfo
from ._sum import KronSum, conv_contraction_costs, times_scale
from ._validation import check_in_range, check_int, check_real, check_seed, underflow_notes

__all__ = ["kfoc"]

_METHODS = ("auto", "gram", "lanczos", "power")
_INITS = ("auto", "tkfac", "kfac", "identity", "random")
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
_SEC_PER_CONTRACTION_MAC = 6e-11
_SEC_PER_GRAM_ENTRY = 8e-9
_SEC_PER_GRAM_ENTRY_STEP = 1.6e-9
_SEC_PER_CALL = 5e-5  # Python and dispatch per contraction, or per call of the Gram solver
_SEC_PER_GRAM_STEP_CALL = 2e-5  # per Lanczos step on K-vectors outside the numba kernel
_SEC_PER_BLOCK_MAC = 2e-10  # per multiply-add of the conv Gram space's batched T×T products
_CONV_GRAM_MAX_ROWS = 8192  # K·T above which the conv form's KT×KT Gram matrices do not pay
_EXPECTED_APPLICATIONS = 10  # the median over the benchmark's data families is 6-9


def _costs(F: KronSum) -> dict:
    """Modelled seconds of the Gram and the Lanczos solver on ``F`` (outer/terms parts, or the
    conv form)."""
    return dict(zip(("gram", "lanczos"), _modelled(_cost_key(F))))


def _cost_key(F: KronSum) -> tuple:
    """Everything the cost model reads of ``F`` and the options, as a hashable key."""
    xp = F.xp
    parts = tuple((P.num_terms, P.form) for P in (F.parts if F.form == "sum" else (F,)))
    rows = F.num_terms * (F.num_positions if F.form == "conv" else 1)
    return (F.form, parts, F.num_terms, F.num_positions, F.m, F.n, F.dtype == xp.float32,
            _float32_iterations(F), numba_enabled(xp, F.weights), syrk_available(xp),
            F.form in ("outer", "conv") and trmm_pays(rows, F.m, xp),
            F.form in ("outer", "conv") and trmm_pays(rows, F.n, xp), F._per_sample_pays())


@functools.lru_cache(maxsize=256)
def _modelled(key: tuple) -> tuple[float, float]:
    """``(gram, lanczos)`` modelled seconds for a :func:`_cost_key` (a pure function of it,
    cached: layers of one network repeat their shapes at every refresh)."""
    form, parts, K, T, m, n, f32, f32_iterations, numba, syrk, trmm_m, trmm_n, per_sample = key
    if form == "conv":
        return _conv_costs(K, T, m, n, f32 or f32_iterations, syrk, (trmm_m, trmm_n), per_sample)
    # the two Gram matrices: outer × outer blocks from the statistics, the others from the terms
    build = sum(Ki * Kj * ((m + n) if fi == fj == "outer" else (m * m + n * n))
                for Ki, fi in parts for Kj, fj in parts) / 2
    its = _EXPECTED_APPLICATIONS
    finish = K * (m * m + n * n)  # the two weighted Gram products of the factors
    cached = min(1.0, 0.35 + 0.65 * K / 2000)  # K×K matrices within the caches cost less per entry
    gram = ((build + finish) * _SEC_PER_GEMM_MAC
            + K * K * cached * (_SEC_PER_GRAM_ENTRY + its * _SEC_PER_GRAM_ENTRY_STEP))
    # a contraction: K quadratic forms on one side (a gemm, or a trmm at TRMM_TIME of one),
    # one weighted Gram product (a syrk: half a gemm) on the other; the two contractions' mean
    fm, fn = (TRMM_TIME if trmm_m else 1.0), (TRMM_TIME if trmm_n else 1.0)
    contraction = K * (m * m * (fm + 0.5) + n * n * (fn + 0.5)) / 2
    lanczos = (2 * its + 2) * contraction * _SEC_PER_CONTRACTION_MAC
    if f32:  # float32 halves the products; the numba Gram route is float64
        lanczos /= 2
        gram -= (build + finish) * _SEC_PER_GEMM_MAC / 2
    elif f32_iterations:  # float64 inputs, Lanczos iterating on a float32 copy
        lanczos /= 2
    gram += _SEC_PER_CALL + (0 if numba else its * _SEC_PER_GRAM_STEP_CALL)
    lanczos += (2 * its + 2) * _SEC_PER_CALL
    return gram, lanczos


def _conv_costs(K: int, T: int, m: int, n: int, f32_iterations: bool, syrk: bool,
                trmm: tuple[bool, bool] = (False, False), per_sample: bool = False) -> tuple[float, float]:
    """The conv form: the Gram solver on per-sample ``T × T`` coefficients (its two ``KT × KT``
    Gram matrices, two batched block products of ``K²T³`` per application, two weighted Gram
    products of ``KT`` rows to finish) against Lanczos on the contractions (each the cheapest
    association of :meth:`KronSum.contract_left`; float32 iterations halve them). ``trmm``:
    whether the (m, m) and the (n, n) factor's products per position go through ``trmm``;
    ``per_sample``: whether the solve holds ``X_k = G_kᵀA_k`` (formed once, ``KTmn``)."""
    its = _EXPECTED_APPLICATIONS
    rows = K * T
    gram = ((rows * rows * (m + n) / 2 + rows * (m * m + n * n) / 2) * _SEC_PER_GEMM_MAC
            + (its + 2) * 4 * K * K * T ** 3 * _SEC_PER_BLOCK_MAC + (its + 2) * 2 * _SEC_PER_CALL)

    def contraction(p, q, trmm_p):  # Σ_k Y_kᵀ M Y_k from side p to side q, the cheapest association
        return K * min(conv_contraction_costs(K, T, p, q, syrk=syrk, trmm=trmm_p, per_sample=per_sample).values())

    lanczos = ((its + 1) * (contraction(m, n, trmm[0]) + contraction(n, m, trmm[1]))
               + (K * T * m * n if per_sample else 0)) * _SEC_PER_CONTRACTION_MAC
    if f32_iterations:
        lanczos /= 2
    lanczos += (2 * its + 2) * _SEC_PER_CALL
    return gram, lanczos


def choose_method(F: KronSum, method: str = "auto", *, explain: bool = False) -> str | MethodChoice:
    """The solver :func:`kfoc` uses for ``F`` with ``method``; the rule of ``method="auto"``.

    ``"gram"`` for the outer and terms forms and sums whose parts all have those forms (e.g.
    K-FOC_running's previous estimate plus a batch) when a cost model says it is cheaper than
    ``"lanczos"``, and K ≤ 8192 (the Gram matrices take 2K² numbers); for the conv form the
    same comparison with its Gram solver on per-sample ``T × T`` coefficients (``K·T ≤ 8192``:
    few samples and positions beside the layer's sizes, as in a CNN's deep layers);
    ``"lanczos"`` otherwise, for a sum with conv parts and for Dask arrays (chunked along K,
    where a K×K matrix does not pay). A conv part of one position (T = 1) is an outer part
    here.

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
        Return a :class:`~kronsum.MethodChoice` (method, reason, modelled costs) instead of the name.

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
    return _choose(F, method, explain)


def _choose(F: KronSum, method: str, explain: bool) -> str | MethodChoice:
    """:func:`choose_method`: the name, or with ``explain`` the :class:`MethodChoice` (whose
    reason is only put into words then)."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    F, given = F._outer_positions(), F
    conv = F.form == "conv"

    def out(name, reason, costs=None):
        if not explain:
            return name
        return MethodChoice(name, reason() if callable(reason) else reason, costs or {})

    if method == "gram":
        if not (F._gram_able() or conv):
            raise ValueError(
                "method='gram' needs the outer, terms or conv form, or a sum of outer/terms "
                "parts; use 'lanczos' for a sum with conv parts"
            )
        if is_dask_namespace(F.xp):
            raise ValueError("method='gram' needs linalg.eigh, which Dask arrays lack; use 'lanczos'")
        return out(method, "requested")
    if method != "auto":
        return out(method, "requested")
    if not (F._gram_able() or conv):
        return out("lanczos", "a sum with conv parts (T > 1 positions) has no Gram solver")
    if is_dask_namespace(F.xp):
        return out("lanczos", "Dask arrays: chunked along K, a K×K Gram matrix does not pay")
    costs = _costs(F)

    def text():
        note = " (conv parts with T = 1 taken as outer)" if F is not given else ""
        return f"modelled cost: gram {costs['gram']:.2g} s, lanczos {costs['lanczos']:.2g} s{note}"

    if conv and F.num_terms * F.num_positions > _CONV_GRAM_MAX_ROWS:
        return out("lanczos", lambda: f"K·T = {F.num_terms * F.num_positions} > "
                                      f"{_CONV_GRAM_MAX_ROWS}: the conv form's Gram matrices would "
                                      f"take 2(KT)² numbers; {text()}", costs)
    if not conv and F.num_terms > 8192:
        return out("lanczos", lambda: f"K = {F.num_terms} > 8192: the Gram matrices would take 2K² "
                                      f"numbers; {text()}", costs)
    return out("gram" if costs["gram"] <= costs["lanczos"] else "lanczos", text, costs)


@counted
@via_numpy_on_cpu
def kfoc(
    F: KronSum,
    *,
    method: str = "auto",
    tol: float | None = None,
    max_iter: int | None = None,
    init: str | Kron = "auto",
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
        to about ``√accuracy``, the error to ``accuracy``. The bound is **certified** when
        the solver knows ``‖F‖²`` (the Gram solver; Lanczos where ``‖F‖²`` costs at most one
        application, e.g. conv blocks with few samples) and K-FOC explains more than half of
        it, and an estimate otherwise: see ``info.error_gap_bound`` and
        ``info.error_gap_certified``, and docs/kfoc.md for the inequalities. The power
        method has no second Ritz value and stops on ``tol`` alone. For large float64 blocks
        Lanczos iterates on a float32 copy; that solve's own answer is returned, finished in
        float32 (a note says so), when its bound — with the copy's distance from F (from the
        inputs' magnitudes) and float32's arithmetic as errors of the operator — meets
        ``accuracy``: at a loose ``accuracy`` (an optimiser's 1e-4), and at a tighter one
        where the float64 check could not certify its bound either (no ``‖F‖²``, or K-FOC
        explains at most half of it; not for the conv form, whose float32 contractions save
        too little). Otherwise it is checked and finished in float64. A conv block
        whose positions cancel within each sample (``Σ_t g_t a_tᵀ`` far below
        ``Σ_t ‖g_t‖‖a_t‖``) is solved again with that rounding in the bound, in float64 for
        lower-precision inputs where the bound misses ``accuracy`` (a note says so).
    max_iter : int, optional
        Most operator applications (each = both contractions, the cost of one iteration of
        the paper's Algorithm 1; the Gram routes' checks of an estimate count too). Default
        500 (``lanczos``), 5000 (``power``).
    init : {"auto", "tkfac", "kfac", "identity", "random"} or Kron
        Starting factor of the iterative solvers. ``"tkfac"`` starts from TKFAC's factor,
        itself one half-step from the identity; ``"random"`` uses ``seed``; a :class:`Kron`
        (e.g. the previous estimate) warm-starts from its factors. ``"auto"`` (default) is
        ``"tkfac"``, except on the contraction solvers for an outer-form block whose few
        largest samples carry at least 15/16 of ``S = Σ_k |w_k| ‖g_k‖²‖a_k‖²`` (heavy-tailed
        per-sample magnitudes): there it starts from the K-FOC factors of those samples alone
        (at most 512 of them, by the Gram solver, for at most a sixteenth of one
        application's cost), which the other terms move by at most their share of ``S``
        (``info.notes`` says so).
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
        on NumPy, to rounding where the weighted Gram products are GEMMs). For the outer and
        conv forms (and sums of them), whose terms are PSD, both factors are PSD to rounding:
        an iterate stopped at ``accuracy`` near a singular optimal factor is projected onto
        the PSD cone first (see docs/kfoc.md). The optimum of any sum of PSD terms with
        non-negative weights is PSD; other solves of such a ``terms`` sum reach it to
        about ``√accuracy``.
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

    Cost: ``gram`` O(K²(m + n) + K³ + K(m² + n²)) for the outer form, O((KT)²(m + n) +
    K²T³ per application + KT(m² + n²)) for the conv form; ``lanczos`` and
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
    auto, tol_given = method == "auto", tol
    method = choose_method(F, method)
    xp = F.xp
    # the user's options are checked; the defaults are known to be valid floats
    if accuracy is not None:
        accuracy = check_real(accuracy, "accuracy", positive=True)
    elif tol is None:
        accuracy = _default_accuracy(xp, F.dtype)
    tol = _default_tol(xp, F.dtype) if tol is None else check_real(tol, "tol", positive=True)
    if max_iter is None:
        max_iter = 5000 if method == "power" else 500
    else:
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
        out = kfoc(F.astype(xp.float64), method="auto" if auto else method, tol=tol_given, max_iter=max_iter,
                   init=init, seed=seed, accuracy=accuracy)
        check_in_range(out.info.sigma1, "kfoc's scale σ₁ (the largest singular value of 𝓡(F))", xp, F.dtype)
        info = out.info
        if info.error_gap_bound is not None:  # the cast rounds each factor and the scale: 3u·σ₁
            info = replace(info, error_gap_bound=info.error_gap_bound + 1.5 * float(xp.finfo(F.dtype).eps))
        return _new_kron(xp.astype(out.left, F.dtype), xp.astype(out.right, F.dtype),
                         xp.astype(out.scale, F.dtype), info, xp)
    Fn, (cw, cl, cr) = F.normalized()
    Fn = Fn.persisted()  # Dask: inputs computed once, each iteration one map-reduce
    c = cw * (cl * cr)
    stop = _stop(Fn, tol, accuracy)
    requested = "auto" if auto else method
    if method == "gram":
        try:
            if Fn.form == "conv":
                sol = conv_gram_solve(Fn, _conv_gram_start(Fn, init), stop, max_iter, seed)
            else:
                sol = gram_solve(Fn, _gram_start(Fn, init, seed), stop, max_iter)
        except MetricBreakdown as exc:
            if not auto:
                raise ValueError(f"kfoc's Gram solver broke down: {exc}; use method='lanczos' "
                                 "or precision='float64'") from None
            sol, stop = _lanczos_instead(Fn, init, seed, tol, accuracy, max_iter,
                                         f"the Gram route broke down ({exc})")
    else:
        sol = _solve_factors(Fn, method, init, seed, stop, max_iter)
    if (auto and sol.route.startswith("gram") and stop.accuracy is not None
            and stop.bound is not None and not stop.bound <= stop.accuracy):
        # the sum's terms cancel, or F is nearly a Kronecker product, beyond what the Gram
        # route's rounding can resolve (its answer, checked on the contractions, misses the
        # accuracy): Lanczos on the contractions, started from that answer, whose rounding
        # stays at the scale of the terms (or of F) once rather than twice
        if stop.f2_abs is not None and stop.f2 is not None and stop.f2_abs > 2 * abs(stop.f2):
            why = (f"the terms cancel (the sum of their magnitudes is "
                   f"{stop.f2_abs / stop.f2 if stop.f2 > 0 else math.inf:.3g} times ‖F‖²)")
        else:
            why = "F is nearly a Kronecker product (its optimal error is within the Gram matrices' rounding)"
        f = sol.factors
        start = Kron(f.left, f.right, 1.0) if f.sigma > 0 else init
        new_sol, new_stop = _lanczos_instead(
            Fn, start, seed, tol, accuracy, max_iter,
            f"{why}: the Gram route's answer had an error-gap bound of {stop.bound:.2g}",
            None if stop.f2 is None else (stop.f2, stop.f2_err))
        new_bound = math.inf if new_stop.bound is None else new_stop.bound
        if new_bound <= stop.bound:
            sol, stop = new_sol, new_stop
        else:  # Lanczos bounded its answer no better: the Gram route's answer, with its bound
            sol.factors.notes = sol.factors.notes + (
                f"{why}: Lanczos on the contractions bounded its answer by only "
                f"{new_bound:.2g}; the Gram route's answer is returned",)
    if stop.op_scale == 0:
        op_scale = _positions_cancel(Fn, sol)
        if op_scale > 0:
            sol, stop = _positions_resolve(Fn, sol, requested, init, seed, tol, accuracy,
                                           max_iter, op_scale)
    L, R, sigma, notes = sol.factors.left, sol.factors.right, sol.factors.sigma, sol.factors.notes
    sig1 = to_float(sigma)
    if psd_sum(Fn) and sig1 > 0:
        # small factors formed over many terms: PSD to what their inverses allow
        L, R, sig1, moved = psd_to_inverse_tolerance(L, R, sig1, xp, Fn.num_terms * Fn.num_positions)
        if moved > 0:
            sigma = sig1
            _widen(stop, sol.eig, moved)
    its, conv, res, s2 = sol.eig.iterations, sol.eig.converged, sol.eig.residual, sol.eig.sigma2
    method = sol.route
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
        # residual is below the breakdown threshold 64·ε (relative), and Temple's inequality
        # with the probe's σ₂ (an estimate) bounds the gap
        stop.met(sig1 * sig1, 64 * float(xp.finfo(Fn.dtype).eps), None if s2 is None else s2 * s2)
    if (precision == "input" and F.dtype != xp.float64 and stop.op_scale > 0
            and stop.accuracy is not None and not stop.bound <= stop.accuracy):
        # terms that cancel, in a precision whose rounding at the terms' scale hides F: the
        # same solve in float64 (what precision="float64" does)
        out = kfoc(F, method="auto" if auto else requested, tol=tol_given, max_iter=max_iter,
                   init=init, seed=seed, precision="float64", accuracy=accuracy)
        out.info = replace(out.info, notes=out.info.notes + (
            f"the terms cancel and {dtype_name(xp, F.dtype)} arithmetic bounded the error gap by only "
            f"{stop.bound:.2g} (accuracy {accuracy:.2g}): solved in float64",))
        return out
    bound = stop.bound
    if sig1 > 0:
        # the bound is the solve's; the factors and scale as stored round by u each (3u·σ₁,
        # below float64), and forming them rounds too: never below 4ε of the working precision
        eps = float(xp.finfo(F.dtype).eps)
        if F.dtype != xp.float64 and not sol.eig.low:
            bound = bound + 1.5 * eps
        bound = max(bound, 4 * eps)
    info = dict(method=f"kfoc/{method}", iterations=its, converged=conv, residual=res,
                error_gap_bound=bound, error_gap_certified=stop.certified)
    if not conv:
        rule = f"tol {tol:.3g}" + ("" if accuracy is None else f" or an error-gap bound ≤ {accuracy:.3g}")
        notes = notes + (f"not converged: residual {res:.3g}, not below {rule} after {its} applications",)
    tie_eps = xp.finfo(xp.float32 if sol.eig.low else F.dtype).eps  # the precision σ's came in
    if s2 is not None and sig1 > 0 and s2 >= sig1 * (1 - math.sqrt(tie_eps)):
        notes = notes + ("sigma1 == sigma2 to working precision: the optimum is not unique; "
                         "one optimal pair is returned",)
    notes = notes + underflow_notes(sig1, c, "sigma1", xp, F.dtype)
    return _new_kron(L, R, times_scale(sigma, c), KronInfo(
        sigma1=sig1 * c, sigma2=None if s2 is None else s2 * c, notes=notes, **info), xp)


# -- set-up: starts and the factor-space solve -----------------------------------------------


def _lanczos_instead(Fn: KronSum, init, seed, tol: float, accuracy: float | None,
                     max_iter: int, why: str, f2: tuple | None = None) -> tuple:
    """``(solution, stop)`` of Lanczos on the contractions in place of the Gram route's answer
    (from ``init``, e.g. that answer), with ``why`` in its notes; ``f2``: ``(‖F‖², its
    rounding)`` in the units of F's σ² where the Gram route computed it (it certifies)."""
    stop = _stop(Fn, tol, accuracy)
    if f2 is not None:
        stop.f2, stop.f2_err = f2
    sol = _solve_factors(Fn, "lanczos", init, seed, stop, max_iter)
    sol.factors.notes = sol.factors.notes + (f"{why}: solved by Lanczos on the contractions",)
    return sol, stop


# a conv part's positions cancel within its samples when the magnitude their products round at,
# S' (:meth:`KronSum._positions_scale`), exceeds this many times T·tr F: positions that cancel no
# more than independent ones (‖Σ_t g_t a_tᵀ‖² ≈ Σ_t ‖g_t‖²‖a_t‖²) have S' ≤ T·tr F (measured
# S'/(T·tr F) = 0.02–1.0 on the benchmark's conv families and ResNet-18's blocks)
_POSITIONS_CANCEL = 4.0


def positions_cancel(Fn: KronSum, sigma: float, sigma_eps: float | None) -> bool:
    """Whether ``Fn``'s conv parts' positions cancel within a sample (per-sample matrices
    ``Σ_t g_t a_tᵀ`` far below ``Σ_t ‖g_t‖‖a_t‖``: ``S' > 4·T·tr F``, :data:`_POSITIONS_CANCEL`),
    so that the contractions round at the positions' scale ``S'``, not at F's; False for sums
    without conv parts.

    ``tr F ≤ √(mn)·σ₁`` (the identity's Rayleigh quotient), so ``sigma``, a σ₁ computed on the
    contractions with unit roundoff ``sigma_eps`` (its rounding ``(T + m + n)·ε·S'``), settles
    most blocks at the cost of ``S'`` (O(K·T·(m + n))); the others, and ``sigma_eps=None`` (a
    Gram route's σ₁, which rounds at ``S'²``), compute ``tr F`` in float64
    (:meth:`KronSum._conv_trace`)."""
    if Fn.form not in ("conv", "sum"):
        return False
    scale, T = Fn._positions_scale()
    if not scale > 0:
        return False
    limit = _POSITIONS_CANCEL * T
    if sigma_eps is not None:
        floor = sigma - (T + Fn.m + Fn.n) * sigma_eps * scale
        if scale <= limit * math.sqrt(Fn.m * Fn.n) * floor:
            return False
    return scale > limit * Fn._conv_trace()


def _positions_cancel(Fn: KronSum, sol: Solution) -> float:
    """``Stop.op_scale`` for a solve ``sol`` of a sum whose conv positions cancel
    (:func:`positions_cancel`): the operator the solver applied lies up to ``4ε·S'`` per unit
    of σ from F's, as for a sum whose terms cancel; 0 where they do not."""
    xp = Fn.xp
    eps = None if sol.route.startswith("gram") else float(
        xp.finfo(xp.float32 if sol.eig.low else Fn.dtype).eps)
    if not positions_cancel(Fn, to_float(sol.factors.sigma), eps):
        return 0.0
    return 4 * float(xp.finfo(Fn.dtype).eps) * Fn._positions_scale()[0]


def _positions_resolve(Fn: KronSum, sol: Solution, requested: str, init, seed, tol: float,
                       accuracy: float | None, max_iter: int, op_scale: float) -> tuple:
    """``(solution, stop)`` for a sum whose conv positions cancel (:func:`_positions_cancel`):
    the solve again from ``sol``'s answer, on the contractions in the working precision (no
    float32 iterations, no ‖F‖² from the per-sample matrices), with ``op_scale`` in the stop, so
    that the error-gap bound allows for the rounding at the positions' scale. ``"power"``
    stays the power method; the other routes continue by Lanczos (the Gram routes' matrices
    round at the positions' scale squared, which their bound does not allow for)."""
    f = sol.factors
    scale, _ = Fn._positions_scale()
    sigma = to_float(f.sigma)
    why = ("the conv positions cancel within a sample (their products' magnitude is "
           + (f"{scale / sigma:.3g} times σ₁" if sigma > 0 else "far above F's") +
           "), so the contractions round at that scale")
    stop = _stop(Fn, tol, accuracy)
    stop.op_scale = op_scale
    method = "power" if requested == "power" else "lanczos"
    start = Kron(f.left, f.right, 1.0) if sigma > 0 else init
    new = _solve_factors(Fn, method, start, seed, stop, max_iter)
    new.eig.iterations += sol.eig.iterations
    g = new.factors
    sigma = to_float(g.sigma)
    if psd_sum(Fn) and sigma > 0:
        # the half-step factor rounds at the positions' scale too: PSD up to op_scale/σ of it
        L, R, sigma, moved = psd_factors(g.left, g.right, sigma, Fn.xp,
                                         "left" if Fn.m <= Fn.n else "right", op_scale / sigma)
        new.factors = Factors(L, R, sigma, g.notes)
        _widen(stop, new.eig, moved)
    new.factors.notes = f.notes + new.factors.notes + (
        f"{why}: solved again by {method} on the contractions in {dtype_name(Fn.xp, Fn.dtype)}, the error-gap bound "
        "allowing for that rounding",)
    return new, stop


def _stop(Fn: KronSum, tol: float, accuracy: float | None) -> Stop:
    """The stopping rule of a solve on ``Fn``: below float64, ``accuracy`` less the rounding of
    the stored answer (``1.5ε``, added back to the reported bound) where it leaves room; for a
    sum whose terms can cancel (signed weights or terms, :func:`psd_sum` false) with the
    contractions' rounding, ``4ε·S`` per unit of σ (``S`` the inputs' magnitude,
    :meth:`KronSum._rounding_scale`; ``Stop.op_scale``); the Rayleigh quotients' rounding
    ``(K·T + m + n)·ε`` (``Stop.th_rel``: sums of K·T terms and products over m and n)."""
    eps = float(Fn.xp.finfo(Fn.dtype).eps)
    if accuracy is not None and Fn.dtype != Fn.xp.float64 and accuracy > 3 * eps:
        accuracy = accuracy - 1.5 * eps
    stop = Stop(float(tol), None if accuracy is None else float(accuracy),
                th_rel=(Fn.num_terms * Fn.num_positions + Fn.m + Fn.n) * eps)
    if not psd_sum(Fn):
        stop.op_scale = 4 * eps * Fn._rounding_scale()
    return stop


def _solve_factors(Fn: KronSum, method: str, init, seed, stop: Stop, max_iter: int) -> Solution:
    """``"lanczos"`` or ``"power"`` on the contractions, iterating on the smaller factor,
    finished by :func:`kronsum._eigen.finish`, from ``init`` (``"auto"``: the
    :func:`_dominant_start` where there is one, noted). Lanczos iterates in float32 where
    :func:`_mixed_precision` says so (route ``"lanczos[float32]"``)."""
    dominant = _dominant_start(Fn) if isinstance(init, str) and init == "auto" else None
    if dominant is None:
        return _solve_from(Fn, method, init, seed, stop, max_iter)
    sol = _solve_from(Fn, method, dominant[0], seed, stop, max_iter)
    sol.factors.notes = sol.factors.notes + (dominant[1],)
    return sol


def _solve_from(Fn: KronSum, method: str, init, seed, stop: Stop, max_iter: int) -> Solution:
    """:func:`_solve_factors` from a resolved start."""
    xp = Fn.xp
    side = "left" if Fn.m <= Fn.n else "right"
    Fn = Fn._with_per_sample()  # conv: X_k = G_kᵀA_k formed once where they fit
    if method == "lanczos" and stop.accuracy is not None and stop.op_scale == 0 and _norm_pays(Fn):
        # ‖F‖² bounds the answer's error from below: the error-gap bound becomes proven, or
        # far tighter when K-FOC explains little of ‖F‖² (the estimate's 2√θ₂ ≪ ‖F − F̂‖)
        stop.f2 = to_float(Fn._sq_norm())
        stop.f2_err = Fn.num_terms * Fn.num_positions ** 2 * float(xp.finfo(Fn.dtype).eps) * abs(stop.f2)
    if method == "lanczos" and _mixed_precision(Fn, stop):
        F32 = Fn.astype(xp.float32)  # a float32 copy of the inputs for the solve
        if Fn._Xp is not None:  # and of the per-sample matrices, rounded from float64
            F32 = F32._with_per_sample(xp.astype(Fn._Xp, xp.float32))
        rounding = _float32_copy(Fn, F32, stop, side)
        eig = lanczos_two_precision(
            contraction_space(F32, side, keep_aux=rounding is not None and aux_fits(F32, side)),
            _initial(F32, init, seed, side),  # a Kron start is cast
            contraction_space(Fn, side, keep_aux=True),
            lambda: contraction_space(Fn, side, keep_aux=aux_fits(Fn, side)), Fn.dtype, stop, max_iter,
            low_image=_low_image_error(Fn) if side == "left" else None, symmetric=Fn.symmetric,
            rounding=rounding)
        # the float32 copy's rounding (e.g. of gradients whose rows sum to zero) can leave the
        # iterate indefinite beyond float64 rounding: projected onto the PSD cone in the finish
        if eig.low:  # the accuracy allows the float32 solve's own answer: finished in float32
            psd = psd_sum(Fn)
            f = finish(F32, side, eig, psd=psd, strict=True)
            L, R, sigma = xp.astype(f.left, Fn.dtype), xp.astype(f.right, Fn.dtype), to_float(f.sigma)
            if psd:  # PSD to the working precision's rounding, as its inverses need
                L, R, sigma0, moved = psd_factors(L, R, sigma, xp, side, float(xp.finfo(xp.float32).eps))
                # with the finish's own projection of the iterate, what that costs the bound
                cost = stop.low.answer_finish(f.moved, moved, sigma)
                sigma = sigma0
                if stop.bound + cost > stop.accuracy:
                    # the float32 answer's projection (factors singular to float32's
                    # rounding) spends more than the accuracy leaves: float64 Lanczos from it
                    its = eig.iterations
                    x = xp.astype(eig.x, Fn.dtype)
                    eig = lanczos(contraction_space(Fn, side, keep_aux=aux_fits(Fn, side)),
                                  symmetrize(x, xp) if Fn.symmetric else x, stop, max(max_iter - its, 1))
                    eig.iterations += its
                    return Solution(finish(Fn, side, eig, psd=True), eig, "lanczos[float32]")
                stop.bound += cost  # second order in the moves, at F's residual (Stop.answer_finish)
            note = (f"finished in float32: the error-gap bound {stop.bound:.2g} includes the "
                    f"float32 copy's rounding of F",)
            return Solution(Factors(L, R, sigma, f.notes + note), eig, "lanczos[float32]")
        return Solution(finish(Fn, side, eig, psd=psd_sum(Fn)), eig, "lanczos[float32]")
    x0 = _initial(Fn, init, seed, side)
    if method == "lanczos":
        eig = lanczos(contraction_space(Fn, side, keep_aux=aux_fits(Fn, side)), x0, stop, max_iter)
    else:
        space = contraction_space(Fn, side)
        eig = power(space, x0, stop, max_iter)
        if eig.sigma2 is None and eig.converged:  # σ₂ for the tie note (a stream apart from init's)
            eig.sigma2, k = deflated_top(space, eig.x, space.M(eig.x), seed=[0x5EED, 2])
            eig.iterations += k
    return Solution(finish(Fn, side, eig, psd=psd_sum(Fn)), eig, method)


def _norm_pays(Fn: KronSum) -> bool:
    """Whether ``‖F‖²`` (:meth:`KronSum._sq_norm`) costs at most one Lanczos application on
    the contractions (about ``K·T(m² + n²)`` multiply-adds; it saves one or more on the
    benchmark's families) and, for the conv form, its per-sample matrices ``X_k = G_kᵀA_k``
    take no more memory than the inputs: conv blocks with K ≲ 2T. Sums and Dask: never."""
    if Fn.form not in ("outer", "conv") or is_dask_namespace(Fn.xp):
        return False
    K, T, m, n = Fn.num_terms, Fn.num_positions, Fn.m, Fn.n
    application = K * T * (m * m + n * n)
    if Fn.form == "outer":
        return K * K * (m + n) / 2 <= application
    return K * T * m * n + K * K * m * n / 2 <= application and m * n <= T * (m + n)


def _low_image_error(Fn: KronSum) -> float:
    """The relative error allowed for the float32 application that checks the float32 solve:
    64·ε₃₂ of θ (measured: 2–3·ε₃₂ on the benchmark's conv and outer families, whose float32
    copies round the inputs and accumulate over K·T = 2048–4096 terms)."""
    return 64 * float(Fn.xp.finfo(Fn.xp.float32).eps)


def _float32_copy(Fn: KronSum, F32: KronSum, stop: Stop, side: str) -> LowPrecisionCopy | None:
    """The float32 copy ``F32`` of ``Fn`` as a :class:`kronsum._eigen.LowPrecisionCopy`, whose
    solve's own answer may be returned (:meth:`kronsum._eigen.Stop.answer_bound`): at any
    ``accuracy`` of at least 64·ε₃₂, and at a tighter one where the float64 check would not
    certify the bound either, except for the conv form, whose float32 contractions cost
    nearly as much as float64's (the float32 finish's half-step would cost what the float64
    check does). ``None`` otherwise. Its distance from F is at most ``δ = 3ε₃₂·S``
    (:meth:`KronSum._rounding_scale`, summed in float32 and widened by 0.1 % for that sum's
    own rounding). ``side``: the iterated factor (``"right"``: the answer's left factor is a
    float32 half-step of the iterate, and its right factor one of that)."""
    if stop.accuracy is None:
        return None
    eps32 = float(F32.xp.finfo(F32.xp.float32).eps)
    loose = stop.accuracy >= 64 * eps32
    if not loose and Fn.form == "conv":
        return None
    return LowPrecisionCopy(3 * eps32 * F32._rounding_scale() * 1.001, any_answer=loose,
                            half_first=side == "right")


def _float32_iterations(F: KronSum) -> bool:
    """Whether Lanczos on the contractions of float64 ``F`` iterates in float32 under the
    default (accuracy) rule: contractions of at least 2²⁶ multiply-adds (below, the copy and
    the float64 check cost more than the float32 steps save), not Dask (whose contractions are
    bound by the map-reduce, not the arithmetic), and ``mixed_precision`` on."""
    xp = F.xp
    large = F.num_terms * F.num_positions * (F.m * F.m + F.n * F.n) >= 1 << 26
    return (large and F.dtype == xp.float64 and not is_dask_namespace(xp)
            and _options()["mixed_precision"])


def _mixed_precision(Fn: KronSum, stop: Stop) -> bool:
    """Whether Lanczos on the contractions iterates in float32 (:func:`kronsum._eigen.lanczos_two_precision`):
    :func:`_float32_iterations`, under the accuracy rule, for a sum whose rounding stays at F's
    scale (``stop.op_scale == 0``: no terms or positions that cancel)."""
    return stop.accuracy is not None and stop.op_scale == 0 and _float32_iterations(Fn)


def _gram_start(Fn: KronSum, init, seed) -> Array:
    """The Gram solver's start coefficients: ``α₀ = W 𝓡 vec(R₀)`` (the half-step from a right
    factor ``R₀``, so ``L₀ = Σ_k α_k L_k``); ``"tkfac"`` and ``"identity"`` coincide here
    (``R₀ = I``)."""
    xp = Fn.xp
    w = Fn.weights
    if isinstance(init, Kron):
        R0 = xp.astype(xp.asarray(init.right), Fn.dtype)
    elif init == "kfac":
        R0 = kfac(Fn).right
    elif init == "random":
        R0 = random_like(eye_like(Fn.n, w, xp), seed, Fn.symmetric, xp)
    else:  # "auto", "tkfac" and "identity" coincide after the half-step into coefficient space
        R0 = None
    return w * (Fn._traces("right") if R0 is None else Fn._inner("right", R0))


def _conv_gram_start(Fn: KronSum, init):
    """The conv Gram solver's start: ``"tkfac"`` (and ``"identity"``, equal after the half-step),
    ``"kfac"``, ``"random"``, or a :class:`Kron`'s right factor."""
    if isinstance(init, Kron):
        return Fn.xp.astype(Fn.xp.asarray(init.right), Fn.dtype)
    return "tkfac" if init in ("identity", "auto") else init


# the dominant-samples start (``init="auto"``): candidate sample counts, the share of the
# magnitude S the others may carry, and the most its Gram solve may cost, in applications
_DOMINANT_COUNTS = (64, 128, 256, 512)
_DOMINANT_REST = 1 / 16
_DOMINANT_COST = 1 / 16


def _dominant_start(Fn: KronSum):
    """``(Kron, note)`` for ``init="auto"`` on the contraction solvers, or ``None`` (TKFAC's
    start then): the K-FOC factors of the ``s`` samples of an outer-form ``Fn`` with the
    largest magnitudes ``β_k = |w_k|‖g_k‖²‖a_k‖²``, for the smallest ``s`` of
    :data:`_DOMINANT_COUNTS` whose samples leave at most :data:`_DOMINANT_REST` of
    ``S = Σ β_k`` to the others and whose Gram solve (``s²(m + n)/2`` multiply-adds for the
    Gram matrices, ``s(m² + n²)/2`` for the factors) costs at most :data:`_DOMINANT_COST` of
    one application (``K(m² + n²)``). ``‖F − F_s‖ ≤ S − S_s``,
    so the start is the optimum of a sum that close to F (Wedin's theorem bounds its angle to
    F's optimum by that distance over the gap). One host read of five sums; not for Dask
    (no sort) or other forms."""
    if Fn.form != "outer" or is_dask_namespace(Fn.xp):
        return None
    xp = Fn.xp
    K, m, n = Fn.num_terms, Fn.m, Fn.n
    counts = [s for s in _DOMINANT_COUNTS
              if 4 * s <= K and s * (s * (m + n) + m * m + n * n) / 2 <= _DOMINANT_COST * K * (m * m + n * n)]
    if not counts:
        return None
    beta = xp.abs(Fn.weights) * row_sq_norms(Fn.G, xp) * row_sq_norms(Fn.A, xp)
    order = xp.argsort(-beta)  # largest first
    top = xp.take(beta, order[: counts[-1]])
    sums = host_floats([xp.sum(beta)] + [xp.sum(top[:s]) for s in counts])
    total = sums[0]
    if not (total > 0 and math.isfinite(total)):
        return None
    for s, carried in zip(counts, sums[1:]):
        if total - carried <= _DOMINANT_REST * total:
            break
    else:
        return None
    idx = order[:s]
    sub = KronSum.from_outer(xp.take(Fn.G, idx, axis=0), xp.take(Fn.A, idx, axis=0),
                             weights=xp.take(Fn.weights, idx), check_finite=False)
    est = kfoc(sub, method="gram", init="tkfac")
    if not to_float(est.scale) > 0:
        return None
    note = (f"started from the K-FOC factors of the {s} largest of {K} samples, which carry "
            f"{carried / total:.4f} of the sum of the terms' magnitudes")
    return Kron(est.left, est.right, 1.0), note


def _initial(Fn: KronSum, init, seed, side: str) -> Array:
    """The factor-space solvers' start on ``side`` (the factor they iterate on) for ``init``;
    a zero start (e.g. TKFAC of a zero-trace sum) becomes the identity."""
    xp = Fn.xp
    d = Fn.m if side == "left" else Fn.n
    if isinstance(init, Kron):
        x = init.left if side == "left" else init.right
        x = xp.astype(xp.asarray(x), Fn.dtype)
    elif init in ("tkfac", "auto"):
        x = Fn.contract_right() if side == "left" else Fn.contract_left()
    elif init == "kfac":
        est = kfac(Fn)
        x = est.left if side == "left" else est.right
    elif init == "identity":
        x = eye_like(d, Fn.weights, xp)
    else:
        x = random_like(eye_like(d, Fn.weights, xp), seed, Fn.symmetric, xp)
    if not bool(fro_norm(x, xp) > 0):  # e.g. tkfac of a zero-trace sum: use the identity
        x = eye_like(d, Fn.weights, xp)
    return x

