"""Collection settings for the whole repository (tests/ and the doctests under kronsum/).

numba is optional: without it, the module of compiled kernels cannot be imported, so its
doctest collection is skipped (the kernels are unreachable then: ``kronsum._accel`` falls back
to the array-API path, which the tests cover on their own). The adapters' frameworks are
optional too: a module's doctests (whose examples import torch, JAX, optax, Flax or
laplace-torch plainly, as a user would) are collected only where its framework is installed.
"""

import importlib.util

collect_ignore = []
try:
    import numba  # noqa: F401
except ImportError:
    collect_ignore.append("kronsum/_numba_kernels.py")
_NEEDS = {
    "kronsum/adapters/torch.py": ("torch",),
    "kronsum/adapters/_torch_precond.py": ("torch",),
    "kronsum/adapters/_torch_losses.py": ("torch",),
    "kronsum/adapters/_torch_layers.py": ("torch",),
    "kronsum/adapters/laplace.py": ("torch", "laplace"),
    "kronsum/adapters/distributed.py": ("torch",),
    "kronsum/adapters/jax.py": ("jax",),
    "kronsum/adapters/_jax_precond.py": ("jax", "optax"),
    "kronsum/adapters/_flax.py": ("jax", "flax"),
}
for path, modules in _NEEDS.items():
    if any(importlib.util.find_spec(m) is None for m in modules):
        collect_ignore.append(path)
