"""width_sweep: one model per width, final spectra, fits, and resume from out_dir."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nerve_interp.errors import FiniteSampleWarning
from nerve_interp.scaling import fit_power_law
from nerve_interp.sweeps import width_sweep
from nerve_interp.training import TrainConfig


def test_width_sweep_fits_and_resumes(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    blocks = (torch.randint(0, 50, (64, 1), generator=g) + torch.arange(32)) % 50 + 1
    cfg = TrainConfig(steps=6, batch_size=8, warmup=1, eval_every=6)
    kw = dict(norms=("pre_ln",), preset="tiny", model_overrides={"vocab_size": 64},
              train_config=cfg, n_over_d=8, out_dir=tmp_path, progress=False)
    # every width at N/D = 8 (8·D tokens: 8, 16, 32 blocks of 32): below 10, so one
    # FiniteSampleWarning for the whole sweep, not one per model
    with pytest.warns(FiniteSampleWarning, match=r"N/D = 8 < 10 \(N = 256 tokens, D = 32\) "
                      r"at 3 of 3 widths of the sweep.*At N/D = 8 white noise") as rec:
        res = width_sweep([32, 64, 128], blocks, blocks[:32], **kw)
    assert [w.category for w in rec] == [FiniteSampleWarning] and rec[0].filename == __file__
    t = res.table
    assert sorted(t["width"].unique()) == [32, 64, 128] and set(t["layer"]) == {0, 1}
    assert list(t.columns) == ["norm", "width", "seed", "layer", "point", "metric", "value",
                               "se", "model_se", "n_tokens", "n_over_d", "val_loss"]
    assert (t["n_tokens"] == 8 * t["width"]).all() and (t["n_over_d"] == 8).all()
    # every value carries its jackknife se over 8 groups of evaluation blocks, and one seed
    # per width makes each width's se that of its model's median over layers
    assert (t["se"] > 0).all() and (t["model_se"] > 0).all()
    pw = res.per_width(["soft_rank"]).set_index("width")["value_se"]
    soft = t[t["metric"] == "soft_rank"].groupby("width")["model_se"].first()
    np.testing.assert_allclose(pw.loc[soft.index], soft, rtol=1e-12)
    assert res.fit(["soft_rank"], weighted=True)["weighted"].all()
    assert len(list(tmp_path.glob("*.json"))) == 3
    fit = res.fits.set_index("metric").loc["soft_rank"]
    per_width = (t[t["metric"] == "soft_rank"].groupby("width")["value"].median())
    ref = fit_power_law(per_width.index.to_numpy(), per_width.to_numpy())
    assert fit["beta"] == ref.beta and fit["n"] == 3 and not fit["weighted"]
    # resume: nothing is retrained, the same table comes back
    import nerve_interp.training

    def no_training(*a, **k):
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr(nerve_interp.training, "train", no_training)
    again = width_sweep([32, 64, 128], blocks, blocks[:32], **kw)
    assert again.table.equals(t)
    assert set(t["norm"]) == {"pre_ln"} and set(res.fits["norm"]) == {"pre_ln"}
    # an out_dir written by an older version (norm "pre" in file names and rows) resumes,
    # and the old spelling still works with a DeprecationWarning; rows come back renamed
    for f in tmp_path.glob("pre_ln-*.json"):
        saved = json.loads(f.read_text())
        saved["rows"] = [{**r, "norm": "pre"} for r in saved["rows"]]
        (tmp_path / f.name.replace("pre_ln-", "pre-")).write_text(json.dumps(saved))
        f.unlink()
    with pytest.warns(DeprecationWarning, match="norm='pre_ln'") as rec:
        old = width_sweep([32, 64, 128], blocks, blocks[:32], **{**kw, "norms": ("pre",)})
    assert rec[0].filename == __file__
    assert old.table.equals(t) and old.fits.equals(res.fits)
    # a run written before n_tokens / n_over_d were columns gets them from its token count
    for f in tmp_path.glob("pre-*.json"):
        saved = json.loads(f.read_text())
        saved["rows"] = [{k: v for k, v in r.items() if k not in ("n_tokens", "n_over_d")}
                         for r in saved["rows"]]
        f.write_text(json.dumps(saved))
    assert width_sweep([32, 64, 128], blocks, blocks[:32], **kw).table.equals(t)

    # fit_metrics= still works, deprecated for result.fit(metrics)
    with pytest.warns(DeprecationWarning, match=r"fit_metrics=\.\.\.\) is deprecated") as rec:
        old = width_sweep([32, 64, 128], blocks, blocks[:32], fit_metrics=["eee"], **kw)
    assert rec[0].filename == __file__
    assert old.fits.equals(res.fit(["eee"])) and list(old.fits["metric"]) == ["eee"]


def test_width_sweep_keeps_spectra_and_reloads_them(tmp_path, monkeypatch):
    """keep_spectra: each run's final spectra, equal to the table's metrics, saved next to
    the run's JSON and reloaded (not retrained) on resume; a JSON without its spectra file
    is retrained when spectra are asked for."""
    import numpy as np

    import nerve_interp.training
    from nerve_interp import metrics

    g = torch.Generator().manual_seed(0)
    blocks = (torch.randint(0, 50, (64, 1), generator=g) + torch.arange(32)) % 50 + 1
    cfg = TrainConfig(steps=4, batch_size=8, warmup=1, eval_every=4)
    kw = dict(norms=("pre_ln",), preset="tiny", model_overrides={"vocab_size": 64},
              train_config=cfg, n_over_d=16, out_dir=tmp_path, progress=False)
    width_sweep([32, 64, 128], blocks, blocks, **kw)  # metrics only
    assert not list(tmp_path.glob("*.safetensors"))
    res = width_sweep([32, 64, 128], blocks, blocks, keep_spectra=True, **kw)
    assert sorted(res.spectra) == [("pre_ln", 32, 0), ("pre_ln", 64, 0), ("pre_ln", 128, 0)]
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    for (_, width, _), spectra in res.spectra.items():
        m = spectra.metrics().query("metric == 'soft_rank'")["value"].to_numpy()
        t = res.table
        want = t[(t["width"] == width) & (t["metric"] == "soft_rank")]["value"]
        np.testing.assert_allclose(m, want.to_numpy(), rtol=1e-12)
        # model_se: the jackknife of the median over layers, recomputed from the saved
        # leave-one-group-out spectra with numpy's median and the jackknife formula
        specs = [spectra.spectrum(layer, "post") for layer in spectra.layers]
        loo = np.array([[metrics.soft_rank(lam) for lam in s.groups.loo_eigenvalues]
                        for s in specs])  # [layer, group]
        med = np.median(loo, axis=0)
        k = med.size
        se = np.sqrt((k - 1) / k * ((med - med.mean()) ** 2).sum())
        got = t[(t["width"] == width) & (t["metric"] == "soft_rank")]["model_se"].iloc[0]
        assert got == pytest.approx(se, rel=1e-9)

    def no_training(*a, **k):
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr(nerve_interp.training, "train", no_training)
    again = width_sweep([32, 64, 128], blocks, blocks, keep_spectra=True, **kw)
    for key, spectra in res.spectra.items():
        np.testing.assert_array_equal(again.spectra[key].eigenvalues(0, "post"),
                                      spectra.eigenvalues(0, "post"))
    assert width_sweep([32, 64, 128], blocks, blocks, **kw).spectra == {}


def test_width_sweep_seeds_are_a_sequence():
    """seeds is a sequence of seeds (one model each), never a count; checked before training."""
    blocks = torch.ones(4, 8, dtype=torch.long)
    for bad, err, match in [(2, TypeError, r"seeds=range\(2\)"), ((), ValueError, "empty"),
                            ((1, 1), ValueError, "repeats a seed")]:
        with pytest.raises(err, match=match):
            width_sweep([32, 64, 128], blocks, blocks, seeds=bad, progress=False)
def test_width_sweep_keywords(monkeypatch):
    """LMConfig fields are keywords of their own (as in make_lm) or one model_overrides dict;
    fit_metrics is deprecated for WidthSweepResult.fit; bad keywords fail before training."""
    import pandas as pd

    import nerve_interp.models
    from nerve_interp.sweeps import WidthSweepResult

    seen = []

    class Built(Exception):
        pass

    def fake_make_lm(preset, **kw):
        seen.append((preset, kw))
        raise Built

    monkeypatch.setattr(nerve_interp.models, "make_lm", fake_make_lm)
    blocks = torch.ones(16, 8, dtype=torch.long)  # 128 tokens: N/D = 1 at D = 128
    for kw in ({"vocab_size": 64}, {"model_overrides": {"vocab_size": 64}}):
        with pytest.raises(Built):
            width_sweep([32, 64, 128], blocks, blocks, norms=("pre_ln",), progress=False,
                        n_over_d=1, **kw)
    assert seen[0] == seen[1] == ("tiny", {"seed": 0, "norm": "pre_ln", "d_ff": 32,
                                           "vocab_size": 64})
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['eval_block'\]"):
        width_sweep([32, 64, 128], blocks, blocks, eval_block=4)
    with pytest.raises(TypeError, match="train_config must be a TrainConfig; got dict"):
        width_sweep([32, 64, 128], blocks, blocks, train_config={"steps": 3})
    assert len(seen) == 2

    table = pd.DataFrame({"norm": "pre_ln", "width": [32, 64, 128] * 2, "seed": 0, "layer": 0,
                          "point": "post", "metric": ["soft_rank"] * 3 + ["eee"] * 3,
                          "value": [2.0, 3.1, 4.0, 0.5, 0.6, 0.7], "val_loss": 1.0})
    res = WidthSweepResult(table, pd.DataFrame())
    assert list(res.fit()["metric"]) == ["soft_rank"]
    assert list(res.fit(["eee", "soft_rank"])["metric"]) == ["eee", "soft_rank"]


def _never_built(monkeypatch):
    import nerve_interp.models

    def make_lm(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(nerve_interp.models, "make_lm", make_lm)


def test_width_sweep_n_over_d_is_checked_before_training(monkeypatch):
    """Too few validation blocks for the widest width: refused before any training, saying
    how many blocks are needed and the largest n_over_d these blocks allow."""
    _never_built(monkeypatch)
    val = torch.ones(32, 64, dtype=torch.long)  # 2,048 tokens
    with pytest.raises(ValueError, match=r"n_over_d=32\): the widest FFN \(D = 512\) is "
                       r"measured on ceil\(32·512 / 64\) = 256 validation blocks of 64 tokens "
                       r"\(16384 tokens\), but val_blocks has 32 \(2048 tokens\).*more "
                       r"held-out text, or a smaller n_over_d \(at most 4 with these"):
        width_sweep([64, 128, 512], val, val, progress=False)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "32"):
        with pytest.raises(ValueError, match="n_over_d = .*must be a finite number > 0"):
            width_sweep([64, 128, 512], val, val, n_over_d=bad, progress=False)
    with pytest.raises(ValueError, match=r"val_blocks must be a 2-D LongTensor"):
        width_sweep([64, 128, 512], val, val.flatten(), n_over_d=1, progress=False)


def test_width_sweep_eval_blocks_is_deprecated_but_works(monkeypatch):
    """eval_blocks=n: the first n validation blocks at every width (old behaviour), with a
    DeprecationWarning pointing to n_over_d at the caller's line."""
    import nerve_interp.sweeps

    seen = []

    def fake_run(preset, model_kw, cfg, train_blocks, val_blocks, eval_set, point):
        seen.append((model_kw["d_ff"], len(eval_set)))
        raise StopIteration

    monkeypatch.setattr(nerve_interp.sweeps, "_train_run", fake_run)
    val = torch.ones(80, 16, dtype=torch.long)
    with pytest.warns(DeprecationWarning, match=r"eval_blocks=\.\.\.\) is deprecated.*"
                      r"n_over_d= \(default 32\)") as rec, pytest.raises(StopIteration):
        width_sweep([16, 32, 64], val, val, eval_blocks=12, norms=("pre_ln",),
                    progress=False)
    assert rec[0].filename == __file__ and seen == [(16, 12)]
    with pytest.raises(StopIteration):  # the default: ceil(32·D / 16) = 2·D blocks
        width_sweep([16, 32, 20], val, val, norms=("pre_ln",), progress=False)
    assert seen[1:] == [(16, 32)]
    with pytest.raises(TypeError, match="both n_over_d= and the deprecated eval_blocks="):
        width_sweep([16, 32, 64], val, val, eval_blocks=12, n_over_d=4, progress=False)


