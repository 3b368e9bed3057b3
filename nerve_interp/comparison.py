"""A measured result beside its nulls: one tidy table of differences with intervals.

:func:`compare` lines up every per-point metric (see the glossary) and every pre → post
quantity (variance reinjection, ``point == "reinjection"``) of a measured
:class:`~nerve_interp.results.SpectraResult`
with the same rows of each null (:mod:`nerve_interp.nulls`) and states the difference
measured − null with an interval:

* **paired jackknife** when both were captured on the same tokens in the same groups (the
  ``init`` null with the measured result's data and ``n_groups``): the difference of the
  leave-one-group-out values, so the shared token noise cancels;
* otherwise the two jackknife standard errors **in quadrature** (independent samples), with
  a t quantile on the smaller K − 1 degrees of freedom;
* NaN when neither side has groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from . import metrics as _metrics
from .jackknife import check_ci, jackknife
from .uncertainty import reinjection_loo

COLUMNS = ["model", "layer", "point", "metric", "value", "null", "null_value", "difference",
           "se", "ci_low", "ci_high", "excludes_zero", "interval", "n_tokens", "n_over_d"]
"""Columns of :func:`compare`'s table."""


def _values(result: Any) -> dict[tuple[int, str, str], tuple[float, np.ndarray | None]]:
    """``(layer, point, metric) -> (value, leave-one-group-out values or None)``."""
    out = {}
    for (layer, point), spec in result.items():
        loo = spec.loo_metrics() if spec.groups is not None else None
        for name, value in spec.metrics().items():
            out[(layer, point, name)] = (value, None if loo is None else
                                         np.array([m[name] for m in loo]))
    if {"pre", "post"} <= set(result.points):
        for layer in result.layers:
            a, b = result.spectrum(layer, "pre"), result.spectrum(layer, "post")
            full = _metrics.reinjection(a.eigenvalues, b.eigenvalues)
            loo = None
            if a.groups is not None and b.groups is not None and a.groups.k == b.groups.k:
                loo = reinjection_loo(a, b)
            for name, value in full.items():
                out[(layer, "reinjection", name)] = (value, None if loo is None else loo[name])
    return out


def _paired(result: Any, null: Any) -> bool:
    """Same tokens in the same groups: the init null of the same data and n_groups."""
    if null.metadata.get("null") != "init":
        return False
    theirs = dict(null.items())
    for key, spec in result.items():
        other = theirs.get(key)
        if (other is None or spec.groups is None or other.groups is None
                or not np.array_equal(spec.groups.n, other.groups.n)):
            return False
    return result.metadata.get("data_sha1") == null.metadata.get("data_sha1")


def _se(loo: np.ndarray | None) -> float:
    """The jackknife se of the leave-one-group-out values (NaN without them)."""
    return np.nan if loo is None else float(jackknife(loo.mean(), loo)["se"])


def _interval(diff: float, a: tuple, b: tuple, paired: bool, ci: float
              ) -> tuple[float, float, float, str]:
    (_, loo_a), (_, loo_b) = a, b
    if paired and loo_a is not None and loo_b is not None and loo_a.size == loo_b.size:
        j = jackknife(diff, loo_a - loo_b, ci=ci)
        return float(j["se"]), float(j["ci_low"]), float(j["ci_high"]), "paired jackknife"
    ks = [v.size for v in (loo_a, loo_b) if v is not None]
    if not ks:
        return np.nan, np.nan, np.nan, "none"
    se = float(np.sqrt(np.nansum([_se(loo_a) ** 2, _se(loo_b) ** 2])))
    half = stats.t.ppf(0.5 + ci / 2, min(ks) - 1) * se
    return se, diff - half, diff + half, "quadrature" if len(ks) == 2 else "measured only"


def _check(result: Any, nulls: Sequence[Any]) -> None:
    from .results import SpectraResult

    for i, r in enumerate((result, *nulls)):
        if not isinstance(r, SpectraResult):
            raise TypeError(f"compare() takes SpectraResults (argument {i} is a "
                            f"{type(r).__name__}): the measured result, then its nulls.")
    if not nulls:
        raise ValueError("compare(result, *nulls) needs at least one null, e.g. "
                         "compare(result, ni.nulls.marchenko_pastur(result)).")


def compare(result: Any, *nulls: Any, metrics: Sequence[str] | None = None,
            ci: float = 0.95) -> pd.DataFrame:
    """Each metric measured, under each null, and their difference with an interval.

    Parameters
    ----------
    result : SpectraResult
        The measured spectra.
    *nulls : SpectraResult
        Nulls of it (:mod:`nerve_interp.nulls`), with the same layers and points.
    metrics : sequence of str, optional
        Keep only these metrics (per-point names such as ``"participation_ratio"`` and
        pre → post names such as ``"pr_gain"``); default all.
    ci : float, default 0.95

    Returns
    -------
    DataFrame
        Columns :data:`COLUMNS`: ``point`` is ``"reinjection"`` for the pre → post
        quantities; ``null`` names the null (``metadata["null"]``); ``difference`` is
        ``value − null_value``; ``se``, ``ci_low``, ``ci_high`` its interval; ``interval``
        how it was formed (``"paired jackknife"``, ``"quadrature"``, ``"measured only"``,
        ``"none"``); ``excludes_zero`` whether the interval excludes no difference.
    """
    _check(result, nulls)
    ci = check_ci(ci)
    mine, rows = _values(result), []
    for null in nulls:
        name = str(null.metadata.get("null", null.model))
        theirs, paired = _values(null), _paired(result, null)
        for key, a in mine.items():
            if key not in theirs or (metrics is not None and key[2] not in metrics):
                continue
            b = theirs[key]
            diff = a[0] - b[0]
            se, lo, hi, how = _interval(diff, a, b, paired, ci)
            spec = result.spectrum(key[0], "pre" if key[1] == "reinjection" else key[1])
            rows.append((result.model, key[0], key[1], key[2], a[0], name, b[0], diff, se, lo,
                         hi, bool(lo > 0 or hi < 0), how, spec.n_samples,
                         spec.n_samples / spec.dim))
    return pd.DataFrame(rows, columns=COLUMNS)


__all__ = ["COLUMNS", "compare"]
