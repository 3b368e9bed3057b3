"""Figures from tidy DataFrames (never from models): seaborn in, matplotlib Axes out.

Every function takes ``data`` (a table made by :class:`SpectraResult`, an ablation or a width
sweep) and column names, draws on the ``ax`` it is given or a new one, and returns what it drew
on, so a figure can be redrawn from a saved CSV without rerunning any model.
:func:`plot_power_law` draws a metric against width on log-log axes with the fits of
:func:`nerve_interp.scaling.fit_power_law`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ._validation import check_tidy
from .scaling import PowerLawFit, fit_power_law

#: Colours of the points, the same in every figure.
POINT_PALETTE = {"pre": "#1f77b4", "post": "#d62728", "act": "#ff7f0e", "up": "#2ca02c"}

#: Axis labels, one per metric and column name (the glossary's names).
LABELS = {
    "spectral_entropy": "spectral entropy (nats)",
    "participation_ratio": "participation ratio",
    "eee": "EEE",
    "soft_rank": "soft rank",
    "hard_rank": "hard rank",
    "soft_rank_utilization": "soft rank / D",
    "hard_rank_utilization": "hard rank / D",
    "spectral_concentration": "spectral concentration",
    "sui": "SUI",
    "pr_gain": "PR gain (post / pre)",
    "delta_spectral_entropy": "Δ spectral entropy (post − pre)",
    "delta_eee": "Δ EEE (post − pre)",
    "js_divergence": "JS divergence (pre, post)",
    "soft_rank_gain": "soft rank gain",
    "hard_rank_gain": "hard rank gain",
}


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def _palette(points: Sequence[str]) -> dict[str, str]:
    return {p: POINT_PALETTE.get(p, "#7f7f7f") for p in points}


def plot_spectra(
    data: pd.DataFrame,
    *,
    layers: Sequence[int] | None = None,
    col_wrap: int = 2,
    height: float = 3.2,
    aspect: float = 1.4,
    normalize: bool = True,
    floor: float = 1e-12,
    **kwargs: Any,
):
    """Eigenvalue decay, pre vs post, one log-log panel per layer.

    Parameters
    ----------
    data : DataFrame
        ``SpectraResult.eigenvalue_frame()``: columns ``layer, point, rank, eigenvalue``.
    layers : sequence of int, optional
        Panels to draw (default: every layer in ``data``).
    col_wrap, height, aspect : int, float, float
        Panels per row, and each panel's height (inches) and width / height: two readable
        panels per row by default.
    normalize : bool, default True
        Divide each spectrum by its sum (share of variance per direction), so layers with
        different activation scales share an axis.
    floor : float, default 1e-12
        Eigenvalues below ``floor · λ_1`` are float64 round-off of exact zeros (a point of
        rank r < D, e.g. a gate projection from d_model < D dims) and are not drawn; the
        line ends where the rank ends.
    **kwargs
        Passed to ``seaborn.relplot``.

    Returns
    -------
    seaborn.FacetGrid
    """
    import seaborn as sns

    check_tidy(data, ("layer", "point", "rank", "eigenvalue"))
    df = data if layers is None else data[data["layer"].isin(list(layers))]
    top = df.groupby(["layer", "point"])["eigenvalue"].transform("max")
    df = df[df["eigenvalue"] > floor * top].copy()
    if normalize:
        df["eigenvalue"] = df["eigenvalue"] / df.groupby(["layer", "point"])[
            "eigenvalue"].transform("sum")
    points = [p for p in POINT_PALETTE if p in set(df["point"])]
    n_layers = df["layer"].nunique()
    g = sns.relplot(data=df, x="rank", y="eigenvalue", hue="point", hue_order=points,
                    palette=_palette(points), col="layer", col_wrap=min(col_wrap, n_layers),
                    kind="line", height=height, aspect=aspect, linewidth=1.2,
                    facet_kws={"sharey": True}, **kwargs)
    g.set(xscale="log", yscale="log")
    g.set_titles("layer {col_name}")
    g.set_axis_labels("rank i", "λ_i / Σλ" if normalize else "eigenvalue λ_i")
    return g


def plot_metric(
    data: pd.DataFrame,
    *,
    metric: str = "participation_ratio",
    x: str = "layer",
    hue: str = "point",
    ax: Any = None,
    **kwargs: Any,
):
    """One metric against depth (or step, or width), a line per point.

    Parameters
    ----------
    data : DataFrame
        Tidy metrics (``SpectraResult.metrics()``): ``layer, point, metric, value``.
    metric : str
        Which metric to draw (a name from the glossary).
    x, hue : str
        Columns for the x axis and the colours.
    ax : matplotlib Axes, optional
    **kwargs
        Passed to ``seaborn.lineplot``.

    Returns
    -------
    matplotlib Axes
    """
    import seaborn as sns

    check_tidy(data, (x, hue, "metric", "value"))
    df = data[data["metric"] == metric]
    if df.empty:
        raise KeyError(f"metric {metric!r} is not in the table; it has "
                       f"{sorted(data['metric'].unique())}.")
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(5, 3.2))
    points = [p for p in POINT_PALETTE if p in set(df[hue])] if hue == "point" else None
    sns.lineplot(data=df, x=x, y="value", hue=hue, hue_order=points,
                 palette=_palette(points) if points else None, marker="o", ax=ax, **kwargs)
    _interval_bands(ax, df, x, hue)
    ax.set_ylabel(LABELS.get(metric, metric))
    return ax


def _interval_bands(ax: Any, df: pd.DataFrame, x: str, hue: str) -> None:
    """The ``ci_low``–``ci_high`` band of each hue group (captures with ``n_groups``), in
    the colour of its line."""
    if not {"ci_low", "ci_high"} <= set(df.columns) or df["ci_low"].isna().all():
        return
    colours = {line.get_label(): line.get_color() for line in ax.get_lines()}
    for name, g in df.sort_values(x).groupby(hue, sort=False):
        ax.fill_between(g[x], g["ci_low"], g["ci_high"], alpha=0.2, lw=0,
                        color=colours.get(str(name), POINT_PALETTE.get(str(name), "0.5")))


def plot_reinjection(
    data: pd.DataFrame,
    *,
    metrics: Sequence[str] = ("pr_gain", "delta_spectral_entropy", "delta_eee", "js_divergence"),
    axes: Any = None,
):
    """Variance reinjection per layer: one panel per column of ``reinjection()``, two per
    row (pass ``axes`` for another layout).

    Reference lines mark "no change" (gain 1, difference 0). With ``{metric}_ci_low`` /
    ``_ci_high`` columns (a capture with ``n_groups``) each layer gets its interval as an
    error bar, so you can see which layers' change excludes "no change".

    Returns
    -------
    ndarray of matplotlib Axes
    """
    check_tidy(data, ("layer", *metrics))
    plt = _pyplot()
    if axes is None:
        rows = -(-len(metrics) // 2)
        _, grid = plt.subplots(rows, min(2, len(metrics)), figsize=(10, 3.4 * rows),
                               layout="constrained", squeeze=False)
        for ax in grid.flat[len(metrics):]:
            ax.set_visible(False)
        axes = grid.flat[:len(metrics)]
    for ax, name in zip(axes, metrics, strict=True):
        ax.plot(data["layer"], data[name], marker="o", color=POINT_PALETTE["post"])
        if f"{name}_ci_low" in data:
            lo, hi = data[f"{name}_ci_low"], data[f"{name}_ci_high"]
            ax.errorbar(data["layer"], data[name], yerr=[data[name] - lo, hi - data[name]],
                        fmt="none", ecolor=POINT_PALETTE["post"], elinewidth=1, capsize=2)
        ref = 1.0 if name.endswith("gain") else 0.0
        ax.axhline(ref, color="0.6", lw=0.8, ls="--")
        ax.set_xlabel("layer")
        ax.set_title(LABELS.get(name, name), fontsize=10)
    return axes


#: Colours of the nulls of :func:`plot_compare`, the same in every figure.
NULL_PALETTE = {"init": "#9467bd", "gaussian_equivalent": "#ff7f0e", "independent": "#2ca02c",
                "marchenko_pastur": "#7f7f7f"}


def plot_compare(data: pd.DataFrame, *, metric: str = "pr_gain", point: str = "reinjection",
                 axes: Any = None):
    """A metric beside its nulls (:func:`nerve_interp.compare`'s table), per layer.

    Left: the measured value (black) and each null's value with a band of the difference's
    half-width around it (a measured point outside a null's band differs from that null at
    the table's coverage). Right: measured − null with its interval and the zero line.

    Parameters
    ----------
    data : DataFrame
        ``compare(result, *nulls)``.
    metric : str, default "pr_gain"
    point : str, default "reinjection"
        ``"pre"``, ``"post"``, ... for per-point metrics, ``"reinjection"`` for pre → post.
    axes : two matplotlib Axes, optional

    Returns
    -------
    ndarray of two matplotlib Axes
    """
    check_tidy(data, ("layer", "point", "metric", "value", "null", "null_value", "difference",
                      "ci_low", "ci_high"))
    df = data[(data["metric"] == metric) & (data["point"] == point)].sort_values("layer")
    if df.empty:
        raise KeyError(f"no rows with metric {metric!r} at point {point!r}; the table has "
                       f"{sorted(set(zip(data['point'], data['metric'], strict=True)))[:12]}.")
    if axes is None:
        _, axes = _pyplot().subplots(1, 2, figsize=(10, 3.4), layout="constrained")
    left, right = axes
    measured = df.drop_duplicates("layer")
    left.plot(measured["layer"], measured["value"], "o-", color="k", label="measured", zorder=3)
    for i, (name, g) in enumerate(df.groupby("null", sort=False)):
        colour = NULL_PALETTE.get(str(name), f"C{i}")
        half = (g["ci_high"] - g["ci_low"]) / 2
        left.plot(g["layer"], g["null_value"], "s--", color=colour, label=str(name), ms=4)
        left.fill_between(g["layer"], g["null_value"] - half, g["null_value"] + half,
                          color=colour, alpha=0.2, lw=0)
        right.errorbar(g["layer"] + 0.08 * i, g["difference"],
                       yerr=[g["difference"] - g["ci_low"], g["ci_high"] - g["difference"]],
                       fmt="o", color=colour, ms=4, capsize=2, label=str(name))
    right.axhline(0.0, color="0.6", lw=0.8, ls="--")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    label = LABELS.get(metric, metric)
    left.set(xlabel="layer", ylabel=label, title=f"{label}: measured and nulls")
    right.set(xlabel="layer", ylabel="measured − null", title="difference (interval)")
    left.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return axes


#: Colours of the two token sets of :func:`plot_outliers`.
TOKENS_PALETTE = {"all": "#d62728", "without outliers": "#1f77b4"}
LABELS.update({"outlier_share": "share of variance in the top tokens",
               "position": "position in the sequence (real tokens)"})


def plot_outliers(
    comparison: pd.DataFrame,
    tokens: pd.DataFrame,
    *,
    point: str = "post",
    metrics: Sequence[str] = ("participation_ratio", "soft_rank"),
    axes: Any = None,
):
    """Spectra with all tokens vs with the flagged (outlier) tokens left out, and where
    those tokens sit.

    One panel per metric against layer (log y; a line for ``all`` and one for ``without
    outliers``; flagged layers marked with a cross), then a histogram of the positions of
    the outlier tokens of flagged layers.

    Parameters
    ----------
    comparison : DataFrame
        ``SpectraResult.outlier_comparison()``: ``layer, point, metric, value, tokens,
        outlier_flag``.
    tokens : DataFrame
        ``SpectraResult.outlier_tokens(flagged_only=True)``: ``layer, point, position``.
    point : str, default "post"
    metrics : sequence of str
    axes : sequence of matplotlib Axes, optional
        ``len(metrics) + 1`` of them.

    Returns
    -------
    ndarray of matplotlib Axes
    """
    import seaborn as sns

    check_tidy(comparison, ("layer", "point", "metric", "value", "tokens", "outlier_flag"))
    check_tidy(tokens, ("layer", "point", "position"))
    plt = _pyplot()
    if axes is None:
        _, axes = plt.subplots(1, len(metrics) + 1, figsize=(3.6 * (len(metrics) + 1), 3.2),
                               layout="constrained")
    df = comparison[comparison["point"] == point]
    for ax, metric in zip(axes, metrics, strict=False):
        sub = df[df["metric"] == metric]
        if sub.empty:
            raise KeyError(f"metric {metric!r} at point {point!r} is not in the table.")
        sns.lineplot(data=sub, x="layer", y="value", hue="tokens",
                     hue_order=list(TOKENS_PALETTE), palette=TOKENS_PALETTE, marker="o",
                     markersize=4, ax=ax)
        flagged = sub[(sub["tokens"] == "all") & sub["outlier_flag"].fillna(False).astype(bool)]
        ax.scatter(flagged["layer"], flagged["value"], marker="x", s=60, color="k", zorder=5,
                   label="flagged")
        ax.set_yscale("log")
        ax.set_ylabel(f"{LABELS.get(metric, metric)} ({point})")
        ax.legend(fontsize=7, frameon=False)
    ax = axes[len(metrics)]
    pos = tokens[tokens["point"] == point]["position"].to_numpy()
    pos = pos[pos >= 0]
    if pos.size:
        top = int(pos.max())
        ax.hist(pos, bins=np.arange(-0.5, top + 1.5, max(1, (top + 1) // 40)),
                color=TOKENS_PALETTE["all"])
    else:
        ax.text(0.5, 0.5, "no flagged layer", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(LABELS["position"])
    ax.set_ylabel("outlier tokens (flagged layers)")
    return np.asarray(axes)


#: Colours of the ablation subspaces and line styles of the modes.
SUBSPACE_PALETTE = {"top": "#d62728", "tail": "#1f77b4", "random": "#7f7f7f",
                    "random_matched": "#2ca02c"}
MODE_STYLES = {"keep": "-", "remove": "--"}
LABELS.update({
    "delta_loss": "Δ loss (ablated − clean, nats)",
    "kl": "KL(clean ‖ ablated) (nats/token)",
    "top1_agreement": "top-1 agreement",
    "cosine": "cosine to clean (per token)",
    "embedding_cosine": "cosine to clean (mean-pooled)",
    "k": "subspace size k",
    "variance_fraction": "share of variance in the subspace",
})


def plot_ablation(
    data: pd.DataFrame,
    *,
    metric: str = "delta_loss",
    x: str = "k",
    layers: Sequence[Any] | None = None,
    col_wrap: int = 3,
    height: float = 2.8,
    sharey: bool = False,
):
    """Effect of an ablation against subspace size (log x) or variance fraction.

    One panel per layer; colour = subspace (top / tail / random), line style = mode
    (keep solid, remove dashed); shaded bands are the 95% intervals of the table
    (bootstrap over sequences, and over seeds for random subspaces).

    Parameters
    ----------
    data : DataFrame
        ``AblationResult.table``.
    metric : str
        ``delta_loss``, ``kl``, ``top1_agreement`` (causal LMs) or ``cosine`` (encoders).
    x : {"k", "variance_fraction"}
        ``k`` is drawn on a log axis (k = 0 rows are left out).
    sharey : bool, default False
        One y scale for all layers (effects often differ by orders of magnitude: layer 0 of
        SmolLM2 loses ~7 nats under mean ablation, middle layers ~0.1).

    Returns
    -------
    ndarray of matplotlib Axes
    """
    check_tidy(data, ("layer", "point", "subspace", "mode", "k", "variance_fraction", "metric",
                      "value", "ci_low", "ci_high"))
    df = data[data["metric"] == metric]
    if df.empty:
        raise KeyError(f"metric {metric!r} is not in the table; it has "
                       f"{sorted(data['metric'].unique())}.")
    if x == "k":
        df = df[df["k"] > 0]
    panels = list(dict.fromkeys(df["layer"])) if layers is None else list(layers)
    plt = _pyplot()
    ncol = min(col_wrap, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(height * 1.25 * ncol, height * nrow),
                             squeeze=False, sharey=sharey, layout="constrained")
    for ax, layer in zip(axes.flat, panels, strict=False):
        sub = df[df["layer"] == layer]
        for (subspace, mode), g in sub.groupby(["subspace", "mode"], sort=False):
            g = g.sort_values(x)
            color = SUBSPACE_PALETTE.get(subspace, "#2ca02c")
            ax.plot(g[x], g["value"], MODE_STYLES.get(mode, "-"), color=color, marker=".",
                    label=f"{subspace} {mode}")
            ax.fill_between(g[x], g["ci_low"], g["ci_high"], color=color, alpha=0.15, lw=0)
        if x == "k":
            ax.set_xscale("log")
        ax.set_title(f"layer {layer} ({sub['point'].iloc[0] if len(sub) else ''})", fontsize=10)
        ax.set_xlabel(LABELS.get(x, x))
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0] if sharey else axes.flat:
        ax.set_ylabel(LABELS.get(metric, metric))
    axes.flat[0].legend(fontsize=7, frameon=False)
    return axes


# ------------------------------------------------------------------ power laws
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
    saturating: bool = False,
    **kwargs: Any,
):
    """Log-log scatter of a metric against width, with the fitted power law per group.

    At each ``x`` the rows of a group (layers, seeds, replicates) are reduced to
    ``estimator`` ± 1 SD and drawn as a marker with an error bar. With ``fits=True`` a power law
    is fitted to those per-``x`` values (one point per width, as the follow-up to [SSL] does)
    and drawn as a line whose legend label gives ``β ± t-interval half-width`` and ``R²``.
    The fits come from :func:`nerve_interp.scaling.fit_power_law`, so a figure's legend and
    ``fit_table`` agree.

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
    saturating : bool, default False
        Also draw the saturating alternative ``y = a · D / (b + D)``
        (:func:`nerve_interp.scaling.fit_saturating`, on the same per-``x`` values) as a
        dashed line of the group's colour, its legend label giving ``ΔAIC = AIC_sat −
        AIC_pow`` (> 0 favours the power law).
    **kwargs
        Passed to ``Axes.scatter`` for the markers.

    Returns
    -------
    matplotlib Axes
        ``ax.get_lines()`` holds exactly one fitted line per group that could be fitted (two
        with ``saturating=True``: the power law, then the dashed saturating curve).

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
    _check_power_law_data(data, x, y, hue, estimator)
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(5, 3.6))
    groups = _hue_groups(data, hue)
    colours = _hue_colours(hue, [name for name, _ in groups])
    scatter_kw = {"s": 22, "zorder": 3, **kwargs}
    for (name, g), colour in zip(groups, colours, strict=True):
        fitted = _draw_power_law(ax, g, x, y, label=None if name is None else str(name),
                                 colour=colour, fits=fits, estimator=estimator,
                                 confidence=confidence, scatter_kw=scatter_kw)
        if saturating and fitted is not None:
            _draw_saturating(ax, g, x, y, fitted, estimator, colour)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FFN width D" if x == "width" else x)
    _set_width_ticks(ax, data[x])
    ax.set_ylabel(_metric_label(data, y))
    if hue is not None or fits:
        ax.legend(title=hue, fontsize="small")
    return ax


def _check_power_law_data(data: pd.DataFrame, x: str, y: str, hue: str | None,
                          estimator: str) -> None:
    check_tidy(data, [x, y] if hue is None else [x, y, hue])
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


def _hue_groups(data: pd.DataFrame, hue: str | None) -> list[tuple[Any, pd.DataFrame]]:
    """``(name, rows)`` per value of ``hue`` in order of appearance (points in
    ``POINT_PALETTE`` order); one group ``(None, data)`` without ``hue``."""
    if hue is None:
        return [(None, data)]
    order = list(pd.unique(data[hue]))
    if hue == "point":
        rank = list(POINT_PALETTE)
        order = sorted(order, key=lambda p: rank.index(p) if p in rank else len(rank))
    return [(name, data[data[hue] == name]) for name in order]


def _hue_colours(hue: str | None, names: list[Any]) -> list[Any]:
    if hue == "point":
        return [POINT_PALETTE.get(n, "#7f7f7f") for n in names]
    import seaborn as sns

    return list(sns.color_palette(n_colors=max(len(names), 1)))[: len(names)]


def _draw_power_law(ax: Any, g: pd.DataFrame, x: str, y: str, *, label: str | None,
                    colour: Any, fits: bool, estimator: str, confidence: float,
                    scatter_kw: dict) -> PowerLawFit | None:
    """One group: ``estimator`` ± 1 SD at each ``x``, and its fitted line when ``fits``
    (returned; None when not drawn)."""
    stats = g.groupby(x, sort=True)[y].agg([estimator, "std", "count"])
    xs = stats.index.to_numpy(dtype=float)
    centre = stats[estimator].to_numpy(dtype=float)
    spread = np.nan_to_num(stats["std"].to_numpy(dtype=float))
    ax.errorbar(xs, centre, yerr=spread, fmt="none", ecolor=colour, elinewidth=1,
                capsize=0, alpha=0.7)
    fitted = _fit_group(xs, centre, x, label, confidence) if fits else None
    ax.scatter(xs, centre, color=colour,
               label=label if fitted is None else "_nolegend_", **scatter_kw)
    if fitted is not None:
        grid = np.geomspace(xs.min(), xs.max(), 64)
        ax.plot(grid, fitted.predict(grid), color=colour, linewidth=1.4,
                label=_fit_label(fitted, label))
    return fitted


def _draw_saturating(ax: Any, g: pd.DataFrame, x: str, y: str, power: PowerLawFit,
                     estimator: str, colour: Any) -> None:
    """The dashed saturating curve ``a · x / (b + x)`` fitted to the same per-``x`` values."""
    from .scaling import fit_saturating

    stats = g.groupby(x, sort=True)[y].agg(estimator)
    xs, centre = stats.index.to_numpy(dtype=float), stats.to_numpy(dtype=float)
    sat = fit_saturating(xs, centre)
    grid = np.geomspace(xs.min(), xs.max(), 64)
    ax.plot(grid, sat.predict(grid), color=colour, linewidth=1.2, linestyle="--",
            label=f"a·D/(b+D), b = {sat.b:.3g}: ΔAIC = {sat.aic - power.aic:+.1f}")


def _fit_group(xs: np.ndarray, centre: np.ndarray, x: str, label: str | None,
               confidence: float) -> PowerLawFit | None:
    if xs.size >= 3:
        return fit_power_law(xs, centre, n_boot=0, confidence=confidence)
    warnings.warn(  # stacklevel: _draw_power_law, plot_power_law, its caller
        f"group {label or 'all rows'} has {xs.size} distinct {x} value(s); a power "
        "law needs 3, so it is drawn without a fit.", UserWarning, stacklevel=4)
    return None


def _fit_label(fit: PowerLawFit, name: str | None) -> str:
    pct = f"{100 * fit.confidence:g}%"
    text = f"β = {fit.beta:.2f} ± {fit.beta_pm:.2f} ({pct} t), R² = {fit.r2:.2f}"
    return text if name is None else f"{name}: {text}"


def _set_width_ticks(ax: Any, values: pd.Series) -> None:
    """A sweep's few widths (<= 10) read better as ticks than 10^k; labels that would
    overlap on the log axis are left out."""
    ticks = np.sort(pd.unique(values.astype(float)))
    if ticks.size > 10:
        return
    from matplotlib.ticker import NullFormatter

    labels, last = [], None
    gap = 0.12 * math.log(ticks[-1] / ticks[0]) if ticks.size > 1 else 0.0
    for t in ticks:
        keep = last is None or math.log(t / last) >= gap
        labels.append(f"{t:g}" if keep else "")
        last = t if keep else last
    ax.set_xticks(ticks, labels)
    ax.xaxis.set_minor_formatter(NullFormatter())


def _metric_label(data: pd.DataFrame, y: str) -> str:
    if y == "value" and "metric" in data.columns and data["metric"].nunique() == 1:
        metric = str(data["metric"].iloc[0])
        return LABELS.get(metric, metric)
    return y


def plot_convergence(
    conv: Any,
    *,
    metric: str = "soft_rank",
    point: str = "post",
    layers: Sequence[int] | None = None,
    ax: Any = None,
):
    """A metric against the tokens it was measured on, and its extrapolation to N → ∞.

    Dots are the metric on k of K groups (random merge orders), the large dot all the data,
    the line the fit ``m∞ + a/N`` (on the full-rank samples, N ≥ D), the band at the right
    ``m∞`` with its interval. A curve still climbing at the largest N says the measured value
    is biased by the sample size.

    Parameters
    ----------
    conv : Convergence
        From :meth:`nerve_interp.results.SpectraResult.convergence`.
    metric, point : str
        Which metric at which point (``"pre->post"`` for pre → post quantities).
    layers : sequence of int, optional
        Layers to draw (default: up to 6 spread over the depth).
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
    """
    curves = conv.curves[(conv.curves["metric"] == metric) & (conv.curves["point"] == point)]
    if curves.empty:
        have = conv.curves[["point", "metric"]].drop_duplicates().itertuples(index=False)
        raise KeyError(f"no convergence curve of {metric!r} at {point!r}; the curves hold "
                       f"{sorted(map(tuple, have))}.")
    all_layers = sorted(curves["layer"].unique())
    if layers is None:
        layers = [all_layers[i] for i in np.unique(
            np.linspace(0, len(all_layers) - 1, min(6, len(all_layers))).round().astype(int))]
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(6, 3.6), layout="constrained")
    colours = _pyplot().get_cmap("viridis")(np.linspace(0, 0.9, len(layers)))
    fits = conv.fits.set_index(["layer", "point", "metric"])
    n_max = curves["n_tokens"].max()
    for colour, layer in zip(colours, layers, strict=True):
        g = curves[curves["layer"] == layer]
        ax.scatter(g["n_tokens"], g["value"], s=10, color=colour, alpha=0.5)
        whole = g[g["k"] == g["k"].max()]
        ax.scatter(whole["n_tokens"], whole["value"], s=40, color=colour, label=f"layer {layer}")
        f = fits.loc[(layer, point, metric)]
        if np.isfinite(f["m_inf"]):
            n = np.geomspace(g.loc[g["n_tokens"] >= g["dim"], "n_tokens"].min(), 4 * n_max, 50)
            ax.plot(n, f["m_inf"] + f["a"] / n, color=colour, lw=1)
            ax.fill_between([3 * n_max, 4 * n_max], f["m_inf_ci_low"], f["m_inf_ci_high"],
                            color=colour, alpha=0.3, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel("tokens N")
    ax.set_ylabel(f"{LABELS.get(metric, metric)} ({point})")
    ax.legend(fontsize=8, frameon=False)
    return ax


__all__ = ["LABELS", "MODE_STYLES", "POINT_PALETTE", "SUBSPACE_PALETTE", "TOKENS_PALETTE",
           "plot_ablation", "plot_compare", "plot_convergence", "plot_metric", "plot_outliers",
           "plot_power_law",
           "plot_reinjection", "plot_spectra"]
