"""The README's install commands give an importable package from any working directory."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="needs symlinks")
def test_import_from_the_folder_that_holds_a_clone_named_kronsum(tmp_path):
    """Run from the parent of a clone named ``kronsum`` (a folder without ``__init__.py``), a
    finder-based editable install imports that folder as an empty namespace package; the
    README's ``editable_mode=compat`` (or a regular install) gives the real package."""
    (tmp_path / "kronsum").symlink_to(ROOT, target_is_directory=True)
    code = "import kronsum; print(kronsum.__file__); print(kronsum.KronSum.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    file, name = out.stdout.split()
    assert name == "KronSum" and file.endswith("__init__.py")
