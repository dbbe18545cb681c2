r"""The closed-form estimators: K-FAC (Martens & Grosse 2015; KFC for convolutions) and TKFAC."""

from __future__ import annotations

import math

from ._accel import via_numpy_on_cpu, weighted_gram
from ._compat import device_of, eye_like, host_floats, materialize_all, to_float, trace
from ._kron import Kron, KronInfo
from ._sum import KronSum, _ldexp1, _sum_over, times_scale
from ._validation import check_in_range, dtype_range, underflow_notes

__all__ = ["kfac", "tkfac"]


def _new_kron(left, right, scale, info: KronInfo, xp) -> Kron:
    """A :class:`Kron` from factors the library computed itself (already checked, one dtype):
    skips the constructor's validation, which costs as much as a small layer's estimate, and
    its copies (a 0-d ``scale`` of the right dtype is shared, as the factors are)."""
    out = Kron.__new__(Kron)
    out._xp = xp
    out.left, out.right = left, right
    if not hasattr(scale, "shape"):
        scale = xp.asarray(float(scale), dtype=left.dtype, device=device_of(left))
    if scale.shape != ():
        scale = xp.reshape(scale, ())
    # used as given, like left and right (in place, the library writes only arrays it has
    # just made, e.g. kfac's factors in RunningEstimate's EMA)
    out.scale = scale if scale.dtype == left.dtype else xp.astype(scale, left.dtype)
    out.info = info
    return out


def _require_sum(F: object, fname: str) -> KronSum:
    if not isinstance(F, KronSum):
        raise TypeError(
            f"{fname} takes a KronSum (build one with KronSum.from_terms, from_outer or "
            f"from_conv), got {type(F).__name__}"
        )
    return F


@via_numpy_on_cpu
def kfac(F: KronSum) -> Kron:
    r"""K-FAC: the product of the weighted means of the factors.

    .. math::

        \hat F_{\mathrm{KFAC}} = \frac{(\sum_k w_k L_k) \otimes (\sum_k w_k R_k)}{\sum_k w_k}

    returned as ``scale = Σ w_k``, ``left = Σ w_k L_k / Σ w_k`` (the gradient-side second
    moment, K-FAC's ``E[g gᵀ]``) and ``right = Σ w_k R_k / Σ w_k`` (``E[ā āᵀ]``). For the conv
    form it is Grosse & Martens' KFC,
    ``(Σ_k w_k G_kᵀG_k) ⊗ (Σ_k w_k A_kᵀA_k) / (T Σ_k w_k)``, i.e. ``left = Σ w G_kᵀG_k/(TΣw)``
    and ``right = Σ w A_kᵀA_k/Σw``.

    Exact when all ``L_k`` (or all ``R_k``) are equal; otherwise it assumes the two sides
    independent, which per-sample statistics rarely are (see :func:`kfoc`).

    Parameters
    ----------
    F : KronSum

    Returns
    -------
    Kron
        ``info.method == "kfac"``. All-zero weights give a zero estimate (``scale = 0``),
        and all-zero statistics on one side a zero factor, each recorded in ``info.notes``.

    Raises
    ------
    OverflowError
        When a factor (a weighted mean of the statistics) or ``Σ w_k`` is beyond the range of
        the dtype, or underflows below its smallest normal number, although F may fit (e.g.
        ``G·1e200`` with ``A/1e200``): this split of the magnitude cannot be stored.
        :func:`tkfac` and :func:`kfoc` normalise their factors and handle such inputs.

    Notes
    -----
    Cost: O(K(m² + n²)) for outer and terms, O(KT(m² + n²)) for conv: two (batched)
    Gram products, the floor every estimator here is measured against.

    Examples
    --------
    >>> import numpy as np
    >>> from kronsum import KronSum, kfac
    >>> G, A = np.ones((4, 2)), np.arange(12.0).reshape(4, 3)
    >>> est = kfac(KronSum.from_outer(G, A))
    >>> float(est.scale), est.left.shape, est.right.shape
    (4.0, (2, 2), (3, 3))
    >>> np.allclose(est.to_dense(), KronSum.from_outer(G, A).to_dense())  # equal g: exact
    True
    """
    F = _require_sum(F, "kfac")
    xp = F.xp
    # a sum pools the terms of all its parts, each accumulated at its true scale
    normed = [P._normalized()[:4] for P in (F.parts if F.form == "sum" else (F,))]
    # weights relative to the largest part's power of two 2^ew: Σw/2^ew stays moderate, and
    # the factors' scales 2^(e_L + ew_p − ew)/(Σw/2^ew) over- or underflow only where the
    # factors themselves leave the dtype's range (checked below)
    ew = max(e for _, e, _, _ in normed)
    tiny, big = dtype_range(xp, F.dtype)
    lo, hi = math.frexp(tiny)[1] - 1, math.frexp(big)[1] - 1
    for side, i in (("left", 2), ("right", 3)):
        e = max(t[1] - ew + t[i] for t in normed)
        if not lo <= e <= hi:
            _factor_range_error(side, e, F.dtype)
    rel = [(Pn, _ldexp1(e - ew), _ldexp1(e - ew + el), _ldexp1(e - ew + er))
           for Pn, e, el, er in normed]
    sw = _sum_over([r * xp.sum(Pn.weights) for Pn, r, _, _ in rel])  # Σw / 2^ew
    # 1/Σw folded into the products' scale: no pass over the factors after the products
    inv = 1.0 / xp.where(sw > 0, sw, xp.ones_like(sw))
    pieces = [_kfac_pieces(Pn, al * inv, ar * inv) for Pn, _, al, ar in rel]
    SL = _sum_over([p[0] for p in pieces])
    SR = _sum_over([p[1] for p in pieces])
    SL, SR, sw = materialize_all(SL, SR, sw)  # Dask: one pass, then plain small arrays
    s, ml, mr = host_floats([sw, xp.max(xp.abs(SL)), xp.max(xp.abs(SR))])
    for side, mx in (("left", ml), ("right", mr)):
        if math.isnan(mx):
            check_in_range(mx, f"kfac's {side} factor", xp, F.dtype)  # NaN statistics
        if not math.isfinite(mx) or (0 < mx < tiny):
            _factor_range_error(side, None, F.dtype)
    check_in_range(s * _ldexp1(ew), "kfac's scale Σ w_k", xp, F.dtype)
    notes: tuple[str, ...] = ()
    if not s > 0:
        notes = ("all weights are zero: the estimate is zero",)
    elif ml == 0 or mr == 0:
        which = "left (gradient-side)" if ml == 0 else "right (activation-side)"
        notes = (f"the {which} statistics are all zero: the estimate is zero",)
    return _new_kron(SL, SR, sw * _ldexp1(ew), KronInfo(method="kfac", notes=notes), xp)


