"""The documentation site builds strictly (no warnings) and executes every tutorial.

mkdocs-jupyter runs the tutorials at build time with ``allow_errors: false``, so a failing
cell or assertion in a tutorial fails this test; the rendered pages must carry figures and
the site must serve MathJax itself (offline, no CDN).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
# nbconvert's stderr stream block: the attribute of an output <div>. The leading space
# matters: every notebook page also inlines the CSS rule .jp-RenderedText[data-mime-type=...]
STDERR = ' data-mime-type="application/vnd.jupyter.stderr"'
REPRS = ("&lt;matplotlib.", "&lt;Axes:", "&lt;Figure size")  # a plotting call's return value


def _excerpt(page: str, marker: str) -> str:
    """The text around the first occurrence of ``marker``, tags removed."""
    import re

    at = page.index(marker)
    return re.sub(r"<[^>]+>", " ", page[at:at + 1500])[:400]


def test_site_builds_strictly_with_executed_tutorials(tmp_path):
    import shutil

    # mkdocs-jupyter caches executed notebooks by content; drop the cache so the tutorials
    # really run against the current package
    shutil.rmtree(ROOT / ".cache" / "mkdocs-jupyter", ignore_errors=True)
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "WARNING" not in proc.stderr.replace("[IPKernelApp] WARNING", "")
    assert (site / "javascripts" / "mathjax" / "tex-mml-chtml.js").exists()
    # each tutorial's execution time in this build (docs/hooks.py), kept beside the cache for
    # the record: reported, not asserted (a timing is a benchmark, not a test)
    seconds = json.loads((site / "execution-seconds.json").read_text())
    assert {f"tutorials/{t.name}" for t in (ROOT / "tutorials").glob("*.ipynb")} <= set(seconds)
    (ROOT / ".cache").mkdir(exist_ok=True)
    (ROOT / ".cache" / "docs-execution-seconds.json").write_text(json.dumps(seconds, indent=1))
    for tutorial in sorted((ROOT / "tutorials").glob("*.ipynb")):
        page = (site / "tutorials" / tutorial.stem / "index.html").read_text()
        assert "You will learn" in page, tutorial.name
        assert "data:image/png;base64" in page, f"{tutorial.name}: no figure rendered"
        # a page shows no stderr (warnings, progress bars) and no bare object reprs
        assert STDERR not in page, f"{tutorial.name}: stderr in the page: {_excerpt(page, STDERR)}"
        for marker in REPRS:
            assert marker not in page, f"{tutorial.name}: {_excerpt(page, marker)}"
        # docs/hooks.py points a notebook's .md/.ipynb links at the built pages
        assert not re.search(r'href="(?![a-z]+:)[^"]*\.(?:md|ipynb)[#"]', page), tutorial.name
        # an executed widget (a slider, a tqdm bar once ipywidgets is installed) would load
        # its renderer from a CDN: tutorials show widgets in a live notebook only
        assert "@jupyter-widgets/html-manager" not in page, f"{tutorial.name}: widget state"
    # one page per module under reference/: check them together
    reference = "\n".join(page.read_text()
                          for page in sorted((site / "reference").glob("**/index.html")))
    assert "collect_spectra" in reference and "participation_ratio" in reference
    assert "<code>exact_diagonal</code>" in reference and "plan_capture" in reference
    assert ":func:<code>" not in reference and ":class:<code>" not in reference  # hooks.py
    assert "::</p>" not in reference
    assert "SPEC.md" not in reference  # SPEC.md is not in the repository
    assert not (site / "hooks.py").exists()  # exclude_docs
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):  # shown as source
        assert (site / "notebooks" / notebook.stem / "index.html").exists(), notebook.name
