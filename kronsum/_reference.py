"""Dense ground truth: the rearrangement and its SVD (Van Loan & Pitsianis 1993)."""

from __future__ import annotations

import math

from ._closed_forms import _require_sum
from ._compat import fro_norm, host_floats, symmetrize, trace
from ._kron import Kron, KronInfo
from ._sum import KronSum, times_scale
from ._validation import DEFAULT_MAX_ELEMENTS, check_in_range, check_int, underflow_notes

__all__ = ["nearest_kronecker", "DEFAULT_MAX_ELEMENTS"]


def nearest_kronecker(F: KronSum, method: str = "svd", *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Kron:
    r"""The nearest Kronecker product by dense SVD of the rearranged matrix: the ground truth.

    Forms ``𝓡(F)`` (m², n²), takes its SVD ``Σ σ_i u_i v_iᵀ`` and returns
    ``σ₁ mat(u₁) ⊗ mat(v₁)``, with the sign chosen so that ``tr(left) ≥ 0`` and symmetrised
    factors when the terms are symmetric. The same answer as :func:`kfoc`, by a route that
    shares none of its code: use it to test, not to compute.

    Parameters
    ----------
    F : KronSum
    method : {"svd"}
        The only dense method.
    max_elements : int
        Refuse (``ValueError``) when ``m²·n²`` exceeds this; default 2**26 (512 MiB in float64).

    Returns
    -------
    Kron
        Unit-Frobenius factors, ``scale = σ₁``; ``info.sigma1``, ``info.sigma2`` exact;
        ``info.notes`` records a zero sum and ``σ₁ = σ₂`` (the optimum is not unique), as
        :func:`kfoc` does.

    Raises
    ------
    OverflowError
        When σ₁ is beyond the range of the dtype (as :func:`kfoc`).

    Notes
    -----
    Cost O(m²n² min(m², n²)) time and O(m²n²) memory.

    Examples
    --------
    >>> import numpy as np
    >>> from kronsum import KronSum, nearest_kronecker, kfoc
    >>> rng = np.random.default_rng(1)
    >>> F = KronSum.from_outer(rng.standard_normal((10, 3)), rng.standard_normal((10, 2)))
    >>> ref, fast = nearest_kronecker(F), kfoc(F)
    >>> bool(np.allclose(ref.to_dense(), fast.to_dense()))
    True
    """
    F = _require_sum(F, "nearest_kronecker")
    if method != "svd":
        raise ValueError(f"method must be 'svd', got {method!r}")
    m, n = F.m, F.n
    max_elements = check_int(max_elements, "max_elements", minimum=1)
    if m * m * n * n > max_elements:
        gib = m * m * n * n * 8 / 2**30
        raise ValueError(
            f"nearest_kronecker(method='svd') would form the rearranged matrix of shape "
            f"(m², n²) = ({m * m}, {n * n}) ({gib:.1f} GiB in float64), above max_elements="
            f"{max_elements}; use kfoc(F) for layers of this size or raise max_elements"
        )
    xp = F.xp
    Fn, (cw, cl, cr) = F.normalized()
    U, s, Vt = xp.linalg.svd(Fn.rearranged(max_elements=max_elements), full_matrices=False)
    sigma = s[0]
    L = xp.reshape(U[:, 0], (m, m))
    R = xp.reshape(Vt[0, :], (n, n))
    if Fn.symmetric:
        L, R = symmetrize(L, xp), symmetrize(R, xp)
        L, R = L / fro_norm(L, xp), R / fro_norm(R, xp)
    flip = trace(L, xp) < 0
    L, R = xp.where(flip, -L, L), xp.where(flip, -R, R)
    c = cw * (cl * cr)
    s1, s2 = host_floats([sigma, s[1] if s.shape[0] > 1 else 0.0])
    check_in_range(s1 * c, "nearest_kronecker's scale σ₁", xp, F.dtype)
    notes: tuple[str, ...] = ()
    if not s1 > 0:
        notes = ("zero sum (sigma1 = 0): the estimate is zero",)
    elif s2 >= s1 * (1 - math.sqrt(float(xp.finfo(F.dtype).eps))):
        notes = ("sigma1 == sigma2 to working precision: the optimum is not unique; "
                 "one optimal pair is returned",)
    notes = notes + underflow_notes(s1, c, "sigma1", xp, F.dtype)
    info = KronInfo(method="svd", sigma1=s1 * c, sigma2=s2 * c, notes=notes)
    return Kron(L, R, scale=times_scale(sigma, c), info=info)
