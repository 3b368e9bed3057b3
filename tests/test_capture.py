"""nnsight capture against an independent raw-hook float64 reference, and its bad-input errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import TINY, make_tiny, random_batch, raw_hook_points, ref_eigenvalues
from test_sites import FunctionalNet

import nerve_interp as ni
from nerve_interp.errors import CaptureError, RankDeficientWarning, ResultsFileError, SiteError

GATED = {"llama", "mistral", "qwen2", "gemma3"}


def family_of(name):
    return "gated" if name in GATED else {"bert": "bert", "opt": "opt"}.get(name, "plain")


@pytest.mark.parametrize("name", sorted(TINY))
def test_capture_matches_raw_hooks(name):
    model = make_tiny(name)
    batches = [random_batch(seed=s) for s in range(3)]
    ref = raw_hook_points(model, batches, family_of(name))
    points = ("pre", "act", "up", "post") if name in GATED else ("pre", "post")
    res = ni.collect_spectra(model, batches, points=points, progress=False, eigenvectors=True)
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert res.metadata["n_tokens"] == n_real
    for (layer, point), x in ref.items():
        got, want = res.eigenvalues(layer, point), ref_eigenvalues(x)
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) / want[0] <= 1e-6, (layer, point)
        np.testing.assert_allclose(res.mean(layer, point), x.mean(0), rtol=1e-9, atol=1e-9)
        assert res.spectrum(layer, point).n_samples == n_real


def test_gated_post_is_act_times_up():
    model = make_tiny("llama")
    ref = raw_hook_points(model, [random_batch()], "gated")
    np.testing.assert_allclose(ref[(0, "post")], ref[(0, "act")] * ref[(0, "up")], rtol=1e-6)


def test_padding_is_excluded():
    """Same real tokens with and without extra padding give the same spectrum."""
    model = make_tiny("gpt2")
    ids = torch.randint(2, 97, (2, 10))
    plain = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded_ids = torch.cat([ids, torch.zeros(2, 6, dtype=ids.dtype)], 1)
    padded = {"input_ids": padded_ids,
              "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros(2, 6)], 1).long()}
    a = ni.collect_spectra(model, [plain], progress=False, layers=[0])
    b = ni.collect_spectra(model, [padded], progress=False, layers=[0])
    assert a.metadata["n_tokens"] == b.metadata["n_tokens"] == 20
    np.testing.assert_allclose(a.eigenvalues(0, "post"), b.eigenvalues(0, "post"), atol=1e-9)


def test_rank_deficient_warning():
    with pytest.warns(RankDeficientWarning,
                      match=r"N = 30 tokens <= D = 128 at 2 of 2 points \(layers.0.ffn.pre") as rec:
        ni.collect_spectra(make_tiny("gpt2"), [random_batch()], max_tokens=30, layers=[0],
                           progress=False)
    assert len(rec) == 1 and rec[0].filename == __file__  # one warning, at the user's line


def test_finite_sample_warning_once_per_capture():
    """N/D < 10 but N > D: one FiniteSampleWarning for the capture (not one per point), with
    the floor at that N/D and the token count that reaches N/D = 10; none at N/D >= 10."""
    from nerve_interp.errors import FiniteSampleWarning

    model = make_tiny("gpt2")  # D = 128
    batches = [random_batch(seed=s) for s in range(8)]
    with pytest.warns(FiniteSampleWarning, match=r"N/D = 3 < 10 \(N = 384 tokens, D = 128\) "
                      r"at 4 of 4 points .*At N/D = 3 white noise .* Raise max_tokens to "
                      r">= 1280") as rec:
        ni.collect_spectra(model, batches, max_tokens=384, layers=[0, 1], progress=False)
    assert [w.category for w in rec] == [FiniteSampleWarning] and rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error", FiniteSampleWarning)
        ni.collect_spectra(make_tiny("gpt2"), [random_batch(batch=64, seq=24)], layers=[0],
                           progress=False)  # 1520 real tokens >= 10·D


def test_max_tokens_and_layers_and_stop():
    model = make_tiny("pythia")
    batches = [random_batch(seed=s) for s in range(5)]
    res = ni.collect_spectra(model, batches, max_tokens=100, layers=[-1], progress=False)
    assert res.metadata["n_tokens"] == 100 and res.layers == [2]
    assert res.spectrum(2, "pre").n_samples == 100
    with pytest.raises(SiteError, match="out of range"):
        ni.collect_spectra(model, batches, layers=[7], progress=False)
    with pytest.raises(SiteError, match="no 'act' point"):
        ni.collect_spectra(model, batches, points=("pre", "act"), progress=False)


def test_strings_with_tokenizer(tiny_tokenizer):
    model = make_tiny("gpt2")
    texts = ["w1 w2 w3 w4 w5", "w6 w7", "w8 w9 w3 w5"] * 4
    res = ni.collect_spectra(model, texts, tokenizer=tiny_tokenizer, batch_size=5,
                             progress=False)
    lens = [len(tiny_tokenizer(t)["input_ids"]) for t in texts]
    assert lens[:3] == [5, 2, 4]
    assert res.metadata["n_tokens"] == sum(lens)
    with pytest.raises(TypeError, match="no tokenizer"):
        ni.collect_spectra(model, texts, progress=False)


def test_empty_and_all_padding_data():
    model = make_tiny("gpt2")
    with pytest.raises(CaptureError, match="no tokens"):
        ni.collect_spectra(model, [], progress=False)
    ids = torch.randint(2, 97, (2, 5))
    with pytest.raises(CaptureError, match="every token was padding"):
        ni.collect_spectra(model, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}],
                           progress=False)


def test_nan_activation_names_site_and_batch():
    model = make_tiny("gpt2")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.bias[3] = float("nan")
    with pytest.raises(CaptureError, match=r"batch 0.*\n.*layers\.1\.ffn\.pre.*NaN/inf"):
        ni.collect_spectra(model, [random_batch()], progress=False)


def test_function_activation_model():
    net = FunctionalNet().eval()
    x = torch.randn(4, 6, 8)
    res = ni.collect_spectra(net, [x], precision="fp64",
                             progress=False)  # float input: every row is data
    h = net.blocks[0].mlp.fc_in(x).detach().reshape(-1, 16).double().numpy()
    np.testing.assert_allclose(res.eigenvalues(0, "pre"), ref_eigenvalues(h), rtol=1e-9,
                               atol=1e-12)
    # the float tensor itself (not wrapped in a list) is split into batches along dim 0
    whole = ni.collect_spectra(net, x, precision="fp64", progress=False, batch_size=3)
    assert whole.metadata["n_batches"] == 2 and whole.metadata["n_tokens"] == 24
    np.testing.assert_allclose(whole.eigenvalues(0, "pre"), ref_eigenvalues(h), rtol=1e-9,
                               atol=1e-12)


def test_checkpoint_resume(tmp_path):
    model = make_tiny("gpt2")
    batches = [random_batch(seed=s) for s in range(6)]
    ckpt = tmp_path / "run.ckpt"
    full = ni.collect_spectra(model, batches, progress=False)
    ni.collect_spectra(model, batches[:4], progress=False, checkpoint=ckpt, checkpoint_every=2)
    resumed = ni.collect_spectra(model, batches, progress=False, checkpoint=ckpt)
    assert resumed.metadata["n_tokens"] == full.metadata["n_tokens"]
    for layer in full.layers:
        np.testing.assert_allclose(resumed.eigenvalues(layer, "post"),
                                   full.eigenvalues(layer, "post"), rtol=1e-10, atol=1e-12)
    with pytest.raises(ResultsFileError, match="another model"):
        ni.collect_spectra(make_tiny("pythia"), batches, progress=False, checkpoint=ckpt)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ResultsFileError, match="corrupt"):
        ni.collect_spectra(model, batches, progress=False, checkpoint=bad)


def test_nnsight_transformers_model_wrapper(tiny_tokenizer):
    """A model the user already wrapped with nnsight's TransformersModel works the same."""
    from nnsight import TransformersModel

    # right padding only: TransformersModel gives left-padded rows position ids that start at
    # their first real token, a plain HF forward does not (GPT-2 has absolute positions)
    batches = [random_batch(seed=s) for s in range(2)]
    for b in batches:
        b["attention_mask"][3] = 1
    plain = ni.collect_spectra(make_tiny("gpt2"), batches, progress=False)
    wrapped = TransformersModel(make_tiny("gpt2"), tokenizer=tiny_tokenizer)
    res = ni.collect_spectra(wrapped, batches, progress=False)
    for layer in plain.layers:
        np.testing.assert_allclose(res.eigenvalues(layer, "post"), plain.eigenvalues(layer, "post"),
                                   rtol=1e-10, atol=1e-12)


