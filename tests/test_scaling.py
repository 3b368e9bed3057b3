"""Power-law fits (SPEC.md §6) against exact answers, scipy/numpy references and simulation."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from nerve_interp.scaling import (
    FIT_COLUMNS,
    PowerLawFit,
    asymmetry,
    fit_power_law,
    fit_table,
)

WIDTHS = np.array([768, 1536, 2304, 3072, 3840, 4608, 5376, 6144], dtype=float)


def noisy(beta=0.9, a=2.0, sigma=0.1, seed=1, x=WIDTHS):
    rng = np.random.default_rng(seed)
    return x, a * x**beta * np.exp(sigma * rng.standard_normal(x.size))


# --- exact answers -------------------------------------------------------------------------

def test_exact_power_law():
    x = np.array([1.0, 2, 3, 5, 8, 13])
    fit = fit_power_law(x, 3 * x**0.7)
    assert fit.beta == pytest.approx(0.7, abs=1e-12)
    assert fit.prefactor == pytest.approx(3.0, rel=1e-12)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert abs(fit.beta_se) < 1e-10
    assert fit.beta_ci[1] - fit.beta_ci[0] < 1e-9
    assert fit.n == 6 and fit.x_range == (1.0, 13.0)
    assert fit.predict(10.0) == pytest.approx(3 * 10**0.7)
    np.testing.assert_allclose(fit.predict(x), 3 * x**0.7, rtol=1e-12)
    assert str(fit) == "β = 0.700 ± 0.000 (95% t), R² = 1.000, n = 6"


def test_fit_is_frozen_and_accepts_lists_and_series():
    fit = fit_power_law([1, 2, 4], [1, 2, 4], n_boot=0)
    assert isinstance(fit, PowerLawFit)
    with pytest.raises(AttributeError):
        fit.beta = 2.0  # type: ignore[misc]
    fit2 = fit_power_law(pd.Series([1, 2, 4]), pd.Series([1.0, 2.0, 4.0]), n_boot=0)
    assert fit2.beta == pytest.approx(1.0)


# --- independent references ------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_linregress_and_polyfit(seed):
    x, y = noisy(seed=seed, sigma=0.2)
    fit = fit_power_law(x, y, n_boot=0)
    lr = scipy.stats.linregress(np.log(x), np.log(y))
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    assert fit.beta == pytest.approx(lr.slope, rel=1e-10)
    assert fit.beta == pytest.approx(slope, rel=1e-10)
    assert fit.prefactor == pytest.approx(math.exp(intercept), rel=1e-10)
    assert fit.beta_se == pytest.approx(lr.stderr, rel=1e-10)
    assert fit.r2 == pytest.approx(lr.rvalue**2, rel=1e-10)
    t = scipy.stats.t.ppf(0.975, x.size - 2)
    assert fit.beta_ci[0] == pytest.approx(lr.slope - t * lr.stderr, rel=1e-10)
    assert fit.beta_ci[1] == pytest.approx(lr.slope + t * lr.stderr, rel=1e-10)
    assert fit.beta_pm == pytest.approx(t * lr.stderr, rel=1e-10)
    # intercept interval from linregress's intercept_stderr
    lo, hi = fit.prefactor_ci
    assert math.log(lo) == pytest.approx(lr.intercept - t * lr.intercept_stderr, rel=1e-9)
    assert math.log(hi) == pytest.approx(lr.intercept + t * lr.intercept_stderr, rel=1e-9)


def test_se_formula_by_hand():
    x, y = noisy(seed=5, sigma=0.3)
    u, v = np.log(x), np.log(y)
    b, c = np.polyfit(u, v, 1)
    ss_res = np.sum((v - (b * u + c)) ** 2)
    s_xx = np.sum((u - u.mean()) ** 2)
    se = math.sqrt(ss_res / (u.size - 2)) / math.sqrt(s_xx)
    assert fit_power_law(x, y, n_boot=0).beta_se == pytest.approx(se, rel=1e-10)


def test_confidence_level_changes_t_quantile():
    x, y = noisy(seed=3)
    f90 = fit_power_law(x, y, n_boot=0, confidence=0.90)
    f95 = fit_power_law(x, y, n_boot=0, confidence=0.95)
    t90, t95 = (scipy.stats.t.ppf(q, x.size - 2) for q in (0.95, 0.975))
    assert f90.beta_pm / f95.beta_pm == pytest.approx(t90 / t95)
    assert str(f90).endswith("(90% t), R² = " + f"{f90.r2:.3f}, n = 8")


@settings(max_examples=50, deadline=None)
@given(beta=st.floats(-2, 2), log_a=st.floats(-5, 5), log_c=st.floats(-3, 3),
       seed=st.integers(0, 2**16))
def test_units_change_only_the_prefactor(beta, log_a, log_c, seed):
    """Rescaling x by c leaves β, its SE and R² unchanged and divides A by c^β."""
    x, y = noisy(beta=beta, a=math.exp(log_a), sigma=0.1, seed=seed)
    c = math.exp(log_c)
    f1 = fit_power_law(x, y, n_boot=0)
    f2 = fit_power_law(c * x, y, n_boot=0)
    assert f2.beta == pytest.approx(f1.beta, abs=1e-9)
    assert f2.beta_se == pytest.approx(f1.beta_se, rel=1e-6, abs=1e-12)
    assert f2.prefactor == pytest.approx(f1.prefactor / c**f1.beta, rel=1e-8)


# --- calibration ---------------------------------------------------------------------------

def test_t_interval_coverage():
    rng = np.random.default_rng(2025)
    true_beta, hits, reps = 0.85, 0, 300
    for _ in range(reps):
        y = 1.5 * WIDTHS**true_beta * np.exp(0.15 * rng.standard_normal(WIDTHS.size))
        lo, hi = fit_power_law(WIDTHS, y, n_boot=0).beta_ci
        hits += lo <= true_beta <= hi
    assert 0.90 <= hits / reps <= 0.99, hits / reps


# --- weighted fits (y_se) ------------------------------------------------------------------

SIGMA_LN = np.array([0.02, 0.05, 0.03, 0.10, 0.04, 0.08, 0.06, 0.12])  # known σ of ln y


def _reference_wls(x, y, y_se):
    """Independent reference: numpy's weighted polyfit and scipy's curve_fit with absolute
    sigma give the line and the WLS covariance (Xᵀ W X)⁻¹; the reduced χ² from the residuals,
    the Birge ratio max(1, χ²_ν) and the normal quantile written out here."""
    import scipy.optimize

    u, v, sig = np.log(x), np.log(y), np.asarray(y_se) / np.asarray(y)
    (b, c), cov = np.polyfit(u, v, 1, w=1 / sig, cov="unscaled")
    popt, pcov = scipy.optimize.curve_fit(lambda t, a0, a1: a0 + a1 * t, u, v, p0=[c, b],
                                          sigma=sig, absolute_sigma=True)
    np.testing.assert_allclose([popt[1], popt[0]], [b, c], rtol=1e-7)
    np.testing.assert_allclose(pcov[::-1, ::-1], cov, rtol=1e-6)
    chi2_red = float(np.sum(((v - (b * u + c)) / sig) ** 2) / (u.size - 2))
    scale = max(1.0, chi2_red)
    return b, c, math.sqrt(scale * cov[0, 0]), math.sqrt(scale * cov[1, 1]), chi2_red


@pytest.mark.parametrize("understate", [0.5, 1.0, 3.0])  # χ²_ν < 1, ≈ 1, > 1
def test_weighted_fit_matches_polyfit_and_curve_fit(understate):
    rng = np.random.default_rng(11)
    y = 2.0 * WIDTHS**0.8 * np.exp(SIGMA_LN * rng.standard_normal(WIDTHS.size))
    y_se = y * SIGMA_LN / understate  # the σ given are `understate` times too small
    fit = fit_power_law(WIDTHS, y, y_se=y_se, n_boot=0)
    b, c, se_b, se_c, chi2_red = _reference_wls(WIDTHS, y, y_se)
    assert fit.weighted and fit.chi2_reduced == pytest.approx(chi2_red, rel=1e-9)
    assert fit.beta == pytest.approx(b, rel=1e-10)
    assert fit.prefactor == pytest.approx(math.exp(c), rel=1e-10)
    assert fit.beta_se == pytest.approx(se_b, rel=1e-8)
    z = scipy.stats.norm.ppf(0.975)
    assert fit.beta_ci == pytest.approx((b - z * se_b, b + z * se_b), rel=1e-8)
    assert np.log(fit.prefactor_ci) == pytest.approx((c - z * se_c, c + z * se_c), rel=1e-8)
    if understate == 3.0:  # the scatter, not the given σ, sets the interval: never narrower
        assert chi2_red > 1 and fit.beta_se > math.sqrt(np.polyfit(
            np.log(WIDTHS), np.log(y), 1, w=y / y_se, cov="unscaled")[1][0, 0])
    assert "weighted, χ²_ν = " in str(fit) and "95% normal" in str(fit)


def test_weighted_fit_known_answers():
    """Exact power law: the line exactly, χ²_ν = 0 and an interval from the given σ alone;
    equal relative errors: the OLS line; far-off points with large σ barely move it."""
    x = np.array([1.0, 2, 4, 8, 16])
    exact = fit_power_law(x, 3 * x**0.7, y_se=0.1 * 3 * x**0.7, n_boot=0)
    assert exact.beta == pytest.approx(0.7, abs=1e-12) and exact.chi2_reduced < 1e-20
    s_uu = np.sum((np.log(x) - np.log(x).mean()) ** 2) / 0.1**2
    assert exact.beta_se == pytest.approx(1 / math.sqrt(s_uu), rel=1e-12)
    xs, ys = noisy(seed=4, sigma=0.2)
    same = fit_power_law(xs, ys, y_se=0.05 * ys, n_boot=0)
    assert same.beta == pytest.approx(fit_power_law(xs, ys, n_boot=0).beta, rel=1e-12)
    y = 3 * x**0.7
    y[-1] *= 5  # an outlier ...
    se = 0.01 * y
    se[-1] = 100 * y[-1]  # ... with a huge error bar
    assert fit_power_law(x, y, y_se=se, n_boot=0).beta == pytest.approx(0.7, abs=1e-3)


def test_weighted_interval_coverage():
    """Exact power law with Gaussian noise of known σ on ln y (different at each width):
    the 95 % interval covers the true exponent in 91-99 % of 400 draws."""
    rng = np.random.default_rng(2026)
    true_beta, reps, hits, hits_boot = 0.85, 400, 0, 0
    for i in range(reps):
        y = 1.5 * WIDTHS**true_beta * np.exp(SIGMA_LN * rng.standard_normal(WIDTHS.size))
        fit = fit_power_law(WIDTHS, y, y_se=y * SIGMA_LN, n_boot=200 if i < 100 else 0,
                            seed=i)
        hits += fit.beta_ci[0] <= true_beta <= fit.beta_ci[1]
        if i < 100:
            hits_boot += fit.beta_ci_boot[0] <= true_beta <= fit.beta_ci_boot[1]
    assert 0.91 <= hits / reps <= 0.99, hits / reps
    assert hits_boot >= 70, hits_boot  # 8 resampled points: coarse, but not useless


def test_weighted_interval_widens_when_the_errors_are_understated():
    """σ given 3× too small: the Birge ratio widens the interval back towards the truth
    (coverage near the nominal 95 %, not the ~50 % the given σ alone would give)."""
    rng = np.random.default_rng(7)
    true_beta, reps, hits, raw = 0.85, 300, 0, 0
    for _ in range(reps):
        y = 1.5 * WIDTHS**true_beta * np.exp(SIGMA_LN * rng.standard_normal(WIDTHS.size))
        fit = fit_power_law(WIDTHS, y, y_se=y * SIGMA_LN / 3, n_boot=0)
        hits += fit.beta_ci[0] <= true_beta <= fit.beta_ci[1]
        unscaled = fit.beta_se / math.sqrt(max(1.0, fit.chi2_reduced))
        raw += abs(fit.beta - true_beta) <= 1.96 * unscaled
    assert 0.85 <= hits / reps <= 0.99 and raw / reps < 0.7, (hits / reps, raw / reps)


def test_weighted_bootstrap_and_table():
    x, y = noisy(seed=8, sigma=0.1)
    se = y * SIGMA_LN
    f1 = fit_power_law(x, y, y_se=se, seed=5)
    assert f1.beta_ci_boot == fit_power_law(x, y, y_se=se, seed=5).beta_ci_boot
    assert f1.beta_ci_boot[0] < f1.beta < f1.beta_ci_boot[1] and f1.n_boot_used == 2000
    df = pd.DataFrame({"width": x, "value": y, "value_se": se, "metric": "soft_rank"})
    row = fit_table(df, by="metric", y_se="value_se", seed=5).iloc[0]
    assert bool(row["weighted"]) and row["beta"] == f1.beta and row["beta_se"] == f1.beta_se
    assert PowerLawFit.from_dict(row) == f1
    old = {k: v for k, v in fit_power_law(x, y).to_dict().items()
           if k not in ("weighted", "chi2_reduced")}  # a row written before weighted fits
    assert not PowerLawFit.from_dict(old).weighted
    with pytest.raises(ValueError, match="agg='median', y_se='value_se'"):
        fit_table(df, by="metric", y_se="value_se", agg="median")
    with pytest.raises(KeyError, match="value_sd"):
        fit_table(df, by="metric", y_se="value_sd")


@pytest.mark.parametrize("y_se, match", [
    ([0.1, 0.2], r"y_se must have the shape of y, \(3,\).*got shape \(2,\)"),
    ([0.1, 0.0, 0.2], r"y_se\[1\] = 0.0: standard errors must be finite and > 0"),
    ([0.1, float("nan"), 0.2], r"y_se\[1\] = nan"),
    ([0.1, -1, 0.2], r"y_se\[1\] = -1.0.*y_se=None for an unweighted fit"),
])
def test_bad_y_se(y_se, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law([1, 2, 4], [1, 2, 3], y_se=y_se, n_boot=0)


# --- bootstrap ------------------------------------------------------------------------------

def test_bootstrap_contains_beta_and_is_deterministic():
    x, y = noisy(seed=7, sigma=0.2)
    f1 = fit_power_law(x, y, seed=123)
    f2 = fit_power_law(x, y, seed=123)
    f3 = fit_power_law(x, y, seed=124)
    lo, hi = f1.beta_ci_boot
    assert lo < f1.beta < hi
    assert f1.beta_ci_boot == f2.beta_ci_boot
    assert f1.beta_ci_boot != f3.beta_ci_boot
    assert 0 < f1.n_boot_used <= 2000
    gen = fit_power_law(x, y, seed=np.random.default_rng(123))
    assert gen.beta_ci_boot == f1.beta_ci_boot


def test_bootstrap_skips_degenerate_resamples():
    # 3 points with 3 distinct x: P(all equal) = 3/27, so about 1 in 9 resamples is skipped.
    fit = fit_power_law([1, 2, 4], [1.0, 2.2, 3.9], n_boot=2000, seed=0)
    assert 1600 < fit.n_boot_used < 1900
    off = fit_power_law([1, 2, 4], [1.0, 2.2, 3.9], n_boot=0)
    assert math.isnan(off.beta_ci_boot[0]) and off.n_boot_used == 0


# --- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "x, y, match",
    [
        ([1, 2], [1, 2], "at least 3 points.*got 2"),
        ([1, 2, 4, 8], [1, 2, 0.0, 4], r"y\[2\] = 0.0: a power law needs y > 0.*log\(y\+1\)"),
        ([1, 2, 4, 8], [1, 2, -3.0, 4], r"y\[2\] = -3.0: a power law needs y > 0"),
        ([0, 2, 4, 8], [1, 2, 3, 4], r"x\[0\] = 0.0: a power law needs x > 0"),
        ([1, 2, 4, 8], [1, float("nan"), 3, 4], r"y\[1\] = nan: a power law needs finite"),
        ([1, 2, float("inf")], [1, 2, 3], r"x\[2\] = inf"),
        ([1, 2, 4], [1, 2, 3, 4], r"same length; got len\(x\) = 3, len\(y\) = 4"),
        ([768, 768, 768], [1, 2, 3], r"single distinct value \(768\).*at least 2 distinct"),
        (np.ones((3, 2)), np.ones((3, 2)), r"x must be 1-D.*got shape \(3, 2\)"),
    ],
)
def test_errors(x, y, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(x, y, n_boot=0)


def test_bad_options():
    with pytest.raises(ValueError, match="confidence"):
        fit_power_law([1, 2, 4], [1, 2, 3], confidence=95)
    with pytest.raises(ValueError, match="n_boot == -1"):
        fit_power_law([1, 2, 4], [1, 2, 3], n_boot=-1)


# --- tables and asymmetry -------------------------------------------------------------------

def _sweep() -> pd.DataFrame:
    rows = []
    for point, (soft, hard) in {"post": (0.95, 0.5), "pre": (0.8, 0.3)}.items():
        for metric, beta in (("soft_rank", soft), ("hard_rank", hard)):
            x, y = noisy(beta=beta, seed=len(rows))
            rows += [{"point": point, "metric": metric, "width": w, "value": v}
                     for w, v in zip(x, y, strict=True)]
    return pd.DataFrame(rows)


def test_fit_table_matches_fit_power_law():
    df = _sweep()
    table = fit_table(df)
    assert list(table.columns) == ["metric", "point", *FIT_COLUMNS]
    assert len(table) == 4
    for row in table.itertuples(index=False):
        g = df[(df.metric == row.metric) & (df.point == row.point)]
        fit = fit_power_law(g.width, g.value)
        assert row.beta == fit.beta and row.beta_se == fit.beta_se
        assert (row.beta_ci_low, row.beta_ci_high) == fit.beta_ci
        assert (row.beta_boot_low, row.beta_boot_high) == fit.beta_ci_boot
        assert row.prefactor == fit.prefactor and row.r2 == fit.r2 and row.n == fit.n


def test_fit_table_two_groups_by_str_and_agg():
    df = _sweep().query("point == 'post'")
    table = fit_table(df, by="metric", n_boot=0)
    assert list(table["metric"]) == ["hard_rank", "soft_rank"]
    # two "layers" per width with the same geometric mean: median-aggregation recovers the fit
    lay = pd.concat([df.assign(layer=0, value=df.value * 1.2),
                     df.assign(layer=1, value=df.value * 1.2)])
    agg = fit_table(lay, by="metric", agg="median", n_boot=0)
    assert (agg["n"] == 8).all()
    np.testing.assert_allclose(agg["beta"], table["beta"], rtol=1e-12)
    whole = fit_table(df.query("metric == 'soft_rank'"), by=(), n_boot=0)
    assert len(whole) == 1 and list(whole.columns) == list(FIT_COLUMNS)


def test_fit_table_errors_name_the_group_and_columns():
    df = _sweep()
    df.loc[df.index[0], "value"] = 0.0
    with pytest.raises(ValueError, match=r"metric='soft_rank', point='post'.*y\[0\] = 0.0"):
        fit_table(df, n_boot=0)
    with pytest.raises(KeyError, match="width"):
        fit_table(df.drop(columns="width"))


def test_asymmetry():
    soft = fit_power_law(WIDTHS, 2 * WIDTHS**0.66, n_boot=0)
    hard = fit_power_law(WIDTHS, 7 * WIDTHS**0.29, n_boot=0)
    assert asymmetry(soft, hard) == pytest.approx(0.37, abs=1e-12)
    assert asymmetry(0.96, 0.82) == pytest.approx(0.14)
    with pytest.raises(TypeError, match="soft_fit"):
        asymmetry("0.9", hard)  # type: ignore[arg-type]


# --- purity ---------------------------------------------------------------------------------

def test_import_is_light():
    code = ("import sys, nerve_interp.scaling; "
            "print(*[m in sys.modules for m in ('torch', 'nnsight', 'pandas', 'matplotlib')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False"] * 4, out


# --- plots ----------------------------------------------------------------------------------

def test_plot_power_law_one_line_per_hue():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nerve_interp.plotting import plot_power_law

    df = _sweep().query("metric == 'soft_rank'")
    layers = pd.concat([df.assign(layer=i, value=df.value * (1 + 0.05 * i)) for i in range(3)])
    ax = plot_power_law(layers, hue="point")
    lines = ax.get_lines()
    assert len(lines) == 2
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("pre: β = ") and "(95% t), R² = " in labels[0]  # SPEC order
    assert labels[1].startswith("post: β = ")
    assert ax.get_ylabel() == "soft rank"
    plt.close("all")

    fig, ax0 = plt.subplots()
    ax = plot_power_law(df.query("point == 'pre'"), ax=ax0)
    assert ax is ax0 and len(ax.get_lines()) == 1
    ax = plot_power_law(df, hue="point", fits=False, ax=plt.subplots()[1])
    assert len(ax.get_lines()) == 0
    with pytest.raises(ValueError, match="2 metrics"):
        plot_power_law(_sweep(), hue="point")
    with pytest.warns(UserWarning, match="needs 3"):
        plot_power_law(df[df.width < 2000], hue="point", ax=plt.subplots()[1])
    plt.close("all")


def test_scaling_plots_is_a_deprecated_alias():
    """Old code importing plot_power_law from scaling_plots gets the same function, warned."""
    import nerve_interp.scaling_plots as old
    from nerve_interp import plotting

    with pytest.warns(DeprecationWarning, match="import plot_power_law from nerve_interp.plotting"):
        from nerve_interp.scaling_plots import plot_power_law
    assert plot_power_law is plotting.plot_power_law
    with pytest.warns(DeprecationWarning) as record:
        assert old.plot_power_law is plotting.plot_power_law
    assert record[0].filename == __file__  # points at the caller's line
    with pytest.raises(AttributeError, match="no attribute 'plot_spectra'"):
        old.plot_spectra  # noqa: B018


def test_fit_table_row_back_to_a_power_law_fit():
    """A fit_table row (or to_dict()) becomes the same PowerLawFit again."""
    from nerve_interp.scaling import PowerLawFit, fit_power_law, fit_table

    rng = np.random.default_rng(1)
    widths = np.array([64, 128, 256, 512, 1024] * 2)
    values = 2.0 * widths ** 0.6 * np.exp(rng.normal(0, 0.05, widths.size))
    df = pd.DataFrame({"width": widths, "value": values, "metric": "soft_rank"})
    row = fit_table(df, by="metric", n_boot=200, seed=3).iloc[0]
    direct = fit_power_law(widths, values, n_boot=200, seed=3)
    back = PowerLawFit.from_dict(row)
    for key, want in direct.to_dict().items():
        assert back.to_dict()[key] == pytest.approx(want, rel=1e-12, nan_ok=True), key
    assert back.n_boot_used == direct.n_boot_used > 0 and back.confidence == 0.95
    np.testing.assert_allclose(back.predict([100, 2000]), direct.predict([100, 2000]),
                               rtol=1e-12)
    assert str(back) == str(direct)
    assert PowerLawFit.from_dict(direct.to_dict(), confidence=0.9).confidence == 0.9
    with pytest.raises(KeyError, match="missing \\['beta_se'\\]"):
        PowerLawFit.from_dict({k: v for k, v in direct.to_dict().items() if k != "beta_se"})


# --- power law or saturation: AIC --------------------------------------------------------

SAT_WIDTHS = np.repeat([32.0, 48, 64, 96, 128, 192, 256, 384], 3)


def _reference_aic(resid, w=None, k=3):
    """-2 log-likelihood of N(0, s²/w_i) residuals at the MLE s² = Σ w r² / n, plus 2k."""
    w = np.ones_like(resid) if w is None else np.asarray(w, float)
    s2 = float(np.sum(w * resid**2)) / resid.size
    return -2 * float(np.sum(scipy.stats.norm.logpdf(resid, scale=np.sqrt(s2 / w)))) + 2 * k


@pytest.mark.parametrize("seed", range(5))
def test_power_law_data_prefer_the_power_law(seed):
    rng = np.random.default_rng(seed)
    y = 3 * SAT_WIDTHS**0.5 * np.exp(0.05 * rng.standard_normal(SAT_WIDTHS.size))
    row = fit_table(pd.DataFrame({"width": SAT_WIDTHS, "value": y}), by=(), n_boot=0).iloc[0]
    assert row["delta_aic"] > 2 and row["preferred"] == "power_law"
    assert row["delta_aic"] == pytest.approx(row["aic_saturating"] - row["aic"])


@pytest.mark.parametrize("seed", range(5))
def test_saturating_data_prefer_saturation(seed):
    rng = np.random.default_rng(seed)
    y = 40 * SAT_WIDTHS / (100 + SAT_WIDTHS) * np.exp(0.05 * rng.standard_normal(SAT_WIDTHS.size))
    row = fit_table(pd.DataFrame({"width": SAT_WIDTHS, "value": y}), by=(), n_boot=0).iloc[0]
    assert row["delta_aic"] < -2 and row["preferred"] == "saturating"
    assert row["sat_a"] == pytest.approx(40, rel=0.15)
    assert row["sat_b"] == pytest.approx(100, rel=0.4)


def test_saturating_exact_and_against_curve_fit():
    from scipy.optimize import curve_fit

    from nerve_interp.scaling import fit_saturating

    x = SAT_WIDTHS
    exact = fit_saturating(x, 20 * x / (50 + x))
    assert exact.a == pytest.approx(20, rel=1e-6) and exact.b == pytest.approx(50, rel=1e-6)
    assert not exact.at_bound
    rng = np.random.default_rng(3)
    y = 20 * x / (50 + x) * np.exp(0.1 * rng.standard_normal(x.size))
    fit = fit_saturating(x, y)
    (ln_a, ln_b), _ = curve_fit(lambda d, la, lb: la + np.log(d) - np.log(np.exp(lb) + d),
                                x, np.log(y), p0=[np.log(20), np.log(50)])
    assert fit.a == pytest.approx(np.exp(ln_a), rel=1e-4)
    assert fit.b == pytest.approx(np.exp(ln_b), rel=1e-4)
    resid = np.log(y) - np.log(fit.predict(x))
    assert fit.aic == pytest.approx(_reference_aic(resid), rel=1e-9)
    assert fit.rss == pytest.approx(float(resid @ resid), rel=1e-9)
    # a straight line has no bend: b runs to the top of its range
    assert fit_saturating(x, 0.5 * x).at_bound


@pytest.mark.parametrize("weighted", [False, True])
def test_aic_is_the_gaussian_formula(weighted):
    x, y = noisy(beta=0.6, sigma=0.1, seed=4)
    se = 0.05 * y * (1 + np.arange(x.size) % 3) if weighted else None
    fit = fit_power_law(x, y, n_boot=0, y_se=se)
    w = None if se is None else (y / se) ** 2
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1, w=None if w is None else np.sqrt(w))
    resid = np.log(y) - (intercept + slope * np.log(x))
    assert fit.aic == pytest.approx(_reference_aic(resid, w), rel=1e-9)
    n, rss = x.size, float(np.sum((np.ones_like(y) if w is None else w) * resid**2))
    if w is None:  # the closed form of the module docstring
        assert fit.aic == pytest.approx(n * math.log(2 * math.pi * rss / n) + n + 6, rel=1e-12)
    row = fit_table(pd.DataFrame({"width": x, "value": y, "se": se if weighted else 1.0}),
                    by=(), n_boot=0, y_se="se" if weighted else None).iloc[0]
    assert row["aic"] == pytest.approx(fit.aic)
    # equal k: ΔAIC is n · ln(RSS_sat / RSS_pow)
    assert row["delta_aic"] == pytest.approx(
        n * math.log(_sat_rss(x, y, row, w) / rss), rel=1e-9)


def _sat_rss(x, y, row, w):
    r = np.log(y) - np.log(row["sat_a"] * x / (row["sat_b"] + x))
    return float(np.sum((np.ones_like(y) if w is None else w) * r**2))


def test_old_rows_without_aic_still_load():
    x, y = noisy()
    row = fit_power_law(x, y, n_boot=0).to_dict()
    old = {k: v for k, v in row.items() if k not in FIT_COLUMNS[-8:]}
    assert math.isnan(PowerLawFit.from_dict(old).aic)
    assert PowerLawFit.from_dict(row).aic == pytest.approx(row["aic"])
    assert list(fit_table(pd.DataFrame({"width": x, "value": y}), by=(), n_boot=0).columns) \
        == list(FIT_COLUMNS)


def test_plot_power_law_draws_the_saturating_fit_dashed():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nerve_interp.plotting import plot_power_law

    df = _sweep().query("metric == 'soft_rank'")
    ax = plot_power_law(df, hue="point", saturating=True)
    lines = ax.get_lines()
    assert len(lines) == 4
    assert [ln.get_linestyle() for ln in lines] == ["-", "--", "-", "--"]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("ΔAIC" in t for t in labels)
    assert len(plot_power_law(df, hue="point", ax=plt.subplots()[1]).get_lines()) == 2
    plt.close("all")
