"""Collection settings for the whole repository (tests/ and the doctests under kronsum/).

numba is optional: without it, the module of compiled kernels cannot be imported, so its
doctest collection is skipped (the kernels are unreachable then: ``kronsum._accel`` falls back
to the array-API path, which the tests cover on their own). laplace-torch is optional too: its
backend module needs it to be imported at all.
"""

import importlib.util

collect_ignore = []
try:
    import numba  # noqa: F401
except ImportError:
    collect_ignore.append("kronsum/_numba_kernels.py")
if importlib.util.find_spec("laplace") is None:
    collect_ignore.append("kronsum/adapters/laplace.py")