def test_forward_stops_after_last_needed_layer():
    model = make_tiny("llama")
    calls = []
    handles = [model.model.layers[i].register_forward_hook(
        lambda m, a, o, i=i: calls.append(i)) for i in range(3)]
    handles.append(model.lm_head.register_forward_hook(lambda m, a, o: calls.append("head")))
    try:
        ni.collect_spectra(model, [random_batch()], layers=[1], progress=False)
    finally:
        for h in handles:
            h.remove()
    assert calls == [0]  # layer 1's FFN read inside layer 1: layers 1 (rest), 2, head never ran


def test_skip_first_tokens_matches_raw_hooks():
    model = make_tiny("gpt2")
    batches = [random_batch(seed=s) for s in range(2)]
    keep = [b["attention_mask"].bool() & (b["attention_mask"].cumsum(1) > 2) for b in batches]
    ref = raw_hook_points(model, batches, "plain", select=keep)
    with pytest.warns(DeprecationWarning, match="skip_first"):  # exclude_positions=range(2)
        res = ni.collect_spectra(model, batches, precision="fp64", skip_first=2, progress=False)
    n = sum(int(b["attention_mask"].sum()) - 2 * b["attention_mask"].shape[0] for b in batches)
    assert res.metadata["n_tokens"] == n and res.metadata["skip_first"] == 2
    for (layer, point), x in ref.items():
        want = ref_eigenvalues(x)
        assert np.max(np.abs(res.eigenvalues(layer, point) - want)) / want[0] <= 1e-9
