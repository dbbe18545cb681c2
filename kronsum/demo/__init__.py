"""``python -m kronsum demo``: K-FAC, TKFAC and K-FOC against the exact Fisher of real networks.

The demo trains two small networks on scikit-learn's bundled digits (no download) — the TKFAC
paper's MLP 64-20-20-20-10 with tanh and a small CNN (two ``Conv2d`` and a ``Linear`` head) —
and at several checkpoints compares, per layer, the exact Fisher block with its Kronecker
approximations (relative Frobenius errors and the time each estimator took). ``--train`` adds
natural-gradient training of the MLP preconditioned by each estimator, against plain SGD.

It needs the ``demo`` extra (PyTorch, scikit-learn, matplotlib, tqdm); ``import kronsum``
imports none of them, and neither does importing this package: they are imported when the
demo runs (:func:`main`). See ``docs/demo.md``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

__all__ = ["INSTALL_HINT", "main", "missing_dependencies"]

#: The modules the demo needs, with the distribution that provides each.
_DEPENDENCIES = {"torch": "torch", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}

#: What to run when a dependency is missing.
INSTALL_HINT = 'pip install -e ".[demo]" --config-settings editable_mode=compat   (in the clone)'


def missing_dependencies() -> list[str]:
    """The distributions of the ``demo`` extra that cannot be imported here (imports them)."""
    missing = []
    for mod, dist in _DEPENDENCIES.items():
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(dist)
    return missing


def main(argv: Sequence[str] | None = None, prog: str = "python -m kronsum demo") -> int:
    """Run the demo with command-line arguments ``argv`` (see ``python -m kronsum demo --help``)."""
    from .run import build_parser

    args = build_parser(prog).parse_args(argv)
    missing = missing_dependencies()
    if missing:
        print(
            f"kronsum demo needs {', '.join(missing)} (the 'demo' extra), which "
            f"{'is' if len(missing) == 1 else 'are'} not installed. Install with:\n\n"
            f"    {INSTALL_HINT}\n",
            file=sys.stderr,
        )
        return 2
    from .run import run

    return run(args)
