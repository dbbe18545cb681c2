"""The documentation site builds with ``mkdocs build --strict`` (broken links, bad references fail)."""

import pathlib
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses, a cluster or a site build: `-m "not slow"` skips them

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("mkdocs") is None, reason="mkdocs is not installed (extra 'docs')")
def test_mkdocs_build_strict(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(pathlib.Path(sys.executable).parent) + ":/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    # the docstrings' Sphinx roles are rendered as cross-references or code, never as raw text
    import re

    raw = re.findall(r":(?:func|meth|class|attr|mod|data|obj|exc):(?:`|<code>)", api)
    assert not raw, f"{len(raw)} raw Sphinx roles in the API page"
    assert 'href="#kronsum.kfoc"' in api and api.count("autorefs-internal") > 50


def test_every_docs_page_is_in_the_nav():
    import yaml

    def pages_of(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if isinstance(value, list):
                yield from pages_of(value)
            else:
                yield value

    listed = set(pages_of(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= listed, f"pages missing from mkdocs.yml nav: {sorted(pages - listed)}"


@pytest.mark.skipif(shutil.which("mkdocs") is None, reason="mkdocs is not installed (extra 'docs')")
def test_maths_is_left_for_katex_and_katex_is_loaded(tmp_path):
    """The formulas written as ``$…$`` / ``$$…$$`` reach the pages as arithmatex spans (which
    KaTeX's auto-render typesets in the browser) and every page loads KaTeX; no LaTeX command
    is left outside them."""
    import re

    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(pathlib.Path(sys.executable).parent) + ":/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in ("why", "conventions", "kfac", "tkfac", "kfoc"):
        html = (site / page / "index.html").read_text(encoding="utf-8")
        assert 'class="arithmatex"' in html, page
        assert "katex.min.js" in html and "auto-render.min.js" in html and "javascripts/katex.js" in html
        outside = re.sub(r'<(span|div) class="arithmatex">.*?</\1>', "", html, flags=re.S)
        outside = re.sub(r"<(code|pre|script)\b.*?</\1>", "", outside, flags=re.S)
        assert not re.search(r"\\(frac|sum|otimes|operatorname|top)\b", outside), page
    assert (site / "javascripts" / "katex.js").exists()
