"""``python -m kronsum`` (and the ``kronsum`` console script): subcommands.

``python -m kronsum demo [--out DIR] [--quick] [--device cpu|cuda] [--train]`` runs the demo
(:mod:`kronsum.demo`), which needs the ``demo`` extra:
``pip install -e ".[demo]" --config-settings editable_mode=compat``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a subcommand; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    prog = "kronsum" if script.startswith("kronsum") and not script.endswith(".py") else "python -m kronsum"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="kronsum: nearest-Kronecker-product kernels (K-FAC, TKFAC, K-FOC).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"kronsum {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("demo", add_help=False,
                   help="K-FAC, TKFAC and K-FOC against the exact Fisher of real networks "
                        f"({prog} demo --help)")
    if not argv or argv[0] not in ("demo",):
        parser.parse_args(argv)  # --help, --version, or an error for an unknown command
        parser.print_help()
        return 2
    from .demo import main as demo_main

    return demo_main(argv[1:], prog=f"{prog} demo")


if __name__ == "__main__":
    sys.exit(main())
