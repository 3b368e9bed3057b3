"""The capture pipeline's pieces (nerve_interp/capture/): options checked once, the token
selection against a rule written out here, the tally, the backends' refusals, row alignment,
and warnings that point at the caller's line."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from conftest import make_tiny, random_batch

import nerve_interp as ni
from nerve_interp.capture import CaptureOptions
from nerve_interp.capture.backends import align_rows, backend_for, check_alignment
from nerve_interp.capture.selection import Selection, Tally, TokenSelector, subsample_mask
from nerve_interp.capture.source import Batch
from nerve_interp.diagnostics import ExclusionRule
from nerve_interp.errors import CaptureError, RankDeficientWarning, SiteError

CPU = torch.device("cpu")


def build(**kw):
    return CaptureOptions.build(kw, device=CPU, vocab_size=97)


# ------------------------------------------------------------------ options
@pytest.mark.parametrize("kw, err, match", [
    (dict(max_tokens="500"), TypeError, "max_tokens must be an int"),
    (dict(max_tokens=1), ValueError, r"max_tokens == 1, must be >= 2"),
    (dict(max_tokens=2.5), TypeError, "max_tokens must be an int"),
    (dict(layers="0,5"), TypeError, "layers must be an int, a sequence of ints"),
    (dict(layers=[0.5]), TypeError, r"layers must be ints .* float 0.5"),
    (dict(layers=[True]), TypeError, "layers must be ints"),
    (dict(eigenvectors="no"), TypeError, "eigenvectors must be True or False"),
    (dict(progress=2), TypeError, "progress must be True or False"),
    (dict(diagnostics=None), TypeError, "diagnostics must be True or False"),
    (dict(points=()), SiteError, "points is empty"),
    (dict(points=("pre", "mid")), SiteError, "unknown point 'mid'"),
    (dict(batch_size=0), ValueError, "batch_size == 0, must be >= 1"),
    (dict(max_length="64"), TypeError, "max_length must be an int"),
    (dict(checkpoint_every=0), ValueError, "checkpoint_every == 0"),
    (dict(token_fraction="0.5"), TypeError, "token_fraction must be a number"),
    (dict(outlier_fraction=1.5), ValueError, "outlier_fraction"),
    (dict(precision="bf16"), ValueError, "refused"),
    (dict(max_token=5), TypeError, r"unknown capture option\(s\) \['max_token'\]"),
])
def test_options_refuse_bad_input_once(kw, err, match):
    with pytest.raises(err, match=match):
        build(**kw)


def test_bad_options_are_refused_before_the_model_runs():
    """collect_spectra checks its options before any trace: a model that fails when run
    never runs."""
    model = make_tiny("gpt2")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(TypeError, match="max_tokens must be an int"):
        ni.collect_spectra(model, [random_batch()], max_tokens="500", progress=False)
    with pytest.raises(TypeError, match="layers must be ints"):
        ni.collect_spectra(model, [random_batch()], layers=[0.5], progress=False)
    assert calls == []


def test_options_normalise_and_replay():
    opts = build(points=("post", "pre"), layers=[-1, 0], max_tokens=np.int64(300),
                 exclude_positions=(2,), skip_first=0, precision="auto")
    assert opts.points == ("pre", "post")  # forward order
    assert opts.layers == (-1, 0) and type(opts.max_tokens) is int
    assert opts.precision == "fp32"  # "auto"
    assert opts.rule == ExclusionRule(positions=(2,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.max_tokens = 5
    again = dataclasses.replace(opts, layers=(1,), points=("post",))
    assert again.layers == (1,) and again.max_tokens == 300 and opts.layers == (-1, 0)


def test_manifest_and_metadata_come_from_the_options():
    """A known answer for the checkpoint manifest (the format older checkpoints were
    written in, so they still resume)."""
    model = make_tiny("gpt2")
    site = ni.find_ffn_sites(model)[0]
    opts = build(points=("pre", "post"), max_tokens=100, exclude_token_ids=(3,),
                 token_fraction=0.5, subsample_seed=7)
    man = opts.manifest({"model": "m", "model_class": "C"}, [site], rank=1, world_size=2)
    assert man == {
        "model": "m", "model_class": "C",
        "sites": {"layers.0.ffn.pre": site.paths["pre"], "layers.0.ffn.post": site.paths["post"]},
        "options": {"points": ["pre", "post"], "max_tokens": 100, "skip_first": 0,
                    "precision": "fp32", "exclusion": opts.rule.to_dict(),
                    "token_fraction": 0.5, "subsample_seed": 7},
        "shard": {"rank": 1, "world_size": 2}}
    plain = build().manifest({"model": "m", "model_class": "C"}, [site])
    assert set(plain["options"]) == {"points", "max_tokens", "skip_first", "precision"}
    meta = opts.metadata()
    assert meta["token_fraction"] == 0.5 and meta["exclusion"]["token_ids"] == [3]


@pytest.mark.filterwarnings("ignore::nerve_interp.errors.RankDeficientWarning")
@pytest.mark.parametrize("kw, new", [(dict(skip_first=1), "exclude_positions=range"),
                                     (dict(gram_dtype=torch.float32), "precision=")])
def test_synonym_keywords_are_deprecated_but_work(kw, new):
    model = make_tiny("gpt2")
    with pytest.warns(DeprecationWarning, match=new) as rec:
        old = ni.collect_spectra(model, [random_batch()], progress=False, layers=[0], **kw)
    assert rec[0].filename == __file__  # at the caller's line
    want = (dict(exclude_positions=(0,)) if "skip_first" in kw else dict(precision="fp32"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        cur = ni.collect_spectra(model, [random_batch()], progress=False, layers=[0], **want)
    np.testing.assert_array_equal(old.eigenvalues(0, "post"), cur.eigenvalues(0, "post"))


# ------------------------------------------------------------------ selection
def test_selection_against_the_rule_written_out():
    """Positions among real tokens, ids, subsampling, then the budget: a mask built here
    from SPEC.md §1 with plain loops."""
    b = random_batch(batch=4, seq=24, seed=3)
    rule = ExclusionRule(positions=(0, 1), token_ids=(5, 9, 11))
    sel = TokenSelector(rule, 0.7, 4, CPU, with_meta=True)
    tally = Tally()
    got = sel.select(Batch(2, b), remaining=40, tally=tally)
    ids, real = b["input_ids"], b["attention_mask"].bool()
    draw = subsample_mask(real, 0.7, 4, 2)
    want, n_pos, n_ids, n_sub = [], 0, 0, 0
    for r in range(ids.shape[0]):
        pos = -1
        for c in range(ids.shape[1]):
            if not real[r, c]:
                continue
            pos += 1
            if pos in (0, 1):
                n_pos += 1
            elif int(ids[r, c]) in (5, 9, 11):
                n_ids += 1
            elif not draw[r, c]:
                n_sub += 1
            else:
                want.append((r, c, pos))
    want = want[:40]
    flat = [r * ids.shape[1] + c for r, c, _ in want]
    assert got.idx.tolist() == flat and got.mask_shape == (4, 24) and got.remaining == 40
    assert got.meta[:, 0].eq(2).all()
    assert got.meta[:, 1:3].tolist() == [[r, p] for r, _, p in want]
    assert got.meta[:, 3].tolist() == [int(ids[r, c]) for r, c, _ in want]
    assert (tally.positions, tally.token_ids, tally.subsampled) == (n_pos, n_ids, n_sub)
    assert tally.real == int(real.sum()) and tally.longest == int(real.sum(1).max())


def test_selection_empty_batch_and_non_token_inputs():
    sel = TokenSelector(ExclusionRule(), None, 0, CPU, with_meta=False)
    tally = Tally()
    pad = {"input_ids": torch.ones(2, 5, dtype=torch.long),
           "attention_mask": torch.zeros(2, 5, dtype=torch.long)}
    assert sel.select(Batch(0, pad), None, tally) is None and tally.empty_batches == 0
    first_only = ExclusionRule(positions=(0,))
    one = {"input_ids": torch.ones(1, 1, dtype=torch.long)}
    assert TokenSelector(first_only, None, 0, CPU, with_meta=False).select(
        Batch(0, one), None, tally) is None
    assert tally.empty_batches == 1 and tally.positions == 1
    floats = Batch(3, {"_args": (torch.randn(4, 8),)})
    got = TokenSelector(ExclusionRule(), None, 0, CPU, with_meta=True).select(floats, 3, tally)
    assert got.idx is None and got.remaining == 3 and got.meta.tolist() == [[3, -1, -1, -1]]
    with pytest.raises(CaptureError, match="no input_ids, so token_fraction=0.5"):
        TokenSelector(ExclusionRule(), 0.5, 0, CPU, with_meta=False).select(floats, None, tally)


def test_tally_round_trip_and_sum():
    t = Tally(real=10, positions=2, token_ids=1, subsampled=3, empty_batches=1, longest=7)
    assert Tally.from_dict(t.to_dict()) == t
    assert Tally.from_dict({"real": 4, "unknown": 1}) == Tally(real=4)
    assert t.summed(lambda n: 2 * n) == Tally(20, 4, 2, 6, 2, 7)  # longest stays local


# ------------------------------------------------------------------ backends
def test_backends_say_what_they_cannot_do():
    model = make_tiny("gpt2")
    wrapper = ni.sites.as_nnsight(model)
    assert backend_for(wrapper, build()).name == "local"
    with pytest.raises(ValueError, match="remote backend cannot apply exclude_norm_above"):
        backend_for(wrapper, build(remote="local", exclude_norm_above=5))
    with pytest.raises(CaptureError, match="TransformersModel"):
        backend_for(wrapper, build(remote="local"))


def test_row_alignment_is_checked_once_for_both_backends():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    sel = Selection(torch.tensor([0, 4, 5]), (2, 3), None)
    np.testing.assert_array_equal(align_rows(x, sel, "p").numpy(), x.reshape(6, 4)[[0, 4, 5]])
    np.testing.assert_array_equal(align_rows(x.reshape(6, 4), sel, "p").numpy(),
                                  x.reshape(6, 4)[[0, 4, 5]])  # flattened (OPT)
    assert align_rows(x, Selection(None, None, 4), "p").shape == (4, 4)
    with pytest.raises(CaptureError, match=r"p: activations of shape \(3, 2, 4\) cannot be"):
        check_alignment((3, 2, 4), (2, 3), "p")


# ------------------------------------------------------------------ warnings
def test_warnings_point_at_the_callers_line_through_a_multi_pass_plan():
    model = make_tiny("gpt2")
    with pytest.warns(RankDeficientWarning) as rec:
        ni.collect_spectra(model, [random_batch()], progress=False, memory_budget=1_150_000)
    assert rec[0].filename == __file__
