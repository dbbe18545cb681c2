r"""Exact approximation errors ``‖F − Σ_r s_r L_r ⊗ R_r‖_F`` without forming F."""

from __future__ import annotations

import math
import warnings
from typing import Any

from ._closed_forms import _require_sum
from ._compat import Array, device_of, host_vector, namespace, to_float
from ._ekfac import EigenKron, diag_in_basis, rotated
from ._sum import KronSum, _ldexp1, times_scale
from ._validation import check_in_range

__all__ = ["frobenius_error", "AccuracyWarning"]

_DIRECT_FLOPS = 2e9  # "auto" evaluates entry by entry below this many multiply-adds
_BLOCK_ELEMENTS = 2**22  # entries of 𝓡(F) formed at once by the direct route


class AccuracyWarning(UserWarning):
    """A result may have lost digits to rounding (the message says how many and why)."""


def _max_abs(x: Array, xp: Any) -> Array:
    c = xp.max(xp.abs(x), axis=(-2, -1))
    return xp.where(c > 0, c, xp.ones_like(c))


def frobenius_error(F: KronSum, approx: Any, relative: bool = False, *, method: str = "auto") -> Array:
    r"""``‖F − approx‖_F`` (or divided by ``‖F‖_F``), exactly, without forming F.

    ``approx`` is a :class:`Kron` (or any result with several Kronecker terms, such as a
    Kronecker-rank-r approximation) ``B = Σ_r s_r L_r ⊗ R_r``, or an :class:`EigenKron`
    ``(U ⊗ V) diag(vec S) (U ⊗ V)ᵀ``. Two routes:

    ``"direct"``  forms the rearranged matrices ``𝓡(F)`` and ``𝓡(B)`` a block of rows at a time
                  and sums the squared entrywise differences: relative accuracy about
                  ``ε‖F‖/err``, memory O(m·n²) per block, cost O(K m² n²) (conv: O(K m² n²)).
    ``"gram"``    ``‖F‖² − 2Σ_r s_r⟨F, L_r⊗R_r⟩ + Σ_{r,r'} s_r s_r'⟨L_r,L_r'⟩⟨R_r,R_r'⟩`` from K×K
                  Gram matrices: cost O(K²(m + n)) (outer), but it cancels: relative accuracy
                  about ``ε(‖F‖/err)²``, useless when ``err/‖F‖ < 1e-8`` in float64.
    ``"auto"``    ``"direct"`` when it costs under about 2e9 multiply-adds, else ``"gram"``,
                  with an :class:`AccuracyWarning` when the result is small enough
                  (``err/‖F‖ < 1e-4``) to have lost digits.

    For an :class:`EigenKron`, with ``D`` the diagonal of F in its basis (:func:`ekfac`'s
    ``S`` of F) the error splits into two non-negative parts,
    ``‖F − F̂‖² = ‖off(F̃)‖² + ‖D − S‖²``, where ``F̃ = (U ⊗ V)ᵀF(U ⊗ V)`` is F rotated into the
    basis (a sum of the same form: ``GU``, ``AV``). ``"direct"`` sums the squared
    off-diagonal entries of ``𝓡(F̃)`` block by block (nothing cancels: relative accuracy about
    ``ε‖F‖/err``, so an F that is exactly of EKFAC form gives an error at rounding level);
    ``"gram"`` takes ``‖off(F̃)‖² = ‖F‖² − ‖D‖²``, which cancels as above. Costs as for a
    Kron plus the rotation, ``O(K(m² + n²))`` (conv ``O(KT(m² + n²))``).

    Parameters
    ----------
    F : KronSum
    approx : Kron or EigenKron
        With factor sizes matching F's ``m`` and ``n``.
    relative : bool
        Return ``‖F − approx‖ / ‖F‖`` (for a zero F: 0 if ``approx`` is zero, ``inf`` otherwise).
        F and ``approx`` may have any magnitude the dtype holds (their inputs are rescaled by
        powers of two first); ``OverflowError`` when the absolute error itself is beyond the
        dtype's range. NaN or infinity in ``approx`` propagates to the result.
    method : {"auto", "direct", "gram"}

    Returns
    -------
    0-d array of F's namespace and dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from kronsum import KronSum, kfac, frobenius_error
    >>> rng = np.random.default_rng(0)
    >>> F = KronSum.from_outer(rng.standard_normal((6, 3)), rng.standard_normal((6, 2)))
    >>> est = kfac(F)
    >>> bool(np.isclose(frobenius_error(F, est), np.linalg.norm(F.to_dense() - est.to_dense())))
    True
    """
    F = _require_sum(F, "frobenius_error")
    if not (hasattr(approx, "_as_stack") or isinstance(approx, EigenKron)):
        raise TypeError(f"approx must be a Kron, an EigenKron or a Kronecker-rank-r result, got "
                        f"{type(approx).__name__}")
    if method not in ("auto", "direct", "gram"):
        raise ValueError(f"method must be 'auto', 'direct' or 'gram', got {method!r}")
    if isinstance(approx, EigenKron):
        return _eigen_error(F, approx, relative, method)
    s, Ls, Rs = approx._as_stack()
    if (Ls.shape[-1], Rs.shape[-1]) != (F.m, F.n):
        raise ValueError(
            f"approx has factors of sizes ({Ls.shape[-1]}, {Rs.shape[-1]}) but F has "
            f"(m, n) = ({F.m}, {F.n})"
        )
    xp = namespace(F.weights, Ls, names=("F", "approx"))
    dtype = F.dtype
    Fn, ew, el, er, zero = F._normalized()
    lmax, rmax = _max_abs(Ls, xp), _max_abs(Rs, xp)
    Ls = xp.astype(Ls, dtype) / lmax[:, None, None]
    Rs = xp.astype(Rs, dtype) / rmax[:, None, None]
    # F = 2^E F̃ and approx = Σ_r s_r l_r r_r (unit-max factors): both in units of 2^ref, the
    # larger of the two magnitudes, with exponents kept exact on the host so that neither
    # opposite scales nor an F (or approx) beyond float64's range make 0/0 or inf/inf
    r = int(s.shape[0])
    mags = host_vector(xp.concat([xp.astype(s, dtype), xp.astype(lmax, dtype), xp.astype(rmax, dtype)]))
    terms = [math.frexp(mags[i]) + math.frexp(mags[r + i]) + math.frexp(mags[2 * r + i])
             for i in range(r)]
    exps = [t[1] + t[3] + t[5] for t in terms if t[0] != 0]
    E = ew + el + er
    ref = max(([] if zero else [E]) + exps, default=0)  # a zero F has no magnitude
    Fn = Fn if zero else Fn.scaled(_ldexp1(E - ref))
    s = xp.asarray([math.ldexp(t[0] * t[2] * t[4], t[1] + t[3] + t[5] - ref) for t in terms],
                   dtype=dtype, device=device_of(F.weights))

    m, n, K = F.m, F.n, F.num_terms
    flops = K * m * m * n * n
    use = method if method != "auto" else ("direct" if flops <= _DIRECT_FLOPS else "gram")
    if use == "direct":
        e2, f2 = _direct(Fn, s, Ls, Rs)
    else:
        e2, f2 = _gram(Fn, s, Ls, Rs)
    finite = all(math.isfinite(t) for t in mags)
    return _finish(xp, e2, f2, ref, finite, dtype, use, method, flops, relative)


