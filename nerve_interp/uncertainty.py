"""Intervals and convergence curves of a :class:`~nerve_interp.results.SpectraResult` whose
capture kept per-group statistics (``collect_spectra(..., n_groups=K)``).

:func:`reinjection_intervals` gives the jackknife of every pre → post quantity (the pre and
post groups hold the same sequences, so the leave-one-out pairs line up);
:func:`convergence` reads every metric at N·k/K tokens (the groups merged in a few random
orders, the same orders at every point) and fits ``m(N) = m∞ + a/N``
(:func:`nerve_interp.jackknife.fit_convergence`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from . import metrics as _metrics
from .errors import NotFittedError
from .jackknife import fit_convergence, jackknife
from .spectrum import Spectrum, point_metrics

CONVERGENCE_METRICS = ("participation_ratio", "participation_ratio_corrected", "soft_rank",
                       "spectral_entropy", "eee")
"""Per-spectrum metrics :func:`convergence` reads by default."""
CONVERGENCE_REINJECTION = ("pr_gain", "delta_spectral_entropy", "delta_eee", "js_divergence")
"""Pre → post quantities :func:`convergence` reads by default."""


def reinjection_intervals(pre: Spectrum, post: Spectrum, *, ci: float = 0.95
                          ) -> dict[str, dict[str, float]]:
    """Jackknife ``se`` / ``ci_low`` / ``ci_high`` of every ``metrics.reinjection`` value.

    Raises
    ------
    ValueError
        The two spectra were not captured with the same groups.
    """
    gp, gq = pre.require_groups(), post.require_groups()
    if gp.k != gq.k or not np.array_equal(gp.n, gq.n):
        raise ValueError(
            f"{pre.name} and {post.name} have different groups (tokens per group {gp.n} vs "
            f"{gq.n}): their leave-one-out samples do not line up. Capture both points in "
            "one collect_spectra call without exclude_norm_above (which drops different "
            "tokens at each point).")
    full = _metrics.reinjection(pre.eigenvalues, post.eigenvalues)
    loo = reinjection_loo(pre, post)
    return {name: {k: float(v) for k, v in jackknife(value, loo[name], ci=ci).items()}
            for name, value in full.items()}


def reinjection_loo(pre: Spectrum, post: Spectrum) -> dict[str, np.ndarray]:
    """``{quantity: (K,) leave-one-group-out values}`` of every ``metrics.reinjection``
    quantity (the groups of ``pre`` and ``post`` must line up; see
    :func:`reinjection_intervals`)."""
    gp, gq = pre.require_groups(), post.require_groups()
    loo = [_metrics.reinjection(a, b)
           for a, b in zip(gp.loo_eigenvalues, gq.loo_eigenvalues, strict=True)]
    return {name: np.array([r[name] for r in loo]) for name in loo[0]}


@dataclasses.dataclass
class Convergence:
    """Metrics as the sample grows, and their extrapolation to N → ∞.

    Attributes
    ----------
    curves : DataFrame
        ``model, layer, point, metric, order, k, n_tokens, dim, value``: the metric on the first
        ``k`` of K groups merged in random order ``order`` (k = K, all the data, is listed
        once with order 0). ``point`` is ``"pre->post"`` for pre → post quantities.
    fits : DataFrame
        One row per (layer, point, metric): ``value`` (at all N tokens), ``n_tokens``,
        ``m_inf`` with ``m_inf_se``, ``m_inf_ci_low``, ``m_inf_ci_high``, ``a``, ``r2`` and
        ``n_points`` (of :func:`nerve_interp.jackknife.fit_convergence`, fitted on the
        points with ``n_tokens >= dim`` only: NaN when fewer than 3 group counts qualify), and
        ``relative_change`` = (m∞ − value) / value: how far the measured value is from its
        extrapolation (≈ its finite-sample bias, if m(N) = m∞ + a/N holds).
    """

    curves: pd.DataFrame
    fits: pd.DataFrame

    def save(self, path: str | Path) -> Path:
        """Write both tables to one CSV folder (``curves.csv``, ``fits.csv``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.curves.to_csv(path / "curves.csv", index=False)
        self.fits.to_csv(path / "fits.csv", index=False)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Convergence:
        path = Path(path)
        return cls(pd.read_csv(path / "curves.csv"), pd.read_csv(path / "fits.csv"))


def convergence(result, metrics: Iterable[str] | None = None, *, pre: str = "pre",
                post: str = "post", ci: float = 0.95) -> Convergence:
    """See :meth:`nerve_interp.results.SpectraResult.convergence`."""
    names = list(CONVERGENCE_METRICS if metrics is None else metrics)
    own = [m for m in names if m not in _metrics.REINJECTION_NAMES]
    pair = [m for m in names if m in _metrics.REINJECTION_NAMES]
    if metrics is None:
        pair = list(CONVERGENCE_REINJECTION)
    rows = []
    for (layer, point), spec in result.items():
        if spec.require_groups().conv_eigenvalues.shape[0] == 0:
            raise NotFittedError(
                f"{spec.name} has no convergence curves: it was captured with "
                "collect_spectra(..., convergence=False) (or is a sampled null). Capture "
                "with convergence=True (the default) to read metrics against N.")
        rows += _spectrum_curves(result.model, layer, point, spec, own)
    if pair and pre in result.points and post in result.points:
        for layer in result.layers:
            rows += _pair_curves(result.model, layer, result.spectrum(layer, pre),
                                 result.spectrum(layer, post), pair, f"{pre}->{post}")
    curves = pd.DataFrame(rows, columns=["model", "layer", "point", "metric", "order", "k",
                                         "n_tokens", "dim", "value"])
    return Convergence(curves, _fits(curves, ci))


def _spectrum_curves(model: str, layer: int, point: str, spec: Spectrum,
                     names: Sequence[str]) -> list[tuple]:
    g = spec.require_groups()
    rows = []
    full = spec.metrics()
    for name in names:
        if name in full:
            rows.append((model, layer, point, name, 0, g.k, spec.n_samples, spec.dim,
                         full[name]))
    for r in range(g.conv_n.shape[0]):
        for p, k in enumerate(g.conv_groups):
            n = int(g.conv_n[r, p])
            a = None if g.conv_fourth is None else float(g.conv_fourth[r, p])
            m = point_metrics(g.conv_eigenvalues[r, p], n, a)
            rows += [(model, layer, point, name, r, int(k), n, spec.dim, m[name])
                     for name in names if name in m]
    return rows


def _pair_curves(model: str, layer: int, a: Spectrum, b: Spectrum, names: Sequence[str],
                 label: str) -> list[tuple]:
    ga, gb = a.require_groups(), b.require_groups()
    full = _metrics.reinjection(a.eigenvalues, b.eigenvalues)
    n, d = min(a.n_samples, b.n_samples), max(a.dim, b.dim)
    rows = [(model, layer, label, name, 0, ga.k, n, d, full[name]) for name in names]
    for r in range(ga.conv_n.shape[0]):
        for p, k in enumerate(ga.conv_groups):
            m = _metrics.reinjection(ga.conv_eigenvalues[r, p], gb.conv_eigenvalues[r, p])
            nt = int(min(ga.conv_n[r, p], gb.conv_n[r, p]))
            rows += [(model, layer, label, name, r, int(k), nt, d, m[name]) for name in names]
    return rows


def _fits(curves: pd.DataFrame, ci: float) -> pd.DataFrame:
    out = []
    for (model, layer, point, metric), df in curves.groupby(
            ["model", "layer", "point", "metric"], sort=False):
        whole = df[df["k"] == df["k"].max()].iloc[0]
        # only full-rank samples (N_k >= D): below, the 1/N form does not hold (white noise
        # at N/D = 0.5 has soft rank 0.4·D) and those points drag m∞ far off
        ok = np.isfinite(df["value"].to_numpy()) & (df["n_tokens"] >= df["dim"]).to_numpy()
        try:
            fit = fit_convergence(df["n_tokens"].to_numpy()[ok], df["value"].to_numpy()[ok],
                                  ci=ci)
        except ValueError:  # fewer than 3 full-rank group counts (N/D or K too small)
            fit = {"m_inf": np.nan, "a": np.nan, "m_inf_se": np.nan, "m_inf_ci_low": np.nan,
                   "m_inf_ci_high": np.nan, "r2": np.nan, "n_points": int(ok.sum())}
        value = float(whole["value"])
        out.append({"model": model, "layer": layer, "point": point, "metric": metric,
                    "value": value, "n_tokens": int(whole["n_tokens"]), **fit,
                    "relative_change": (fit["m_inf"] - value) / value if value else np.nan})
    return pd.DataFrame(out)


__all__ = ["CONVERGENCE_METRICS", "CONVERGENCE_REINJECTION", "Convergence", "convergence",
           "reinjection_intervals"]
