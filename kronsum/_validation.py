"""Input checks shared by the constructors and estimators.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong
shape, empty batch, non-finite or negative values) with a message that names the argument
and its shape. Nothing here writes to the caller's arrays.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

from ._compat import Array, all_finite, device_of, is_array, namespace, to_float

__all__ = ["check_array", "check_weights", "common_float_dtype", "check_finite_values",
           "check_dense_size", "DEFAULT_MAX_ELEMENTS", "check_int", "check_real", "check_seed",
           "check_scale", "check_in_range", "dtype_range", "underflow_notes"]


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
        kind = _dtype_kind(xp, x.dtype)
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


def _dtype_kind(xp: Any, dtype: Any) -> str:
    """``"complex"``, ``"integer"``, ``"boolean"`` or ``"non-numeric"`` for a non-real dtype."""
    for kind, label in (("complex floating", "complex"), ("integral", "integer"), ("bool", "boolean")):
        try:
            if xp.isdtype(dtype, kind):
                return label
        except (TypeError, ValueError):  # e.g. NumPy's object dtype
            break
    return "non-numeric"


#: Largest dense matrix (entries) the dense views and the SVD reference form by default:
#: 2**26 entries, 512 MiB in float64. Every such method takes ``max_elements=`` to raise it.
DEFAULT_MAX_ELEMENTS = 2**26


def check_dense_size(entries: int, what: str, max_elements: int) -> None:
    """``ValueError`` before allocating a dense ``what`` of ``entries`` numbers above the limit."""
    max_elements = check_int(max_elements, "max_elements", minimum=1)
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
        for i, v in enumerate(weights):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(
                    f"weights must be real numbers, got {v!r} ({type(v).__name__}) at index {i} "
                    f"of a {type(weights).__name__} of length {len(weights)}"
                )
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


# -- scalar options ---------------------------------------------------------------------------


def check_int(value: object, name: str, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """An integer option (Python or NumPy integer, not ``bool``) within ``[minimum, maximum]``.

    ``TypeError`` for another kind of object, ``ValueError`` out of range; both name ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        lo = "" if minimum is None else f"{minimum} <= "
        hi = "" if maximum is None else f" <= {maximum}"
        raise ValueError(f"{name} must be an integer with {lo}{name}{hi}, got {v}")
    return v


def check_real(value: object, name: str, *, minimum: float | None = None, positive: bool = False,
               below: float | None = None, finite: bool = True, array_ok: bool = False) -> float:
    """A real option (Python or NumPy number, not ``bool``; a 0-d real array when
    ``array_ok``) as a float: finite unless ``finite=False``, ``> 0`` when ``positive``,
    ``>= minimum`` and ``< below`` when given. NaN is always refused.

    ``TypeError`` for another kind of object, ``ValueError`` for a value out of range.
    """
    if is_array(value) and array_ok and not isinstance(value, numbers.Number):
        xp = namespace(value)
        if value.ndim != 0 or not (xp.isdtype(value.dtype, "real floating")
                                   or xp.isdtype(value.dtype, "integral")):
            raise TypeError(
                f"{name} must be a real number or a 0-d real array, got an array of shape "
                f"{tuple(int(s) for s in value.shape)} and dtype {value.dtype}"
            )
        v = to_float(value)
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    else:
        v = float(value)
    want = ("a positive" if positive else "a") + (" finite" if finite else "") + " real number"
    if minimum is not None:
        want += f" >= {minimum}"
    if below is not None:
        want += f" and < {below}"
    if (math.isnan(v) or (finite and not math.isfinite(v)) or (positive and not v > 0)
            or (minimum is not None and v < minimum) or (below is not None and not v < below)):
        raise ValueError(f"{name} must be {want}, got {v!r}")
    return v