def _table(n_seeds: int, seed: int = 0):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for width in (32, 64, 128, 256):
        for s in range(n_seeds):
            for layer in (0, 1):
                v = 2.0 * width**0.6 * np.exp(0.05 * rng.standard_normal())
                rows.append({"norm": "pre_ln", "width": width, "seed": s, "layer": layer,
                             "point": "post", "metric": "soft_rank", "value": v,
                             "n_tokens": 32 * width, "n_over_d": 32.0, "val_loss": 1.0})
    return pd.DataFrame(rows)


def test_width_sweep_fit_weights_by_the_seed_spread_only_with_enough_seeds():
    """Per-width means with their standard error over seeds: weighted (y_se) when every
    width has >= MIN_SEEDS_FOR_WEIGHTS seeds, else OLS on every (width, seed) point; the
    weighted fit equals fit_power_law on the means with y_se = sd / sqrt(n_seeds)."""
    import numpy as np
    import pandas as pd

    from nerve_interp.sweeps import MIN_SEEDS_FOR_WEIGHTS, WidthSweepResult

    many = WidthSweepResult(_table(MIN_SEEDS_FOR_WEIGHTS), pd.DataFrame())
    pw = many.per_width(["soft_rank"])
    per_model = many.table.groupby(["width", "seed"])["value"].median()
    mean = per_model.groupby("width").mean()
    se = per_model.groupby("width").std(ddof=1) / np.sqrt(MIN_SEEDS_FOR_WEIGHTS)
    np.testing.assert_allclose(pw["value"], mean.to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(pw["value_se"], se.to_numpy(), rtol=1e-12)
    assert (pw["n_seeds"] == MIN_SEEDS_FOR_WEIGHTS).all() and (pw["n_over_d"] == 32).all()
    fit = many.fit(["soft_rank"]).iloc[0]
    ref = fit_power_law(mean.index.to_numpy(), mean.to_numpy(), y_se=se.to_numpy())
    assert fit["weighted"] and fit["beta"] == pytest.approx(ref.beta, rel=1e-12)
    assert fit["beta_se"] == pytest.approx(ref.beta_se, rel=1e-12) and fit["n"] == 4
    ols = many.fit(["soft_rank"], weighted=False).iloc[0]
    assert not ols["weighted"] and ols["n"] == 4 * MIN_SEEDS_FOR_WEIGHTS

    two = WidthSweepResult(_table(2), pd.DataFrame())
    auto = two.fit(["soft_rank"]).iloc[0]
    assert not auto["weighted"] and auto["n"] == 8  # 2 seeds: too few for weights
    assert two.fit(["soft_rank"], weighted=True).iloc[0]["weighted"]
    one = WidthSweepResult(_table(1), pd.DataFrame())
    with pytest.raises(ValueError, match=r"needs a standard error > 0 at every width; 4 of 4"):
        one.fit(["soft_rank"], weighted=True)
    assert not one.fit(["soft_rank"]).iloc[0]["weighted"]


def test_untrained_sweep_is_the_model_at_init(tmp_path, monkeypatch):
    """untrained=True measures make_lm(preset, seed) as initialised: no optimizer step, the
    same values as capturing that model directly, kept apart from the trained runs."""
    import nerve_interp.training
    from nerve_interp.capture import collect_spectra
    from nerve_interp.models import make_lm

    g = torch.Generator().manual_seed(0)
    blocks = (torch.randint(0, 50, (64, 1), generator=g) + torch.arange(32)) % 50 + 1
    cfg = TrainConfig(steps=6, batch_size=8, warmup=1, eval_every=6)
    kw = dict(norms=("pre_ln",), preset="tiny", model_overrides={"vocab_size": 64},
              train_config=cfg, n_over_d=16, out_dir=tmp_path, progress=False, seeds=(0, 1))

    def no_training(*a, **k):
        raise AssertionError("an untrained sweep trained")

    with monkeypatch.context() as m:
        m.setattr(nerve_interp.training, "train", no_training)
        init = width_sweep([32, 48, 64], blocks, blocks[:32], untrained=True, **kw)
    assert sorted(p.name for p in tmp_path.glob("*.json"))[0] == "pre_ln-D32-s0-init.json"
    model = make_lm("tiny", seed=1, vocab_size=64, norm="pre_ln", d_ff=48)
    ref = collect_spectra(model, [blocks[:24]], points=("post",), progress=False)
    ref = ref.metrics().query("metric == 'soft_rank'").set_index("layer")["value"]
    got = init.table.query("metric == 'soft_rank' and width == 48 and seed == 1")
    np.testing.assert_allclose(got.set_index("layer")["value"].loc[ref.index], ref, rtol=1e-6)
    assert np.isclose(got["val_loss"].iloc[0], np.log(64), atol=0.5)  # about uniform at init
    trained = width_sweep([32, 48, 64], blocks, blocks[:32], **kw)
    assert len(list(tmp_path.glob("*.json"))) == 12
    assert not np.allclose(trained.table["value"], init.table["value"])
    # resume: the init runs come back from their own files
    monkeypatch.setattr(nerve_interp.training, "train", no_training)
    assert width_sweep([32, 48, 64], blocks, blocks[:32], untrained=True, **kw).table.equals(
        init.table)


def test_width_sweep_n_jobs_gives_the_same_sweep(tmp_path):
    """n_jobs=2 trains the runs in two spawned worker processes: the same table (in the same
    run order) and spectra as one process at the same threads per run, files written for
    resume; bad n_jobs is refused before any training."""
    g = torch.Generator().manual_seed(0)
    blocks = (torch.randint(0, 50, (64, 1), generator=g) + torch.arange(32)) % 50 + 1
    cfg = TrainConfig(steps=4, batch_size=8, warmup=1, eval_every=4)
    kw = dict(norms=("pre_ln",), preset="tiny", model_overrides={"vocab_size": 64},
              train_config=cfg, n_over_d=16, progress=False, seeds=(0, 1),
              keep_spectra=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of the two workers gets on any machine below
    try:
        one = width_sweep([32, 48, 64], blocks, blocks[:32], **kw)
        two = width_sweep([32, 48, 64], blocks, blocks[:32], n_jobs=2, out_dir=tmp_path,
                          **kw)
    finally:
        torch.set_num_threads(threads)
    assert two.table.equals(one.table) and len(list(tmp_path.glob("*.json"))) == 6
    key = ("pre_ln", 48, 1)
    np.testing.assert_array_equal(two.spectra[key].spectrum(1, "post").eigenvalues,
                                  one.spectra[key].spectrum(1, "post").eigenvalues)
    for bad, err in ((0, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(err, match="n_jobs"):
            width_sweep([32, 48, 64], blocks, blocks[:32], n_jobs=bad, **kw)
