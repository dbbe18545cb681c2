"""The documentation site as a reader sees it: every page built with ``mkdocs build --strict``,
served over HTTP and rendered by headless Chromium (its DOM after the scripts ran): the maths
typeset by the bundled KaTeX (no CDN), no Sphinx role left as raw text, no KaTeX error, the
page's own title and navigation present. Skipped where Chromium or mkdocs is missing (CI installs
Debian's ``chromium``). Set ``KRONSUM_DOCS_SCREENSHOTS=DIR`` to also save a full-width screenshot
of every page there, for a look by eye."""

from __future__ import annotations

import functools
import html
import os
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)
ROLE = re.compile(r":(func|meth|class|attr|mod|data|obj|exc|ref):")  # markdown turns the `name` after it into code

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (Debian package 'chromium')"),
    pytest.mark.skipif(shutil.which("mkdocs") is None, reason="mkdocs is not installed (extra 'docs')"),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert proc.returncode == 0, proc.stderr
    handler = functools.partial(_Quiet, directory=str(out))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield out, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request log on stderr
        pass


def _chromium(*args: str) -> str:
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           *args], capture_output=True, text=True, timeout=120)
    return proc.stdout


class _Formulas(HTMLParser):
    """Counts the formulas arithmatex wrote (elements of class ``arithmatex``) and those of
    them that hold a KaTeX rendering (a descendant of class ``katex``)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
            "track", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack: list[bool] = []  # per open element: is it a formula
        self.open: list[list[bool]] = []  # per open formula: [typeset]
        self.total = self.typeset = 0

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        if "katex" in classes and self.open:
            self.open[-1][0] = True
        if tag in self.VOID:
            return
        formula = "arithmatex" in classes
        self.stack.append(formula)
        if formula:
            self.open.append([False])

    def handle_endtag(self, tag):
        if tag in self.VOID or not self.stack:
            return
        if self.stack.pop():
            self.total += 1
            self.typeset += self.open.pop()[0]


def _text(dom: str) -> str:
    """The visible text of a DOM dump (scripts, styles and KaTeX's MathML copies dropped)."""
    dom = re.sub(r"(?s)<(script|style|math)\b.*?</\1>", " ", dom)
    return html.unescape(re.sub(r"<[^>]+>", " ", dom))


def test_every_page_renders_with_typeset_maths_and_no_raw_roles(site):
    out, base = site
    pages = sorted(p.parent.relative_to(out) for p in out.rglob("index.html"))
    assert len(pages) >= 20, pages
    shots = os.environ.get("KRONSUM_DOCS_SCREENSHOTS")
    with_maths = 0
    problems = []
    for page in pages:
        url = f"{base}/{page.as_posix()}/".replace("/./", "/")
        dom = _chromium("--dump-dom", url)
        if "<title>" not in dom or "kronsum" not in dom:
            problems.append(f"{page}: not rendered")
            continue
        text = _text(dom)
        if ROLE.search(text):
            problems.append(f"{page}: raw Sphinx role {ROLE.search(text).group(0)!r}")
        formulas = _Formulas()
        formulas.feed(dom)
        if formulas.total:
            with_maths += 1
            if formulas.typeset < formulas.total or "katex-error" in dom:
                problems.append(f"{page}: {formulas.total} formulas, {formulas.typeset} typeset by KaTeX"
                                + (" (KaTeX error)" if "katex-error" in dom else ""))
        if shots:
            name = ("index" if page == Path(".") else page.as_posix().replace("/", "_")) + ".png"
            Path(shots).mkdir(parents=True, exist_ok=True)
            _chromium("--window-size=1280,3000", f"--screenshot={Path(shots) / name}", url)
    assert not problems, "\n".join(problems)
    assert with_maths >= 2  # the K-FOC and inverse pages carry display maths
