r"""The stopping rule of K-FOC's iterative solvers: a bound on how far the answer's error is
above the optimal error, from the Ritz values and residuals the solvers have at hand.

Notation: ``A = 𝓡𝓡ᵀ`` on the iterated factor, eigenvalues ``λ_1 ≥ λ_2 ≥ …`` (``λ_i = σ_i²``,
``Σ λ_i = ‖F‖²``); ``u`` the unit Ritz vector with Ritz value ``θ_1`` and residual
``r_1 = ‖Au − θ_1u‖``; ``θ_2`` the second Ritz value and ``r_2`` its residual. The answer
finished from ``u`` has ``‖F − F̂‖² = ‖F‖² − θ_1`` against the optimum's ``‖F‖² − λ_1``, so

.. math::

    \|F - \hat F\| - \mathrm{opt} = \frac{\lambda_1 - \theta_1}{\|F - \hat F\| + \mathrm{opt}}
    \le \min\Big(\frac{\lambda_1 - \theta_1}{e_-},\ \sqrt{\lambda_1 - \theta_1}\Big),
    \qquad \lambda_1 - \theta_1 \le \frac{r_1^2}{\theta_1 - \mu}

(the second is Temple's inequality) for any ``μ ≥ λ_2`` below ``θ_1``, with ``e_-`` a lower
bound of ``‖F − F̂‖ + opt``. When ``‖F‖²`` is known (the Gram solver has it at the cost of one
pass over its K×K matrices) ``μ = ‖F‖² − θ_1 ≥ ‖F‖² − λ_1 ≥ λ_2`` is a proven bound as soon as
``θ_1 > ‖F‖²/2`` (K-FOC explains more than half of ``‖F‖²``), and so is
``e_- = ‖F − F̂‖ + √(‖F − F̂‖² − Δ)`` with ``Δ`` the bound of ``λ_1 − θ_1`` (the optimum's error
is ``√(‖F‖² − λ_1) ≥ √(‖F − F̂‖² − Δ)``, about ``‖F − F̂‖`` near convergence): the bound is
then **certified** (in exact arithmetic, for the solver's residual; ``f2``'s
rounding is allowed for, the Lanczos recurrence's residual estimate is taken as it is). Otherwise ``μ = θ_2 + r_2`` (an eigenvalue lies within ``r_2`` of
``θ_2``, and ``θ_2 ≤ λ_2`` by interlacing; that this eigenvalue is ``λ_2`` is what the Krylov
space suggests, not a proof) and, without ``‖F‖²``, ``e_- = 2√θ_2 ≤ 2·opt``,
``‖F‖² ≥ θ_1 + θ_2`` (with it, ``e_-`` and ``‖F‖`` as above): an **estimate**.

The estimate is multiplied by ``ESTIMATE_SAFETY`` (4): early in a Krylov space ``θ_2`` can sit
well below ``λ_2``; the unscaled estimate came within 7 % of the true gap on the test data, and
the property tests check that the scaled one stays above it (docs/kfoc.md has the cases where
it did not).

Pure float arithmetic: the numba kernel compiles this same function.
"""

from __future__ import annotations

import math

ESTIMATE_SAFETY = 4.0


def gap_bound(th1: float, r1: float, th2: float, r2: float, f2: float,
              f2_err: float = 0.0, th_err: float = 0.0, th_round: float = 0.0,
              half_err: float = 0.0) -> tuple[float, bool]:
    """``(bound, certified)``: an upper bound of ``(‖F − F̂‖ − optimal error)/‖F‖``.

    ``th1``, ``r1``: the top Ritz value and its absolute residual; ``th2``, ``r2``: the second
    Ritz value and its residual (``th2 < 0``: unknown); ``f2``: ``‖F‖²`` in the same units
    (``< 0``: unknown), ``f2_err`` a bound of its rounding error (it widens ``μ`` and narrows
    ``‖F − F̂‖`` by that much, so that a nearly exact Kronecker product, where ``f2 − θ_1``
    cancels, is not certified on rounding noise). ``th_err``: how far the operator the solver
    applied may lie from F's at the Ritz vector (its rounding, in the units of ``th1``; 0: the
    solver's arithmetic taken as exact): F's Rayleigh quotient of the vector is then at least
    ``th1 − th_err``, its residual at most ``r1 + th_err`` (at its own Rayleigh quotient, which
    minimises the residual over shifts: ``‖A_F u − θ_1u‖ ≤ r_1 + th_err``), and the Ritz values may sit
    ``th_err`` from F's. ``th_round``: a bound of the rounding of ``th1`` itself (a scalar, not
    the operator: it moves the Rayleigh quotient, not the residual), so that ``f2 − θ_1``
    computed by different arithmetic than ``θ_1`` is not taken for an optimal error that
    rounding made. ``half_err`` (in the units of ``√th1``): how far the answer's other factor
    (scaled, ``S = σR``) may lie from F's half-step of the iterate ``𝓡ᵀu`` (computed in a lower
    precision, or of a copy of F): ``S − 𝓡ᵀu`` is orthogonal to ``F − u⊗𝓡ᵀu``, so the error
    grows from ``a = ‖F − u⊗𝓡ᵀu‖`` to ``√(a² + b²) ≤ a + min(b, b²/(2a))``, with ``a ≥ e``
    (``e`` as for ``e_-``). ``certified`` when the bound rests on ``f2`` alone (see the module
    docstring). ``inf`` when nothing bounds ``λ_2`` below ``θ_1``; 0 for a zero operator
    (certified when ``f2 = 0`` says the sum is zero).
    """
    if not th1 > 0.0:
        return 0.0, f2 == 0.0
    certified = False
    mu = math.inf
    lo1 = th1 - th_err - th_round  # F's Rayleigh quotient of the Ritz vector, at least
    if f2 >= 0.0 and f2 + f2_err - lo1 < lo1:
        mu = max(f2 + f2_err - lo1, 0.0)
        certified = True
    elif th2 >= 0.0:
        mu = th2 + r2 + th_err
    d = lo1 - mu
    if not d > 0.0:
        return math.inf, False
    r = r1 + th_err
    dl = r * r / d
    if f2 >= 0.0:
        nf2 = max(f2 - f2_err, lo1)
        # e ≤ ‖F − F̂‖, and opt² = ‖F‖² − λ_1 ≥ e² − dl: the optimum's error is at least that
        e = math.sqrt(max(f2 - f2_err - th1 - th_err - th_round, 0.0))
        lower = e + math.sqrt(max(e * e - dl, 0.0))
    else:
        nf2 = lo1 + max(th2, 0.0)
        e = math.sqrt(max(th2, 0.0))  # ‖F − F̂‖ ≥ opt ≥ √λ_2 ≥ √θ_2
        lower = 2.0 * e
    nf = math.sqrt(nf2)
    bound = math.sqrt(dl) / nf
    if lower > 0.0:
        bound = min(bound, dl / (lower * nf))
    if half_err > 0.0:
        bound += (min(half_err, half_err * half_err / (2.0 * e)) if e > 0.0 else half_err) / nf
    return (bound if certified else ESTIMATE_SAFETY * bound), certified
