"""mkdocs hooks: serve MathJax 3 from the site itself (no CDN), copied from the
django-static-mathjax wheel (the `docs` extra) at build time, so nothing binary is committed;
and drop the Sphinx roles (``:func:``, ``:class:`` ...) and ``::`` literal-block markers of
docstrings from the API pages, which mkdocstrings would otherwise print literally."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):(?=<code>)")


def on_config(config, **kwargs):
    """Progress bars off in the executed tutorials: a static page shows a bar's last frame as
    stderr noise. ``TQDM_DISABLE`` is read by nerve_interp's bars (``nerve_interp._progress``),
    ``HF_HUB_DISABLE_PROGRESS_BARS`` by transformers' weight-loading bars; the kernels that
    mkdocs-jupyter starts inherit both."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return config


def on_page_content(html, **kwargs):
    """``:func:<code>name</code>`` → ``<code>name</code>``, and the RST literal-block marker
    ``text::`` before a code block → ``text:``."""
    return _ROLE.sub("", html).replace("::</p>", ":</p>")


def _mathjax_es5() -> Path:
    spec = importlib.util.find_spec("mathjax")
    if spec is None or spec.origin is None:
        raise RuntimeError("MathJax is missing: pip install 'nerve_interp[docs]' "
                           "(django-static-mathjax ships MathJax 3.2.2).")
    return Path(spec.origin).parent / "static" / "mathjax" / "es5"


def on_post_build(config, **kwargs):
    es5 = _mathjax_es5()
    dest = Path(config["site_dir"]) / "javascripts" / "mathjax"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(es5 / "tex-mml-chtml.js", dest / "tex-mml-chtml.js")
    fonts = dest / "output" / "chtml" / "fonts"
    if fonts.exists():
        shutil.rmtree(fonts)
    shutil.copytree(es5 / "output" / "chtml" / "fonts", fonts)