def _finish(xp: Any, e2: Array, f2: Array, ref: int, finite: bool, dtype: Any, use: str,
            method: str, flops: float, relative: bool, stacklevel: int = 3) -> Array:
    """``2^ref·√e2`` (or ``√(e2/f2)``), with the Gram route's warning for small errors.
    ``e2`` and ``f2`` are in units of ``2^ref``; ``finite``: whether the approximation's
    magnitudes were finite (else NaN or infinity propagates unscaled); ``OverflowError``
    when the error is beyond ``dtype``'s range."""
    zero = xp.zeros_like(e2)
    e2 = xp.where(e2 < 0, zero, e2)  # rounding of the Gram route; NaN and inf pass through
    if use == "gram" and method == "auto":
        if bool(e2 < 1e-8 * f2):
            warnings.warn(
                f"frobenius_error used the Gram route (method='direct' would cost ~{flops:.1e} "
                f"multiply-adds) and the error is below 1e-4·‖F‖, where that route loses about "
                f"2·log10(‖F‖/err) digits; pass method='direct' for an accurate value",
                AccuracyWarning, stacklevel=stacklevel,
            )
    if relative:  # a zero F: 0 when approximated by zero, inf otherwise
        safe = xp.where(f2 > 0, f2, xp.ones_like(f2))
        rel = xp.sqrt(e2 / safe)
        return xp.where(f2 > 0, rel, xp.where(e2 > 0, xp.full_like(rel, float("inf")), rel))
    err = xp.sqrt(e2)
    v = to_float(err)
    if math.isnan(v) or not finite:  # NaN/inf in approx propagate
        return err
    if v != 0:
        mant, e = math.frexp(v)
        check_in_range(math.inf if e + ref > 1100 else math.ldexp(mant, e + ref),
                       "‖F − approx‖_F", xp, dtype)
    return _times_pow2(err, ref)


