"""The one place that talks to :mod:`array_api_compat`.

Every public function infers its namespace with :func:`namespace` and then uses only
array-API standard operations on it, so NumPy, CuPy, PyTorch, JAX, Dask and
array-api-strict arrays all take the same code path and get arrays of their own type back.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass
from typing import Any, Sequence

import array_api_compat
from array_api_compat import is_array_api_obj

__all__ = [
    "Array",
    "namespace",
    "device_of",
    "is_array",
    "is_numpy_namespace",
    "is_dask_namespace",
    "fro_norm",
    "materialize",
    "materialize_all",
    "persist_all",
    "fro_inner",
    "to_float",
    "eye_like",
    "trace",
    "symmetrize",
    "on_accelerator",
    "host_floats",
    "all_finite",
]

#: Any array of an array-API compatible library.
Array = Any


def namespace(*arrays: Array, names: tuple[str, ...] | None = None) -> Any:
    """Return the array-API namespace shared by ``arrays``.

    ``TypeError`` if they come from different libraries, naming each argument (``names``) and
    its array type.
    """
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError:
        labels = names or tuple(f"argument {i}" for i in range(len(arrays)))
        kinds = ", ".join(f"{n} is {type(a).__module__}.{type(a).__name__}" for n, a in zip(labels, arrays))
        raise TypeError(f"all arrays must come from one array library; {kinds}") from None


def device_of(x: Array) -> Any:
    """The device of ``x`` as array-api-compat reports it."""
    return array_api_compat.device(x)


def is_array(x: object) -> bool:
    """Whether ``x`` is an array of some array-API compatible library."""
    return bool(is_array_api_obj(x))


def on_accelerator(x: Array) -> bool:
    """Whether ``x`` lives in accelerator memory (CuPy, torch CUDA/MPS, JAX on a GPU/TPU):
    there a read of a scalar to the host stalls the device queue, so loops batch their reads."""
    if array_api_compat.is_cupy_array(x):
        return True
    dev = device_of(x)
    if array_api_compat.is_torch_array(x):
        return getattr(dev, "type", "cpu") != "cpu"
    if array_api_compat.is_jax_array(x):
        return getattr(dev, "platform", "cpu") != "cpu"
    return False


def host_floats(values: list) -> list[float]:
    """Python floats from a list of 0-d arrays (or floats) in one device-to-host transfer.

    On an accelerator the scalars are stacked on the device and copied once, so reading ``k``
    iteration scalars costs one synchronisation instead of ``k``; elsewhere each is converted in
    turn (Dask: each a small computation over materialised inputs). Counted as one host read.
    """
    pending = [v for v in values if not isinstance(v, (int, float))]  # NumPy scalars are floats
    if len(pending) > 1 and on_accelerator(pending[0]):
        xp = array_api_compat.array_namespace(*pending)
        got = iter(host_vector(xp.stack([xp.reshape(v, ()) for v in pending])))
        return [float(v) if isinstance(v, (int, float)) else float(next(got)) for v in values]
    if any(type(v) not in (int, float) for v in values):  # a NumPy scalar stands for a read
        count("host_reads")
    return [float(v) for v in values]


def host_vector(v: Array) -> list[float]:
    """The entries of a 1-d array as Python floats, in one device-to-host transfer (CuPy
    ``get``, torch ``tolist``, JAX/NumPy through ``np.asarray``; Dask: one ``compute``)."""
    count("host_reads")
    if array_api_compat.is_cupy_array(v):
        return [float(t) for t in v.get().tolist()]
    if array_api_compat.is_torch_array(v):
        return [float(t) for t in v.tolist()]
    import numpy as np

    if array_api_compat.is_dask_array(v):
        v = v.compute()
    return [float(t) for t in np.asarray(v).tolist()]


def is_numpy_namespace(xp: Any) -> bool:
    return bool(array_api_compat.is_numpy_namespace(xp))


def float64_available(xp: Any) -> bool:
    """Whether ``xp`` makes float64 arrays (JAX only with ``jax_enable_x64``)."""
    if array_api_compat.is_jax_namespace(xp):
        import jax

        return bool(jax.config.read("jax_enable_x64"))
    return True


def max_abs_host(arrays: Sequence[Array], xp: Any) -> list[float]:
    """``[max |x| for x in arrays]`` of non-empty real arrays as Python floats, one host read
    (NaN for an array holding one). NumPy floating arrays: as ``max(max x, −min x)``, two
    reductions without the ``|x|`` copy and without a 0-d array per input."""
    if is_numpy_namespace(xp):
        import numpy as np

        count("host_reads")
        out = []
        for x in arrays:
            if x.size and x.dtype.kind == "f":
                hi, lo = np.maximum.reduce(x, axis=None), -np.minimum.reduce(x, axis=None)
                out.append(float(hi if hi >= lo else lo))  # NaN: both are NaN
            else:
                out.append(float(np.max(np.abs(x))))
        return out
    return host_floats([xp.max(xp.abs(x)) for x in arrays])


def is_dask_namespace(xp: Any) -> bool:
    return bool(array_api_compat.is_dask_namespace(xp))


_SMALL = 2**22  # entries of a Dask iterate brought back to the client instead of persisted


def _identity_block(b):
    return b


def materialize(x: Array) -> Array:
    """Compute a lazy Dask array now and keep the result; other arrays as they are.

    The iterative solvers call it on every iterate, so each Dask step is one map-reduce over the
    persisted inputs instead of a graph that re-runs all earlier steps. Small arrays (up to 2²²
    entries: factors, coefficient vectors) come back to the client and are re-wrapped; large
    ones are persisted on the workers. Either way the result gets a fresh, random key name, so
    no task key is ever submitted twice with a different definition (dask/dask#9888).
    """
    return materialize_all(x)[0]


def materialize_all(*xs: Array) -> tuple:
    """:func:`materialize` for several arrays, computed in one pass when they are Dask arrays."""
    if not any(array_api_compat.is_dask_array(x) for x in xs):
        return xs
    import uuid

    import dask
    import dask.array as da
    import numpy as np

    small = [array_api_compat.is_dask_array(x) and math.prod(x.shape) <= _SMALL for x in xs]
    computed = iter(dask.compute(*(x for x, sm in zip(xs, small) if sm)))
    out = []
    for x, sm in zip(xs, small):
        if not array_api_compat.is_dask_array(x):
            out.append(x)
        elif sm:
            out.append(da.from_array(np.asarray(next(computed)), chunks=-1, name=False))
        else:
            y = x.persist()
            out.append(y.map_blocks(_identity_block, dtype=y.dtype, meta=y._meta,
                                    name=f"kronsum-persisted-{uuid.uuid4().hex}"))
    return tuple(out)


def persist_all(*xs: Array) -> tuple:
    """Dask arrays persisted where they are computed (the workers of a ``distributed``
    cluster, or local memory), in one pass and whatever their size: nothing comes back to
    the client and nothing is sent back in a graph. Each result keeps its chunks and gets a
    fresh key name (dask/dask#9888, as :func:`materialize_all`); other arrays as they are."""
    if not any(array_api_compat.is_dask_array(x) for x in xs):
        return xs
    import uuid

    import dask

    lazy = [x for x in xs if array_api_compat.is_dask_array(x)]
    done = iter(dask.persist(*lazy))
    out = []
    for x in xs:
        if not array_api_compat.is_dask_array(x):
            out.append(x)
            continue
        y = next(done)
        out.append(y.map_blocks(_identity_block, dtype=y.dtype, meta=y._meta,
                                name=f"kronsum-persisted-{uuid.uuid4().hex}"))
    return tuple(out)


def fro_norm(x: Array, xp: Any) -> Array:
    """Frobenius norm of ``x`` as a 0-d array, safe from overflow and underflow.

    The entries are divided by their largest magnitude before squaring, so a matrix with
    entries near 1e±200 still has a finite, accurate norm; an all-zero ``x`` gives 0.
    """
    c = xp.max(xp.abs(x))
    safe = xp.where(c > 0, c, xp.ones_like(c))
    return c * xp.sqrt(xp.sum((x / safe) ** 2))


def fro_inner(x: Array, y: Array, xp: Any) -> Array:
    """Frobenius inner product ``<x, y> = sum(x * y)`` over the last two axes."""
    return xp.sum(x * y, axis=(-2, -1))


def all_finite(xp: Any, x: Array) -> bool:
    """Whether ``x`` holds no NaN or infinity (synchronises lazy and device arrays).

    PyTorch: one sum screens. NaN and ±inf propagate through a sum, so a finite sum proves
    every entry finite; only a sum that is not finite (NaN/inf present, or finite entries whose
    sum overflows) is confirmed entry-wise. PyTorch's ``isfinite`` on the CPU costs about 30
    times a sum. Elsewhere ``all(isfinite(x))``: NumPy's fastest pass, and NumPy-backed
    namespaces would warn about the screen's ``inf − inf`` and overflow.
    """
    if array_api_compat.is_torch_namespace(xp):
        return math.isfinite(float(xp.sum(x))) or bool(xp.all(xp.isfinite(x)))
    return bool(xp.all(xp.isfinite(x)))


def dtype_name(xp: Any, dtype: Any) -> str:
    """``"float64"``/``"float32"`` whatever the library (NumPy, torch and the others print
    their dtypes differently), for messages and notes that must not depend on the backend."""
    for name in ("float64", "float32", "float16"):
        if dtype == getattr(xp, name, None):
            return name
    return str(dtype)


def to_float(x: Array) -> float:
    """A Python float from a 0-d array (this synchronises lazy and device arrays; counted as
    one host read by :func:`counting`)."""
    if type(x) not in (int, float):  # a NumPy scalar stands for a 0-d array read: counted
        count("host_reads")
    return float(x)


@dataclass
class Counts:
    """What a solve did, for :class:`kronsum.KronInfo`: ``host_reads`` (times it waited for an
    array's values: each :func:`to_float`, :func:`host_vector` or batched :func:`host_floats`
    of arrays counts once) and ``contractions`` (calls of ``KronSum.contract_left/right``)."""

    host_reads: int = 0
    contractions: int = 0


_COUNTS: contextvars.ContextVar[Counts | None] = contextvars.ContextVar("kronsum_counts", default=None)


class counting:
    """Count host reads and contractions inside the block (nested blocks add to the outer one):
    ``with counting() as counts: ...`` gives the block's :class:`Counts`."""

    __slots__ = ("_counts", "_outer", "_token")

    def __enter__(self) -> Counts:
        self._outer, self._counts = _COUNTS.get(), Counts()
        self._token = _COUNTS.set(self._counts)
        return self._counts

    def __exit__(self, *exc) -> None:
        _COUNTS.reset(self._token)
        outer, counts = self._outer, self._counts
        if outer is not None:
            outer.host_reads += counts.host_reads
            outer.contractions += counts.contractions


def counted(fn):
    """Decorate a solver returning an object with ``info`` (a :class:`kronsum.KronInfo`): its
    ``host_reads`` and ``contractions`` are what the call did (nested solves included)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with counting() as counts:
            out = fn(*args, **kwargs)
        out.info = out.info._counted(counts.host_reads, counts.contractions)
        return out

    return wrapper


def count(what: str) -> None:
    """Add one to the counter ``what`` of the innermost :func:`counting` block, if any."""
    counts = _COUNTS.get()
    if counts is not None:
        setattr(counts, what, getattr(counts, what) + 1)


def trace(x: Array, xp: Any) -> Array:
    """Trace over the last two axes (square): the sum of every (n+1)-th entry of the flattened
    matrix, a strided read of n entries (no product with an identity); NumPy's own ``trace``
    on NumPy arrays (the same sum, one call)."""
    if is_numpy_namespace(xp):
        import numpy as np

        return np.trace(x, axis1=-2, axis2=-1)
    n = x.shape[-1]
    flat = xp.reshape(x, tuple(x.shape[:-2]) + (n * n,))
    return xp.sum(flat[..., :: n + 1], axis=-1)


def eye_like(n: int, ref: Array, xp: Any) -> Array:
    """``n x n`` identity with the dtype and device of ``ref``."""
    return xp.eye(n, dtype=ref.dtype, device=device_of(ref))


def symmetrize(x: Array, xp: Any) -> Array:
    """``(x + x^T) / 2`` over the last two axes."""
    return (x + xp.matrix_transpose(x)) / 2
