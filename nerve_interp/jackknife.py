r"""Intervals from per-group statistics: the delete-one-group jackknife and the N → ∞
extrapolation of a convergence curve. Pure numpy/scipy, no capture state.

A capture with ``n_groups=K`` (:func:`nerve_interp.collect_spectra`) splits the tokens into K
groups of whole sequences and keeps, per point, the spectrum of every *leave-one-group-out*
sample. For a metric θ with full-sample value θ̂ and leave-one-out values θ̂₍₋g₎:

.. math::

    \mathrm{se}^2 = \frac{K - 1}{K} \sum_g \bigl(\hat\theta_{(-g)} - \bar\theta_{(\cdot)}\bigr)^2,
    \qquad \hat\theta \pm t_{K-1,\,(1+c)/2}\,\mathrm{se}

(Efron & Stein; Shao & Tu 1995, ch. 2). The interval is centred on θ̂, so it measures the
sampling spread of θ̂ *at this N*, not its finite-sample bias: a metric that is biased at
finite N (soft rank, spectral entropy, EEE, the plain participation ratio) has an interval
around a biased value. :func:`fit_convergence` estimates that bias from partial merges.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats


def check_ci(ci: float) -> float:
    """``ci`` as a float in (0, 1), or a ValueError that says what it is."""
    if isinstance(ci, bool) or not isinstance(ci, (int, float, np.floating)):
        raise TypeError(f"ci must be a coverage in (0, 1), e.g. 0.95; got {type(ci).__name__}.")
    if not 0.0 < float(ci) < 1.0:
        raise ValueError(f"ci == {ci!r}; pass the coverage of the interval in (0, 1), e.g. 0.95 "
                         "for 95 %.")
    return float(ci)


def jackknife(full: ArrayLike, loo: ArrayLike, *, ci: float = 0.95) -> dict[str, np.ndarray]:
    """Delete-one-group jackknife standard error and t interval.

    Parameters
    ----------
    full : array-like of shape (...)
        The statistic on all K groups (θ̂), any units.
    loo : array-like of shape (K, ...)
        The statistic with group ``g`` left out, for every g (K >= 2).
    ci : float, default 0.95
        Coverage of the interval (t quantile with K − 1 degrees of freedom).

    Returns
    -------
    dict of ndarray of shape (...)
        ``se``, ``ci_low``, ``ci_high`` (same units as ``full``), and ``bias``: the
        jackknife bias estimate (K − 1)(θ̄₍·₎ − θ̂), for reference (not subtracted).

    Examples
    --------
    The jackknife of a mean is the classical standard error s/√K:

    >>> x = np.array([1.0, 2.0, 4.0, 7.0])
    >>> loo = np.array([np.delete(x, g).mean() for g in range(4)])
    >>> out = jackknife(x.mean(), loo)
    >>> bool(np.isclose(out["se"], x.std(ddof=1) / 2))
    True
    """
    full = np.asarray(full, dtype=np.float64)
    loo = np.asarray(loo, dtype=np.float64)
    k = loo.shape[0] if loo.ndim else 0
    if k < 2:
        raise ValueError(f"the jackknife needs >= 2 leave-one-out values; got {k}.")
    if loo.shape[1:] != full.shape:
        raise ValueError(f"loo has shape {loo.shape}; expected (K, *{full.shape}).")
    mean = loo.mean(axis=0)
    se = np.sqrt((k - 1) / k * ((loo - mean) ** 2).sum(axis=0))
    half = stats.t.ppf(0.5 + check_ci(ci) / 2, k - 1) * se
    return {"se": se, "ci_low": full - half, "ci_high": full + half,
            "bias": (k - 1) * (mean - full)}


def fit_convergence(n: ArrayLike, m: ArrayLike, *, ci: float = 0.95) -> dict[str, float]:
    """Fit ``m(N) = m∞ + a / N`` by least squares (the leading finite-sample term).

    Parameters
    ----------
    n : array-like of shape (p,)
        Token counts (> 0), at least 3 distinct values.
    m : array-like of shape (p,)
        The metric at each count (several orders of merging may repeat a count).
    ci : float, default 0.95
        Coverage of the t interval of ``m_inf`` (p − 2 degrees of freedom).

    Returns
    -------
    dict
        ``m_inf`` (the extrapolated value), ``a`` (units of m · tokens), ``m_inf_se``,
        ``m_inf_ci_low``, ``m_inf_ci_high``, ``r2`` (of the fit, 1 − RSS/TSS), ``n_points``.
        The interval is the regression's: it says how well the curve pins m∞ down *given*
        the 1/N form, not whether the form holds (look at ``r2`` and the plot).
    """
    n = np.asarray(n, dtype=np.float64).ravel()
    m = np.asarray(m, dtype=np.float64).ravel()
    if n.shape != m.shape:
        raise ValueError(f"n and m must have the same length; got {n.size} and {m.size}.")
    if np.unique(n).size < 3 or not np.all(n > 0) or not np.all(np.isfinite(m)):
        raise ValueError("fit_convergence needs >= 3 distinct token counts > 0 and finite "
                         f"metric values; got counts {np.unique(n).tolist()}.")
    x = np.column_stack([np.ones_like(n), 1.0 / n])
    coef, *_ = np.linalg.lstsq(x, m, rcond=None)
    resid = m - x @ coef
    dof = n.size - 2
    s2 = float(resid @ resid) / dof if dof > 0 else np.nan
    cov = s2 * np.linalg.inv(x.T @ x)
    se = float(np.sqrt(cov[0, 0]))
    half = stats.t.ppf(0.5 + check_ci(ci) / 2, dof) * se if dof > 0 else np.nan
    tss = float(((m - m.mean()) ** 2).sum())
    return {"m_inf": float(coef[0]), "a": float(coef[1]), "m_inf_se": se,
            "m_inf_ci_low": float(coef[0] - half), "m_inf_ci_high": float(coef[0] + half),
            "r2": 1.0 - float(resid @ resid) / tss if tss > 0 else np.nan,
            "n_points": int(n.size)}


def convergence_grid(k: int, size: int = 8) -> list[int]:
    """Group counts ``1 ≤ k' ≤ K`` at which a convergence curve is read: about ``size``
    values, evenly spaced in log N (always 1 and K)."""
    if k < 2:
        raise ValueError(f"a convergence curve needs K >= 2 groups; got {k}.")
    grid = np.unique(np.round(np.geomspace(1, k, min(size, k))).astype(int))
    return [int(v) for v in grid]


def t_half_width(se: Sequence[float] | np.ndarray, k: int, ci: float = 0.95) -> np.ndarray:
    """``t_{K−1, (1+ci)/2} · se``: the half-width of the jackknife interval."""
    return stats.t.ppf(0.5 + check_ci(ci) / 2, k - 1) * np.asarray(se, dtype=np.float64)


__all__ = ["check_ci", "convergence_grid", "fit_convergence", "jackknife", "t_half_width"]
