r"""The closed-form estimators: K-FAC (Martens & Grosse 2015; KFC for convolutions) and TKFAC."""

from __future__ import annotations

from ._accel import via_numpy_on_cpu, weighted_gram
from ._compat import device_of, eye_like, materialize_all, trace
from ._kron import Kron, KronInfo
from ._sum import KronSum, _sum_over

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
        recorded in ``info.notes``.

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
    normed = [P.normalized() for P in (F.parts if F.form == "sum" else (F,))]
    # weights relative to the largest part's power of two c: Σw/c stays moderate, so the
    # factors' scales cl·(cw/c)/(Σw/c) over- or underflow only where the factors do
    c = max(cw for _, (cw, _, _) in normed)
    rel = [(Pn, cw / c, cl, cr) for Pn, (cw, cl, cr) in normed]
    sw = _sum_over([r * xp.sum(Pn.weights) for Pn, r, _, _ in rel])  # Σw / c
    # 1/Σw folded into the products' scale: no pass over the factors after the products
    inv = 1.0 / xp.where(sw > 0, sw, xp.ones_like(sw))
    pieces = [_kfac_pieces(Pn, (r * cl) * inv, (r * cr) * inv) for Pn, r, cl, cr in rel]
    SL = _sum_over([p[0] for p in pieces])
    SR = _sum_over([p[1] for p in pieces])
    SL, SR, sw = materialize_all(SL, SR, sw)  # Dask: one pass, then plain small arrays
    notes = () if bool(sw > 0) else ("all weights are zero: the estimate is zero",)
    return _new_kron(SL, SR, sw * c, KronInfo(method="kfac", notes=notes), xp)


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
    ok = bool(delta != 0)
    if not ok:
        return Kron(Il / Fn.m, Ir / Fn.n, scale=xp.zeros_like(delta),
                    info=KronInfo(method=f"tkfac/{variant}",
                                  notes=("zero trace (zero sum): the estimate is zero",)))
    return _new_kron(phi / delta, psi / delta, (cw * (cl * cr)) * delta,
                     KronInfo(method=f"tkfac/{variant}"), xp)
