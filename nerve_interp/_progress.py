"""One progress bar for the package: tqdm's, with its two rough edges in notebooks smoothed.

- ``TQDM_DISABLE=1`` (tqdm's own environment switch) turns every bar off, including the
  notebook bar, which ignores that switch in tqdm itself. The documentation build sets it, so
  the rendered tutorials carry no progress output.
- In a Jupyter kernel without ipywidgets, ``tqdm.auto`` warns (a ``TqdmWarning`` with a path
  in it) at import; here the plain text bar is used instead, with no warning.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

__all__ = ["tqdm", "bars_disabled"]


def bars_disabled() -> bool:
    """True when ``TQDM_DISABLE`` is set to anything but ``""``, ``0`` or ``false``."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")


def _tqdm_class() -> type:
    in_kernel = "ipykernel" in sys.modules
    if in_kernel and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm as bar
    else:
        from tqdm.std import tqdm as bar
    return bar


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(*args, **kwargs)``, off when ``TQDM_DISABLE`` is set."""
    # explicit, so that tqdm's own reading of the variable (which differs) never applies
    kwargs["disable"] = bool(kwargs.get("disable", False)) or bars_disabled()
    return _tqdm_class()(*args, **kwargs)


tqdm.write = lambda *args, **kwargs: _tqdm_class().write(*args, **kwargs)  # type: ignore[attr-defined]
