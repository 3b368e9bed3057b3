"""mkdocs hook: serve MathJax 3 from the site itself (no CDN), copied from the
django-static-mathjax wheel (the `docs` extra) at build time, so nothing binary is committed."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path


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
