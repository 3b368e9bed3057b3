r"""Power-law fits ``y = A · x^β`` of a metric against FFN width, with honest intervals.

Definitions (see Concepts: power-law fits) follow the fit used by the authors' follow-up to [SSL]
(*Spectral Scaling Laws in Language Models*, Jha & Reagen, EMNLP 2025): ordinary least squares
on ``(ln x, ln y)``, the same numbers ``numpy.polyfit(ln x, ln y, 1)`` gives. With
``u = ln x``, ``v = ln y`` and ``n`` points:

| column | meaning |
|---|---|
| ``beta`` | OLS slope ``S_uv / S_uu`` (dimensionless exponent) |
| ``prefactor`` | ``A = exp(intercept)``, in the units of ``y`` per unit ``x^β`` |
| ``beta_se`` | ``sqrt(SS_res / (n − 2)) / sqrt(S_uu)`` |
| ``beta_ci`` | ``beta ± t_{0.975, n−2} · beta_se`` (the ± of the follow-up) |
| ``beta_ci_boot`` | percentile interval of ``beta`` over pairs resampled with replacement |
| ``r2`` | ``1 − SS_res / SS_tot`` on the log scale |
| ``aic`` | Akaike information criterion of the line (see below) |

**Power law or saturation?** A handful of widths rarely tells a power law from a curve that
bends over. :func:`fit_saturating` fits the alternative ``y = a · x / (b + x)`` (linear in
``x`` for ``x ≪ b``, flat at ``a`` for ``x ≫ b``) on the same points, by least squares on
``ln y`` like the power law (weighted by the same ``w_i`` when ``y_se`` is given), and both
get the Gaussian AIC *in log y*, with residuals ``r_i = ln y_i − ln ŷ_i``::

    AIC = n · ln(2π · RSS_w / n) + n − Σ ln w_i + 2k,    RSS_w = Σ w_i r_i²,  k = 3

(``w_i = 1`` unweighted; ``k`` counts the two curve parameters and the noise variance, so
both models have ``k = 3`` and ``ΔAIC = AIC_saturating − AIC_power_law = n · ln(RSS_sat /
RSS_pow)``). :func:`fit_table` reports both and ``preferred``: ``"power_law"`` when
``ΔAIC > 2``, ``"saturating"`` when ``ΔAIC < −2``, ``"tie"`` in between (the usual reading:
a difference under 2 is no evidence either way).

Weighted fits (``y_se=`` given, the standard error of each ``y``): weighted least squares on
``(ln x, ln y)`` with weights ``w_i = 1 / σ_i²``, ``σ_i = y_se_i / y_i`` (the delta method),
the same line ``numpy.polyfit(ln x, ln y, 1, w=1/σ)`` gives. Its covariance is the WLS one
``(Xᵀ W X)⁻¹`` times ``max(1, χ²_ν)``, ``χ²_ν = Σ w_i r_i² / (n − 2)`` (the Birge-ratio
convention: the given errors are trusted unless the points scatter more than they allow, so
an interval is never narrower than the scatter allows), and ``beta_ci`` is
``beta ± z · beta_se`` with the normal quantile (the errors are taken as known).

Both intervals assume the points are independent. Layers of one model at one width are not, so
fit one value per width (e.g. the median over layers) rather than every layer as a point, or
the intervals will be too narrow. With the handful of widths a sweep has (n = 5 to 8) the
bootstrap interval is coarse; the t-interval is the one to quote.

This module imports numpy and scipy only (pandas is imported inside :func:`fit_table`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats

from ._validation import _to_numpy, check_positive_int

ArrayLike = Any

#: Columns of :func:`fit_table`, after the ``by`` columns.
FIT_COLUMNS: tuple[str, ...] = (
    "beta",
    "beta_se",
    "beta_ci_low",
    "beta_ci_high",
    "beta_boot_low",
    "beta_boot_high",
    "prefactor",
    "r2",
    "n",
    "prefactor_ci_low",
    "prefactor_ci_high",
    "x_min",
    "x_max",
    "n_boot_used",
    "weighted",
    "chi2_reduced",
    "aic",
    "sat_a",
    "sat_b",
    "aic_saturating",
    "delta_aic",
    "preferred",
)

#: Columns a row needs for :meth:`PowerLawFit.from_dict` (tables written before weighted fits
#: lack ``weighted`` and ``chi2_reduced``: an unweighted fit; before the AIC, ``aic`` and the
#: saturating columns).
_REQUIRED_COLUMNS = FIT_COLUMNS[:-8]

#: ``|ΔAIC|`` below which :func:`fit_table` calls the two models a ``"tie"``.
AIC_TIE = 2.0


@dataclass(frozen=True)
class PowerLawFit:
    """Result of :func:`fit_power_law`: ``y ≈ prefactor · x ** beta``.

    Attributes
    ----------
    beta : float
        Fitted exponent (OLS slope on ``(ln x, ln y)``; the WLS slope when ``weighted``).
    beta_se : float
        Standard error of ``beta``, ``sqrt(SS_res / (n − 2)) / sqrt(S_xx)`` with ``S_xx`` the
        sum of squares of centred ``ln x``. Weighted: ``sqrt(max(1, χ²_ν) / S_xx^w)`` with
        ``S_xx^w = Σ w_i (ln x_i − ū_w)²`` about the weighted mean ``ū_w``.
    beta_ci : tuple of float
        ``(low, high)`` t-interval, ``beta ± t_{(1+confidence)/2, n−2} · beta_se``; weighted:
        the normal interval ``beta ± z_{(1+confidence)/2} · beta_se``.
    beta_ci_boot : tuple of float
        ``(low, high)`` percentile interval of ``beta`` over ``n_boot_used`` bootstrap
        resamples of the ``(x, y)`` pairs (each with its weight when ``weighted``);
        ``(nan, nan)`` when no bootstrap was run.
    prefactor : float
        ``A = exp(intercept)``, in units of ``y`` per unit ``x ** beta``. It is the fitted
        *geometric* mean of ``y`` at ``x = 1`` (no log-normal bias correction).
    prefactor_ci : tuple of float
        ``exp`` of the t-interval of the intercept.
    r2 : float
        Coefficient of determination on the log scale, in [0, 1] (weighted sums when
        ``weighted``); ``nan`` when all ``y`` are equal (``SS_tot = 0``).
    n : int
        Number of points fitted.
    x_range : tuple of float
        ``(min x, max x)``: the range where :meth:`predict` interpolates.
    confidence : float
        Coverage of both intervals (default 0.95).
    n_boot_used : int
        Bootstrap resamples that entered ``beta_ci_boot``; resamples whose ``x`` are all
        equal have no slope and are skipped.
    weighted : bool
        True for a weighted fit (``y_se`` given).
    chi2_reduced : float
        ``χ²_ν = Σ w_i r_i² / (n − 2)`` of a weighted fit (about 1 when the scatter matches the
        given errors; above 1 it widened the interval); ``nan`` for an unweighted fit.
    aic : float
        Gaussian AIC of the line in ``ln y`` (:func:`gaussian_aic`, ``k = 3``), to compare
        with :attr:`SaturatingFit.aic` on the same points.
    """

    beta: float
    beta_se: float
    beta_ci: tuple[float, float]
    beta_ci_boot: tuple[float, float]
    prefactor: float
    prefactor_ci: tuple[float, float]
    r2: float
    n: int
    x_range: tuple[float, float]
    confidence: float = 0.95
    n_boot_used: int = 0
    weighted: bool = False
    chi2_reduced: float = math.nan
    aic: float = math.nan

    @property
    def beta_pm(self) -> float:
        """Half-width of ``beta_ci``, the ``±`` of ``β = 0.97 ± 0.05``."""
        return (self.beta_ci[1] - self.beta_ci[0]) / 2

    def predict(self, x: ArrayLike) -> Any:
        """``prefactor · x ** beta``: a float for a scalar ``x``, else an array of ``x``'s shape.

        Examples
        --------
        >>> fit = fit_power_law([1, 2, 4, 8], [3, 6, 12, 24], n_boot=0)
        >>> round(fit.predict(16), 6)
        48.0
        """
        xa = _to_numpy(x)
        out = self.prefactor * np.power(xa, self.beta)
        return float(out) if out.ndim == 0 else out

    def to_dict(self) -> dict[str, float | int]:
        """Flat dictionary with the keys of :data:`FIT_COLUMNS` (one row of :func:`fit_table`)."""
        return {
            "beta": self.beta,
            "beta_se": self.beta_se,
            "beta_ci_low": self.beta_ci[0],
            "beta_ci_high": self.beta_ci[1],
            "beta_boot_low": self.beta_ci_boot[0],
            "beta_boot_high": self.beta_ci_boot[1],
            "prefactor": self.prefactor,
            "r2": self.r2,
            "n": self.n,
            "prefactor_ci_low": self.prefactor_ci[0],
            "prefactor_ci_high": self.prefactor_ci[1],
            "x_min": self.x_range[0],
            "x_max": self.x_range[1],
            "n_boot_used": self.n_boot_used,
            "weighted": self.weighted,
            "chi2_reduced": self.chi2_reduced,
            "aic": self.aic,
        }

    @classmethod
    def from_dict(cls, row: Any, *, confidence: float = 0.95) -> PowerLawFit:
        """The fit back from :meth:`to_dict` or from a row of :func:`fit_table`.

        Parameters
        ----------
        row : mapping or pandas.Series
            With the keys of :data:`FIT_COLUMNS` (other keys, e.g. the ``by`` columns of a
            fit table, are ignored; without ``weighted`` and ``chi2_reduced``, as in tables
            written before weighted fits, the fit is unweighted).
        confidence : float, default 0.95
            Coverage of the intervals in ``row`` (a table does not record it).

        Raises
        ------
        KeyError
            If a key of :data:`FIT_COLUMNS` is missing (the message lists which).

        Examples
        --------
        >>> import pandas as pd
        >>> df = pd.DataFrame({"width": [1, 2, 4, 8], "value": [3.0, 6.0, 12.0, 24.0]})
        >>> row = fit_table(df, by=(), n_boot=0).iloc[0]
        >>> round(PowerLawFit.from_dict(row).predict(16), 6)
        48.0
        """
        missing = [k for k in _REQUIRED_COLUMNS if k not in row]
        if missing:
            raise KeyError(f"a PowerLawFit row needs {list(_REQUIRED_COLUMNS)}; missing "
                           f"{missing}. Pass a row of fit_table() or the output of "
                           "PowerLawFit.to_dict().")
        return cls(beta=float(row["beta"]), beta_se=float(row["beta_se"]),
                   beta_ci=(float(row["beta_ci_low"]), float(row["beta_ci_high"])),
                   beta_ci_boot=(float(row["beta_boot_low"]), float(row["beta_boot_high"])),
                   prefactor=float(row["prefactor"]),
                   prefactor_ci=(float(row["prefactor_ci_low"]),
                                 float(row["prefactor_ci_high"])),
                   r2=float(row["r2"]), n=int(row["n"]),
                   x_range=(float(row["x_min"]), float(row["x_max"])),
                   confidence=float(confidence), n_boot_used=int(row["n_boot_used"]),
                   weighted=bool(row["weighted"]) if "weighted" in row else False,
                   chi2_reduced=float(row["chi2_reduced"]) if "chi2_reduced" in row
                   else math.nan,
                   aic=float(row["aic"]) if "aic" in row else math.nan)

    def __str__(self) -> str:
        pct = f"{100 * self.confidence:g}%"
        how = (f"{pct} normal, weighted, χ²_ν = {self.chi2_reduced:.2f}" if self.weighted
               else f"{pct} t")
        return (f"β = {self.beta:.3f} ± {self.beta_pm:.3f} ({how}), "
                f"R² = {self.r2:.3f}, n = {self.n}")


def _check_xy(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    xa, ya = _to_numpy(x), _to_numpy(y)
    for name, a, what in (("x", xa, "one width per point"), ("y", ya, "one value per point")):
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D of shape (n,) ({what}); got shape {a.shape}.")
    if xa.size != ya.size:
        raise ValueError(
            f"x and y must have the same length; got len(x) = {xa.size}, len(y) = {ya.size}. "
            "Pass one (width, value) pair per point."
        )
    if xa.size < 3:
        raise ValueError(
            f"a power-law fit needs at least 3 points (n − 2 >= 1 degrees of freedom for the "
            f"standard error); got {xa.size}. Add widths to the sweep."
        )
    for name, a in (("x", xa), ("y", ya)):
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{name}[{i}] = {a[i]}: a power law needs finite values "
                f"({bad.size} non-finite of {a.size}); drop or fix those points first."
            )
        bad = np.flatnonzero(a <= 0)
        if bad.size:
            i = int(bad[0])
            hint = ("drop zero-rank points or fit log(y+1) yourself" if name == "y"
                    else "x is a width or a size and must be positive")
            raise ValueError(
                f"{name}[{i}] = {a[i]}: a power law needs {name} > 0 "
                f"({bad.size} value(s) <= 0 of {a.size}); {hint}."
            )
    if np.unique(xa).size < 2:
        raise ValueError(
            f"x has a single distinct value ({xa[0]:g}) across all {xa.size} points, so the "
            "exponent is undefined; fit across at least 2 distinct widths."
        )
    return xa, ya


def _ols(u: np.ndarray, v: np.ndarray) -> tuple[float, float, float, float, float]:
    """Slope, intercept, SS_res, S_uu, SS_tot of ``v ~ u`` (centred sums, float64)."""
    um, vm = u.mean(), v.mean()
    du, dv = u - um, v - vm
    s_uu = float(du @ du)
    slope = float(du @ dv) / s_uu
    intercept = float(vm - slope * um)
    resid = dv - slope * du
    return slope, intercept, float(resid @ resid), s_uu, float(dv @ dv)


def _wls(u: np.ndarray, v: np.ndarray, w: np.ndarray
         ) -> tuple[float, float, float, float, float, float, float]:
    """Slope, intercept, χ² = Σ w r², S_uu^w, SS_tot^w, Σ w and the weighted mean of ``u`` of
    ``v ~ u`` with weights ``w`` (sums about the weighted means, float64)."""
    sw = float(w.sum())
    um, vm = float(w @ u) / sw, float(w @ v) / sw
    du, dv = u - um, v - vm
    s_uu = float(w @ (du * du))
    slope = float(w @ (du * dv)) / s_uu
    resid = dv - slope * du
    return (slope, vm - slope * um, float(w @ (resid * resid)), s_uu, float(w @ (dv * dv)),
            sw, um)


def _line(u: np.ndarray, v: np.ndarray, w: np.ndarray | None, confidence: float
          ) -> dict[str, float]:
    """The fitted line on the logs and its errors: ``slope, intercept, se, se_int, q`` (the
    quantile of ``beta_ci``), ``r2`` and ``chi2_reduced`` (nan unweighted)."""
    n, dof = int(u.size), int(u.size) - 2
    if w is None:  # OLS, as documented
        slope, intercept, ss_res, s_uu, ss_tot = _ols(u, v)
        s = math.sqrt(ss_res / dof)
        se, se_int = s / math.sqrt(s_uu), s * math.sqrt(1.0 / n + float(u.mean()) ** 2 / s_uu)
        q = float(scipy.stats.t.ppf(0.5 + confidence / 2, dof))
        chi2_red = math.nan
    else:  # WLS with the Birge ratio: (XᵀWX)⁻¹ · max(1, χ²_ν), normal quantile
        slope, intercept, ss_res, s_uu, ss_tot, sw, um = _wls(u, v, w)
        chi2_red = ss_res / dof
        scale = max(1.0, chi2_red)
        se, se_int = math.sqrt(scale / s_uu), math.sqrt(scale * (1.0 / sw + um**2 / s_uu))
        q = float(scipy.stats.norm.ppf(0.5 + confidence / 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return {"slope": slope, "intercept": intercept, "se": se, "se_int": se_int, "q": q,
            "r2": r2, "chi2_reduced": chi2_red}


def _bootstrap_slopes(u: np.ndarray, v: np.ndarray, n_boot: int,
                      rng: np.random.Generator, w: np.ndarray | None = None) -> np.ndarray:
    """Slopes of ``n_boot`` resamples of the points with replacement (with their weights)."""
    idx = rng.integers(0, u.size, size=(n_boot, u.size))
    ub, vb = u[idx], v[idx]
    ok = np.ptp(ub, axis=1) > 0  # all-equal x: no slope, skip
    ub, vb = ub[ok], vb[ok]
    if w is not None:
        wb = w[idx][ok]
        um = np.einsum("ij,ij->i", wb, ub) / wb.sum(axis=1)
        vm = np.einsum("ij,ij->i", wb, vb) / wb.sum(axis=1)
        du, dv = ub - um[:, None], vb - vm[:, None]
        return np.einsum("ij,ij->i", wb * du, dv) / np.einsum("ij,ij->i", wb * du, du)
    du = ub - ub.mean(axis=1, keepdims=True)
    dv = vb - vb.mean(axis=1, keepdims=True)
    return np.einsum("ij,ij->i", du, dv) / np.einsum("ij,ij->i", du, du)


def _check_y_se(y_se: ArrayLike, ya: np.ndarray) -> np.ndarray:
    """``y_se`` as float64 of y's shape, finite and > 0, or a ValueError naming the index."""
    se = _to_numpy(y_se)
    if se.shape != ya.shape:
        raise ValueError(f"y_se must have the shape of y, {ya.shape} (one standard error per "
                         f"point, in the units of y); got shape {se.shape}.")
    bad = np.flatnonzero(~(np.isfinite(se) & (se > 0)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"y_se[{i}] = {se[i]}: standard errors must be finite and > 0 ({bad.size} bad of "
            f"{se.size}); drop those points, or pass y_se=None for an unweighted fit.")
    return se


def fit_power_law(
    x: ArrayLike,
    y: ArrayLike,
    *,
    n_boot: int = 2000,
    seed: int | np.random.Generator | None = 0,
    confidence: float = 0.95,
    y_se: ArrayLike | None = None,
) -> PowerLawFit:
    """Fit ``y = A · x^β`` by least squares on ``(ln x, ln y)``, weighted by the
    standard errors of ``y`` when they are given.

    Parameters
    ----------
    x : array-like of shape (n,)
        The size being scaled, usually the FFN width ``D`` (units: dimensions). Finite, > 0,
        at least 2 distinct values.
    y : array-like of shape (n,)
        The metric at each ``x``, e.g. soft or hard rank (units of the metric). Finite, > 0.
        ``n >= 3``. Each point should be one independent observation (e.g. the median over
        layers at one width), not one layer of a model.
    n_boot : int, default 2000
        Bootstrap resamples of the ``(x, y)`` pairs for ``beta_ci_boot``; 0 skips the bootstrap
        (the interval is then ``(nan, nan)``).
    seed : int, numpy Generator or None, default 0
        Seed of the bootstrap, so the same call gives the same interval.
    confidence : float, default 0.95
        Coverage of the t-interval and of the bootstrap percentile interval, in (0, 1).
    y_se : array-like of shape (n,), optional
        Standard error of each ``y`` (same units as ``y``; finite, > 0), e.g. the standard
        error of a mean over seeds. Given, the fit is weighted least squares on ``ln y`` with
        weights ``1 / σ_i²``, ``σ_i = y_se_i / y_i`` (the delta method), its covariance is
        the WLS one times ``max(1, χ²_ν)`` (the Birge-ratio convention, so an interval never
        gets narrower than the data's scatter allows; ``chi2_reduced`` reports ``χ²_ν``),
        ``beta_ci`` uses the normal quantile, and the bootstrap resamples points with their
        weights. None (default): ordinary least squares.

    Returns
    -------
    PowerLawFit
        ``beta``, ``beta_se``, ``beta_ci``, ``beta_ci_boot``, ``prefactor``, ``r2``, ``n``, ...

    Raises
    ------
    ValueError
        If ``x`` or ``y`` is not 1-D, their lengths differ, ``n < 3``, a value is non-finite or
        <= 0 (the message names the index), all ``x`` are equal, or ``y_se`` does not have
        the shape of ``y`` or holds a value that is non-finite or <= 0.

    See Also
    --------
    fit_table : one fit per group of a tidy table.
    asymmetry : ``β_soft − β_hard``.

    Notes
    -----
    The t-interval is exact when ``ln y`` has independent Gaussian noise of constant variance
    around a line in ``ln x``. The bootstrap resamples points, so with few widths its interval
    is coarse and can be narrower than the t-interval; resamples whose ``x`` are all equal are
    skipped and ``n_boot_used`` says how many remained (a warning is raised when none did).

    With ``y_se`` the errors are taken as known, so the interval uses the normal quantile
    (1.96 at 95 %) rather than ``t_{n−2}``; when the points scatter more than the errors
    allow (``χ²_ν > 1``) the covariance grows by ``χ²_ν``, and a ``χ²_ν < 1`` never shrinks
    it. For an exact power law with Gaussian noise of known σ on ``ln y`` the 95 % interval
    covers the true exponent in 96–97 % of draws (tests/test_scaling.py): conservative, since
    the Birge ratio only widens. Standard errors estimated from very few replicates are
    themselves noisy and make the weights wrong: weighting per-width means by their standard
    error over 2 seeds covered the true exponent in only 64–75 % of simulated draws (4–8
    widths), 88–92 % with 5 seeds, 93–95 % with 10 (an unweighted fit on every point: 94–96 %).
    Pass ``y_se`` that rests on enough data (see
    :data:`nerve_interp.sweeps.MIN_SEEDS_FOR_WEIGHTS`).

    Examples
    --------
    >>> fit = fit_power_law([768, 1536, 3072, 6144], [300.0, 540.0, 1010.0, 1900.0], seed=0)
    >>> round(fit.beta, 3), round(fit.r2, 4), fit.n
    (0.889, 0.9997, 4)
    >>> lo, hi = fit.beta_ci
    >>> round(lo, 3), round(hi, 3)
    (0.844, 0.935)
    >>> exact = fit_power_law([1, 2, 4, 8], [3 * 2**0, 3 * 2**0.7, 3 * 4**0.7, 3 * 8**0.7])
    >>> round(exact.beta, 6), round(exact.prefactor, 6), round(exact.r2, 6)
    (0.7, 3.0, 1.0)
    >>> print(exact)
    β = 0.700 ± 0.000 (95% t), R² = 1.000, n = 4
    >>> w = fit_power_law([1, 2, 4, 8], [3.0, 4.9, 7.9, 13.1], y_se=[0.1, 0.2, 0.3, 0.5],
    ...                   n_boot=0)
    >>> print(w)
    β = 0.707 ± 0.045 (95% normal, weighted, χ²_ν = 0.05), R² = 1.000, n = 4
    """
    xa, ya = _check_xy(x, y)
    se_y = None if y_se is None else _check_y_se(y_se, ya)
    n_boot = check_positive_int(n_boot, "n_boot", minimum=0)
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ValueError(f"confidence = {confidence!r}, must be a float in (0, 1), e.g. 0.95.")
    u, v = np.log(xa), np.log(ya)
    w = None if se_y is None else (ya / se_y) ** 2  # 1 / σ_ln², σ_ln = y_se / y
    line = _line(u, v, w, confidence)
    slope, intercept, se, se_int, q = (line[k] for k in ("slope", "intercept", "se", "se_int",
                                                         "q"))
    boot_ci = (float("nan"), float("nan"))
    n_used = 0
    if n_boot > 0:
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        slopes = _bootstrap_slopes(u, v, n_boot, rng, w)
        n_used = int(slopes.size)
        if n_used:
            alpha = (1 - confidence) / 2
            lo, hi = np.quantile(slopes, [alpha, 1 - alpha])
            boot_ci = (float(lo), float(hi))
        else:
            warnings.warn(
                f"all {n_boot} bootstrap resamples had a single distinct x, so beta_ci_boot is "
                "(nan, nan); use the t-interval.", RuntimeWarning, stacklevel=2)

    resid = v - (intercept + slope * u)
    return PowerLawFit(
        aic=gaussian_aic(resid, w),
        beta=slope,
        beta_se=se,
        beta_ci=(slope - q * se, slope + q * se),
        beta_ci_boot=boot_ci,
        prefactor=math.exp(intercept),
        prefactor_ci=(math.exp(intercept - q * se_int), math.exp(intercept + q * se_int)),
        r2=line["r2"],
        n=int(u.size),
        x_range=(float(xa.min()), float(xa.max())),
        confidence=float(confidence),
        n_boot_used=n_used,
        weighted=w is not None,
        chi2_reduced=line["chi2_reduced"],
    )


def gaussian_aic(resid: ArrayLike, w: ArrayLike | None = None, k: int = 3) -> float:
    """Akaike information criterion of a least-squares fit with Gaussian noise.

    ``AIC = n · ln(2π · RSS_w / n) + n − Σ ln w_i + 2k`` with ``RSS_w = Σ w_i r_i²``: minus
    twice the maximised log-likelihood of residuals ``r_i ~ N(0, s² / w_i)`` (``s²`` at its
    maximum-likelihood value ``RSS_w / n``), plus ``2k``.

    Parameters
    ----------
    resid : array-like of shape (n,)
        Residuals of the fit in the space it was fitted in (here ``ln y − ln ŷ``).
    w : array-like of shape (n,), optional
        Relative weights (``1 / σ_i²`` up to a common factor); all 1 when omitted.
    k : int, default 3
        Fitted parameters, the noise variance included (3 for a two-parameter curve).

    Returns
    -------
    float
        The AIC; lower is better, and only differences between models fitted to the same
        points mean anything. ``-inf`` for a perfect fit (``RSS = 0``).

    Examples
    --------
    >>> round(gaussian_aic([0.1, -0.1, 0.2, -0.2]), 4)
    2.596
    """
    r = _to_numpy(resid)
    w = np.ones_like(r) if w is None else _to_numpy(w)
    n = r.size
    rss = float(w @ (r * r))
    if rss <= 0:
        return -math.inf
    return n * math.log(2 * math.pi * rss / n) + n - float(np.log(w).sum()) + 2 * k


@dataclass(frozen=True)
class SaturatingFit:
    """Result of :func:`fit_saturating`: ``y ≈ a · x / (b + x)``.

    Attributes
    ----------
    a : float
        The plateau ``y`` approaches for ``x ≫ b`` (units of ``y``).
    b : float
        The half-saturation size, where ``y = a / 2`` (units of ``x``).
    aic : float
        Gaussian AIC in ``ln y`` (:func:`gaussian_aic`, ``k = 3``).
    rss : float
        ``Σ w_i (ln y_i − ln ŷ_i)²`` at the optimum.
    n : int
        Points fitted.
    at_bound : bool
        True when ``b`` sits at the edge of its search range, ``[x_min · e⁻⁷, x_max · e⁷]``:
        the data are then a straight line (``b`` at the top, a power law with β = 1) or flat
        (``b`` at the bottom) as far as this model can tell.
    """

    a: float
    b: float
    aic: float
    rss: float
    n: int
    at_bound: bool = False

    def predict(self, x: ArrayLike) -> Any:
        """``a · x / (b + x)``: a float for a scalar ``x``, else an array of ``x``'s shape."""
        xa = _to_numpy(x)
        out = self.a * xa / (self.b + xa)
        return float(out) if out.ndim == 0 else out


def _saturating_rss(t: float, u: np.ndarray, v: np.ndarray, x: np.ndarray,
                    w: np.ndarray) -> tuple[float, float]:
    """RSS_w and ln a of the best saturating curve with ``b = exp(t)`` (ln a profiled out:
    the weighted mean of ``ln y − ln x + ln(b + x)``)."""
    z = v - u + np.log(np.exp(t) + x)
    ln_a = float(w @ z) / float(w.sum())
    r = z - ln_a
    return float(w @ (r * r)), ln_a


def fit_saturating(x: ArrayLike, y: ArrayLike, *, y_se: ArrayLike | None = None
                   ) -> SaturatingFit:
    """Fit ``y = a · x / (b + x)`` by least squares on ``ln y`` (the power law's alternative).

    For each ``b`` the best ``ln a`` is a (weighted) mean, so the fit is a one-dimensional
    search over ``ln b``: a grid of 241 points over ``[ln x_min − 7, ln x_max + 7]``, then
    ``scipy.optimize.minimize_scalar`` (bounded) between the grid neighbours of its best
    point.

    Parameters
    ----------
    x, y : array-like of shape (n,)
        As for :func:`fit_power_law` (finite, > 0, ``n >= 3``).
    y_se : array-like of shape (n,), optional
        Standard errors of ``y``: weights ``(y_i / y_se_i)²`` on ``ln y``, the power law's.

    Returns
    -------
    SaturatingFit
        ``a``, ``b``, ``aic``, ``rss``, ``n``, ``at_bound``.

    Examples
    --------
    >>> x = [16, 32, 64, 128, 256, 512]
    >>> fit = fit_saturating(x, [20 * v / (50 + v) for v in x])
    >>> round(fit.a, 4), round(fit.b, 4)
    (20.0, 50.0)
    """
    import scipy.optimize

    xa, ya = _check_xy(x, y)
    w = np.ones_like(ya) if y_se is None else (ya / _check_y_se(y_se, ya)) ** 2
    u, v = np.log(xa), np.log(ya)
    lo, hi = float(u.min()) - 7.0, float(u.max()) + 7.0
    grid = np.linspace(lo, hi, 241)
    rss = np.array([_saturating_rss(t, u, v, xa, w)[0] for t in grid])
    i = int(np.argmin(rss))
    res = scipy.optimize.minimize_scalar(
        lambda t: _saturating_rss(t, u, v, xa, w)[0], method="bounded",
        bounds=(grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]),
        options={"xatol": 1e-10})
    t = float(res.x) if res.fun <= rss[i] else float(grid[i])
    best, ln_a = _saturating_rss(t, u, v, xa, w)
    resid = v - (ln_a + u - np.log(math.exp(t) + xa))
    return SaturatingFit(a=math.exp(ln_a), b=math.exp(t), aic=gaussian_aic(resid, w),
                         rss=best, n=int(xa.size),
                         at_bound=bool(min(t - lo, hi - t) < (hi - lo) / 240))


