"""Capture through nnsight's remote path, simulated here with remote="local" (the block is
serialised as for NDIF and run with nerve_interp hidden), equals the local capture."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_tiny, random_batch

import nerve_interp as ni
from nerve_interp.errors import CaptureError


@pytest.fixture
def local_backend_calls(monkeypatch):
    """Count the traces that really went through nnsight's remote serialisation."""
    from nnsight.intervention.backends.local import LocalSimulationBackend

    calls = []
    original = LocalSimulationBackend.__call__

    def counting(self, tracer):
        calls.append(type(self).__name__)
        return original(self, tracer)

    monkeypatch.setattr(LocalSimulationBackend, "__call__", counting)
    return calls


@pytest.mark.parametrize("name, kw", [
    ("gpt2", {}),
    ("llama", dict(points=("pre", "act", "up", "post"), max_tokens=150, exclude_positions=(0,))),
])
def test_remote_local_equals_local_capture(name, kw, tiny_tokenizer, local_backend_calls):
    from nnsight import TransformersModel

    batches = [random_batch(seed=s) for s in range(3)]
    for b in batches:  # right padding only (see test_nnsight_transformers_model_wrapper)
        b["attention_mask"][3] = 1
    model = TransformersModel(make_tiny(name), tokenizer=tiny_tokenizer)
    local = ni.collect_spectra(model, batches, progress=False, precision="fp64", **kw)
    assert local_backend_calls == []
    remote = ni.collect_spectra(model, batches, progress=False, remote="local",
                                precision="fp64", **kw)
    # one request per batch run (the token budget of the llama case ends after 2 batches)
    assert local_backend_calls == ["LocalSimulationBackend"] * remote.metadata["n_batches"]
    assert remote.metadata["n_batches"] == (2 if "max_tokens" in kw else 3)
    assert remote.metadata["n_tokens"] == local.metadata["n_tokens"]
    for layer in local.layers:
        for point in local.points:
            want, got = local.eigenvalues(layer, point), remote.eigenvalues(layer, point)
            assert np.max(np.abs(got - want)) <= 1e-10 * want[0]
            np.testing.assert_allclose(remote.spectrum(layer, point).mean,
                                       local.spectrum(layer, point).mean, rtol=0, atol=1e-12)


def test_remote_fp32_matches_local_fp32_and_fp64(tiny_tokenizer):
    """precision="fp32" on the remote path forms the same statistics as locally, float64
    diagonal included (covariance.exact_diagonal), against the fp64 capture."""
    from nnsight import TransformersModel

    batches = [random_batch(seed=s) for s in range(3)]
    for b in batches:
        b["attention_mask"][3] = 1
    model = TransformersModel(make_tiny("gpt2"), tokenizer=tiny_tokenizer)
    exact = ni.collect_spectra(model, batches, progress=False, precision="fp64")
    local = ni.collect_spectra(model, batches, progress=False, precision="fp32")
    remote = ni.collect_spectra(model, batches, progress=False, precision="fp32",
                                remote="local")
    for layer in exact.layers:
        for point in exact.points:
            want = exact.spectrum(layer, point)
            for got in (local.spectrum(layer, point), remote.spectrum(layer, point)):
                assert np.max(np.abs(got.eigenvalues - want.eigenvalues)) <= 1e-5 * \
                    want.eigenvalues[0]
            # the trace is the float64 sum of squares of the fp32-centred rows
            np.testing.assert_allclose(remote.spectrum(layer, point).eigenvalues.sum(),
                                       want.eigenvalues.sum(), rtol=1e-7)


def test_remote_needs_a_remotable_wrapper():
    with pytest.raises(CaptureError, match="TransformersModel"):
        ni.collect_spectra(make_tiny("gpt2"), [random_batch()], progress=False, remote="local")
    with pytest.raises(CaptureError, match="remote=1"):
        ni.collect_spectra(make_tiny("gpt2"), [random_batch()], progress=False, remote=1)


def test_lazy_meta_model_as_on_ndif(tmp_path, tiny_tokenizer, local_backend_calls):
    """As with NDIF: a TransformersModel of a folder stays on the meta device here (sites are
    found on it); the weights are only loaded where the serialised trace runs."""
    import nnsight

    folder = tmp_path / "tiny-llama"
    make_tiny("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    batches = [random_batch(seed=s) for s in range(2)]
    for b in batches:
        b["attention_mask"][3] = 1
    lazy = nnsight.TransformersModel(str(folder), task="text-generation", tokenizer=str(folder))
    assert next(lazy._module.parameters()).device.type == "meta"
    got = ni.collect_spectra(lazy, batches, progress=False, remote="local", precision="fp64")
    assert len(local_backend_calls) == 2 and got.metadata["remote"] == "local"
    want = ni.collect_spectra(make_tiny("llama"), batches, progress=False, precision="fp64")
    for layer in want.layers:
        for point in want.points:
            a, b = got.eigenvalues(layer, point), want.eigenvalues(layer, point)
            assert np.max(np.abs(a - b)) <= 1e-10 * b[0]


def test_remote_keeps_position_exclusion_and_refuses_norm_rule(tiny_tokenizer):
    """Position / id exclusion is a mask on the kept rows, so it works remotely; the norm rule
    needs every token's norm here and is refused with a clear message."""
    from nnsight import TransformersModel

    batches = [random_batch(seed=s) for s in range(2)]
    for b in batches:
        b["attention_mask"][3] = 1
    model = TransformersModel(make_tiny("gpt2"), tokenizer=tiny_tokenizer)
    local = ni.collect_spectra(model, batches, progress=False, exclude_positions=(0,),
                               precision="fp64")
    remote = ni.collect_spectra(model, batches, progress=False, remote="local",
                                exclude_positions=(0,), precision="fp64")
    assert remote.metadata["n_tokens"] == local.metadata["n_tokens"]
    assert remote.metadata["n_excluded"]["positions"] == local.metadata["n_excluded"]["positions"]
    for layer in local.layers:
        for point in local.points:
            want, got = local.eigenvalues(layer, point), remote.eigenvalues(layer, point)
            assert np.max(np.abs(got - want)) <= 1e-10 * want[0]
    assert remote.metadata["diagnostics"]["enabled"] is False
    with pytest.raises(ValueError, match="exclude_norm_above"):
        ni.collect_spectra(model, batches, progress=False, remote="local", exclude_norm_above=5)
