"""Collection settings for the whole repository (tests/ and the doctests under kronsum/).

numba is optional: without it, the module of compiled kernels cannot be imported, so its
doctest collection is skipped (the kernels are unreachable then: ``kronsum._accel`` falls back
to the array-API path, which the tests cover on their own).
"""

try:
    import numba  # noqa: F401
except ImportError:
    collect_ignore = ["kronsum/_numba_kernels.py"]