def _preferred(delta_aic: float) -> str:
    if delta_aic > AIC_TIE:
        return "power_law"
    return "saturating" if delta_aic < -AIC_TIE else "tie"


def _model_comparison(fit: PowerLawFit, xs: np.ndarray, ys: np.ndarray,
                      se: np.ndarray | None) -> dict[str, Any]:
    """The saturating columns of a :func:`fit_table` row."""
    sat = fit_saturating(xs, ys, y_se=se)
    delta = sat.aic - fit.aic
    return {"sat_a": sat.a, "sat_b": sat.b, "aic_saturating": sat.aic, "delta_aic": delta,
            "preferred": _preferred(delta)}


def fit_table(
    df: Any,
    *,
    x: str = "width",
    y: str = "value",
    by: str | Sequence[str] = ("metric", "point"),
    agg: str | None = None,
    n_boot: int = 2000,
    seed: int | None = 0,
    confidence: float = 0.95,
    y_se: str | None = None,
):
    """One power-law fit per group of a tidy table (one row per observation in, one per fit out).

    Parameters
    ----------
    df : pandas.DataFrame
        Long table with columns ``x``, ``y`` and the ``by`` columns, e.g. a width sweep
        ``width, layer, point, metric, value``.
    x, y : str, default "width", "value"
        Columns of the size and of the metric.
    by : str or sequence of str, default ("metric", "point")
        Columns that define a fit; ``()`` fits the whole table once.
    agg : str, optional
        If given (``"median"``, ``"mean"``, ...), first reduce ``y`` over the rows that share
        ``by`` and ``x`` (e.g. the layers of one model), so each width is one point: the
        follow-up fits the median over layers. By default every row is a point, which makes
        the intervals too narrow when rows are layers of the same model.
    n_boot, seed, confidence
        Passed to :func:`fit_power_law` (the same seed for every group).
    y_se : str, optional
        Column of the standard error of ``y`` (e.g. ``"value_se"``): each group is then a
        weighted fit (:func:`fit_power_law` with ``y_se``). Not with ``agg``: reduce the
        table first and give each reduced point its standard error.

    Returns
    -------
    pandas.DataFrame
        One row per group: the ``by`` columns, then ``beta, beta_se, beta_ci_low,
        beta_ci_high, beta_boot_low, beta_boot_high, prefactor, r2, n``, then
        ``prefactor_ci_low, prefactor_ci_high, x_min, x_max, n_boot_used, weighted,
        chi2_reduced``, then the model comparison ``aic`` (of the power law), ``sat_a,
        sat_b`` (the saturating fit ``y = sat_a · x / (sat_b + x)``, :func:`fit_saturating`),
        ``aic_saturating``, ``delta_aic = aic_saturating − aic`` (> 0 favours the power law)
        and ``preferred`` (``"power_law"``, ``"saturating"`` or ``"tie"`` when
        ``|delta_aic| <= 2``) (:data:`FIT_COLUMNS`; the AIC is Gaussian in ``ln y``, see the
        module docstring).

    Raises
    ------
    KeyError
        If a column is missing (the message lists which).
    ValueError
        If a group cannot be fitted; the message names the group.

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"width": [1, 2, 4, 1, 2, 4],
    ...                    "metric": ["soft_rank"] * 3 + ["hard_rank"] * 3,
    ...                    "value": [2.0, 4.0, 8.0, 1.0, 1.5, 2.25]})
    >>> table = fit_table(df, by="metric", n_boot=0)
    >>> [(m, round(b, 6)) for m, b in zip(table["metric"], table["beta"])]
    [('hard_rank', 0.584963), ('soft_rank', 1.0)]
    """
    import pandas as pd

    from ._validation import check_tidy

    keys = [by] if isinstance(by, str) else list(by)
    if y_se is not None and agg is not None:
        raise ValueError(f"fit_table(agg={agg!r}, y_se={y_se!r}): a standard error cannot be "
                         "aggregated with the values; reduce the table first and give each "
                         "reduced point its standard error, or drop one of the two.")
    cols = [*keys, x, y] + ([y_se] if y_se is not None else [])
    check_tidy(df, cols)
    data = df[cols]
    if agg is not None:
        data = data.groupby([*keys, x], sort=True, observed=True, dropna=False)[y].agg(agg)
        data = data.reset_index()
    groups = [((), data)] if not keys else data.groupby(keys, sort=True, observed=True,
                                                          dropna=False)
    rows = []
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        label = dict(zip(keys, key, strict=True))
        try:
            fit = fit_power_law(g[x].to_numpy(), g[y].to_numpy(), n_boot=n_boot, seed=seed,
                                confidence=confidence,
                                y_se=None if y_se is None else g[y_se].to_numpy())
        except ValueError as err:
            where = ", ".join(f"{k}={v!r}" for k, v in label.items()) or "whole table"
            raise ValueError(f"cannot fit {y} against {x} for group {where}: {err}") from err
        xs, ys = g[x].to_numpy(dtype=float), g[y].to_numpy(dtype=float)
        se = None if y_se is None else g[y_se].to_numpy(dtype=float)
        rows.append({**label, **fit.to_dict(), **_model_comparison(fit, xs, ys, se)})
    return pd.DataFrame(rows, columns=[*keys, *FIT_COLUMNS])


