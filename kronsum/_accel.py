"""The one dispatch point for backend-specific fast paths.

Everything here has a generic array-API fallback and must give the same numbers (tests run
both paths, ``rtol 1e-10`` in float64). Fast paths are taken only for NumPy arrays:

* :func:`weighted_gram` — ``Vᵀ diag(c) V`` through BLAS ``syrk`` (half the flops of ``gemm``)
  by splitting the rows by the sign of ``c`` (small products: one ``gemm``);
* :func:`row_gram` — the K×K Gram matrix ``V Vᵀ`` of many short rows through ``gemm``, where
  NumPy's ``syrk`` route costs more;
* :func:`quadratic_rows` and :func:`quadratic_blocks` — ``v_kᵀ M v_k`` and ``P_k M P_kᵀ`` for a
  symmetric ``M`` through BLAS ``trmm`` with ``M``'s upper triangle (half the multiply-adds of
  ``V M``), where SciPy's BLAS wrappers are importable and the shapes make it pay;
* :func:`numba_enabled` — whether a numba kernel may run: option on
  (:func:`kronsum.config`), numba importable, NumPy namespace, float32/float64;
* :func:`via_numpy_on_cpu` — the estimators' entry: PyTorch CPU tensors are handed to the
  NumPy code as views of the same memory (``Tensor.numpy()``, no copy) so that they reach the
  two paths above, and the factors are handed back as CPU tensors (``torch.from_numpy``, no copy).
  Option ``torch_cpu_via_numpy``; tensors that require grad stay in PyTorch;
* :func:`cuda_graph` — opt-in (option ``cuda_graphs``) for PyTorch CUDA tensors: a device-only
  stretch of work (no host read inside, e.g. kfoc's squaring route up to its read) captured
  once per input layout as a CUDA graph and replayed, one launch for its ~100 small kernels.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections import OrderedDict
from typing import Any, Callable

import array_api_compat

from ._compat import Array, is_numpy_namespace
from ._config import _options, numba_importable

__all__ = ["gram", "row_gram", "row_sq_norms", "row_dots", "weighted_gram", "syrk_gram", "eig_gram", "quadratic_rows", "quadratic_blocks", "trmm_pays", "TRMM_TIME",
           "symmetric_to_rounding", "numba_enabled", "numba_kernels", "via_numpy_on_cpu", "cuda_graph",
           "clear_cuda_graphs"]


def numba_enabled(xp: Any, *arrays: Array) -> bool:
    """Whether the numba kernels may run for ``arrays`` of namespace ``xp``."""
    if not (_options()["use_numba"] and is_numpy_namespace(xp) and numba_importable()):
        return False
    import numpy as np

    return all(a.dtype in (np.float32, np.float64) for a in arrays)


def numba_kernels():
    """The compiled kernels module (imported lazily: compiling costs a second once)."""
    from . import _numba_kernels

    return _numba_kernels


# K·d² multiply-adds below which weighted_gram's row splits cost more than one gemm
# (measured crossover on one BLAS thread: about 10⁶; docs/benchmarks.md, small layers)
_SMALL_WEIGHTED_GRAM = 1_000_000


# the widths from which ``syrk_gram`` fills the other triangle itself, a tile at a time: NumPy's
# own copy after its ``syrk`` goes entry by entry across rows, which for wide results costs more
# than the ``syrk`` (4608 wide from 64 rows, float32: 103 ms against 45), from 2048 wide, and
# from 1024 for widths that are multiples of 256 (row strides that alias in the cache: 1024
# wide from 64 rows, 3.7 ms against 1.8); below, NumPy's copy is as fast as the tiles' loop
# (measured on one BLAS thread, float32 and float64, 64 to 4096 rows)
_MIRROR_MIN_WIDTH = 2048
_MIRROR_ALIASED_WIDTH = 1024
_MIRROR_TILE = 128


def syrk_gram(B: Array) -> Array:
    """``BᵀB`` (d, d) of a NumPy 2-D ``B`` (K, d) through BLAS ``syrk``, symmetric bit for bit.

    For narrow results (or without SciPy) NumPy's ``B.T @ B``, which calls ``syrk`` and copies
    the computed triangle; from ``d = 2048`` (1024 for multiples of 256) SciPy's ``syrk`` on
    ``B`` or its Fortran view ``Bᵀ`` (no copy of a C- or Fortran-ordered ``B``) and the other
    triangle filled by transposed tiles of 128 × 128, which stay in the cache where NumPy's
    row-by-row copy does not. The one Gram product of the NumPy routes."""
    import numpy as np

    K, d = B.shape
    wide = d >= _MIRROR_MIN_WIDTH or (d >= _MIRROR_ALIASED_WIDTH and d % 256 == 0)
    blas = _scipy_blas() if wide else None
    if blas is None or B.dtype not in (np.float32, np.float64):
        return B.T @ B
    syrk = blas.ssyrk if B.dtype == np.float32 else blas.dsyrk
    if B.flags.f_contiguous and not B.flags.c_contiguous:  # B itself as Fortran: BᵀB directly
        P = syrk(1.0, B, trans=1, lower=0).T
    else:  # Bᵀ as the Fortran view of B: (Bᵀ)(Bᵀ)ᵀ
        P = syrk(1.0, np.ascontiguousarray(B).T, trans=0, lower=0).T  # C order: lower triangle
    b = _MIRROR_TILE
    for i in range(0, d, b):
        i1 = min(i + b, d)
        for j in range(i1, d, b):
            P[i:i1, j:j + b] = P[j:j + b, i:i1].T
        D = P[i:i1, i:i1]
        D[...] = np.tril(D) + np.tril(D, -1).T
    return P


def weighted_gram(V: Array, c: Array, xp: Any, alpha: Any = None) -> Array:
    """``alpha · Vᵀ diag(c) V`` for ``V`` (K, d), ``c`` (K,) and a positive scalar ``alpha``
    (a Python float or a 0-d array of ``V``'s dtype; default 1): the weighted Gram product.

    NumPy: ``Bᵀ B`` with ``B = sqrt(|c|) V`` over the rows of each sign (gathered in one
    copy, positive rows first), which NumPy hands to BLAS ``syrk`` (equal weights, e.g. a mean: ``VᵀV`` scaled in place, without the scaled
    copy of ``V``); below ``K·d² = 10⁶`` multiply-adds, where the splits and copies cost more
    than the flops they save, one ``gemm`` averaged with its transpose (symmetric bit for
    bit); elsewhere one ``gemm`` with ``alpha`` folded into ``c``.
    """
    if not is_numpy_namespace(xp):
        ca = c if alpha is None else c * alpha
        return xp.matrix_transpose(V) @ (ca[:, None] * V)
    import numpy as np

    c0 = c[0] if c.shape[0] else 0
    if c0 > 0 and c[-1] == c0 and bool((c == c0).all()):  # equal weights (a mean): no scaled copy of V
        P = syrk_gram(V)
        P *= c0 if alpha is None else c0 * alpha
        return P
    if alpha is not None:
        c = c * alpha
    K, d = V.shape
    if K * d * d <= _SMALL_WEIGHTED_GRAM:  # the row splits and scaled copies cost more than a gemm
        P = V.T @ (c[:, None] * V)
        P *= 0.5  # halved first: no overflow for entries above half the largest number
        P += P.T  # a/2 + b/2 both ways: symmetric bit for bit
        return P
    neg = c < 0
    kn = int(np.count_nonzero(neg))
    if kn == 0:
        return syrk_gram(np.sqrt(c)[:, None] * V)
    # the rows of each sign gathered once, in their order (a stable partition), and scaled in
    # place: one copy of V where a gather and a scaled copy per sign cost two
    order = np.argsort(neg, kind="stable")
    B = V[order]
    B *= np.sqrt(np.abs(c[order]))[:, None]
    kp = K - kn
    return syrk_gram(B[:kp]) - syrk_gram(B[kp:])


def eig_gram(M: Array, rows_of: Callable[[Array], Array], eig: tuple | None = None) -> Array | None:
    """``Σ_{±} ± ZᵀZ`` over the signs of the eigenvalues of a symmetric NumPy ``M`` (p, p):
    with ``M = V diag(d) Vᵀ`` (one ``eigh``), ``Z = rows_of(V_s diag(√|d_s|))`` for the
    eigenvectors ``V_s`` (p, p_s) of each sign, a 2-D array of rows whose Gram product goes
    through :func:`syrk_gram` (half the multiply-adds of a ``gemm``; symmetric bit for bit). One
    sign's rows are alive at a time. ``None`` when ``d`` has no non-zero entry (a zero
    ``M``). ``eig=(d, V)`` gives ``M`` by some of its eigenpairs instead (``V`` (p, r) with
    orthonormal columns; ``M = None``): ``r`` rows per sample where the ``eigh`` of the
    formed ``M`` would give ``p`` of them, rounding's among them. The one signed-Gram routine
    of the contractions' row routes (:func:`eig_quadratic_sum`, the held per-sample
    matrices)."""
    import numpy as np

    d, V = np.linalg.eigh(M) if eig is None else eig
    out = None
    for sel, sign in ((d < 0, -1.0), (d > 0, 1.0)):
        if not sel.any():
            continue
        part = syrk_gram(rows_of(V[:, sel] * np.sqrt(np.abs(d[sel])).astype(V.dtype, copy=False)))
        if out is None:
            out = part if sign > 0 else np.negative(part, out=part)
        elif sign > 0:
            out += part
        else:
            out -= part
    return out


def eig_quadratic_sum(P: Array, Q: Array, M: Array | None, w: Array, eig: tuple | None = None) -> Array:
    """``Σ_k w_k Y_kᵀ M Y_k`` with ``Y_k = P_kᵀ Q_k``, for ``P`` (K, T, p), ``Q`` (K, T, q), a
    symmetric ``M`` (p, p) (``None``: the identity) and non-negative weights ``w`` (K,; a
    :class:`~kronsum.KronSum`'s are), on NumPy.

    With ``M = V diag(d) Vᵀ`` (:func:`eig_gram`) the sum is the signed Gram product of the
    ``K·p`` rows ``√(w_k|d_i|) (P_k v_i)ᵀ Q_k``: ``syrk``, ``K·p·q²/2`` multiply-adds
    instead of the ``K·p·q²`` of ``Σ_k Y_kᵀ (M Y_k)``. ``√|d_i|`` scales the eigenvectors
    and ``√w_k`` the smaller of ``P_k V`` (T × p_s) and the rows (p_s × q). Cost
    ``K(T p² + T p q) + K p q²/2`` plus the ``eigh``; the caller decides that it pays
    (:func:`syrk_available`) and that ``M`` is symmetric. ``eig=(d, V)`` (``M=None``): ``M``
    given by ``r`` of its eigenpairs, ``r`` rows per sample and no ``eigh``
    (:func:`eig_gram`).
    """
    import numpy as np

    K, T, p = P.shape
    q = Q.shape[-1]
    sw = np.sqrt(w).astype(P.dtype)

    def rows_of(Vs):  # (K·p_s, q); Vs None: the identity
        PV = P if Vs is None else np.reshape(np.reshape(P, (K * T, p)) @ Vs, (K, T, Vs.shape[1]))
        if T < q:
            PV = PV * sw[:, None, None]
        Z = np.matmul(np.swapaxes(PV, 1, 2), Q)
        if T >= q:
            Z *= sw[:, None, None]
        return Z.reshape(-1, q)

    if M is None and eig is None:
        return syrk_gram(rows_of(None))
    out = eig_gram(M, rows_of, eig)
    return np.zeros((q, q), dtype=Q.dtype) if out is None else out


def row_gram(V: Array, xp: Any) -> Array:
    """``V Vᵀ`` (K, K) of a 2-D array ``V`` (K, d): the K×K Gram matrix of its rows.

    NumPy turns ``V @ V.T`` into BLAS ``syrk`` and then copies the computed triangle into the
    other, entry by entry across rows; for K×K results with few columns that copy costs more
    than the ``syrk`` saves (3× a ``gemm`` at K = 4096, d = 36). There ``V @ copy(V).T``, one
    ``gemm`` (NumPy does not recognise the copy as ``Vᵀ``), is taken: for
    ``d < max(96, min(K/8, 384))``, the crossover measured on one BLAS thread (K = 128 to 4096;
    docs/benchmarks.md, small layers: the copy is O(K²), the extra flops O(K²d)). Other
    namespaces use their own ``matmul``. Symmetric to rounding, not always bit for bit.
    """
    if is_numpy_namespace(xp) and V.ndim == 2 and V.shape[1] < max(96, min(V.shape[0] // 8, 384)):
        import numpy as np

        return V @ np.copy(V).T
    return V @ xp.matrix_transpose(V)


def row_sq_norms(V: Array, xp: Any) -> Array:
    """``(‖v_k‖²)_k`` of the rows of ``V`` (K, d), shape (K,): :func:`row_dots` of ``V`` with itself."""
    return row_dots(V, V, xp)


def row_dots(U: Array, V: Array, xp: Any) -> Array:
    """``(u_k · v_k)_k`` of the rows (last axis) of two arrays of shapes that broadcast, e.g.
    (K, d) and (K, d) to (K,), or (c, K, d) and (1, K, d) to (c, K): on NumPy one pass without
    a ``U∘V`` temporary (``vecdot``, NumPy ≥ 2; ``einsum`` before, whose call costs more),
    ``sum(U * V, axis=-1)`` elsewhere."""
    if is_numpy_namespace(xp):
        import numpy as np

        if hasattr(np, "vecdot"):
            return np.vecdot(U, V)
        return np.einsum("...i,...i->...", U, V)
    return xp.sum(U * V, axis=-1)


# trmm (a triangular times a general matrix) runs at about a gemm's speed per multiply-add on
# one BLAS thread only when the triangle is at least 128 wide and the other operand has at
# least twice as many rows: there it takes 0.6–0.8 of ``V @ M``'s time; below, it is slower
# (measured with OpenBLAS, float32 and float64; docs/benchmarks.md, "K-FOC against K-FAC")
_TRMM_MIN_WIDTH = 128
_TRMM_MIN_ROW_RATIO = 2


# trmm's time over gemm's for the products it takes (measured 0.61–0.83): the cost models' factor
TRMM_TIME = 0.7


def trmm_pays(rows: int, d: int, xp: Any) -> bool:
    """Whether a product ``V M`` of ``V`` (rows, d) with a symmetric ``M`` (d, d) goes through
    ``trmm`` (:func:`quadratic_rows`, :func:`quadratic_blocks`): NumPy, SciPy importable,
    ``d ≥ 128`` and ``rows ≥ 2d`` (the one shape rule, shared with the cost models)."""
    return (is_numpy_namespace(xp) and d >= _TRMM_MIN_WIDTH and rows >= _TRMM_MIN_ROW_RATIO * d
            and _scipy_blas() is not None)


def positive_definite(x: Array, xp: Any) -> bool:
    """Whether the symmetric ``x`` (or ``−x`` when its trace is negative: an eigenvector's
    sign is arbitrary) is numerically positive definite, by a Cholesky factorisation (a third
    of an ``eigvalsh``'s cost): its smallest eigenvalue is then above ``−c·d·ε·‖x‖``, within
    any rounding tolerance. NumPy only (LAPACK reports a failed factorisation); other libraries
    return False, so that the caller decides from the eigenvalues."""
    if not is_numpy_namespace(xp):
        return False
    import numpy as np

    y = -x if float(np.trace(x)) < 0 else x
    try:
        np.linalg.cholesky(y)
    except np.linalg.LinAlgError:
        return False
    return True


def symmetric_to_rounding(M: Array) -> bool:
    """Whether a float32/float64 NumPy matrix ``M`` (p, p) is symmetric to rounding:
    ``|M − Mᵀ| ≤ p·ε·max|M|``. The routes that use one triangle (or the eigenvectors) of such
    an ``M`` leave out its antisymmetric rest, which is then below the rounding of a ``gemm``
    with ``M``. Other dtypes: False, so that they keep the ``gemm`` routes."""
    import numpy as np

    if M.dtype not in (np.float32, np.float64):
        return False
    scale = float(np.max(np.abs(M))) if M.size else 0.0
    if not scale:
        return True
    p, b = M.shape[0], 64  # a block of rows at a time: temporaries of 64 rows, not of M's size
    tol = p * np.finfo(M.dtype).eps * scale
    return all(float(np.max(np.abs(M[i:i + b] - M[:, i:i + b].T))) <= tol for i in range(0, p, b))


def _trmm_route(V: Array, M: Array, xp: Any) -> bool:
    """Whether ``V M`` (``V`` (r, d), ``M`` (d, d)) goes through :func:`_upper_half_product`:
    :func:`trmm_pays`, operands of one dtype, ``M`` :func:`symmetric_to_rounding`."""
    return trmm_pays(*V.shape, xp) and V.dtype == M.dtype and symmetric_to_rounding(M)


@functools.lru_cache(maxsize=1)
def _scipy_blas():
    """SciPy's BLAS wrappers (``scipy.linalg.blas``), or None when SciPy is not installed."""
    try:
        from scipy.linalg import blas
    except ImportError:  # pragma: no cover - SciPy comes with the test and numba extras
        return None
    return blas


def _upper_half_product(V: Array, M: Array) -> Array:
    """``H = V U`` with ``U = triu(M) − diag(M)/2`` for NumPy ``V`` (r, d) and symmetric ``M``:
    ``V M Vᵀ = H Vᵀ + (H Vᵀ)ᵀ`` and ``v_kᵀ M v_k = 2 h_k · v_k``. One BLAS ``trmm`` on the
    Fortran view ``Vᵀ`` (``(Uᵀ Vᵀ)ᵀ``): ``r·d²/2`` multiply-adds, no copy of ``V`` beyond the
    result; the caller checked :func:`_trmm_route`."""
    import numpy as np

    U = np.triu(M)
    U[np.diag_indices_from(U)] *= 0.5
    blas = _scipy_blas()
    trmm = blas.strmm if V.dtype == np.float32 else blas.dtrmm
    # Uᵀ as the Fortran view of U (lower triangular) and Vᵀ as V's: BLAS copies neither
    return trmm(1.0, U.T, np.ascontiguousarray(V).T, side=0, lower=1).T


def quadratic_rows(V: Array, M: Array, xp: Any) -> Array:
    """``(v_kᵀ M v_k)_k`` for ``V`` (r, d) and ``M`` (d, d), shape (r,).

    NumPy, where :func:`_trmm_route` says so (symmetric ``M``): ``2 (V U)·V`` row by row with
    ``U`` ``M``'s upper triangle, diagonal halved (one ``trmm``, ``r·d²/2`` multiply-adds);
    elsewhere the row dots of ``V Mᵀ`` and ``V`` (one ``gemm``, ``r·d²``). Equal to rounding.
    """
    if _trmm_route(V, M, xp):
        return 2 * row_dots(_upper_half_product(V, M), V, xp)
    return row_dots(V @ xp.matrix_transpose(M), V, xp)


def quadratic_blocks(P: Array, M: Array, xp: Any) -> Array:
    """``(P_k M P_kᵀ)_k`` for ``P`` (K, T, d) and ``M`` (d, d), shape (K, T, T).

    On NumPy ``P`` is taken as one (K·T, d) matrix for the product with ``M`` (one ``gemm``,
    not K), and where :func:`_trmm_route` says so (symmetric ``M``), through ``H = P U`` with
    ``U`` ``M``'s upper triangle, diagonal halved: ``H_k P_kᵀ + (H_k P_kᵀ)ᵀ``, symmetric bit
    for bit. Cost ``K·T·d²/2`` (trmm) or ``K·T·d²`` (gemm), plus ``K·T²·d``.
    """
    if not is_numpy_namespace(xp):
        return (P @ M) @ xp.matrix_transpose(P)
    import numpy as np

    K, T, d = P.shape
    P2 = np.reshape(P, (K * T, d))
    if _trmm_route(P2, M, xp):
        B = np.reshape(_upper_half_product(P2, M), (K, T, d)) @ np.swapaxes(P, 1, 2)
        return B + np.swapaxes(B, 1, 2)
    return np.reshape(P2 @ M, (K, T, d)) @ np.swapaxes(P, 1, 2)


def syrk_available(xp: Any) -> bool:
    """Whether :func:`weighted_gram` is a ``syrk`` (half a ``gemm``) in ``xp`` for products
    beyond the small ones: NumPy (which the estimators also use for PyTorch CPU tensors,
    through NumPy views of their memory)."""
    return is_numpy_namespace(xp)


def gram(V: Array) -> Array:
    """``VᵀV`` of a 2-D array ``V`` (K, d), in ``V``'s namespace.

    NumPy: BLAS ``syrk`` (half the flops of ``gemm``; :func:`syrk_gram`); float32/float64
    PyTorch CPU tensors without ``requires_grad`` take that route through a view of their memory
    (a copy only when ``V`` is not contiguous) when the option ``torch_cpu_via_numpy`` is on;
    other arrays use their own ``matmul``.
    """
    if _options()["torch_cpu_via_numpy"] and _torch_cpu_plain([V]):
        import torch

        return torch.from_numpy(syrk_gram(V.contiguous().numpy()))
    xp = array_api_compat.array_namespace(V)
    return xp.matrix_transpose(V) @ V


def _torch_cpu_plain(arrays: list) -> bool:
    """Whether every array is a float32/float64 PyTorch CPU tensor that does not require grad."""
    if not arrays or not all(array_api_compat.is_torch_array(a) for a in arrays):
        return False
    import torch

    return all(a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64)
               and not a.requires_grad for a in arrays)


def _map_kron(K, f, xp):
    """``K`` with its factors and scale replaced by ``f(array)`` (namespace ``xp``); other
    results (an :class:`~kronsum.EigenKron`) map their arrays with their ``_map_arrays``."""
    from ._closed_forms import _new_kron

    if hasattr(K, "_map_arrays"):
        return K._map_arrays(f, xp)
    return _new_kron(f(K.left), f(K.right), f(K.scale), K.info, xp)


def _cpu_tensor(a):
    """A CPU tensor sharing ``a``'s memory (``torch.from_numpy``: unlike ``torch.as_tensor`` it
    ignores ``torch.set_default_device``); a copy only for layouts torch cannot view."""
    import numpy as np
    import torch

    a = np.asarray(a)
    if a.flags.writeable and all(st >= 0 for st in a.strides):
        return torch.from_numpy(a)
    return torch.from_numpy(np.array(a))


@functools.cache
def _numpy_xp() -> Any:
    """array-api-compat's NumPy namespace (looked up once: a lookup costs microseconds)."""
    import numpy as np

    return array_api_compat.array_namespace(np.empty(0))


def via_numpy_on_cpu(fn: Callable) -> Callable:
    """Decorate an estimator ``fn(F, ...) -> Kron`` (or :class:`~kronsum.EigenKron`) so that PyTorch CPU inputs run on NumPy.

    When the option ``torch_cpu_via_numpy`` is on and every array of ``F`` (and of a
    :class:`~kronsum.Kron` passed as a keyword, e.g. ``init``) is a float32/float64 CPU tensor
    without ``requires_grad``, ``fn`` receives the same sum over NumPy views of the tensors'
    memory and its :class:`~kronsum.Kron` is returned with tensor factors sharing the NumPy
    result's memory. Otherwise ``fn`` runs unchanged.
    """

    @functools.wraps(fn)
    def wrapper(F, *args, **kwargs):
        if getattr(F, "_xp", None) is _numpy_xp():  # NumPy inputs: nothing to map
            return fn(F, *args, **kwargs)
        from ._kron import Kron
        from ._sum import KronSum

        if not (isinstance(F, KronSum) and _options()["torch_cpu_via_numpy"]):
            return fn(F, *args, **kwargs)
        krons = {k: v for k, v in kwargs.items() if isinstance(v, Kron)}
        arrays = F._arrays() + [a for K in krons.values() for a in (K.left, K.right, K.scale)]
        if not _torch_cpu_plain(arrays):
            return fn(F, *args, **kwargs)
        to_np = (lambda t: t.numpy())
        np_xp = _numpy_xp()
        kwargs = {k: (_map_kron(v, to_np, np_xp) if k in krons else v) for k, v in kwargs.items()}
        out = fn(F._map(to_np, np_xp), *args, **kwargs)
        return _map_kron(out, _cpu_tensor, F.xp)

    return wrapper


# -- CUDA graphs (PyTorch) -------------------------------------------------------------------

_GRAPH_CACHE_SIZE = 32  # captured graphs kept per thread (least recently used dropped first)
_graphs = threading.local()


def _graph_cache() -> OrderedDict:
    if not hasattr(_graphs, "cache"):
        _graphs.cache = OrderedDict()
    return _graphs.cache


def clear_cuda_graphs() -> int:
    """Drop the calling thread's captured CUDA graphs and release the memory they hold.

    With the option ``cuda_graphs`` on (:func:`kronsum.get_config`), :func:`kronsum.kfoc`
    keeps one captured graph per input layout (the 32 used last in each thread), each with a
    copy of its inputs and its intermediate arrays. Call this when those layouts will not be
    used again, e.g. after a training run. The memory goes back to PyTorch's caching
    allocator (``torch.cuda.empty_cache()`` returns it to the device); other threads' graphs
    are kept.

    Returns
    -------
    int
        The number of entries dropped (a layout whose capture failed counts too).

    Examples
    --------
    >>> import kronsum as ks
    >>> ks.clear_cuda_graphs()  # none captured here (no CUDA tensors, option off)
    0
    """
    cache = _graph_cache()
    n = len(cache)
    cache.clear()
    return n


def cuda_graph(tag: Any, build: Callable[[list], Any], arrays: list) -> Any | None:
    """``build(arrays)`` through a CUDA graph, or ``None`` where that does not apply.

    Applies when the option ``cuda_graphs`` is on and every array is a PyTorch CUDA tensor
    that does not require grad (not CuPy: CuPy 14 refuses cuBLAS calls during stream
    capture, ``NotImplementedError``, so no matmul could be captured). ``build`` must queue
    device work only (no host read, no transfer, no data-dependent shapes); ``tag``
    (hashable) must name everything besides the arrays' layouts that decides what ``build``
    queues. The first call for a ``tag`` and input layout (shapes, dtypes, strides, device)
    captures ``build`` on static copies of the arrays (after one warm-up run on a side
    stream, as PyTorch requires); every call copies the inputs into those copies and replays
    the graph on the current stream: one launch instead of one Python dispatch per kernel.
    The result's arrays are the graph's own memory, overwritten by its next replay: use them
    (queue what reads them) before calling again. A capture that fails warns once per layout
    and returns ``None`` (the caller runs ``build`` eagerly; the failure is remembered until
    the entry is dropped). Graphs are kept per thread, the ``_GRAPH_CACHE_SIZE`` most
    recently used; each holds its static inputs and its intermediate arrays
    (:func:`clear_cuda_graphs` frees them). The key also holds PyTorch's float32 matmul
    settings (TF32, ``set_float32_matmul_precision``) and autocast state, which change the
    captured kernels. Capture runs under ``torch.cuda.device`` of the inputs, on a stream of
    that device, in ``"thread_local"`` error mode (other threads' CUDA calls do not break it);
    PyTorch synchronises the device and empties its allocator cache before each capture.
    """
    if not (_options()["cuda_graphs"] and arrays
            and all(array_api_compat.is_torch_array(a) and a.device.type == "cuda"
                    and not a.requires_grad for a in arrays)):
        return None
    import torch

    dev = arrays[0].device
    settings = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(),
                torch.is_autocast_enabled("cuda"))
    key = (tag, settings,
           tuple((tuple(a.shape), a.dtype, a.device, tuple(a.stride())) for a in arrays))
    cache = _graph_cache()
    entry = cache.get(key)
    if entry is None:
        try:
            with torch.cuda.device(dev):
                statics = [a.clone() for a in arrays]
                side = torch.cuda.Stream(device=dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    build(statics)  # warm-up (cuBLAS workspaces, allocator) outside the capture
                torch.cuda.current_stream(dev).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=torch.cuda.Stream(device=dev),
                                      capture_error_mode="thread_local"):
                    out = build(statics)
        except Exception as exc:  # e.g. an operation that cannot be captured
            warnings.warn(f"kronsum: CUDA graph capture of {tag} failed ({exc!r}); running "
                          "eagerly for this input layout", RuntimeWarning, stacklevel=3)
            entry = (None, None, None)
        else:
            entry = (graph, statics, out)
        cache[key] = entry
        while len(cache) > _GRAPH_CACHE_SIZE:
            cache.popitem(last=False)
    cache.move_to_end(key)
    graph, statics, out = entry
    if graph is None:
        return None
    with torch.cuda.device(dev):
        for s, a in zip(statics, arrays):
            s.copy_(a)
        graph.replay()
    return out
