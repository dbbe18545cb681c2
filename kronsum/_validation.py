"""Input checks shared by the constructors and estimators.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong
shape, empty batch, non-finite or negative values) with a message that names the argument
and its shape. Nothing here writes to the caller's arrays.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ._compat import Array, all_finite, is_array, namespace, to_float

__all__ = ["check_array", "check_weights", "common_float_dtype", "check_finite_values",
           "check_dense_size", "DEFAULT_MAX_ELEMENTS"]


def _shape_str(x: Array) -> str:
    return str(tuple(int(s) for s in x.shape))


def check_array(x: object, name: str, *, ndim: int, what: str) -> Array:
    """Check that ``x`` is a real floating array with ``ndim`` axes and no empty axis.

    ``what`` describes the expected shape, e.g. ``"(K, m)"``, for the error message.
    """
    if not is_array(x):
        raise TypeError(
            f"{name} must be an array of an array-API library (NumPy, CuPy, torch, JAX, "
            f"Dask, array-api-strict), got {type(x).__name__}"
        )
    xp = namespace(x)
    if not xp.isdtype(x.dtype, "real floating"):
        kind = "complex" if xp.isdtype(x.dtype, "complex floating") else "integer or boolean"
        raise TypeError(
            f"{name} must have a real floating dtype (float32 or float64), got the {kind} "
            f"dtype {x.dtype}; convert it first, e.g. with xp.astype({name}, xp.float64)"
        )
    if x.dtype not in (xp.float32, xp.float64):
        raise TypeError(
            f"{name} must be float32 or float64, got {x.dtype}: half precision has too little range "
            f"for the squared statistics (products of four entries); upcast with "
            f"xp.astype({name}, xp.float32)"
        )
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {what} ({ndim} axes), got shape {_shape_str(x)}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name} must not be empty: expected shape {what}, got {_shape_str(x)}")
    return x


#: Largest dense matrix (entries) the dense views and the SVD reference form by default:
#: 2**26 entries, 512 MiB in float64. Every such method takes ``max_elements=`` to raise it.
DEFAULT_MAX_ELEMENTS = 2**26


def check_dense_size(entries: int, what: str, max_elements: int) -> None:
    """``ValueError`` before allocating a dense ``what`` of ``entries`` numbers above the limit."""
    if entries > max_elements:
        raise ValueError(
            f"{what} would have {entries:,} entries ({entries * 8 / 2**30:.1f} GiB in float64), "
            f"above max_elements={max_elements:,}; dense views are for tests and small layers — "
            f"pass a larger max_elements to form it anyway"
        )


def common_float_dtype(xp: Any, arrays: Sequence[Array]) -> Any:
    """The promoted real floating dtype of ``arrays``."""
    return xp.result_type(*arrays)


def check_finite_values(xp: Any, x: Array, name: str) -> None:
    """``ValueError`` if ``x`` holds NaN or infinity (synchronises lazy/device arrays)."""
    if not all_finite(xp, x):
        raise ValueError(
            f"{name} of shape {_shape_str(x)} contains NaN or infinite values; pass "
            "check_finite=False to skip this check"
        )


def check_weights(
    weights: object, K: int, xp: Any, dtype: Any, device: Any, *, check_finite: bool
) -> Array:
    """Validate ``weights`` (``None`` means all ones) as a non-negative 1-d array of length K."""
    if weights is None:
        return xp.ones((K,), dtype=dtype, device=device)
    if isinstance(weights, (list, tuple)):
        if any(isinstance(v, complex) for v in weights):
            raise TypeError("weights must be real numbers, got a complex value")
        weights = xp.asarray([float(v) for v in weights], dtype=dtype, device=device)
    w = check_array(weights, "weights", ndim=1, what="(K,)")
    if namespace(w) is not xp:
        raise TypeError(
            f"weights must be an array of the same library as the other inputs "
            f"({xp.__name__}), got {type(w).__module__}.{type(w).__name__}"
        )
    if w.shape[0] != K:
        raise ValueError(
            f"weights must have shape (K,) = ({K},) to match the {K} terms, got {_shape_str(w)}"
        )
    w = xp.astype(w, dtype, copy=False)
    if check_finite:
        check_finite_values(xp, w, "weights")
    smallest = to_float(xp.min(w))  # NaN if w holds one (then ask w < 0 entry-wise)
    if smallest < 0 or (math.isnan(smallest) and bool(xp.any(w < 0))):
        raise ValueError(
            f"weights must be non-negative (F = sum_k w_k L_k kron R_k is a weighted sum of "
            f"curvature terms); the smallest is {smallest}. Fold signs into L_k."
        )
    return w