def _factor_range_error(side: str, exponent: int | None, dtype) -> None:
    size = "" if exponent is None else f" (entries of about 2^{exponent})"
    raise OverflowError(
        f"kfac's {side} factor, the weighted mean Σ w_k {'L_k' if side == 'left' else 'R_k'} / Σ w_k"
        f"{size}, is beyond the range of {dtype}, although F may fit: its split of the magnitude "
        f"(means of the statistics) cannot be stored; rescale {'G (or L)' if side == 'left' else 'A (or R)'} "
        f"by a constant, or use tkfac or kfoc, whose factors are normalised"
    )


def _kfac_pieces(Fn: KronSum, aL, aR):
    """``(aL Σ w L̃_k, aR Σ w R̃_k)`` of one single-form normalised sum (conv: ``Σ w G_kᵀG_k / T``
    on the left); ``aL``, ``aR`` are positive scalars (floats or 0-d arrays)."""
    xp = Fn.xp
    w = Fn.weights
    if Fn.form == "terms":
        return aL * xp.tensordot(w, Fn.L, axes=1), aR * xp.tensordot(w, Fn.R, axes=1)
    if Fn.form == "outer":
        return weighted_gram(Fn.G, w, xp, aL), weighted_gram(Fn.A, w, xp, aR)
    K, T, m = Fn.G.shape
    n = Fn.A.shape[-1]
    wt = xp.reshape(xp.broadcast_to(w[:, None], (K, T)), (K * T,))
    return (weighted_gram(xp.reshape(Fn.G, (K * T, m)), wt, xp, aL / T),
            weighted_gram(xp.reshape(Fn.A, (K * T, n)), wt, xp, aR))


