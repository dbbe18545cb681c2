r"""Streaming estimates: one Kronecker product kept up to date batch after batch.

In training the statistics arrive one mini-batch at a time, ``F_1, F_2, …`` (each a
:class:`KronSum`), and second-order optimisers track an exponential moving average of them.
The quantity every estimator here approximates is the **running sum**

.. math::

    S_1 = F_1, \qquad S_t = a_t S_{t-1} + b_t F_t,

with ``(a_t, b_t) = (decay, 1 − decay)`` for ``t ≥ 2``, or, with ``bias_correction=True``,
the bias-corrected average of an EMA started at zero (as in Adam),
``a_t = decay (1 − decayᵗ⁻¹)/(1 − decayᵗ)``, ``b_t = (1 − decay)/(1 − decayᵗ)``. In both cases
``a_t + b_t = 1`` and ``S_t = Σ_i c_i F_i`` is a convex combination of the batches
(:meth:`RunningEstimate.batch_weights` gives the ``c_i``). ``t`` counts the updates that
were applied (see ``update_every``), not the batches seen.

Five estimators (:data:`ESTIMATORS`):

``"kfac"``          K-FAC's EMA of the factors (Martens & Grosse 2015; TKFAC paper Eq. (17)-(18)):
                    ``left_t = a_t left_{t−1} + b_t E_t[g gᵀ]``, likewise ``right`` and ``scale``.
``"tkfac"``         the same EMA of TKFAC's ``Φ``, ``Ψ`` and ``δ``.
``"kfoc_approx"``   K-FOC_approx: the same EMA of each batch's K-FOC factors (unit Frobenius
                    norm, ``tr ≥ 0``) and of its ``σ₁``.
``"kfoc_running"``  K-FOC_running: the optimum of ``a_t · (previous estimate) + b_t F_t`` — the
                    previous estimate enters as one more Kronecker term — by :func:`kfoc` on
                    that sum: the Gram solver for outer/terms batches when
                    :func:`choose_method` takes it (the extra term is one more coefficient),
                    Lanczos warm-started from the previous estimate otherwise (conv batches,
                    Dask, K > 8192 or Gram matrices that do not pay).
``"ekfac"``         EKFAC (George et al. 2018): K-FAC's EMA of the factors, their eigenbasis
                    refreshed every ``basis_every`` updates, and an EMA of the corrected
                    eigenvalues ``S`` in the current basis, updated every time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from ._closed_forms import _new_kron, kfac, tkfac
from ._compat import Array, is_array, namespace
from ._ekfac import EigenKron, _ekfac_in
from ._eigen import psd_sum
from ._kfoc import choose_method, kfoc
from ._kron import Kron, KronInfo
from ._sum import KronSum
from ._validation import check_finite_values, check_int, check_real, check_seed

__all__ = ["RunningEstimate", "ESTIMATORS"]

#: The estimator names :class:`RunningEstimate` accepts.
ESTIMATORS = ("kfac", "tkfac", "kfoc_approx", "kfoc_running", "ekfac")

_KFOC_OPTIONS = ("method", "accuracy", "tol", "max_iter", "precision", "seed")
_STATE_KEYS = ("estimator", "decay", "update_every", "bias_correction", "step", "num_updates",
               "left", "right", "scale")
_EKFAC_KEYS = ("basis_every", "U", "V", "S")  # and these for "ekfac"


def _same_namespace(a: Any, b: Any) -> bool:
    return a is b or getattr(a, "__name__", None) == getattr(b, "__name__", object())


def _mix(a: float, old: Array, b: float, new: Array, *, reuse_new: bool = False) -> Array:
    """``a·old + b·new`` for ``a, b > 0``, in three passes with at most one new array.

    The smaller weight is divided by the larger, e.g. ``((b/a)·new + old)·a``, and the last two
    steps run in place on an array made here or, with ``reuse_new=True`` (``new`` made by this
    update and held by nothing else), on ``new`` itself: no allocation at all when ``b ≤ a``
    (an EMA's usual case). JAX and Dask, without in-place operators, rebind instead. The plain
    expression makes three arrays; on the CPU a fresh 1024×1024 float32 array can cost more in
    page faults than the arithmetic on it (measured: an allocating variant made the wide MLP's
    K-FAC stream 10 % slower).

    Range: the intermediate ``(b/a)·new + old`` is the result divided by ``max(a, b) ≥ 1/2``
    (when ``a + b = 1``), so an entry overflows only where the result lies within that factor
    of the dtype's largest number (float32: above 1.7e38 at worst), where the plain expression
    would still be finite.
    """
    big, r, small = (old, b / a, new) if b <= a else (new, a / b, old)
    if reuse_new and small is new:
        out = small
        out *= r
    else:
        out = small * r
    out += big
    out *= max(a, b)
    return out


class RunningEstimate:
    r"""A Kronecker estimate ``scale · left ⊗ right`` of a stream of sums, updated per batch.

    Each :meth:`update` takes the statistics of one mini-batch, ``F_t`` (a :class:`KronSum`
    of fixed factor sizes ``(m, n)``), and :attr:`estimate` returns the current
    :class:`Kron` approximating the running sum

    .. math::

        S_1 = F_1, \qquad S_t = a_t S_{t-1} + b_t F_t = \sum_{i \le t} c_i F_i,

    with ``(a_t, b_t) = (decay, 1 − decay)``; with ``bias_correction=True`` the EMA starts at
    zero and is divided by ``1 − decayᵗ``: ``b_t = (1 − decay)/(1 − decayᵗ)``,
    ``a_t = 1 − b_t``. With ``t`` the number of updates applied so far; ``a_1 = 0`` either way.

    Parameters
    ----------
    estimator : {"kfac", "tkfac", "kfoc_approx", "kfoc_running", "ekfac"}
        ``"kfac"``, ``"tkfac"``, ``"kfoc_approx"``: the EMA of the batch estimator's factors,
        as K-FAC and TKFAC (Eq. (17)-(18) of Gao et al. 2021) do,

        .. math::

            \mathrm{left}_t = a_t\,\mathrm{left}_{t-1} + b_t\,\mathrm{left}(F_t),\quad
            \mathrm{right}_t = a_t\,\mathrm{right}_{t-1} + b_t\,\mathrm{right}(F_t),\quad
            \mathrm{scale}_t = a_t\,\mathrm{scale}_{t-1} + b_t\,\mathrm{scale}(F_t),

        where ``left(F)``, ``right(F)``, ``scale(F)`` are those of :func:`kfac` (means
        ``E[g gᵀ]``, ``E[ā āᵀ]`` and ``Σ w``), :func:`tkfac` (``Φ``, ``Ψ`` of unit trace and
        ``δ = tr F``: the averages keep unit trace, so ``tr`` of the estimate equals
        ``tr S_t`` exactly) or :func:`kfoc` (unit-Frobenius factors and ``σ₁``; K-FOC_approx).
        ``"kfoc_running"`` (K-FOC_running): the Frobenius-optimal Kronecker product of
        ``a_t · P + b_t F_t``, with ``P`` the previous estimate entered as one more Kronecker
        term (:meth:`KronSum.from_kron`), by :func:`kfoc` warm-started from ``P``.
        ``"ekfac"`` (George et al. 2018): the ``"kfac"`` EMA of the factors is kept as above;
        at updates ``t = 1, 1 + B, 1 + 2B, …`` (``B = basis_every``) the basis
        ``U_t ⊗ V_t`` becomes the eigenvectors of the running K-FAC factors (after this
        update's mix), otherwise ``U_t = U_{t−1}``, ``V_t = V_{t−1}``; then

        .. math::

            S_t = a_t\,\operatorname{diag}_{t}(\hat F_{t-1}) + b_t\,\operatorname{diag}_{t}(F_t),

        where ``diag_t(M)`` is the grid ``(u_i ⊗ v_j)ᵀ M (u_i ⊗ v_j)`` in the current basis:
        between refreshes ``diag_t(F̂_{t−1}) = S_{t−1}`` (George et al.'s EMA of the corrected
        eigenvalues), and at a refresh it is the previous estimate's diagonal in the new basis,
        ``((U_tᵀU_{t−1})∘²) S_{t−1} ((V_tᵀV_{t−1})∘²)ᵀ``, so the average carries over (rather
        than restarting from one batch). ``S_t`` is thus the Frobenius-nearest matrix of the
        form ``(U_t ⊗ V_t) diag(vec S) (U_t ⊗ V_t)ᵀ`` to ``a_t F̂_{t−1} + b_t F_t``.
        :attr:`estimate` is then an :class:`EigenKron`.
    decay : float, default 0.95
        The EMA parameter, ``0 ≤ decay < 1`` (the TKFAC paper's ε). ``decay = 0`` gives each
        batch's own estimate.
    update_every : int, default 1
        Apply an update only at every ``update_every``-th call of :meth:`update` (calls
        ``0, T, 2T, …``, counted from 0, so the first batch always enters), as K-FAC and
        TKFAC update their factors every ``T_FIM`` steps. The batches of the calls in between
        are **not** accumulated: they are checked (type, sizes, library) and dropped, as in
        K-FAC implementations, where their statistics are usually not even computed. Each
        applied update decays the old estimate by ``decay`` once (not ``decayᵀ``).
    bias_correction : bool, default False
        Use the bias-corrected weights above. Both choices give a convex combination of the
        batches; they differ in the weight of the first one (``decayᵗ⁻¹`` without correction,
        ``(1 − decay) decayᵗ⁻¹/(1 − decayᵗ)`` with it).
    basis_every : int, optional
        ``"ekfac"`` only (default 1): refresh the eigenbasis at every ``basis_every``-th
        applied update, counted from the first (George et al.'s ``n`` between
        eigendecompositions).
    kfoc_options : dict, optional
        Passed to :func:`kfoc` (keys ``method``, ``accuracy``, ``tol``, ``max_iter``,
        ``precision``, ``seed``; not ``init``): by default each solve stops within
        ``1e-8·‖F‖`` of the optimal error of its sum (float64; see :func:`kfoc`). For ``"kfoc_running"`` the combined sum has form ``"sum"``:
        ``"auto"`` follows :func:`choose_method` on it, and ``"gram"`` means ``"lanczos"``
        when the batch has the conv form (the first batch, which is solved alone, uses the
        method as given).

    Notes
    -----
    What is averaged is the estimator's own factors, as in the papers, not the statistics:
    the K-FAC, TKFAC and K-FOC_approx averages are in general *not* the estimator applied to
    ``S_t`` (batches of different weight ``Σw`` or trace enter with equal factor weights).
    The exception: for ``"kfac"`` with every batch of the same total weight ``Σ w`` the EMA
    equals ``kfac(S_t)`` exactly. A stream of identical batches gives back the batch
    estimate exactly for all four (the magnitude is averaged in ``scale``, separately from
    the factors). Damping is not part of the average (the TKFAC paper averages the damped
    factors of its Eq. (14)); apply it to :attr:`estimate` with :meth:`Kron.inverse`.

    ``"kfoc_running"`` is exact when ``S_t`` is itself a Kronecker product (e.g. all batches
    share the left factor), and otherwise approximates ``S_t`` by approximating
    ``a_t · (estimate of S_{t−1}) + b_t F_t``; its error to ``S_t`` can exceed the optimum's
    (see docs/streaming.md for measurements).

    Cost per applied update: ``"kfac"``, ``"tkfac"``: the batch estimator, ``O(K(m² + n²))``
    (conv: ``O(KT(m² + n²))``) plus ``O(m² + n²)``; ``"kfoc_approx"``: one :func:`kfoc` of
    the batch; ``"kfoc_running"``: one :func:`kfoc` of the combined sum — with the Gram
    solver (outer batches), the batch's Gram matrices plus ``O(K(m² + n²))`` for the extra
    term's row; with Lanczos (conv batches), each application the batch's two contractions
    plus ``O(m² + n²)``, a few applications per update when the estimate moves little
    (``estimate.info.iterations`` counts them). Skipped calls
    cost nothing. ``"ekfac"``: the ``"kfac"`` update plus one pass over the batch in the
    basis (:func:`ekfac`'s cost without the basis), and at a refresh two eigendecompositions
    ``O(m³ + n³)`` and the projection ``O(m³ + n³ + mn(m + n))``. Memory: the state is
    ``m² + n² + 1`` numbers (``"ekfac"``: ``2(m² + n²) + mn + 1``).

    Inputs are never modified; arrays come back in the batches' namespace, device and dtype
    (all batches of one stream must share them).

    Examples
    --------
    >>> import numpy as np
    >>> import kronsum as ks
    >>> rng = np.random.default_rng(0)
    >>> batches = [ks.KronSum.from_outer(rng.standard_normal((16, 3)), rng.standard_normal((16, 4)))
    ...            for _ in range(5)]
    >>> run = ks.RunningEstimate("kfoc_running", decay=0.9)
    >>> for F in batches:
    ...     est = run.update(F)
    >>> est.left.shape, est.right.shape, run.num_updates
    ((3, 3), (4, 4), 5)
    >>> S = batches[0]                                   # the exact running sum, S_t
    >>> for F in batches[1:]:
    ...     S = 0.9 * S + 0.1 * F
    >>> err = float(ks.frobenius_error(S, run.estimate, relative=True))
    >>> best = float(ks.frobenius_error(S, ks.kfoc(S), relative=True))
    >>> best <= err < 1.0
    True
    >>> kfac_run = ks.RunningEstimate("kfac", decay=0.9)   # K-FAC's EMA: equal Σw per batch,
    >>> for F in batches:                                   # so it equals kfac(S_t) exactly
    ...     _ = kfac_run.update(F)
    >>> bool(np.allclose(kfac_run.estimate.to_dense(), ks.kfac(S).to_dense()))
    True
    """

    def __init__(self, estimator: str, decay: float = 0.95, *, update_every: int = 1,
                 bias_correction: bool = False, kfoc_options: Mapping[str, Any] | None = None,
                 basis_every: int | None = None):
        if not isinstance(estimator, str) or estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if basis_every is not None and estimator != "ekfac":
            raise ValueError(f"basis_every is for estimator 'ekfac' only, got it with {estimator!r}")
        basis_every = check_int(1 if basis_every is None else basis_every, "basis_every",
                                minimum=1)
        decay = check_real(decay, "decay", minimum=0.0, below=1.0)
        update_every = check_int(update_every, "update_every", minimum=1)
        if not isinstance(bias_correction, bool):
            raise TypeError(f"bias_correction must be True or False, got {bias_correction!r}")
        opts = dict(kfoc_options or {})
        bad = sorted(set(opts) - set(_KFOC_OPTIONS))
        if bad:
            raise ValueError(
                f"kfoc_options takes the keys {_KFOC_OPTIONS}, got {bad} (the warm start 'init' "
                "is set by RunningEstimate itself)"
            )
        for key, value in opts.items():  # checked now, not at the first update
            if key in ("tol", "accuracy") and value is not None:
                check_real(value, f"kfoc_options[{key!r}]", positive=True)
            elif key == "max_iter" and value is not None:
                check_int(value, "kfoc_options['max_iter']", minimum=1)
            elif key == "seed":
                check_seed(value, "kfoc_options['seed']")
        self._estimator = estimator
        self._decay = float(decay)
        self._update_every = update_every
        self._bias_correction = bias_correction
        self._kfoc_options = opts
        self._basis_every = basis_every
        self._clear()

    def _clear(self) -> None:
        self._step = 0
        self._num_updates = 0
        self._left = self._right = self._scale = None
        self._U = self._V = self._S = None  # "ekfac": the basis and corrected eigenvalues
        self._xp = None
        self._info: KronInfo | None = None
        # whether every batch in the estimate had symmetric terms (its factors are then
        # symmetric); None: unknown (restored from a state_dict)
        self._symmetric: bool | None = None
        # whether every batch was a sum of PSD terms (outer/conv forms): K-FOC's estimate is
        # then PSD, and the previous estimate enters the next sum as a PSD term; False when
        # unknown (restored from a state_dict)
        self._psd = False

    # -- configuration and counters ------------------------------------------------------
    @property
    def estimator(self) -> str:
        """The estimator name, one of :data:`ESTIMATORS`."""
        return self._estimator

    @property
    def decay(self) -> float:
        """The EMA parameter, ``0 ≤ decay < 1``."""
        return self._decay

    @property
    def update_every(self) -> int:
        """Updates are applied at calls ``0, T, 2T, …`` of :meth:`update` (``T = update_every``)."""
        return self._update_every

    @property
    def bias_correction(self) -> bool:
        """Whether the bias-corrected weights are used."""
        return self._bias_correction

    @property
    def basis_every(self) -> int:
        """``"ekfac"``: the eigenbasis is refreshed at every ``basis_every``-th applied update."""
        return self._basis_every

    @property
    def step(self) -> int:
        """Number of calls of :meth:`update` so far (batches seen)."""
        return self._step

    @property
    def num_updates(self) -> int:
        """Number of updates applied so far (``t``, batches that entered the estimate)."""
        return self._num_updates

    @property
    def estimate(self) -> Any:
        """The current :class:`Kron` (``"ekfac"``: :class:`EigenKron`; ``info.method`` is
        ``"running/<estimator>"``).

        ``info.iterations`` holds the operator applications of the last applied update
        (``"kfoc_approx"``: of the batch solve; ``"kfoc_running"``: of the warm-started solve
        of the combination). Raises ``RuntimeError`` before the first :meth:`update`.
        """
        if self._num_updates == 0:
            raise RuntimeError("RunningEstimate has no estimate yet: call update(F) with a batch first")
        if self._estimator == "ekfac":
            return EigenKron._new(self._U, self._V, self._S, self._info, self._xp)
        return _new_kron(self._left, self._right, self._scale, self._info, self._xp)

    def mixing_weights(self, t: int) -> tuple[float, float]:
        r"""``(a_t, b_t)`` of update number ``t ≥ 1``: ``S_t = a_t S_{t−1} + b_t F_t``.

        Examples
        --------
        >>> from kronsum import RunningEstimate
        >>> RunningEstimate("kfac", decay=0.5).mixing_weights(2)
        (0.5, 0.5)
        >>> RunningEstimate("kfac", decay=0.5, bias_correction=True).mixing_weights(2)
        (0.3333333333333333, 0.6666666666666666)
        """
        t = check_int(t, "t", minimum=1)
        d = self._decay
        if t == 1 or d == 0.0:
            return (0.0, 1.0)
        if not self._bias_correction:
            return (d, 1.0 - d)
        norm = -math.expm1(t * math.log(d))  # 1 - d**t, accurate for d near 1
        return (d * -math.expm1((t - 1) * math.log(d)) / norm, (1.0 - d) / norm)

    def batch_weights(self, num_updates: int | None = None) -> list[float]:
        r"""``[c_1, …, c_t]`` with ``S_t = Σ_i c_i F_i`` over the ``t`` batches that entered.

        ``num_updates`` defaults to :attr:`num_updates`. The weights are non-negative and sum
        to 1: ``c_i = b_i Π_{j>i} a_j``.

        Examples
        --------
        >>> from kronsum import RunningEstimate
        >>> [round(c, 3) for c in RunningEstimate("kfac", decay=0.5).batch_weights(3)]
        [0.25, 0.25, 0.5]
        """
        t = self._num_updates if num_updates is None else num_updates
        t = check_int(t, "num_updates", minimum=0)
        c: list[float] = []
        for i in range(1, t + 1):
            a, b = self.mixing_weights(i)
            c = [a * ci for ci in c] + [b]
        return c

    # -- the update ------------------------------------------------------------------------
    def update(self, F: KronSum | Kron) -> Kron:
        """Take the statistics ``F`` of one batch; return the (possibly unchanged) :attr:`estimate`.

        Parameters
        ----------
        F : KronSum or Kron
            Of the same factor sizes ``(m, n)``, array library and dtype as the earlier
            batches (any form; ``"sum"`` included). For ``estimator="kfac"`` also the
            batch's own K-FAC estimate as a :class:`Kron` (e.g. from
            :func:`kronsum.adapters.torch.collect_kfac`, which reduces the statistics to their
            Gram matrices as they are recorded): mixed in as :func:`kfac`'s result of the batch
            would be, its factors and scale used as given (not normalised, not scanned for
            NaN; they are not written to).

        Returns
        -------
        Kron
            The estimate after this call. At calls that ``update_every`` skips, the earlier
            estimate, unchanged.

        Raises
        ------
        TypeError
            ``F`` is not a :class:`KronSum` (or, for ``"kfac"``, a :class:`Kron`), or its
            library or dtype differs from the state's.
        ValueError
            Its factor sizes differ from the state's.
        OverflowError
            The estimate of this batch is beyond the range of the dtype (see the estimator).
            A call that raises leaves the object as it was (its step count included).
        """
        return self._update(F, owned=False)

    def _update(self, F: KronSum | Kron, owned: bool) -> Kron:
        """:meth:`update`; ``owned``: a :class:`Kron` ``F`` was made for this call and is held
        by nothing else, so the EMA may write its factors in place."""
        self._check_batch(F)
        if self._step % self._update_every != 0:
            self._step += 1
            return self.estimate
        t = self._num_updates + 1
        a, b = self.mixing_weights(t)
        name = self._estimator
        if name == "kfoc_running":
            if a == 0.0:  # first batch, or decay 0: the batch alone, exactly its kfoc
                est = self._kfoc(F)
            else:
                prev = self.estimate
                S = KronSum.concat(self._as_term(prev, a * self._prev_share()), F.scaled(b))
                est = self._kfoc(S, prev)
            left, right, scale = est.left, est.right, est.scale
        else:
            own = False  # whether the batch's factors are this call's own, to mix in place
            if isinstance(F, Kron):  # "kfac" only (checked): the batch's K-FAC itself
                est, own = F, owned
                if a == 0.0 and not owned:  # kept as the state: a copy, not the caller's arrays
                    xp = F._xp
                    est = _new_kron(xp.asarray(F.left, copy=True), xp.asarray(F.right, copy=True),
                                    xp.asarray(F.scale, copy=True), F.info, xp)
            elif name in ("kfac", "ekfac"):
                est, own = self._kfac(F), True  # fresh factors of this call, held by nothing else
            elif name == "tkfac":
                est = self._tkfac(F)
            else:
                est = self._kfoc(F)
            if a == 0.0:
                left, right, scale = est.left, est.right, est.scale
            else:
                left = _mix(a, self._left, b, est.left, reuse_new=own)
                right = _mix(a, self._right, b, est.right, reuse_new=own)
                scale = a * self._scale + b * est.scale
        if name == "ekfac":  # sets the basis and correction last, after everything that can fail
            info = self._ekfac_update(F, left, right, t, a, b)
        # the estimate succeeded: only now is anything written (a failing batch leaves the
        # object as it was, its step count included)
        self._step += 1
        self._xp = F._xp
        self._left, self._right, self._scale = left, right, scale
        if isinstance(F, Kron):  # what the batch's terms were is not known (used by kfoc_running only)
            self._symmetric, self._psd = None, False
        elif a == 0.0:
            self._symmetric = F.symmetric
            self._psd = psd_sum(F)
        else:
            self._psd = self._psd and psd_sum(F)
            if self._symmetric is not None:
                self._symmetric = self._symmetric and F.symmetric
        self._info = dataclasses.replace(info if name == "ekfac" else est.info, method=f"running/{name}")
        self._num_updates = t
        return self.estimate

    def _snapshot(self) -> dict:
        """The object's attributes, for :meth:`_restore`: references suffice, since an update
        rebinds the state and never writes into the arrays it held."""
        return dict(vars(self))

    def _restore(self, snapshot: dict) -> None:
        """Put back a :meth:`_snapshot` (a caller whose later step failed undoes this update)."""
        vars(self).clear()
        vars(self).update(snapshot)

    # -- the estimators: one place, overridden where the batch is split over processes --------
    def _kfac(self, F: KronSum) -> Kron:
        return kfac(F)

    def _tkfac(self, F: KronSum) -> Kron:
        return tkfac(F)

    def _kfoc(self, S: KronSum, prev: Kron | None = None) -> Kron:
        """K-FOC of a batch, or of ``S`` = the weighted previous estimate plus the batch, warm
        started from ``prev``."""
        opts = dict(self._kfoc_options)
        if prev is None:
            return kfoc(S, **opts)
        if opts.get("method", "auto") == "gram" and not S._gram_able():
            opts["method"] = "lanczos"
        # the warm start pays for Lanczos on the contractions; the Gram solver's steps
        # cost O(K²) and a factor start would cost a product with the batch (K n²)
        warm = choose_method(S, opts.get("method", "auto")) != "gram"
        return kfoc(S, init=prev, **opts) if warm else kfoc(S, **opts)

    def _ekfac_basis(self, kron: Kron) -> tuple:
        """The eigenvectors ``(U, V)`` of K-FAC's factors (``"ekfac"``'s basis refreshes)."""
        from ._ekfac import _eigenbasis

        return _eigenbasis(kron, kron._xp)

    def _ekfac_diag(self, F: KronSum, U: Array, V: Array) -> Array:
        """The batch's corrected eigenvalues ``S`` (its diagonal in ``U ⊗ V``), true scale."""
        return _ekfac_in(F, U, V, KronInfo(method="ekfac")).S

    def _prev_share(self) -> float:
        """The share of the previous estimate this object adds to ``S`` (1: it alone holds
        the batch; ``1/world`` when every rank adds it to its part of a split batch)."""
        return 1.0

    def _ekfac_update(self, F: KronSum, left: Array, right: Array, t: int, a: float,
                      b: float) -> KronInfo:
        """Set ``_U``, ``_V``, ``_S`` of update ``t`` (see the class docstring)."""
        xp = F.xp
        U, V, S_prev = self._U, self._V, self._S
        notes: tuple[str, ...] = ()
        if (t - 1) % self._basis_every == 0:
            kron = _new_kron(left, right, 1.0, KronInfo(method="kfac"), xp)
            # checked and symmetrised always: a restored state continues bit for bit
            U, V = self._ekfac_basis(kron)
            notes = ("eigenbasis refreshed at this update",)
            if a != 0.0:  # the previous estimate's diagonal in the new basis
                Mu = (xp.matrix_transpose(U) @ self._U) ** 2
                Mv = (xp.matrix_transpose(V) @ self._V) ** 2
                S_prev = Mu @ S_prev @ xp.matrix_transpose(Mv)
        S = self._ekfac_diag(F, U, V)
        if a != 0.0:
            S = _mix(a, S_prev, b, S, reuse_new=True)
        self._U, self._V, self._S = U, V, S
        return KronInfo(method="ekfac", notes=notes)

    def _as_term(self, prev: Kron, a: float) -> KronSum:
        """``a · prev`` as a one-term sum. ``prev`` is this object's own estimate, finite by
        construction (checked batches and solves, checked restores): no NaN scan, and no
        symmetry scan when the batches so far say whether its factors are symmetric."""
        psd = self._estimator == "kfoc_running" and self._psd
        if self._symmetric is None:
            term = KronSum.from_kron(prev, check_finite=False).scaled(a)
            term._psd_terms = psd
            return term
        xp = self._xp
        return KronSum("terms", xp.reshape(prev.scale, (1,)) * a, L=prev.left[None, ...],
                       R=prev.right[None, ...], symmetric=self._symmetric, _xp=xp, psd_terms=psd)

    def _check_batch(self, F: object) -> None:
        if isinstance(F, Kron) and self._estimator != "kfac":
            raise TypeError(
                f"F is a Kron: only estimator='kfac' takes a batch's K-FAC estimate; "
                f"{self._estimator!r} needs the batch's statistics as a KronSum"
            )
        if not isinstance(F, (KronSum, Kron)):
            raise TypeError(
                f"F must be a KronSum (the statistics of one batch), got {type(F).__name__}"
            )
        if self._num_updates == 0:
            return
        m, n = int(self._left.shape[0]), int(self._right.shape[0])
        if (F.m, F.n) != (m, n):
            raise ValueError(
                f"F has factor sizes (m, n) = ({F.m}, {F.n}) but the running estimate has "
                f"({m}, {n}): left {tuple(self._left.shape)}, right {tuple(self._right.shape)}"
            )
        if not _same_namespace(F._xp, self._xp):
            raise TypeError(
                f"F's arrays belong to {getattr(F._xp, '__name__', F._xp)} but the running "
                f"estimate holds arrays of {getattr(self._xp, '__name__', self._xp)}"
            )
        if F.dtype != self._left.dtype:
            raise TypeError(
                f"F has dtype {F.dtype} but the running estimate has dtype {self._left.dtype}; "
                "cast the batch with F.astype(...)"
            )

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The state as a plain dict: configuration, counters and the estimate's arrays.

        Keys: ``"estimator"`` (str), ``"decay"`` (float), ``"update_every"`` (int),
        ``"bias_correction"`` (bool), ``"step"``, ``"num_updates"`` (int), ``"left"`` (m, m),
        ``"right"`` (n, n) and ``"scale"`` (0-d) (for ``"ekfac"`` the running K-FAC factors,
        plus ``"basis_every"`` (int), ``"U"`` (m, m), ``"V"`` (n, n) and ``"S"`` (m, n)):
        arrays of the batches' own library, device and dtype (``None`` before the first update), so ``torch.save`` or a JAX checkpointer
        stores them as they are. The arrays are shared, not copied; ``RunningEstimate``
        never writes into them (copy them before modifying them in place). The ``KronInfo``
        diagnostics of the last update are not part of the state.

        Examples
        --------
        >>> import numpy as np
        >>> import kronsum as ks
        >>> run = ks.RunningEstimate("kfac", decay=0.9)
        >>> _ = run.update(ks.KronSum.from_outer(np.ones((2, 2)), np.ones((2, 3))))
        >>> state = run.state_dict()
        >>> sorted(state)[:4], state["left"].shape, state["num_updates"]
        (['bias_correction', 'decay', 'estimator', 'left'], (2, 2), 1)
        >>> restored = ks.RunningEstimate.from_state_dict(state)
        >>> bool(np.array_equal(restored.estimate.to_dense(), run.estimate.to_dense()))
        True
        """
        state = {
            "estimator": self._estimator,
            "decay": self._decay,
            "update_every": self._update_every,
            "bias_correction": self._bias_correction,
            "step": self._step,
            "num_updates": self._num_updates,
            "left": self._left,
            "right": self._right,
            "scale": self._scale,
        }
        if self._estimator == "ekfac":
            state.update(basis_every=self._basis_every, U=self._U, V=self._V, S=self._S)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; continuing the stream then gives identical results.

        The configuration stored in ``state`` (estimator, decay, update_every,
        bias_correction) must equal this object's (``ValueError`` naming the key otherwise;
        use :meth:`from_state_dict` to build a matching object). Checks the keys, the counters
        (``num_updates`` must be the number of updates ``step`` calls apply), and that
        ``left`` (m, m), ``right`` (n, n) and ``scale`` (0-d) are finite real arrays of one
        library and dtype, with ``scale >= 0`` except for ``"tkfac"`` (whose scale is
        ``tr F``). Nothing is copied or modified, and a refused state leaves this object as
        it was.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping (a state_dict), got {type(state).__name__}")
        keys = _STATE_KEYS + (_EKFAC_KEYS if self._estimator == "ekfac" else ())
        missing = [k for k in keys if k not in state]
        extra = sorted(str(k) for k in state if k not in keys)
        if missing or extra:
            raise ValueError(f"state has missing keys {missing} and unexpected keys {extra}")
        mine = {"estimator": self._estimator, "decay": self._decay,
                "update_every": self._update_every, "bias_correction": self._bias_correction}
        if self._estimator == "ekfac":
            mine["basis_every"] = self._basis_every
        for key, value in mine.items():
            if state[key] != value or type(state[key]) is bool and type(value) is not bool:
                raise ValueError(
                    f"state[{key!r}] = {state[key]!r} but this RunningEstimate has {key}={value!r}; "
                    "use RunningEstimate.from_state_dict(state) to restore its configuration"
                )
        step, t = state["step"], state["num_updates"]
        for key, v in (("step", step), ("num_updates", t)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"state[{key!r}] must be an integer >= 0, got {v!r}")
        expected = -(-step // self._update_every)  # calls 0, T, 2T, … below step
        if t != expected:
            raise ValueError(
                f"state['num_updates'] = {t} does not match state['step'] = {step} with "
                f"update_every = {self._update_every} (expected {expected})"
            )
        left, right, scale = state["left"], state["right"], state["scale"]
        extra_arrays = {k: state[k] for k in ("U", "V", "S")} if self._estimator == "ekfac" else {}
        if t == 0:
            if not (left is None and right is None and scale is None
                    and all(v is None for v in extra_arrays.values())):
                raise ValueError("state with num_updates = 0 must have left, right and scale "
                                 f"{'(and U, V, S) ' if extra_arrays else ''}None")
            self._clear()
            self._step = step
            return
        arrays = {"left": left, "right": right, "scale": scale, **extra_arrays}
        for key, v in arrays.items():
            if not is_array(v):
                raise TypeError(f"state[{key!r}] must be an array, got {type(v).__name__}")
        try:
            xp = namespace(*arrays.values())
        except TypeError:
            raise TypeError(f"state arrays {list(arrays)} must be arrays of one library") from None
        for key, v, nd in (("left", left, 2), ("right", right, 2), ("scale", scale, 0)):
            if not xp.isdtype(v.dtype, "real floating"):
                raise TypeError(f"state[{key!r}] must have a real floating dtype, got {v.dtype}")
            if v.ndim != nd or (nd == 2 and (v.shape[0] != v.shape[1] or v.shape[0] == 0)):
                what = "(m, m)" if key == "left" else "(n, n)" if key == "right" else "() (0-d)"
                raise ValueError(f"state[{key!r}] must have shape {what}, got {tuple(v.shape)}")
        if extra_arrays:
            m, n = int(left.shape[0]), int(right.shape[0])
            for key, want in (("U", (m, m)), ("V", (n, n)), ("S", (m, n))):
                v = extra_arrays[key]
                if tuple(v.shape) != want:
                    raise ValueError(f"state[{key!r}] must have shape {want} to match left "
                                     f"({m}, {m}) and right ({n}, {n}), got {tuple(v.shape)}")
        if len({v.dtype for v in arrays.values()}) != 1:
            got = ", ".join(f"{k} {v.dtype}" for k, v in arrays.items())
            raise TypeError(f"state arrays must share one dtype, got {got}")
        for key, v in arrays.items():
            check_finite_values(xp, v, f"state[{key!r}]")
        if self._estimator != "tkfac" and float(scale) < 0:  # tkfac's δ = tr F may be negative
            raise ValueError(
                f"state['scale'] must be >= 0 for estimator {self._estimator!r} (its scale is "
                f"{'Σ w_k' if self._estimator == 'kfac' else 'σ₁'}), got {float(scale)!r}"
            )
        self._clear()
        self._step, self._num_updates = step, t
        self._left, self._right, self._scale, self._xp = left, right, scale, xp
        if self._estimator == "kfoc_running" and t > 0:
            # a previous estimate with PSD factors enters the next sums as a PSD term, as it
            # would have in the stream that saved it (one eigvalsh of each factor, here only)
            from ._eigen import _psd_projection

            self._psd = all(_psd_projection(M, xp) is None for M in (left, right))
        if extra_arrays:
            self._U, self._V, self._S = extra_arrays["U"], extra_arrays["V"], extra_arrays["S"]
        self._info = KronInfo(method=f"running/{self._estimator}",
                              notes=("restored from a state_dict",))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], *,
                        kfoc_options: Mapping[str, Any] | None = None) -> "RunningEstimate":
        """A new :class:`RunningEstimate` with the configuration and state of ``state``."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping (a state_dict), got {type(state).__name__}")
        for key in ("estimator", "decay", "update_every", "bias_correction"):
            if key not in state:
                raise ValueError(f"state has no key {key!r}")
        out = cls(state["estimator"], state["decay"], update_every=state["update_every"],
                  bias_correction=state["bias_correction"], kfoc_options=kfoc_options,
                  basis_every=state.get("basis_every") if state["estimator"] == "ekfac" else None)
        out.load_state_dict(state)
        return out

    def __repr__(self) -> str:
        size = "" if self._num_updates == 0 else \
            f", m={int(self._left.shape[0])}, n={int(self._right.shape[0])}"
        return (f"RunningEstimate({self._estimator!r}, decay={self._decay}, "
                f"update_every={self._update_every}, bias_correction={self._bias_correction}, "
                f"step={self._step}, num_updates={self._num_updates}{size})")