def _times_pow2(x: Array, e: int) -> Array:
    """``x · 2^e`` for any integer ``e`` (in two factors when ``2^e`` is no normal float64)."""
    if -1022 <= e <= 1023:
        return times_scale(x, _ldexp1(e))
    return times_scale(times_scale(x, _ldexp1(e // 2)), _ldexp1(e - e // 2))


def _direct(Fn: KronSum, s: Array, Ls: Array, Rs: Array):
    xp = Fn.xp
    m, n = Fn.m, Fn.n
    r = Ls.shape[0]
    Rf = xp.reshape(Rs, (r, n * n)) * s[:, None]
    b = max(1, min(m, _BLOCK_ELEMENTS // max(1, m * n * n)))
    e2 = xp.zeros((), dtype=Fn.dtype, device=Fn.device)
    f2 = xp.zeros((), dtype=Fn.dtype, device=Fn.device)
    for i0 in range(0, m, b):
        i1 = min(m, i0 + b)
        blk = Fn._rearranged_rows(i0, i1)
        Lb = xp.reshape(Ls[:, i0:i1, :], (r, (i1 - i0) * m))
        e2 = e2 + xp.sum((blk - xp.matrix_transpose(Lb) @ Rf) ** 2)
        f2 = f2 + xp.sum(blk**2)
    return e2, f2


def _gram(Fn: KronSum, s: Array, Ls: Array, Rs: Array):
    xp = Fn.xp
    r = Ls.shape[0]
    f2 = Fn._sq_norm()
    cross = xp.stack([xp.sum(Fn.contract_left(Ls[i, ...]) * Rs[i, ...]) for i in range(r)])
    m, n = Fn.m, Fn.n
    Lf, Rf = xp.reshape(Ls, (r, m * m)), xp.reshape(Rs, (r, n * n))
    SB = (Lf @ xp.matrix_transpose(Lf)) * (Rf @ xp.matrix_transpose(Rf))
    b2 = xp.sum((s @ SB) * s)
    return f2 - 2 * xp.sum(s * cross) + b2, f2


def _eigen_error(F: KronSum, est: EigenKron, relative: bool, method: str) -> Array:
    """:func:`frobenius_error` of an :class:`EigenKron`: ``‖off(F̃)‖² + ‖D − S‖²``."""
    if (est.m, est.n) != (F.m, F.n):
        raise ValueError(
            f"approx has bases of sizes ({est.m}, {est.n}) but F has (m, n) = ({F.m}, {F.n})"
        )
    xp = namespace(F.weights, est.S, names=("F", "approx"))
    dtype = F.dtype
    Fn, ew, el, er, zero = F._normalized()
    U, V = xp.astype(est.U, dtype), xp.astype(est.V, dtype)
    # F = 2^E F̃ and S, both in units of 2^ref, the larger magnitude (as for a Kron)
    S = xp.astype(est.S, dtype)
    smax = to_float(xp.max(xp.abs(S))) if math.prod(S.shape) else 0.0
    finite = math.isfinite(smax)
    E = ew + el + er
    ref = max(([] if zero else [E]) + ([math.frexp(smax)[1]] if finite and smax != 0 else []),
              default=0)
    Fn = Fn if zero else Fn.scaled(_ldexp1(E - ref))
    S = _times_pow2(S, -ref)
    m, n, K = F.m, F.n, F.num_terms
    flops = K * m * m * n * n
    use = method if method != "auto" else ("direct" if flops <= _DIRECT_FLOPS else "gram")
    D = diag_in_basis(Fn, U, V)
    d2 = xp.sum((D - S) ** 2)
    if use == "direct":
        off2, f2 = _offdiag_direct(rotated(Fn, U, V))
    else:
        f2 = Fn._sq_norm()
        off2 = f2 - xp.sum(D * D)
    return _finish(xp, off2 + d2, f2, ref, finite, dtype, use, method, flops, relative,
                   stacklevel=4)


def _offdiag_direct(Ft: KronSum):
    """``(Σ off-diagonal entries², ‖F̃‖²)`` of F̃ from blocks of rows of 𝓡(F̃): the diagonal
    entry ``((i, j), (i, j))`` of F̃ is the entry ``((i, i), (j, j))`` of 𝓡(F̃), masked out."""
    xp = Ft.xp
    m, n = Ft.m, Ft.n
    dev = Ft.device
    b = max(1, min(m, _BLOCK_ELEMENTS // max(1, m * n * n)))
    cols = xp.arange(n * n, device=dev)
    col_diag = xp.astype((cols // n) == (cols % n), Ft.dtype)
    off2 = xp.zeros((), dtype=Ft.dtype, device=dev)
    f2 = xp.zeros((), dtype=Ft.dtype, device=dev)
    for i0 in range(0, m, b):
        i1 = min(m, i0 + b)
        blk = Ft._rearranged_rows(i0, i1)  # rows (i, i'), i0 <= i < i1
        rows = xp.arange((i1 - i0) * m, device=dev)
        row_diag = xp.astype((rows // m + i0) == (rows % m), Ft.dtype)
        keep = 1 - row_diag[:, None] * col_diag[None, :]
        off2 = off2 + xp.sum((blk * keep) ** 2)
        f2 = f2 + xp.sum(blk**2)
    return off2, f2
