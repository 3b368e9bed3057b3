"""Figures of power-law fits from tidy DataFrames: a metric against width on log-log axes.

Like :mod:`nerve_interp.plotting`, every function takes ``data`` and column names, draws on the
``ax`` it is given or a new one, and returns that Axes. The fits come from
:func:`nerve_interp.scaling.fit_power_law`, so a figure's legend and ``fit_table`` agree.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd

from ._validation import check_tidy
from .scaling import PowerLawFit, fit_power_law


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def _fit_label(fit: PowerLawFit, name: str | None) -> str:
    pct = f"{100 * fit.confidence:g}%"
    text = f"β = {fit.beta:.2f} ± {fit.beta_pm:.2f} ({pct} t), R² = {fit.r2:.2f}"
    return text if name is None else f"{name}: {text}"


def plot_power_law(
    data: pd.DataFrame,
    *,
    x: str = "width",
    y: str = "value",
    hue: str | None = None,
    fits: bool = True,
    estimator: str = "mean",
    ax: Any = None,
    confidence: float = 0.95,
    **kwargs: Any,
):
    """Log-log scatter of a metric against width, with the fitted power law per group.

    At each ``x`` the rows of a group (layers, seeds, replicates) are reduced to
    ``estimator`` ± 1 SD and drawn as a marker with an error bar. With ``fits=True`` a power law
    is fitted to those per-``x`` values (one point per width, as the follow-up to [SSL] does)
    and drawn as a line whose legend label gives ``β ± t-interval half-width`` and ``R²``.

    Parameters
    ----------
    data : DataFrame
        Tidy table with columns ``x`` and ``y`` (and ``hue``), e.g. the rows of one metric
        from a width sweep: ``width, layer, point, metric, value``. If it has a ``metric``
        column it must hold one metric, unless ``hue="metric"``.
    x, y : str, default "width", "value"
        Columns of the size (x axis) and of the metric (y axis); both must be > 0.
    hue : str, optional
        Column whose values get their own colour and fit (e.g. ``"point"`` or ``"model"``).
    fits : bool, default True
        Draw the fitted line of each group (groups with fewer than 3 distinct ``x`` are drawn
        without one, with a warning).
    estimator : {"mean", "median"}, default "mean"
        Reduction over the rows at one ``x`` (the follow-up uses the median over layers).
    ax : matplotlib Axes, optional
        Where to draw; a new figure if omitted.
    confidence : float, default 0.95
        Coverage of the t-interval in the legend.
    **kwargs
        Passed to ``Axes.scatter`` for the markers.

    Returns
    -------
    matplotlib Axes
        ``ax.get_lines()`` holds exactly one fitted line per group that could be fitted.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> df = pd.DataFrame({"width": [768, 1536, 3072, 6144] * 2,
    ...                    "point": ["post"] * 4 + ["pre"] * 4,
    ...                    "value": [300, 540, 1010, 1900, 60, 75, 95, 118]})
    >>> ax = plot_power_law(df, hue="point")
    >>> len(ax.get_lines())
    2
    """
    cols = [x, y] if hue is None else [x, y, hue]
    check_tidy(data, cols)
    if estimator not in ("mean", "median"):
        raise ValueError(f"estimator = {estimator!r}, must be 'mean' or 'median'.")
    if "metric" in data.columns and hue != "metric":
        metrics = sorted(map(str, data["metric"].unique()))
        if len(metrics) > 1:
            raise ValueError(
                f"data holds {len(metrics)} metrics {metrics}; a power law fits one. Select one "
                "(data[data['metric'] == 'soft_rank']) or pass hue='metric'."
            )
    if data.empty:
        raise ValueError("data has no rows to plot.")
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(5, 3.6))

    if hue is None:
        groups: list[tuple[Any, pd.DataFrame]] = [(None, data)]
    else:
        order = list(pd.unique(data[hue]))
        if hue == "point":
            from .plotting import POINT_PALETTE

            order = sorted(order, key=lambda p: (list(POINT_PALETTE).index(p)
                                                 if p in POINT_PALETTE else len(POINT_PALETTE)))
        groups = [(name, data[data[hue] == name]) for name in order]
    colours = _colours(hue, [name for name, _ in groups])

    for (name, g), colour in zip(groups, colours, strict=True):
        stats = g.groupby(x, sort=True)[y].agg([estimator, "std", "count"])
        xs = stats.index.to_numpy(dtype=float)
        centre = stats[estimator].to_numpy(dtype=float)
        spread = np.nan_to_num(stats["std"].to_numpy(dtype=float))
        label = None if name is None else str(name)
        ax.errorbar(xs, centre, yerr=spread, fmt="none", ecolor=colour, elinewidth=1,
                    capsize=0, alpha=0.7)
        scatter_kw = {"s": 22, "zorder": 3, **kwargs}
        fitted = None
        if fits:
            if xs.size >= 3:
                fitted = fit_power_law(xs, centre, n_boot=0, confidence=confidence)
            else:
                warnings.warn(
                    f"group {label or 'all rows'} has {xs.size} distinct {x} value(s); a power "
                    "law needs 3, so it is drawn without a fit.", UserWarning, stacklevel=2)
        ax.scatter(xs, centre, color=colour,
                   label=label if fitted is None else "_nolegend_", **scatter_kw)
        if fitted is not None:
            grid = np.geomspace(xs.min(), xs.max(), 64)
            ax.plot(grid, fitted.predict(grid), color=colour, linewidth=1.4,
                    label=_fit_label(fitted, label))

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FFN width D" if x == "width" else x)
    ticks = np.sort(pd.unique(data[x].astype(float)))
    if ticks.size <= 10:  # a sweep's few widths read better than 10^k ticks
        from matplotlib.ticker import NullFormatter

        labels, last = [], None
        gap = 0.12 * math.log(ticks[-1] / ticks[0]) if ticks.size > 1 else 0.0
        for t in ticks:  # leave out labels that would overlap on the log axis
            keep = last is None or math.log(t / last) >= gap
            labels.append(f"{t:g}" if keep else "")
            last = t if keep else last
        ax.set_xticks(ticks, labels)
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel(_ylabel(data, y))
    if hue is not None or fits:
        ax.legend(title=hue, fontsize="small")
    return ax


def _colours(hue: str | None, names: list[Any]) -> list[Any]:
    if hue == "point":
        from .plotting import POINT_PALETTE

        return [POINT_PALETTE.get(n, "#7f7f7f") for n in names]
    import seaborn as sns

    return list(sns.color_palette(n_colors=max(len(names), 1)))[: len(names)]


def _ylabel(data: pd.DataFrame, y: str) -> str:
    if y == "value" and "metric" in data.columns and data["metric"].nunique() == 1:
        from .plotting import LABELS

        metric = str(data["metric"].iloc[0])
        return LABELS.get(metric, metric)
    return y


__all__ = ["plot_power_law"]
