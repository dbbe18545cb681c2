"""The one dispatch point for backend-specific fast paths.

Everything here has a generic array-API fallback and must give the same numbers (tests run
both paths, ``rtol 1e-10`` in float64). Fast paths are taken only for NumPy arrays:

* :func:`weighted_gram` — ``Vᵀ diag(c) V`` through BLAS ``syrk`` (half the flops of ``gemm``)
  by splitting the rows by the sign of ``c``;
* :func:`numba_enabled` — whether a numba kernel may run: option on
  (:func:`kronsum.config`), numba importable, NumPy namespace, float32/float64.
"""

from __future__ import annotations

import functools
from typing import Any

from ._compat import Array, is_numpy_namespace
from ._config import get_config

__all__ = ["weighted_gram", "numba_enabled", "numba_kernels"]


@functools.lru_cache(maxsize=1)
def _numba_importable() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def numba_enabled(xp: Any, *arrays: Array) -> bool:
    """Whether the numba kernels may run for ``arrays`` of namespace ``xp``."""
    if not (get_config()["use_numba"] and is_numpy_namespace(xp) and _numba_importable()):
        return False
    import numpy as np

    return all(a.dtype in (np.float32, np.float64) for a in arrays)


def numba_kernels():
    """The compiled kernels module (imported lazily: compiling costs a second once)."""
    from . import _numba_kernels

    return _numba_kernels


def weighted_gram(V: Array, c: Array, xp: Any) -> Array:
    """``Vᵀ diag(c) V`` for ``V`` (K, d) and ``c`` (K,): the weighted Gram product.

    NumPy: ``Bᵀ B`` with ``B = sqrt(|c|) V`` over the rows of each sign, which NumPy hands
    to BLAS ``syrk``; elsewhere one ``gemm``.
    """
    if not is_numpy_namespace(xp):
        return xp.matrix_transpose(V) @ (c[:, None] * V)
    import numpy as np

    pos = c > 0
    neg = c < 0
    if not neg.any():
        B = np.sqrt(c)[:, None] * V
        return B.T @ B
    Bp = np.sqrt(c[pos])[:, None] * V[pos]
    Bn = np.sqrt(-c[neg])[:, None] * V[neg]
    return Bp.T @ Bp - Bn.T @ Bn