@via_numpy_on_cpu
def tkfac(F: KronSum, *, variant: str = "trace") -> Kron:
    r"""TKFAC (Gao et al. 2021): ``δ Φ ⊗ Ψ`` with ``δ = tr F`` and ``tr Φ = tr Ψ = 1``.

    .. math::

        \delta = \sum_k w_k \operatorname{tr} L_k \operatorname{tr} R_k = \operatorname{tr} F,
        \quad
        \Phi = \frac{1}{\delta}\sum_k w_k \operatorname{tr}(R_k)\, L_k,
        \quad
        \Psi = \frac{1}{\delta}\sum_k w_k \operatorname{tr}(L_k)\, R_k .

    On the outer form this is the paper's Eq. (8) (with the gradient side on the left, as
    everywhere here). In general ``Φ = 𝓡(F) vec(I)/δ`` and ``Ψ = 𝓡(F)ᵀ vec(I)/δ``, one
    half-step of K-FOC's power method from the identity, which keeps ``tr F`` exactly on
    every form; for the conv form ``Φ = Σ w X_k X_kᵀ/δ``, ``Ψ = Σ w X_kᵀX_k/δ``.

    Parameters
    ----------
    F : KronSum
    variant : {"trace", "position-independent"}
        ``"trace"`` (default) as above. ``"position-independent"`` is the paper's Theorem 3
        for convolutions, which assumes products at different positions uncorrelated
        (Assumption 1) and so uses only the ``t = t'`` terms,
        ``Σ_k Σ_t w_k g_{kt}g_{kt}ᵀ ⊗ a_{kt}a_{kt}ᵀ``; read with the erratum in the notes (the
        weight of each factor's term is the trace of the *other* factor). It keeps the trace of
        that assumed block, not of F. For the outer and terms forms both variants agree.

    Returns
    -------
    Kron
        ``scale = δ``, ``left = Φ`` (m, m), ``right = Ψ`` (n, n). A zero sum gives
        ``scale = 0`` with ``Φ = I/m``, ``Ψ = I/n`` and a note in ``info.notes``.

    Raises
    ------
    OverflowError
        When ``tr F`` is beyond the range of the dtype. Inputs of any magnitude whose trace
        fits (e.g. ``G·1e200`` with ``A/1e200``) give finite answers; a trace below the
        smallest normal number is noted in ``info.notes``.

    Notes
    -----
    Cost: as :func:`kfac` (one weighted Gram product per factor).

    Examples
    --------
    >>> import numpy as np
    >>> from kronsum import KronSum, tkfac
    >>> rng = np.random.default_rng(0)
    >>> F = KronSum.from_outer(rng.standard_normal((16, 3)), rng.standard_normal((16, 4)))
    >>> est = tkfac(F)
    >>> bool(np.isclose(est.trace(), F.trace())), bool(np.isclose(np.trace(est.left), 1.0))
    (True, True)
    """
    F = _require_sum(F, "tkfac")
    if variant not in ("trace", "position-independent"):
        raise ValueError(f"variant must be 'trace' or 'position-independent', got {variant!r}")
    xp = F.xp
    if variant == "position-independent" and F.form == "sum":
        raise ValueError("variant='position-independent' needs a single conv-form sum, not form 'sum'")
    if variant == "position-independent" and F.form == "conv":
        K, T, m = F.G.shape
        n = F.A.shape[-1]
        wt = xp.reshape(xp.broadcast_to(F.weights[:, None], (K, T)), (K * T,))
        F = KronSum("outer", wt, G=xp.reshape(F.G, (K * T, m)), A=xp.reshape(F.A, (K * T, n)),
                    symmetric=True, _xp=xp)
    Fn, (cw, cl, cr) = F.normalized()
    Ir = eye_like(Fn.n, Fn.weights, xp)
    Il = eye_like(Fn.m, Fn.weights, xp)
    phi = Fn.contract_right()  # Σ w tr(R_k) L_k, without a product with I
    psi = Fn.contract_left()
    phi, psi = materialize_all(phi, psi)  # Dask: one pass, then plain small arrays
    delta = trace(phi, xp)
    d = to_float(delta)
    c = cw * (cl * cr)
    check_in_range(d * c, "tkfac's scale δ = tr F", xp, F.dtype)  # NaN: ValueError
    if d == 0:
        return Kron(Il / Fn.m, Ir / Fn.n, scale=xp.zeros_like(delta),
                    info=KronInfo(method=f"tkfac/{variant}",
                                  notes=("zero trace (zero sum): the estimate is zero",)))
    return _new_kron(phi / delta, psi / delta, times_scale(delta, c),
                     KronInfo(method=f"tkfac/{variant}",
                              notes=underflow_notes(d, c, "δ = tr F", xp, F.dtype)), xp)
