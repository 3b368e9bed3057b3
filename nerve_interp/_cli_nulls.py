"""``--nulls`` of ``nerve-interp demo`` / ``spectra``: the measured reinjection beside its
nulls (:mod:`nerve_interp.nulls`), printed per layer and written as ``nulls.csv`` and
``nulls.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._cli_support import check_choices

NULLS = ("init", "gaussian", "independent", "mp")
"""Names ``--nulls`` accepts: init (fresh weights, same tokens), gaussian (the
Gaussian-equivalent nonlinearity), independent (units without correlations), mp (white
noise)."""

NULLS_HELP = ("Comma-separated nulls to compare with: init (same model, fresh weights, same "
              "tokens), gaussian (Gaussian inputs of the same covariance through the FFN's "
              "nonlinearity), independent, mp (white noise). Adds 8 groups for intervals "
              "unless --groups is given; gaussian keeps the joint inputs (and 'up').")


def parse_nulls(text: str | None) -> tuple[str, ...]:
    """``--nulls`` as names of :data:`NULLS` (empty when not given)."""
    return () if text is None else tuple(check_choices(text, NULLS, "--nulls"))


def capture_options(nulls: tuple[str, ...], kw: dict) -> dict:
    """The capture keywords the nulls need: groups for intervals (8, without convergence
    curves, unless given) and the joint inputs for the Gaussian-equivalent null."""
    extra: dict[str, Any] = {}
    if nulls and kw.get("n_groups") is None:
        extra.update(n_groups=8, convergence=False)
    if "gaussian" in nulls:
        extra["joint"] = True
        if "pre" not in kw["points"]:
            extra["points"] = ("pre", *kw["points"])
    return extra


def add_up_point(model: Any, kw: dict, nulls: tuple[str, ...]) -> None:
    """A gated FFN's Gaussian-equivalent null needs ``up`` too (gate and up jointly)."""
    from .sites import POINTS, find_ffn_sites

    if "gaussian" in nulls and "up" not in kw["points"]:
        if find_ffn_sites(model)[0].kind == "gated":
            kw["points"] = tuple(p for p in POINTS if p in (*kw["points"], "up"))


def run_nulls(model: Any, texts: Any, tokenizer: Any, result: Any, nulls: tuple[str, ...],
              kw: dict, echo: Any, out: Path) -> dict[str, Path]:
    """Compute the nulls, print PR gain and ΔSE beside them, write the table and figure."""
    from . import nulls as _nulls
    from .comparison import compare

    made = []
    for name in nulls:
        echo(f"null    {name} ...")
        if name == "init":
            made.append(_nulls.init(model, texts, like=result, tokenizer=tokenizer,
                                    **{k: kw[k] for k in ("batch_size", "max_length",
                                                          "progress") if k in kw}))
        else:
            fn = {"gaussian": _nulls.gaussian_equivalent, "independent": _nulls.independent,
                  "mp": _nulls.marchenko_pastur}[name]
            made.append(fn(result, progress=False))
    table = compare(result, *made)
    echo(format_nulls(table))
    out.mkdir(parents=True, exist_ok=True)
    paths = {"nulls": out / "nulls.csv"}
    table.to_csv(paths["nulls"], index=False)
    if {"pre", "post"} <= set(result.points):
        paths["nulls_figure"] = _figure(table, out / "nulls.png")
    return paths


def format_nulls(table: Any) -> str:
    """Per layer: PR gain and ΔSE measured, each null's value, and measured − null [95 %]."""
    rows = table[(table["point"] == "reinjection")
                 & table["metric"].isin(["pr_gain", "delta_spectral_entropy"])]
    lines = ["\nReinjection against its nulls (difference measured − null, [95 % interval]):",
             f"{'layer':>5}  {'metric':<7}{'measured':>9}  {'null':<11}{'null value':>11}"
             f"  {'difference [95 %]':<28}"]
    for _, r in rows.iterrows():
        metric = "PR gain" if r["metric"] == "pr_gain" else "ΔSE"
        star = " *" if r["excludes_zero"] else ""
        lines.append(f"{r['layer']:>5}  {metric:<7}{r['value']:>9.3f}  {r['null']:<11.11}"
                     f"{r['null_value']:>11.3f}  {r['difference']:+.3f} "
                     f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]{star}")
    survive = rows.assign(up=rows["ci_low"] > 0).groupby(["null", "metric"])["up"]
    for (null, metric), up in survive:
        lines.append(f"{null}: {metric} above the null in {int(up.sum())} of {len(up)} layers")
    lines.append("* the interval excludes 0")
    return "\n".join(lines)


def _figure(table: Any, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from .plotting import plot_compare

    axes = plot_compare(table, metric="pr_gain")
    axes[0].figure.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(axes[0].figure)
    return path


__all__ = ["NULLS", "NULLS_HELP", "add_up_point", "capture_options", "format_nulls",
           "parse_nulls", "run_nulls"]
