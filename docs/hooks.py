"""mkdocs hooks: serve MathJax 3 from the site itself (no CDN), copied from the
django-static-mathjax wheel (the `docs` extra) at build time, so nothing binary is committed;
drop the Sphinx roles (``:func:``, ``:class:`` ...) and ``::`` literal-block markers of
docstrings from the API pages, which mkdocstrings would otherwise print literally; and point
the ``.md`` / ``.ipynb`` links of notebook pages at the built pages (mkdocs rewrites such links
in Markdown pages only; mkdocs-jupyter leaves a notebook's links as written)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import posixpath
import re
import shutil
import time
from pathlib import Path

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):(?=<code>)")
_DOC_LINK = re.compile(r'href="(?![a-zA-Z][a-zA-Z0-9+.-]*:|#|/)([^"#?]+\.(?:md|ipynb))(#[^"]*)?"')
_log = logging.getLogger("mkdocs.hooks.notebook_links")


def on_config(config, **kwargs):
    """Progress bars off in the executed tutorials: a static page shows a bar's last frame as
    stderr noise. ``TQDM_DISABLE`` is read by nerve_interp's bars (``nerve_interp._progress``),
    ``HF_HUB_DISABLE_PROGRESS_BARS`` by transformers' weight-loading bars; the kernels that
    mkdocs-jupyter starts inherit both."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return config


def _link_target(href, page, config, files):
    """The site file a notebook's relative link names: read against the page's URL as
    the site shows it (``../../glossary.md`` from ``tutorials/00_x/``), else against the
    notebook's own folder as Jupyter reads it (``03_x.ipynb``, ``../docs/glossary.md``)."""
    url_dir = page.file.url if page.file.url.endswith("/") else posixpath.dirname(page.file.url)
    src_dir = posixpath.dirname(page.file.src_uri)
    for base in (url_dir, src_dir):
        found = files.get_file_from_path(posixpath.normpath(posixpath.join(base, href)))
        if found is not None:
            return found
    absolute = os.path.realpath(os.path.join(os.path.dirname(page.file.abs_src_path), href))
    docs = os.path.realpath(config["docs_dir"])
    if absolute.startswith(docs + os.sep):
        return files.get_file_from_path(Path(os.path.relpath(absolute, docs)).as_posix())
    return None


def _notebook_links(html, page, config, files):
    def sub(m):
        target = _link_target(m.group(1), page, config, files)
        if target is None:
            _log.warning("%s links to %s, which is not a page of the site",
                         page.file.src_uri, m.group(1))
            return m.group(0)
        return f'href="{target.url_relative_to(page.file)}{m.group(2) or ""}"'

    return _DOC_LINK.sub(sub, html)


_started: dict[str, float] = {}
_seconds: dict[str, float] = {}


def on_pre_page(page, **kwargs):
    """Start the clock of a notebook page (mkdocs-jupyter executes it while rendering)."""
    if page.file.src_uri.endswith(".ipynb"):
        _started[page.file.src_uri] = time.perf_counter()
    return page


def on_page_content(html, page, config, files, **kwargs):
    """``:func:<code>name</code>`` → ``<code>name</code>``, and the RST literal-block marker
    ``text::`` before a code block → ``text:``; in notebook pages, links to ``.md`` and
    ``.ipynb`` sources → links to their pages."""
    if page.file.src_uri.endswith(".ipynb"):
        _seconds[page.file.src_uri] = round(time.perf_counter() - _started[page.file.src_uri], 1)
        html = _notebook_links(html, page, config, files)
    return _ROLE.sub("", html).replace("::</p>", ":</p>")


def _mathjax_es5() -> Path:
    spec = importlib.util.find_spec("mathjax")
    if spec is None or spec.origin is None:
        raise RuntimeError("MathJax is missing: pip install 'nerve_interp[docs]' "
                           "(django-static-mathjax ships MathJax 3.2.2).")
    return Path(spec.origin).parent / "static" / "mathjax" / "es5"


def on_post_build(config, **kwargs):
    """MathJax into the site; and ``execution-seconds.json``: how long each notebook page took
    to execute and render in this build (every tutorial should stay within ~3 minutes on 2
    cores; a cached page takes ~0 s)."""
    site = Path(config["site_dir"])
    (site / "execution-seconds.json").write_text(json.dumps(_seconds, indent=1))
    es5 = _mathjax_es5()
    dest = Path(config["site_dir"]) / "javascripts" / "mathjax"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(es5 / "tex-mml-chtml.js", dest / "tex-mml-chtml.js")
    fonts = dest / "output" / "chtml" / "fonts"
    if fonts.exists():
        shutil.rmtree(fonts)
    shutil.copytree(es5 / "output" / "chtml" / "fonts", fonts)
