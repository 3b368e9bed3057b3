"""Models spread over devices with accelerate (load_model(..., device_map=...)) capture the
same spectra, with each point's statistics on the device of its activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny, random_batch

import nerve_interp as ni
from nerve_interp.covariance import CovarianceAccumulator
from nerve_interp.errors import NerveInterpError


@pytest.fixture
def gpt2_folder(tmp_path, tiny_tokenizer):
    folder = tmp_path / "tiny-gpt2"
    make_tiny("gpt2").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _assert_same(a, b, tol=1e-10):
    assert a.metadata["n_tokens"] == b.metadata["n_tokens"]
    for layer in a.layers:
        for point in a.points:
            want, got = a.eigenvalues(layer, point), b.eigenvalues(layer, point)
            assert np.max(np.abs(got - want)) <= tol * want[0]


def test_device_map_passthrough_captures_the_same(gpt2_folder):
    split = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
             "transformer.h.0": "cpu", "transformer.h.1": "cpu", "transformer.h.2": "cpu",
             "transformer.ln_f": "cpu", "lm_head": "cpu"}
    batches = [random_batch(seed=s) for s in range(2)]
    plain, _ = ni.load_model(str(gpt2_folder))
    ref = ni.collect_spectra(plain, batches, progress=False)
    for device_map in ({"": "cpu"}, split):
        model, tok = ni.load_model(str(gpt2_folder), device_map=device_map)
        assert model.hf_device_map == device_map and tok.pad_token is not None
        _assert_same(ref, ni.collect_spectra(model, batches, progress=False))
    # accelerate's hooks (AlignDevicesHook on every module, as on a multi-device map) forced
    # on: nnsight's forward runs through them
    from accelerate import dispatch_model

    hooked = dispatch_model(make_tiny("gpt2"), device_map=split, force_hooks=True)
    assert hasattr(hooked.transformer.h[0], "_hf_hook")
    _assert_same(ref, ni.collect_spectra(hooked, batches, progress=False))


def test_device_map_for_a_short_name_and_exclusive_with_device():
    model, _ = ni.load_model("minilm", device_map={"": "cpu"})
    assert model.hf_device_map == {"": "cpu"}
    with pytest.raises(NerveInterpError, match="pass one"):
        ni.load_model("minilm", device="cpu", device_map="auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU next to the CPU")
def test_points_on_two_devices(monkeypatch):
    """Layer 0 on the CPU, layers 1-2 on the GPU: every accumulator stays with its rows."""
    from accelerate import dispatch_model

    batches = [random_batch(seed=s) for s in range(2)]
    ref = ni.collect_spectra(make_tiny("gpt2"), batches, progress=False)
    seen = {}
    update = CovarianceAccumulator.update

    def recording(self, x):
        out = update(self, x)
        seen[self.name] = (x.device.type, self.mean_.device.type)
        return out

    monkeypatch.setattr(CovarianceAccumulator, "update", recording)
    model = dispatch_model(make_tiny("gpt2"), device_map={
        "transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
        "transformer.h.0": "cpu", "transformer.h.1": 0, "transformer.h.2": 0,
        "transformer.ln_f": 0, "lm_head": 0})
    _assert_same(ref, ni.collect_spectra(model, batches, progress=False), tol=1e-6)
    assert seen["layers.0.ffn.post"] == ("cpu", "cpu")
    assert seen["layers.2.ffn.pre"] == ("cuda", "cuda")