def asymmetry(soft_fit: PowerLawFit | float, hard_fit: PowerLawFit | float) -> float:
    """Asymmetry of spectral scaling, ``Δ = β_soft − β_hard``.

    This is the definition of the authors' follow-up to [SSL] (where AdamW has the largest,
    Δ = 0.37): how much faster the soft rank (tail directions) grows with width than the hard
    rank (dominant modes). Δ > 0 means widening mostly adds low-energy tail directions.

    Parameters
    ----------
    soft_fit, hard_fit : PowerLawFit or float
        Fits of soft rank and of hard rank against width over the same widths (or their
        exponents).

    Returns
    -------
    float
        ``soft_fit.beta − hard_fit.beta`` (dimensionless). No interval is given: the two fits
        share their widths and runs, so their errors are correlated.

    Examples
    --------
    >>> widths = [768, 1536, 3072, 6144]
    >>> soft = fit_power_law(widths, [2.0 * w**0.66 for w in widths], n_boot=0)
    >>> hard = fit_power_law(widths, [5.0 * w**0.29 for w in widths], n_boot=0)
    >>> round(asymmetry(soft, hard), 6)
    0.37
    """
    def beta(f: PowerLawFit | float, name: str) -> float:
        if isinstance(f, PowerLawFit):
            return f.beta
        if isinstance(f, (int, float, np.floating)) and not isinstance(f, bool):
            return float(f)
        raise TypeError(f"{name} must be a PowerLawFit or a float exponent; got "
                        f"{type(f).__name__}.")

    return beta(soft_fit, "soft_fit") - beta(hard_fit, "hard_fit")


__all__ = ["AIC_TIE", "FIT_COLUMNS", "PowerLawFit", "SaturatingFit", "asymmetry",
           "fit_power_law", "fit_saturating", "fit_table", "gaussian_aic"]
