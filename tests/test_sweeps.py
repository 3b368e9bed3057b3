"""width_sweep: one model per width, final spectra, fits, and resume from out_dir."""

from __future__ import annotations

import json

import pytest
import torch

from nerve_interp.scaling import fit_power_law
from nerve_interp.sweeps import width_sweep
from nerve_interp.training import TrainConfig


def test_width_sweep_fits_and_resumes(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    blocks = (torch.randint(0, 50, (64, 1), generator=g) + torch.arange(32)) % 50 + 1
    cfg = TrainConfig(steps=6, batch_size=8, warmup=1, eval_every=6)
    kw = dict(norms=("pre_ln",), preset="tiny", model_overrides={"vocab_size": 64},
              train_config=cfg, eval_blocks=32, out_dir=tmp_path, progress=False)
    res = width_sweep([32, 64, 128], blocks, blocks[:32], **kw)
    t = res.table
    assert sorted(t["width"].unique()) == [32, 64, 128] and set(t["layer"]) == {0, 1}
    assert len(list(tmp_path.glob("*.json"))) == 3
    fit = res.fits.set_index("metric").loc["soft_rank"]
    per_width = (t[t["metric"] == "soft_rank"].groupby("width")["value"].median())
    ref = fit_power_law(per_width.index.to_numpy(), per_width.to_numpy())
    assert fit["beta"] == ref.beta and fit["n"] == 3
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

    g = torch.Generator().manual_seed(0)
    blocks = (torch.randint(0, 50, (64, 1), generator=g) + torch.arange(32)) % 50 + 1
    cfg = TrainConfig(steps=4, batch_size=8, warmup=1, eval_every=4)
    kw = dict(norms=("pre_ln",), preset="tiny", model_overrides={"vocab_size": 64},
              train_config=cfg, eval_blocks=32, out_dir=tmp_path, progress=False)
    width_sweep([32, 64, 128], blocks, blocks[:32], **kw)  # metrics only
    assert not list(tmp_path.glob("*.safetensors"))
    res = width_sweep([32, 64, 128], blocks, blocks[:32], keep_spectra=True, **kw)
    assert sorted(res.spectra) == [("pre_ln", 32, 0), ("pre_ln", 64, 0), ("pre_ln", 128, 0)]
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    for (_, width, _), spectra in res.spectra.items():
        m = spectra.metrics().query("metric == 'soft_rank'")["value"].to_numpy()
        t = res.table
        want = t[(t["width"] == width) & (t["metric"] == "soft_rank")]["value"]
        np.testing.assert_allclose(m, want.to_numpy(), rtol=1e-12)

    def no_training(*a, **k):
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr(nerve_interp.training, "train", no_training)
    again = width_sweep([32, 64, 128], blocks, blocks[:32], keep_spectra=True, **kw)
    for key, spectra in res.spectra.items():
        np.testing.assert_array_equal(again.spectra[key].eigenvalues(0, "post"),
                                      spectra.eigenvalues(0, "post"))
    assert width_sweep([32, 64, 128], blocks, blocks[:32], **kw).spectra == {}


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
    blocks = torch.ones(4, 8, dtype=torch.long)
    for kw in ({"vocab_size": 64}, {"model_overrides": {"vocab_size": 64}}):
        with pytest.raises(Built):
            width_sweep([32, 64, 128], blocks, blocks, norms=("pre_ln",), progress=False, **kw)
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