def check_seed(seed: object, name: str = "seed") -> object:
    """A seed NumPy's ``default_rng`` takes: ``None``, a non-negative integer, a sequence of
    them, a ``SeedSequence`` or a ``Generator``. ``TypeError``/``ValueError`` naming ``name``."""
    import numpy as np

    if seed is None or isinstance(seed, (np.random.Generator, np.random.SeedSequence,
                                         np.random.BitGenerator)):
        return seed
    items = seed if isinstance(seed, (list, tuple)) else [seed]
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(
                f"{name} must be None, a non-negative integer, a sequence of them or a NumPy "
                f"Generator/SeedSequence, got {seed!r} ({type(seed).__name__})"
            )
        if v < 0:
            raise ValueError(f"{name} must be non-negative, got {seed!r}")
    return seed


def check_scale(scale: object, xp: Any, dtype: Any, ref: Array, name: str = "scale") -> Array:
    """A real scalar (Python/NumPy number or a one-entry real array of ``xp``) as a 0-d array
    of ``dtype`` on ``ref``'s device. ``TypeError`` for ``None``, strings, complex numbers,
    integer arrays of another library; ``ValueError`` for more than one entry."""
    if isinstance(scale, numbers.Number):  # Python and NumPy scalars, whatever the library
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {scale!r} ({type(scale).__name__})")
        return xp.asarray(float(scale), dtype=dtype, device=device_of(ref))
    if not is_array(scale):
        raise TypeError(
            f"{name} must be a real number or a 0-d real array, got {type(scale).__name__}"
        )
    sx = namespace(scale)
    if sx is not xp:
        raise TypeError(
            f"{name} must be a number or an array of the factors' library ({xp.__name__}), got "
            f"{type(scale).__module__}.{type(scale).__name__}"
        )
    if not (xp.isdtype(scale.dtype, "real floating") or xp.isdtype(scale.dtype, "integral")):
        raise TypeError(
            f"{name} must be real, got the {_dtype_kind(xp, scale.dtype)} dtype {scale.dtype}"
        )
    if math.prod(int(s) for s in scale.shape) != 1:
        raise ValueError(
            f"{name} must be a scalar (0-d array), got an array of shape "
            f"{tuple(int(s) for s in scale.shape)}"
        )
    return xp.astype(xp.reshape(scale, ()), dtype, copy=False)


# -- the range of a dtype ---------------------------------------------------------------------


def dtype_range(xp: Any, dtype: Any) -> tuple[float, float]:
    """``(smallest normal, largest finite)`` magnitude of a floating ``dtype``."""
    fi = xp.finfo(dtype)
    return float(fi.smallest_normal), float(fi.max)


def check_in_range(value: float, what: str, xp: Any, dtype: Any) -> float:
    """``OverflowError`` when ``value`` (a host float computed from finite inputs) is not
    finite or above the largest number of ``dtype``: the quantity ``what`` lies beyond its
    range (``ValueError`` for NaN: non-finite statistics). Returns ``value``."""
    if math.isnan(value):
        raise ValueError(
            f"{what} is NaN: the statistics contain NaN or infinity (the constructors' "
            f"check_finite=True would have said which array)"
        )
    if not math.isfinite(value) or abs(value) > dtype_range(xp, dtype)[1]:
        _, big = dtype_range(xp, dtype)
        name = getattr(dtype, "name", None) or str(dtype).replace("torch.", "")
        raise OverflowError(
            f"{what} is beyond the range of {name} (largest finite {big:.3g}): the statistics' "
            f"products overflow it; rescale the inputs (e.g. divide G or A by a constant and "
            f"multiply the result's scale back) or use float64"
        )
    return value


def underflow_notes(value: float, c: float, what: str, xp: Any, dtype: Any) -> tuple[str, ...]:
    """A note for :attr:`KronInfo.notes` when a non-zero ``value`` (computed on the normalised
    sum) times its power-of-two scale ``c`` is below the smallest normal number of ``dtype``:
    the result is then subnormal or zero (F is negligible at this precision); else ``()``."""
    tiny = dtype_range(xp, dtype)[0]
    if value != 0 and abs(value * c) < tiny:
        return (f"{what} = {value:.6g}·{c:.3g} is below the smallest normal number of the dtype "
                f"({tiny:.3g}): the scale is subnormal or zero (F is negligible at this precision)",)
    return ()
