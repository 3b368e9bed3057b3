"""Token subsampling (``token_fraction``): the spectra of exactly the tokens the documented
seeded rule keeps, against raw torch hooks and numpy in float64; determinism per batch index
(checkpoint resume, remote trace, multi-pass plan); metadata, checkpoint manifest and CLI."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from conftest import make_tiny, random_batch, raw_hook_points, ref_eigenvalues

import nerve_interp as ni
from nerve_interp.capture import subsample_mask
from nerve_interp.errors import CaptureError, ResultsFileError
from nerve_interp.tracking import SpectralTracker


def documented_keep(real: torch.Tensor, p: float, seed: int, i: int) -> torch.Tensor:
    """The rule of the docstring, written out: a CPU generator seeded with the first 8 bytes
    (little-endian, top bit cleared) of sha256("seed:i"), one float64 uniform per real token
    in row-major order, kept when u < p."""
    digest = hashlib.sha256(f"{seed}:{i}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    u = torch.rand(int(real.sum()), generator=g, dtype=torch.float64).tolist()
    keep = torch.zeros(real.shape, dtype=torch.bool)
    k = 0
    for r in range(real.shape[0]):
        for c in range(real.shape[1]):
            if real[r, c]:
                keep[r, c] = u[k] < p
                k += 1
    return keep


def batches_of(n, batch=8, seq=40):
    return [random_batch(batch=batch, seq=seq, seed=s) for s in range(n)]


def first_real(mask: torch.Tensor) -> torch.Tensor:
    """Position 0 among the real tokens of each row, by a plain loop."""
    out = torch.zeros_like(mask)
    for r in range(mask.shape[0]):
        cols = mask[r].nonzero()
        if len(cols):
            out[r, int(cols[0])] = True
    return out


@pytest.mark.parametrize("name,family", [("gpt2", "plain"), ("llama", "gated")])
def test_subsample_matches_raw_hooks_on_the_documented_rows(name, family):
    """exclude_positions=(0,), then the seeded draw, then max_tokens (binding mid-batch)."""
    model = make_tiny(name)
    batches = batches_of(6)
    p, seed, budget = 0.5, 7, 600
    keep, n_sub, total = [], 0, 0
    for i, b in enumerate(batches):
        real = b["attention_mask"].bool()
        rule = real & ~first_real(real)
        drawn = documented_keep(real, p, seed, i)
        if total < budget:  # batches after the budget is reached are not run
            n_sub += int((rule & ~drawn).sum())
        total += int((rule & drawn).sum())
        keep.append(rule & drawn)
    assert total > budget + 100  # the budget binds
    ref = raw_hook_points(model, batches, family, select=keep)
    res = ni.collect_spectra(model, batches, precision="fp64", exclude_positions=(0,),
                             token_fraction=p,
                             subsample_seed=seed, max_tokens=budget, progress=False)
    meta = res.metadata
    assert meta["n_tokens"] == budget
    assert meta["token_fraction"] == p and meta["subsample_seed"] == seed
    assert meta["n_excluded"]["subsampled"] == n_sub
    worst = 0.0
    for (layer, point), x in ref.items():
        if point not in res.points:
            continue
        want = ref_eigenvalues(x[:budget])  # the budget keeps the first rows, row-major
        worst = max(worst, float(np.max(np.abs(res.eigenvalues(layer, point) - want)) / want[0]))
    assert worst <= 1e-9, worst
    # the library's mask is that rule, and it does not depend on the padding's place
    for i, b in enumerate(batches[:2]):
        real = b["attention_mask"].bool()
        assert torch.equal(subsample_mask(real, p, seed, i), documented_keep(real, p, seed, i))


def test_fraction_one_is_no_subsampling_exactly():
    model = make_tiny("gpt2")
    batches = batches_of(3)
    off = ni.collect_spectra(model, batches, progress=False, max_tokens=500)
    one = ni.collect_spectra(model, batches, progress=False, max_tokens=500, token_fraction=1.0)
    assert one.metadata["n_tokens"] == off.metadata["n_tokens"] == 500
    assert one.metadata["n_excluded"]["subsampled"] == 0
    assert off.metadata["token_fraction"] is None
    for key, spec in off.items():
        np.testing.assert_array_equal(one.eigenvalues(*key), spec.eigenvalues)


def test_kept_fraction_is_binomial():
    """~4000 real tokens: the kept count is within 5 binomial standard deviations of p·n,
    for several fractions and seeds, and the kept + subsampled tokens are all real tokens."""
    model = make_tiny("gpt2")
    batches = batches_of(14, batch=8, seq=40)
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert 3500 < n_real < 4500
    for p, seed in ((0.1, 0), (0.3, 1), (0.5, 2), (0.9, 3)):
        res = ni.collect_spectra(model, batches, layers=[0], points=("post",), progress=False,
                                 diagnostics=False, token_fraction=p, subsample_seed=seed)
        kept = res.metadata["n_tokens"]
        assert kept + res.metadata["n_excluded"]["subsampled"] == n_real
        sd = math.sqrt(n_real * p * (1 - p))
        assert abs(kept - p * n_real) <= 5 * sd, (p, kept, n_real)
    # the first real token of each row is kept about as often as any other (no position bias)
    firsts = sum(int((first_real(b["attention_mask"].bool())
                      & subsample_mask(b["attention_mask"].bool(), 0.5, 0, i)).sum())
                 for i, b in enumerate(batches * 20))
    n_rows = 20 * sum(b["attention_mask"].shape[0] for b in batches)
    assert abs(firsts - n_rows / 2) <= 5 * math.sqrt(n_rows / 4)


def test_same_seed_same_result_other_seed_other_tokens():
    model = make_tiny("gpt2")
    batches = batches_of(3)
    kw = dict(progress=False, layers=[1], token_fraction=0.4)
    a = ni.collect_spectra(model, batches, subsample_seed=3, **kw)
    b = ni.collect_spectra(model, batches, subsample_seed=3, **kw)
    c = ni.collect_spectra(model, batches, subsample_seed=4, **kw)
    assert a.metadata["n_tokens"] == b.metadata["n_tokens"]
    for key, spec in a.items():
        np.testing.assert_array_equal(b.eigenvalues(*key), spec.eigenvalues)
        assert not np.allclose(c.eigenvalues(*key), spec.eigenvalues, rtol=1e-6)


def test_bad_fractions_and_non_token_inputs():
    model = make_tiny("gpt2")
    batches = [random_batch()]
    kw = dict(progress=False, layers=[0])
    for bad in (0, 0.0, -0.5, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"token_fraction == .*, must be in \(0, 1\]"):
            ni.collect_spectra(model, batches, token_fraction=bad, **kw)
    with pytest.raises(TypeError, match="token_fraction must be a number"):
        ni.collect_spectra(model, batches, token_fraction="0.5", **kw)
    with pytest.raises(ValueError, match="subsample_seed == -1, must be >= 0"):
        ni.collect_spectra(model, batches, token_fraction=0.5, subsample_seed=-1, **kw)
    with pytest.raises(ValueError, match=r"token_fraction == 2"):
        SpectralTracker(batches, token_fraction=2)
    from test_sites import FunctionalNet

    with pytest.raises(CaptureError, match="no input_ids, so token_fraction=0.5 cannot apply"):
        ni.collect_spectra(FunctionalNet().eval(), [torch.randn(2, 5, 8)], token_fraction=0.5,
                           progress=False)
    # every token drawn away: the error says so
    tiny = [{"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3)}]
    with pytest.raises(CaptureError, match="3 by token_fraction=1e-09"):
        ni.collect_spectra(model, tiny, token_fraction=1e-9, **kw)


def test_checkpoint_resume_same_draw_and_other_fraction_refused(tmp_path):
    model = make_tiny("gpt2")
    batches = batches_of(4)
    ckpt = tmp_path / "run.ckpt"
    kw = dict(progress=False, layers=[0, 1], token_fraction=0.5, subsample_seed=2)
    ni.collect_spectra(model, batches[:2], checkpoint=ckpt, **kw)
    for change, match in ((dict(token_fraction=0.25),
                           r"options.token_fraction: checkpoint 0.5, this run 0.25"),
                          (dict(subsample_seed=3),
                           r"options.subsample_seed: checkpoint 2, this run 3"),
                          (dict(token_fraction=None),
                           r"options.subsample_seed: checkpoint 2, this run None")):
        with pytest.raises(ResultsFileError, match=r"other capture options(.|\n)*" + match):
            ni.collect_spectra(model, batches, checkpoint=ckpt, **(kw | change))
    resumed = ni.collect_spectra(model, batches, checkpoint=ckpt, **kw)
    full = ni.collect_spectra(model, batches, **kw)
    assert resumed.metadata["n_tokens"] == full.metadata["n_tokens"]
    assert resumed.metadata["n_excluded"] == full.metadata["n_excluded"]
    for key, spec in full.items():
        np.testing.assert_array_equal(resumed.eigenvalues(*key), spec.eigenvalues)


def test_metadata_round_trips_and_tracker_forwards(tmp_path):
    model = make_tiny("gpt2")
    batches = batches_of(2)
    res = ni.collect_spectra(model, batches, progress=False, layers=[0], token_fraction=0.3,
                             subsample_seed=5)
    res.save(tmp_path / "s.safetensors")
    back = ni.SpectraResult.load(tmp_path / "s.safetensors")
    for key in ("token_fraction", "subsample_seed", "n_excluded", "n_tokens"):
        assert back.metadata[key] == res.metadata[key], key
    assert back.metadata["n_excluded"]["subsampled"] > 0
    tracker = SpectralTracker(batches, layers=[0], token_fraction=0.3, subsample_seed=5)
    tracker.measure(model, 0)
    tracker.measure(model, 1)  # the same tokens at every step
    assert tracker.metadata["token_fraction"] == 0.3 and tracker.metadata["subsample_seed"] == 5
    pr = tracker.frame.query("metric == 'participation_ratio' and point == 'post'")
    assert pr["value"].nunique() == 1
    want = res.metrics().query("layer == 0 and point == 'post' and metric == "
                               "'participation_ratio'")["value"].item()
    assert pr["value"].iloc[0] == pytest.approx(want, rel=1e-5)  # tracker: float32 Gram


def test_multi_pass_plan_and_remote_keep_the_same_tokens(tiny_tokenizer):
    from nnsight import TransformersModel

    batches = [random_batch(seed=s) for s in range(6)]
    for b in batches:  # right padding only (see test_remote)
        b["attention_mask"][3] = 1
    model = TransformersModel(make_tiny("gpt2"), tokenizer=tiny_tokenizer)
    kw = dict(progress=False, token_fraction=0.5, subsample_seed=1, precision="fp64")
    local = ni.collect_spectra(model, batches, **kw)
    remote = ni.collect_spectra(model, batches, remote="local", **kw)
    passes = ni.collect_spectra(model, batches, memory_budget=1_150_000, **kw)
    assert len(passes.metadata["passes"]) == 3
    for other in (remote, passes):
        assert other.metadata["n_tokens"] == local.metadata["n_tokens"]
        assert other.metadata["n_excluded"]["subsampled"] == \
            local.metadata["n_excluded"]["subsampled"] > 0
        assert other.metadata["token_fraction"] == 0.5
        for key, spec in local.items():
            want, got = spec.eigenvalues, other.eigenvalues(*key)
            assert np.max(np.abs(got - want)) <= 1e-10 * want[0], key


def test_cli_token_fraction(tmp_path, run_spectra):
    out = tmp_path / "out"
    res = run_spectra("--max-tokens", "400", "--out", out, "--layers", "0",
                      "--token-fraction", "0.5", "--subsample-seed", "4")
    assert res.exit_code == 0, res.output
    assert "capture 400 tokens" in res.output
    assert "subsampled token fraction 0.5 (seed 4)" in res.output
    back = ni.SpectraResult.load(out / "spectra.safetensors")
    assert back.metadata["token_fraction"] == 0.5 and back.metadata["subsample_seed"] == 4
    assert back.metadata["n_excluded"]["subsampled"] > 0
    bad = run_spectra("--out", str(tmp_path / "o"), "--token-fraction", "2")
    assert bad.exit_code == 2 and "token_fraction == 2.0" in bad.output
