"""The finite-sample-corrected participation ratio: the estimators against U-statistics,
the streamed fourth moment against numpy and raw hooks, known answers through a model with
hand-named sites, and its survival through checkpoints and result files."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from conftest import interrupted, make_tiny, random_batch, raw_hook_points
from test_diagnostics import _Block

import nerve_interp as ni
from nerve_interp import metrics
from nerve_interp.covariance import CovarianceAccumulator
from nerve_interp.moments import NormMoments


def fourth(x: np.ndarray) -> float:
    xc = x - x.mean(0)
    return float(((xc ** 2).sum(1) ** 2).sum())


def test_trace_estimators_equal_the_u_statistics():
    """Known answer: the unbiased estimators are the U-statistics over distinct 4-tuples."""
    rng = np.random.default_rng(0)
    x = rng.standard_t(5, size=(9, 3)) @ rng.standard_normal((3, 3)) + 1.0
    lam = np.linalg.eigvalsh(np.cov(x, rowvar=False))
    t11, t2 = metrics.trace_estimators(lam, 9, fourth(x))
    u2, u11 = [], []
    for i, j, k, m in itertools.permutations(range(9), 4):
        a, b = x[i] - x[j], x[k] - x[m]
        u2.append((a @ b) ** 2 / 4)
        u11.append((a @ a) * (b @ b) / 4)
    assert t2 == pytest.approx(np.mean(u2), rel=1e-12)
    assert t11 == pytest.approx(np.mean(u11), rel=1e-12)
    with pytest.raises(ValueError, match="N >= 4"):
        metrics.trace_estimators(lam, 3, 1.0)


@pytest.mark.parametrize(("precision", "rel"), [("fp64", 1e-12), ("fp32", 1e-9)])
def test_streamed_fourth_moment_equals_numpy(precision, rel):
    """Batches of float32 rows with a large offset, merged with the Chan-style update; and
    two parts re-centred on their common mean add up (the cross-process merge).

    With float32 products the merge's ``δᵀM2δ`` and ``tr M2`` terms carry the round-off of
    the accumulator's ``M2`` (how much depends on the CPU's BLAS: 1.5e-12 relative on an AMD
    EPYC, below 1e-12 on an earlier machine; float64: 4e-16). A wrong merge term is off by
    far more than either bound."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1100, 9, generator=g, dtype=torch.float64) ** 3
         @ torch.randn(9, 9, generator=g, dtype=torch.float64) + 30).float()
    acc, mom = CovarianceAccumulator("t", precision=precision), NormMoments("t")
    for chunk in x.split(97):
        mom.update(chunk, acc)
        acc.update(chunk)
    want = fourth(x.double().numpy())
    assert mom.fourth_ == pytest.approx(want, rel=rel)
    parts = []
    for rows in (x[:300].double(), x[300:].double()):
        a, m = CovarianceAccumulator("p", precision="fp64"), NormMoments("p")
        for chunk in rows.split(64):
            m.update(chunk, a)
            a.update(chunk)
        parts.append((a, m))
    mu = x.double().mean(0)
    total = sum(float(m.recentred(mu, a.scatter_)[0]) for a, m in parts)
    assert total == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("precision", ["fp64", "fp32", "bf16-split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_update_with_moments_equals_two_updates_and_numpy(precision, dtype):
    """``acc.update(x, moments=mom)`` (one pass over the rows: the centring chunks feed the
    moments) gives the fourth moment and the covariance of ``mom.update(x, acc)`` then
    ``acc.update(x)``, and numpy's, through batches larger than one chunk, a large offset
    and a D spanning several panels; the rows are not modified."""
    from nerve_interp import covariance

    g = torch.Generator().manual_seed(4)
    x = (torch.randn(1200, 300, generator=g, dtype=torch.float64) ** 3
         @ torch.randn(300, 300, generator=g, dtype=torch.float64) / 30 + 25).to(dtype)
    assert 300 > covariance.PANEL_WIDTH and 600 > covariance._ROW_CHUNK // 300
    one, two = ((CovarianceAccumulator("t", precision=precision), NormMoments("t"))
                for _ in range(2))
    for chunk in x.split(600):
        before = chunk.clone()
        one[0].update(chunk, moments=one[1])
        assert torch.equal(chunk, before)
        two[1].update(chunk, two[0])
        two[0].update(chunk)
    ref = x.double().numpy()
    # below float64 products the merge carries M2's round-off, which varies with the CPU's
    # BLAS (worst here 1.5e-12, bf16-split of float32 rows, on an AMD EPYC); one pass and
    # two differ by float64 sums taken in another order (2e-13)
    assert one[1].fourth_ == pytest.approx(fourth(ref), rel=1e-11 if precision == "fp64" else 1e-9)
    assert one[1].fourth_ == pytest.approx(two[1].fourth_, rel=1e-11)
    assert torch.allclose(one[1].mean_, two[1].mean_, rtol=0, atol=1e-12)
    cov = one[0].covariance_.numpy()
    tol = 1e-10 if precision == "fp64" else 1e-5
    assert np.abs(cov - np.cov(ref, rowvar=False)).max() <= tol * np.abs(cov).max()
    assert torch.equal(one[0].covariance_, two[0].covariance_)


def test_capture_matches_raw_hooks_with_exclusions_and_budget():
    """participation_ratio_corrected of a capture equals the estimator on the raw-hook
    activations of the documented rows (llama: gated points; positions and a budget cut)."""
    model = make_tiny("llama")
    batches = [random_batch(seed=s) for s in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ni.collect_spectra(model, batches, progress=False, points=("pre", "post"),
                                 exclude_positions=(0,), max_tokens=150)
    select = []
    left = 150
    for b in batches:
        real = b["attention_mask"].bool()
        keep = real & ((real.long().cumsum(1) - 1) != 0)
        flat = keep.reshape(-1) & (keep.reshape(-1).cumsum(0) <= left)
        left -= int(flat.sum())
        select.append(flat.reshape(keep.shape))
    ref = raw_hook_points(model, batches, "gated", select=select)
    table = res.metrics().set_index(["layer", "point", "metric"])["value"]
    for (layer, point), x in ref.items():
        if point not in ("pre", "post"):
            continue
        spec = res.spectrum(layer, point)
        assert spec.n_samples == len(x) == 150
        assert spec.fourth_moment == pytest.approx(fourth(x), rel=1e-6)
        lam = np.linalg.eigvalsh(np.cov(x, rowvar=False)).clip(0)
        want = metrics.participation_ratio_corrected(lam, len(x), fourth(x))
        assert table[(layer, point, "participation_ratio_corrected")] == pytest.approx(
            want, rel=1e-6)


class Passthrough(torch.nn.Module):
    """Its FFN point is its input: activations with a covariance we choose."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block()])  # its FFN activation is an Identity

    def forward(self, x):
        return self.blocks[0](x)


def capture_pr(lam: np.ndarray, n: int, seed: int, heavy: bool) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    d = lam.size
    z = (rng.standard_t(8, (n, d)) / np.sqrt(8 / 6) if heavy else rng.standard_normal((n, d)))
    rot = np.linalg.qr(rng.standard_normal((d, d)))[0]
    x = torch.from_numpy((z * np.sqrt(lam)) @ rot.T + 2.0)
    model = Passthrough()
    sites = ni.find_ffn_sites(model, pre="blocks.{layer}.mlp.act.input",
                              post="blocks.{layer}.mlp.act.output")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ni.collect_spectra(model, list(x.split(50)), sites=sites, points=("post",),
                                 progress=False, diagnostics=False)
    m = res.spectrum(0, "post").metrics()
    return m["participation_ratio"], m["participation_ratio_corrected"]


@pytest.mark.parametrize("heavy", [False, True], ids=["gaussian", "student-t8"])
def test_corrected_pr_known_answers_flat(heavy):
    """A flat covariance, Gaussian or Student-t(8) tokens through a model with hand-named
    sites, mean over 8 captures: at N/D = 1 the corrected PR is within 5 % of the population
    PR where the plain PR is > 30 % low; at N/D = 8 within 2 % (measured, 40 captures:
    +0.5 % / +0.4 % at N/D = 1, -0.04 % / -0.01 % at N/D = 8)."""
    d = 64
    for ratio, tol in ((1, 0.05), (8, 0.02)):
        got = np.array([capture_pr(np.ones(d), ratio * d, s, heavy) for s in range(8)]) / d
        plain, corrected = got.mean(0)
        assert corrected == pytest.approx(1.0, abs=tol), (ratio, plain, corrected)
        if ratio == 1:
            assert plain < 0.7


@pytest.mark.parametrize("heavy", [False, True], ids=["gaussian", "student-t8"])
def test_corrected_pr_known_answers_power_law(heavy):
    """λ_i ∝ 1/i (D = 64, population PR 13.2) at N/D = 8, 16 captures: a few large
    eigenvalues make both estimates noisy (one capture: ~6 %), so the claim is an interval:
    the population PR lies inside mean ± 3 SE of the corrected PR, that interval is
    narrower than ±6 %, and the correction (corrected − plain, paired by capture) is
    positive beyond 3 SE (measured over 40 captures: plain 0.975 / 0.954, corrected
    1.003 / 0.984 of the population value; heavy tails leave a small low bias)."""
    d = 64
    lam = 1.0 / np.arange(1, d + 1)
    pop = lam.sum() ** 2 / (lam ** 2).sum()
    got = np.array([capture_pr(lam, 8 * d, s, heavy) for s in range(16)]) / pop
    n = len(got)
    mean, se = got.mean(0), got.std(0, ddof=1) / np.sqrt(n)
    assert abs(mean[1] - 1) < 3 * se[1] < 0.06, (mean, se)
    diff = got[:, 1] - got[:, 0]
    assert diff.mean() > 3 * diff.std(ddof=1) / np.sqrt(n), diff


def test_fourth_moment_survives_resume_and_files(tmp_path):
    model = make_tiny("gpt2")
    batches = [random_batch(seed=s) for s in range(4)]
    ckpt = tmp_path / "c.ckpt"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = ni.collect_spectra(model, batches, progress=False)
        with pytest.raises(KeyboardInterrupt):
            ni.collect_spectra(model, interrupted(batches, 2), progress=False, checkpoint=ckpt,
                               checkpoint_every=1)
        resumed = ni.collect_spectra(model, batches, progress=False, checkpoint=ckpt)
    for key, spec in whole.items():
        assert resumed.spectrum(*key).fourth_moment == spec.fourth_moment  # bit for bit
    whole.save(tmp_path / "r.safetensors")
    back = ni.SpectraResult.load(tmp_path / "r.safetensors")
    assert back.metrics().equals(whole.metrics())
    assert "participation_ratio_corrected" in set(back.metrics()["metric"])


def test_fourth_moment_without_some_rows_equals_numpy():
    """The spectrum without outlier tokens keeps its corrected PR: removing rows from the
    streamed moments equals numpy on the rows that are left."""
    from nerve_interp.diagnostics import remove_rows

    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, 6, generator=g, dtype=torch.float64) + 4
    x[:7] *= 40  # a few massive rows
    acc, mom = CovarianceAccumulator("t", precision="fp64"), NormMoments("t")
    for chunk in x.split(128):
        mom.update(chunk, acc)
        acc.update(chunk)
    drop = x[[0, 3, 5, 100]]
    n_a, mean_a, m2_a = remove_rows(acc.n_samples_seen_, acc.mean_, acc.scatter_, drop)
    keep = np.ones(600, bool)
    keep[[0, 3, 5, 100]] = False
    assert mom.without(drop, mean_a, m2_a) == pytest.approx(fourth(x.numpy()[keep]), rel=1e-10)


def test_flagged_points_keep_the_corrected_pr_without_outliers():
    from test_diagnostics import lookup_data

    model, sites, batches, _, _ = lookup_data(n_batches=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ni.collect_spectra(model, batches, sites=sites, points=("post",),
                                 progress=False)
    assert res.diagnostics[(0, "post")].outlier_flag
    free = res.without_outliers().metrics().set_index("metric")["value"]
    plain = res.metrics().set_index("metric")["value"]
    assert np.isfinite(free["participation_ratio_corrected"])
    # without the massive tokens the PR rises; at N/D ~ 60 the correction stays small
    assert free["participation_ratio"] > 1.5 * plain["participation_ratio"]
    assert free["participation_ratio_corrected"] == pytest.approx(
        free["participation_ratio"], rel=0.2)
