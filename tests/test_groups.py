"""Per-group statistics (``collect_spectra(n_groups=K)``): exact merges, the jackknife against a
direct leave-one-group-out recomputation in numpy, checkpoints, passes, files, errors, and the
coverage of the intervals on data with a known covariance."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import interrupted, make_tiny, random_batch, raw_hook_points
from scipy import stats
from test_moments import Passthrough, fourth

import nerve_interp as ni
from nerve_interp import metrics as M
from nerve_interp.errors import CaptureError, NotFittedError
from nerve_interp.groups import GroupStats
from nerve_interp.jackknife import fit_convergence, jackknife
from nerve_interp.spectrum import point_metrics


def capture(model, batches, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ni.collect_spectra(model, batches, progress=False, **kw)


@pytest.fixture(scope="module")
def llama():
    return make_tiny("llama")


@pytest.fixture(scope="module")
def batches():
    return [random_batch(seed=s) for s in range(4)]


def test_merged_groups_equal_the_ungrouped_capture(llama, batches):
    """The total of K groups is the capture without groups (1e-12 relative), exclusions and
    a budget cut included."""
    kw = dict(points=("pre", "act", "post"), exclude_positions=(0,), max_tokens=300,
              precision="fp64")
    grouped, plain = capture(llama, batches, n_groups=5, **kw), capture(llama, batches, **kw)
    assert grouped.metadata["n_groups"] == 5 and plain.metadata["n_groups"] is None
    for key, spec in plain.items():
        got = grouped.spectrum(*key)
        assert got.n_samples == spec.n_samples == 300
        assert np.max(np.abs(got.eigenvalues - spec.eigenvalues)) <= 1e-12 * spec.eigenvalues[0]
        np.testing.assert_allclose(got.mean, spec.mean, rtol=1e-12, atol=1e-14)
        assert got.fourth_moment == pytest.approx(spec.fourth_moment, rel=1e-12)
        assert got.groups.n.sum() == 300 and spec.groups is None
    pd_cols = {"se", "ci_low", "ci_high", "n_groups"}
    assert pd_cols <= set(plain.metrics().columns)
    assert plain.metrics()["se"].isna().all() and grouped.metrics()["se"].gt(0).all()


def groups_of_tokens(select, k):
    """The group (sequence s in group s mod k) of every kept token, in capture order."""
    out, first = [], 0
    for keep in select:
        seq = torch.arange(keep.shape[0]).unsqueeze(1).expand_as(keep)
        out.append(((seq + first) % k)[keep])
        first += keep.shape[0]
    return torch.cat(out).numpy()


def test_jackknife_equals_a_direct_leave_one_group_out_recomputation(llama, batches):
    """Raw-hook activations, groups assigned by hand, every leave-one-out metric and the
    jackknife formula written out in numpy: the intervals of metrics() and reinjection()."""
    k = 4
    res = capture(llama, batches, n_groups=k, exclude_positions=(0,))
    select = []
    for b in batches:
        real = b["attention_mask"].bool()
        select.append(real & ((real.long().cumsum(1) - 1) != 0))
    ref = raw_hook_points(llama, batches, "gated", select=select)
    labels = groups_of_tokens(select, k)
    table = res.metrics(ci=0.9).set_index(["layer", "point", "metric"])
    t = stats.t.ppf(0.95, k - 1)
    loo_by_point = {}
    for (layer, point), x in ref.items():
        if point not in ("pre", "post"):
            continue
        loo = []
        for g in range(k):
            rest = x[labels != g]
            lam = np.clip(np.linalg.eigvalsh(np.cov(rest, rowvar=False))[::-1], 0, None)
            loo.append((lam, point_metrics(lam, len(rest), fourth(rest))))
        loo_by_point[(layer, point)] = [lam for lam, _ in loo]
        for name in ("participation_ratio", "participation_ratio_corrected", "soft_rank",
                     "eee"):
            values = np.array([m[name] for _, m in loo])
            se = np.sqrt((k - 1) / k * ((values - values.mean()) ** 2).sum())
            row = table.loc[(layer, point, name)]
            assert row["se"] == pytest.approx(se, rel=1e-6)
            assert row["ci_high"] - row["value"] == pytest.approx(t * se, rel=1e-6)
            assert row["value"] - row["ci_low"] == pytest.approx(t * se, rel=1e-6)
    reinj = res.reinjection(ci=0.9).set_index("layer")
    for layer in res.layers:
        gains = np.array([M.participation_ratio(b) / M.participation_ratio(a) for a, b in zip(
            loo_by_point[(layer, "pre")], loo_by_point[(layer, "post")], strict=True)])
        se = np.sqrt((k - 1) / k * ((gains - gains.mean()) ** 2).sum())
        assert reinj.loc[layer, "pr_gain_se"] == pytest.approx(se, rel=1e-6)
    tidy = res.reinjection(tidy=True)
    assert tidy["se"].notna().all() and {"n_tokens", "n_over_d"} <= set(tidy.columns)


def test_groups_survive_resume_passes_and_files(llama, batches, tmp_path):
    whole = capture(llama, batches, n_groups=3)
    ckpt = tmp_path / "c.ckpt"

    with pytest.raises(KeyboardInterrupt):
        capture(llama, interrupted(batches, 2), n_groups=3, checkpoint=ckpt, checkpoint_every=1)
    with pytest.raises(ni.errors.ResultsFileError, match="n_groups"):
        capture(llama, batches, n_groups=4, checkpoint=ckpt)  # other groups: refused
    resumed = capture(llama, batches, n_groups=3, checkpoint=ckpt)
    two_passes = capture(llama, batches, n_groups=3, memory_budget=250_000)
    assert len(two_passes.metadata.get("passes", [])) > 1
    whole.save(tmp_path / "r.safetensors")
    back = ni.SpectraResult.load(tmp_path / "r.safetensors")
    for other in (resumed, two_passes, back):
        for key, spec in whole.items():
            got = other.spectrum(*key).groups
            np.testing.assert_allclose(got.loo_eigenvalues, spec.groups.loo_eigenvalues,
                                       rtol=1e-12, atol=1e-12 * spec.eigenvalues[0])
            np.testing.assert_array_equal(got.n, spec.groups.n)
            np.testing.assert_array_equal(got.conv_n, spec.groups.conv_n)
    assert back.metrics().equals(whole.metrics())
    assert back.convergence().fits.equals(whole.convergence().fits)


def test_bad_groups_are_refused_clearly(llama, batches):
    for bad, err in ((1, ValueError), (0, ValueError), ("16", TypeError), (True, TypeError),
                     (2.5, TypeError)):
        with pytest.raises(err, match="n_groups"):
            capture(llama, batches, n_groups=bad)
    with pytest.raises(CaptureError, match="fewer groups or more data"):
        capture(llama, batches[:1], n_groups=16)  # 4 sequences
    with pytest.raises(ValueError, match="remote backend cannot keep n_groups"):
        capture(llama, batches, n_groups=4, remote="local")
    plain = capture(llama, batches[:2])
    with pytest.raises(NotFittedError, match="n_groups=16"):
        plain.convergence()
    with pytest.raises(ValueError, match="ci"):
        capture(llama, batches[:2], n_groups=2).metrics(ci=95)


def test_planner_counts_k_times_the_state():
    from nerve_interp.planner import plan_capture, state_bytes

    dims = {(layer, p): 512 for layer in range(4) for p in ("pre", "post")}
    one = plan_capture(dims, budget=60e6, tokens_per_batch=256)
    grouped = plan_capture(dims, budget=60e6, tokens_per_batch=256, n_groups=8)
    assert one.n_passes == 1 and grouped.n_passes == 4  # a layer: 2 × 8 × 2.1 MB + work
    assert max(grouped.bytes_per_pass) >= 2 * 8 * state_bytes(512)
    with pytest.raises(ni.errors.MemoryPlanError, match="64 groups"):
        plan_capture(dims, budget=60e6, tokens_per_batch=256, n_groups=64)


def test_jackknife_and_convergence_known_answers():
    x = np.random.default_rng(0).standard_normal(40)
    loo = np.array([np.delete(x, g).mean() for g in range(40)])
    out = jackknife(x.mean(), loo, ci=0.95)
    assert out["se"] == pytest.approx(x.std(ddof=1) / np.sqrt(40), rel=1e-12)
    n = np.array([100, 200, 400, 800, 1600])
    fit = fit_convergence(n, 5.0 + 300.0 / n)
    assert fit["m_inf"] == pytest.approx(5.0, abs=1e-9) and fit["a"] == pytest.approx(300.0)
    assert fit["r2"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="3 distinct"):
        fit_convergence([1, 1, 2], [1, 2, 3])


def simulate(seed: int, lam: np.ndarray, n: int, k: int, heavy: bool):
    """One capture's group statistics of data with covariance diag(λ) (rotated, offset)."""
    rng = np.random.default_rng(seed)
    d = lam.size
    z = rng.standard_t(8, (n, d)) / np.sqrt(8 / 6) if heavy else rng.standard_normal((n, d))
    rot = np.linalg.qr(rng.standard_normal((d, d)))[0]
    x = torch.from_numpy((z * np.sqrt(lam)) @ rot.T + 2.0)
    gs = GroupStats("sim", k)
    gs.update(x, (torch.arange(n) // 8) % k)  # sequences of 8 tokens
    total, mom = gs.merged()
    lam_hat = np.clip(np.linalg.eigvalsh(total.covariance_.numpy())[::-1], 0, None)
    return lam_hat, mom.fourth_, gs.spectra(total, mom)


@pytest.mark.parametrize("heavy", [False, True], ids=["gaussian", "student-t8"])
def test_interval_coverage_by_simulation(heavy):
    """Over 200 independent samples (power law λ_i ∝ 1/i, D = 16, N/D = 16, K = 10): the
    95 % jackknife interval of the corrected PR covers the population PR 91–99 % of the
    time, and the extrapolated soft rank ± the same half-width covers the population soft
    rank nearly as often (≥ 88 %). (The plain PR, biased low by 1/PR̂ ≈ 1/PR + 1/N, is
    printed for comparison: at N/D = 16 its bias is small beside its spread.)"""
    d, n, k, reps = 16, 256, 10, 200
    lam = 1.0 / np.arange(1, d + 1)
    pr_true = lam.sum() ** 2 / (lam ** 2).sum()
    p = lam / lam.sum()
    sr_true = float(np.exp(-(p * np.log(p)).sum()))
    hits = {"corrected": 0, "plain": 0, "soft_rank": 0}
    for seed in range(reps):
        lam_hat, a, g = simulate(seed, lam, n, k, heavy)
        full = point_metrics(lam_hat, n, a)
        loo = [point_metrics(lam_g, int(n_g), float(a_g))
               for lam_g, n_g, a_g in zip(g.loo_eigenvalues, g.loo_n, g.loo_fourth,
                                          strict=True)]
        for key, name in (("corrected", "participation_ratio_corrected"),
                          ("plain", "participation_ratio")):
            j = jackknife(full[name], [m[name] for m in loo])
            hits[key] += j["ci_low"] <= pr_true <= j["ci_high"]
        ns = [n, *g.conv_n.ravel()]
        srs = [full["soft_rank"], *(M.soft_rank(v) for v in g.conv_eigenvalues.reshape(-1, d))]
        ok = np.array(ns) >= d
        m_inf = fit_convergence(np.array(ns)[ok], np.array(srs)[ok])["m_inf"]
        half = jackknife(full["soft_rank"], [m["soft_rank"] for m in loo])["se"] * \
            stats.t.ppf(0.975, k - 1)
        hits["soft_rank"] += abs(m_inf - sr_true) <= half
    rate = {key: v / reps for key, v in hits.items()}
    print(f"coverage ({'t8' if heavy else 'gaussian'}): {rate}")
    assert 0.91 <= rate["corrected"] <= 0.99, rate
    assert 0.88 <= rate["soft_rank"] <= 0.99, rate


def test_convergence_extrapolates_toward_the_population_value():
    """White noise through the passthrough model (true soft rank = D): the measured soft rank
    at N/D = 8 is biased low (Marchenko–Pastur: 0.94·D); the extrapolation lands closer to D
    than the measured value, on average over 10 captures."""
    d, n = 24, 192
    gaps = []
    for seed in range(10):
        x = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, d)))
        model = Passthrough()
        sites = ni.find_ffn_sites(model, pre="blocks.{layer}.mlp.act.input",
                                  post="blocks.{layer}.mlp.act.output")
        res = capture(model, list(x.split(16)), sites=sites, points=("post",),
                      diagnostics=False, n_groups=12)
        fit = res.convergence(["soft_rank"]).fits.iloc[0]
        gaps.append((d - fit["value"], d - fit["m_inf"]))
    measured, extrapolated = np.mean(gaps, axis=0)
    print(f"soft rank bias at N/D = 8: measured {measured:.2f}, extrapolated {extrapolated:.2f}")
    assert measured > 0.04 * d  # biased low (MP: 0.06·D)
    assert abs(extrapolated) < 0.5 * measured


def test_plots_draw_the_intervals(llama, batches):
    import matplotlib

    matplotlib.use("Agg")
    res = capture(llama, batches, n_groups=4)
    ax = ni.plotting.plot_metric(res.metrics(), metric="participation_ratio_corrected")
    assert len(ax.collections) >= 2  # one band per point
    axes = ni.plotting.plot_reinjection(res.reinjection())
    assert all(a.containers for a in axes)  # error bars
    conv = res.convergence()
    ax = ni.plotting.plot_convergence(conv, metric="js_divergence", point="pre->post")
    assert ax.get_xscale() == "log" and len(ax.get_legend().get_texts()) == len(res.layers)
    with pytest.raises(KeyError, match="no convergence curve"):
        ni.plotting.plot_convergence(conv, metric="nope")
    import matplotlib.pyplot as plt

    plt.close("all")
