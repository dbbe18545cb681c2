"""Library-wide options: ``kronsum.config(...)`` (a context manager) and ``kronsum.get_config()``."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from typing import Iterator

__all__ = ["config", "get_config", "set_config"]

_ENV_DISABLE_NUMBA = "KRONSUM_DISABLE_NUMBA"

_local = threading.local()


def _defaults() -> dict:
    off = os.environ.get(_ENV_DISABLE_NUMBA, "").strip().lower() in ("1", "true", "yes", "on")
    return {"use_numba": not off and importlib.util.find_spec("numba") is not None, "check_every": None, "torch_cpu_via_numpy": True,
            "cuda_graphs": False, "gram_squaring": None, "mixed_precision": True}


@functools.lru_cache(maxsize=1)
def numba_importable() -> bool:
    """Whether ``import numba`` succeeds here (tried once, on first need: it takes a second;
    any exception of the import counts as failure)."""
    try:
        import numba  # noqa: F401
    except Exception:  # ImportError, or e.g. OSError from a broken llvmlite
        return False
    return True


def _options() -> dict:
    """This thread's options as stored (not a copy; read-only for callers)."""
    if not hasattr(_local, "options"):
        _local.options = _defaults()
    return _local.options


def get_config() -> dict:
    """The current options (a copy).

    ``use_numba``
        Whether NumPy inputs on the CPU take the numba kernels: ``True`` by default when numba
        imports and the environment variable ``KRONSUM_DISABLE_NUMBA=1`` is not set, ``False``
        otherwise. Reported as in effect: with numba missing or failing to import it reads
        ``False`` whatever was set.
    ``check_every``
        How many iterations the iterative solvers (:func:`kfoc`'s ``"lanczos"``, ``"power"``
        and ``"gram"`` on non-NumPy arrays) run between reads of their convergence scalars
        to the host. ``None`` (default): every iteration on the CPU, every 4 on an
        accelerator (CuPy, torch CUDA, JAX GPU), where each read stalls the device queue.
        A larger value means fewer synchronisations and at most ``check_every - 1`` wasted
        operator applications; the answer is the same.
    ``torch_cpu_via_numpy``
        Whether :func:`kfac`, :func:`tkfac` and :func:`kfoc` compute on PyTorch CPU tensors
        (float32/float64, not requiring grad) through NumPy views of the same memory (no
        copy), which reach the NumPy fast paths: BLAS ``syrk`` for the Gram products (half
        the flops of PyTorch's ``gemm``) and the numba kernels. Factors come back as PyTorch
        tensors. Default ``True``; ``False`` keeps every operation in PyTorch.
    ``cuda_graphs``
        Whether :func:`kfoc` on PyTorch CUDA tensors, when it takes the repeated-squaring
        route (``info.method == "kfoc/gram-squaring"``: outer/terms forms with
        ``10K² ≤ m² + n²``), runs that route's ~100 small kernels (from the inputs to the
        factors' coefficient vectors) as one replayed CUDA graph instead of dispatching each
        from Python. Default ``False``. The first call per input layout (shapes, dtype,
        strides, device; also the TF32/matmul-precision and autocast settings) captures the
        graph: about three calls' cost, and PyTorch synchronises the device and empties its
        allocator cache. Each graph then keeps on the device a copy of the inputs (K(m + n)
        numbers for the outer form, K(m² + n²) for terms, copied in again on every call) and
        about 15 K² numbers of intermediate arrays, for the 32 layouts used last in each
        thread (``kronsum.clear_cuda_graphs()`` drops them). Worth it for repeated calls with
        the same shapes (a training loop with a few distinct layer shapes), where Python's
        dispatch is slow beside the GPU's work; a loop over more than 32 layouts recaptures
        on every call. CuPy has no such route (it refuses cuBLAS calls during capture). See
        docs/benchmarks.md.

    ``gram_squaring``
        Whether :func:`kfoc`'s ``"gram"`` solver (without numba) computes ``B^(2^s) α₀`` by
        repeated squaring of the K×K operator instead of running Lanczos
        (``info.method == "kfoc/gram-squaring"``). ``None`` (default): on accelerators when
        its K×K products cost at most two fifths of the final factors (``10K² ≤ m² + n²``),
        where Lanczos's many small kernels are slow; ``True``: whenever the Gram solver
        runs on the array-API path (for checking that route on the CPU); ``False``: never.

    ``mixed_precision``
        Whether :func:`kfoc`'s Lanczos solver on the contractions iterates in float32 for
        float64 inputs under the ``accuracy`` rule, then checks and finishes the answer in
        float64 (continuing in float64 when the check fails). Default ``True``; costs a
        float32 copy of the inputs (half their memory) for the solve.

    Examples
    --------
    >>> import kronsum as ks
    >>> sorted(ks.get_config())
    ['check_every', 'cuda_graphs', 'gram_squaring', 'mixed_precision', 'torch_cpu_via_numpy', 'use_numba']
    """
    out = dict(_options())
    out["use_numba"] = bool(out["use_numba"]) and numba_importable()
    return out


def set_config(**options) -> None:
    """Set options for this thread, e.g. ``set_config(use_numba=False)``.

    Prefer the context manager :func:`config`, which restores the previous values.

    Examples
    --------
    >>> import kronsum as ks
    >>> before = ks.get_config()["use_numba"]
    >>> ks.set_config(use_numba=False)
    >>> ks.get_config()["use_numba"]
    False
    >>> ks.set_config(use_numba=before)
    """
    current = dict(_options())  # as stored: setting options never imports numba
    unknown = set(options) - set(current)
    if unknown:
        raise ValueError(f"unknown kronsum option(s) {sorted(unknown)}; known: {sorted(current)}")
    for key, value in options.items():
        if key == "check_every":
            if value is not None:
                from ._validation import check_int

                options[key] = check_int(value, "option check_every", minimum=1)
        elif key == "gram_squaring":
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"option gram_squaring must be None or a bool, got {type(value).__name__}")
        elif not isinstance(value, bool):
            raise TypeError(f"option {key} must be a bool, got {type(value).__name__}")
    current.update(options)
    _local.options = current


@contextlib.contextmanager
def config(**options) -> Iterator[dict]:
    """Set options inside a ``with`` block and restore them after.

    Examples
    --------
    >>> import kronsum as ks
    >>> with ks.config(use_numba=False):
    ...     ks.get_config()["use_numba"]
    False
    """
    before = dict(_options())
    set_config(**options)
    try:
        yield get_config()
    finally:
        _local.options = before
