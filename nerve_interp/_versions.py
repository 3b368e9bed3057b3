"""Versions of nerve_interp and the libraries it runs on (first cell of every tutorial)."""

from __future__ import annotations

import platform
from importlib import metadata


def versions() -> dict[str, str]:
    """``{package: version}`` for Python and the packages results depend on."""
    out = {"python": platform.python_version()}
    for pkg in ("nerve_interp", "torch", "nnsight", "transformers", "numpy", "pandas"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def show_versions() -> None:
    """Print the versions of Python, nerve_interp, torch, nnsight, transformers, numpy, pandas."""
    for k, v in versions().items():
        print(f"{k:>13}: {v}")
