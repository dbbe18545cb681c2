"""The README's quick start runs as written and prints what the README says."""

import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs the README's code in a subprocess: `-m "not slow"` skips it

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _blocks(lang):
    """Fenced code blocks of the README whose info string is ``lang`` ("" for bare fences)."""
    blocks, current, info = [], None, None
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                if info == lang:
                    blocks.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_quickstart_is_the_example_script_and_runs():
    code = _blocks("python")[0]
    assert code == (ROOT / "examples" / "quickstart.py").read_text(encoding="utf-8")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    printed = _blocks("")[0] if _blocks("") else None
    assert printed is not None and out == printed


def test_ci_runs_the_readme_test_command():
    readme_cmds = _blocks("bash")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert readme_cmds[1].strip() in ci
