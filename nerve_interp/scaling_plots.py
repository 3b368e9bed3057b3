"""Deprecated: :func:`plot_power_law` now lives in :mod:`nerve_interp.plotting`.

``from nerve_interp.scaling_plots import plot_power_law`` keeps working and warns
(``DeprecationWarning``); import it from ``nerve_interp.plotting`` instead.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["plot_power_law"]  # noqa: F822 (served by __getattr__)


def __getattr__(name: str) -> Any:
    if name in __all__:
        warnings.warn("nerve_interp.scaling_plots is deprecated; import plot_power_law from "
                      "nerve_interp.plotting instead.", DeprecationWarning, stacklevel=2)
        from . import plotting

        return getattr(plotting, name)
    raise AttributeError(f"module 'nerve_interp.scaling_plots' has no attribute {name!r}")
