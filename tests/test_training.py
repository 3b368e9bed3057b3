"""Training loop: optimizers learn, runs are deterministic and resume exactly; tracking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_tiny

from nerve_interp.errors import FiniteSampleWarning, ResultsFileError
from nerve_interp.tracking import REINJECTION_POINT, SpectralTracker
from nerve_interp.training import TrainConfig, lr_at, train


def blocks(n=64, seq=24, seed=0):
    """A learnable toy language: each row counts up from a random start (mod 90) + 2."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 90, (n, 1), generator=g)
    return (start + torch.arange(seq)) % 90 + 2


@pytest.mark.parametrize("optimizer,lr", [("adamw", 3e-3), ("sgd", 0.3), ("muon", 0.02),
                                          ("lion", 2e-3)])
def test_optimizers_learn(optimizer, lr):
    model = make_tiny("llama")
    cfg = TrainConfig(steps=40, batch_size=8, lr=lr, warmup=5, optimizer=optimizer,
                      eval_every=20)
    run = train(model, blocks(), blocks(16, seed=1), cfg, progress=False)
    h = run.history
    train_loss = h[h["split"] == "train"]["loss"].to_numpy()
    assert train_loss[-5:].mean() < train_loss[:5].mean() - 0.5, optimizer
    assert set(h[h["split"] == "val"]["step"]) == {20, 40}


def test_deterministic_and_exact_resume(tmp_path):
    from nerve_interp.training import Callback

    cfg = TrainConfig(steps=12, batch_size=4, warmup=2, eval_every=6, checkpoint_every=6)
    a = train(make_tiny("llama"), blocks(), blocks(8, seed=1), cfg, progress=False)
    b = train(make_tiny("llama"), blocks(), blocks(8, seed=1), cfg, progress=False)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)

    class Interrupt(Callback):  # a crash after step 7, one step past the checkpoint at 6
        def on_step_end(self, model, state):
            if state.step == 7:
                raise KeyboardInterrupt

    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train(make_tiny("llama"), blocks(), blocks(8, seed=1), cfg, checkpoint=ckpt,
              callbacks=[Interrupt()], progress=False)
    assert torch.load(ckpt, weights_only=True)["step"] == 6
    resumed = train(make_tiny("llama"), blocks(), blocks(8, seed=1), cfg, checkpoint=ckpt,
                    progress=False)
    for pa, pb in zip(a.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    pd_a, pd_r = a.history, resumed.history
    assert pd_r["loss"].tolist() == pd_a["loss"].tolist()
    assert pd_r["step"].tolist() == pd_a["step"].tolist()


def test_checkpoint_from_other_config_is_refused(tmp_path):
    ckpt = tmp_path / "run.pt"
    train(make_tiny("llama"), blocks(), None, TrainConfig(steps=2, warmup=1), checkpoint=ckpt,
          progress=False)
    with pytest.raises(ResultsFileError, match=r"another TrainConfig:\n  steps: checkpoint 2, "
                                               r"this run 3\nDelete it or pass the same"):
        train(make_tiny("llama"), blocks(), None, TrainConfig(steps=3, warmup=1),
              checkpoint=ckpt, progress=False)
    # a finished run resumed on other data would silently return the old run: refused
    with pytest.raises(ResultsFileError, match="other data.*Pass the same data, or delete it"):
        train(make_tiny("llama"), blocks(seed=5), None, TrainConfig(steps=2, warmup=1),
              checkpoint=ckpt, progress=False)


def test_config_errors():
    with pytest.raises(ValueError, match="optimizer='adam'"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="steps == 0"):
        TrainConfig(steps=0)
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_spectral_tracker():
    val = blocks(8, seed=3)
    tracker = SpectralTracker([val], every=5)
    with pytest.warns(FiniteSampleWarning, match=r"N/D = 1\.5 < 10") as rec:  # 192 tokens, D 128
        run = train(make_tiny("gpt2"), blocks(), val,
                    TrainConfig(steps=12, warmup=2, eval_every=6), callbacks=[tracker],
                    progress=False)
    # said once, at the first measurement, not at each of the 4
    assert sum(issubclass(w.category, FiniteSampleWarning) for w in rec) == 1
    f = tracker.frame
    assert (f["n_tokens"] == 192).all() and np.allclose(f["n_over_d"], 1.5)
    assert sorted(f["step"].unique()) == [0, 5, 10, 12]
    assert set(f["point"]) == {"pre", "post", REINJECTION_POINT}
    assert {"participation_ratio", "js_divergence", "pr_gain"} <= set(f["metric"])
    assert f[f["step"] == 12]["val_loss"].notna().all()
    assert math.isnan(f[f["step"] == 0]["train_loss"].iloc[0])
    assert 0 < tracker.seconds <= run.callback_seconds + 1e-6
    # the tracker measures the same tokens every time: step-0 PR equals a direct capture
    import nerve_interp as ni

    fresh = make_tiny("gpt2")
    direct = ni.collect_spectra(fresh, [val], progress=False).metrics()
    want = direct.query("layer == 1 and point == 'post' and metric == 'participation_ratio'")
    got = f.query("step == 0 and layer == 1 and point == 'post' and "
                  "metric == 'participation_ratio'")
    assert got["value"].item() == pytest.approx(want["value"].item(), rel=1e-5)


def test_hf_trainer_callback(tmp_path):
    from transformers import Trainer, TrainingArguments

    from nerve_interp.tracking import HFSpectralCallback

    data = blocks(32)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"input_ids": data[i], "labels": data[i]}

    tracker = SpectralTracker([blocks(8, seed=5)], every=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                             report_to=[], logging_steps=1, save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    Trainer(model=make_tiny("llama"), args=args, train_dataset=DS(),
            callbacks=[HFSpectralCallback(tracker)]).train()
    f = tracker.frame
    assert sorted(f["step"].unique()) == [0, 2, 4]
    assert f[f["step"] == 4]["train_loss"].notna().all()


def test_tracker_checks_its_capture_options_before_training():
    """SpectralTracker passes any collect_spectra option on, checked when it is built (a
    typo must not surface after the first training steps)."""
    from nerve_interp.tracking import SpectralTracker

    val = torch.ones(2, 8, dtype=torch.long)
    with pytest.raises(TypeError, match=r"unknown capture option\(s\) \['max_token'\]"):
        SpectralTracker([val], max_token=100)
    with pytest.raises(TypeError, match="max_tokens must be an int"):
        SpectralTracker([val], max_tokens="100")
    with pytest.raises(TypeError, match="checkpoint="):
        SpectralTracker([val], checkpoint="x.ckpt")
    with pytest.warns(DeprecationWarning, match="gram_dtype"):
        t = SpectralTracker([val], gram_dtype=torch.float64, layers=[0], points=("post",))
    assert t.capture["precision"] == "fp64" and t.points == ("post",) and not t.reinjection
