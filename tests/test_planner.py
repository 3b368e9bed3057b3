"""Memory planner (pure arithmetic) and its use in collect_spectra: passes, merge, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny, random_batch

import nerve_interp as ni
from nerve_interp.errors import CaptureError, MemoryPlanError
from nerve_interp.planner import memory_budget, plan_capture, state_bytes, workspace_bytes

LLAMA8B = {(layer, point): 14336 for layer in range(32) for point in ("pre", "post")}


def test_state_and_workspace_known_answers():
    d = 14336
    assert state_bytes(d) == 8 * d * d + 8 * d
    assert round(64 * state_bytes(d) / 1e9, 1) == 105.2  # DESIGN.md: 1.6 GB per point
    # fp32 on CUDA, 1000 bf16 rows of D = 100: rows 2 + fp32 copy 4 bytes; Gram 4·D²
    assert workspace_bytes(100, 1000, "fp32", activation_bytes=2, device="cuda") == \
        1000 * 100 * 6 + 4 * 100 * 100
    # bf16-split off CUDA widens hi and lo to fp32 (8 more bytes per value); 12·D² of Gram
    assert workspace_bytes(100, 1000, "bf16-split", activation_bytes=2, device="cpu") == \
        1000 * 100 * (2 + 8 + 8) + 12 * 100 * 100
    # few rows: finalising dominates, two decompositions in flight (24·D² each on CPU)
    assert workspace_bytes(1000, 1, "fp64") == 2 * 24 * 1000 * 1000
    assert workspace_bytes(1000, 1, "fp64", device="cuda") == 2 * 8 * 1000 * 1000


def test_the_finish_is_planned_for_the_decompositions_in_flight(monkeypatch):
    monkeypatch.setenv("NERVE_INTERP_EIGH_WORKERS", "1")
    assert workspace_bytes(1000, 1, "fp64") == 24 * 1000 * 1000
    one = plan_capture({(0, "pre"): 1000}, budget=1e9, tokens_per_batch=1, n_groups=4)
    monkeypatch.setenv("NERVE_INTERP_EIGH_WORKERS", "4")
    assert workspace_bytes(1000, 1, "fp64") == 4 * 24 * 1000 * 1000
    four = plan_capture({(0, "pre"): 1000}, budget=1e9, tokens_per_batch=1, n_groups=4)
    # groups: the total and a running merge, and per decomposition its scatter (8·D²) too
    assert four.bytes_per_pass[0] - one.bytes_per_pass[0] == 3 * (8 + 24) * 1000 * 1000
    monkeypatch.setenv("NERVE_INTERP_EIGH_WORKERS", "0")
    with pytest.raises(ValueError, match="NERVE_INTERP_EIGH_WORKERS='0'"):
        workspace_bytes(1000, 1, "fp64")


def test_llama8b_on_an_h100_needs_two_passes():
    plan = plan_capture(LLAMA8B, budget=80e9, device="cuda", precision="fp64",
                        tokens_per_batch=4096, activation_bytes=2)
    assert plan.n_passes == 2 and plan.pass_layers == [tuple(range(16)), tuple(range(16, 32))]
    assert all(b <= 80e9 for b in plan.bytes_per_pass)
    assert plan.bytes_per_pass[0] == 32 * state_bytes(14336) + workspace_bytes(
        14336, 4096, "fp64", activation_bytes=2, device="cuda")
    text = plan.summary()
    assert "2 pass(es)" in text and "105.23 GB" in text and "0-15 (16)" in text
    assert repr(plan) == text


def test_passes_cover_every_point_once_and_fit():
    dims = {(layer, p): 500 + 100 * layer for layer in range(6) for p in ("pre", "post")}
    for budget in (6e7, 1e8, 1e9):  # one point of layer 5 needs 56 MB, the layer 64 MB
        plan = plan_capture(dims, budget=budget, tokens_per_batch=256)
        flat = [k for p in plan.passes for k in p]
        assert sorted(flat) == sorted(dims) and len(flat) == len(dims)
        assert all(b <= budget for b in plan.bytes_per_pass)
        for keys, lays, pts in zip(plan.passes, plan.pass_layers, plan.pass_points,
                                   strict=True):
            assert sorted(keys) == sorted((la, p) for la in lays for p in pts)  # products
    assert plan_capture(dims, budget=1e9, tokens_per_batch=256).n_passes == 1
    # a whole layer 5 (2 points) does not fit, one point does: points are planned apart
    one = state_bytes(1000) + workspace_bytes(1000, 256)
    plan = plan_capture(dims, budget=one + 1, tokens_per_batch=256)
    assert all(len(pts) == 1 for pts in plan.pass_points)  # one point kind per pass
    assert [(5, "pre")] in plan.passes and [(5, "post")] in plan.passes
    assert plan.n_passes < len(dims)  # smaller points still share passes


def test_refuses_with_the_numbers():
    with pytest.raises(MemoryPlanError, match=r"layers.0.ffn.pre \(D = 14336\) alone needs "
                                              r"1.64 GB of float64 state"):
        plan_capture(LLAMA8B, budget=2e9, device="cuda", precision="fp64")
    with pytest.raises(MemoryError):  # MemoryPlanError is a MemoryError
        plan_capture({(0, "pre"): 10_000}, budget=1e6)
    with pytest.raises(ValueError, match="budget"):
        plan_capture({(0, "pre"): 10}, budget=0)
    with pytest.raises(ValueError, match="unknown precision"):
        plan_capture({(0, "pre"): 10}, budget=1e6, precision="bf16")


def test_auto_budget_on_cpu_is_a_share_of_ram():
    import psutil

    b = memory_budget("cpu")
    assert 0 < b <= 0.5 * psutil.virtual_memory().total
    assert memory_budget("cpu", fraction=0.25) < b
    with pytest.raises(ValueError, match="fraction"):
        memory_budget("cpu", fraction=1.5)


# ------------------------------------------------------------------ collect_spectra
def test_multi_pass_capture_equals_single_pass():
    """gpt2 tiny (D = 128): each layer alone fits 1.15 MB, two layers do not: 3 passes."""
    model = make_tiny("gpt2")
    batches = [random_batch(seed=s) for s in range(3)]
    one = ni.collect_spectra(model, batches, progress=False)
    res = ni.collect_spectra(model, batches, progress=False, memory_budget=1_150_000)
    assert res.metadata["passes"] == [[f"layers.{i}.ffn.pre", f"layers.{i}.ffn.post"]
                                      for i in range(3)]
    assert res.metadata["n_tokens"] == one.metadata["n_tokens"]
    assert res.layers == one.layers and res.points == one.points
    for (layer, point), spec in one.items():
        np.testing.assert_allclose(res.eigenvalues(layer, point), spec.eigenvalues,
                                   rtol=1e-12, atol=1e-12 * spec.eigenvalues[0])
    # the token diagnostics of every pass are carried into the merged result
    assert set(res.diagnostics) == set(one.diagnostics)
    for key, d in one.diagnostics.items():
        assert res.diagnostics[key].outlier_share == pytest.approx(d.outlier_share, rel=1e-9)
    assert res.metrics()["outlier_share"].notna().all()
    single = ni.collect_spectra(model, batches, progress=False, memory_budget="auto")
    assert "passes" not in single.metadata  # fits: one ordinary capture


def test_multi_pass_needs_reiterable_data():
    model = make_tiny("gpt2")
    gen = (random_batch(seed=s) for s in range(2))
    with pytest.raises(CaptureError, match="3 passes over the data, but batches is an iterator"):
        ni.collect_spectra(model, gen, progress=False, memory_budget=1_150_000)
    gen = (random_batch(seed=s) for s in range(2))  # one pass: a generator is fine
    res = ni.collect_spectra(model, gen, progress=False, memory_budget=1e9)
    ref = ni.collect_spectra(model, [random_batch(seed=s) for s in range(2)], progress=False)
    assert res.metadata["n_tokens"] == ref.metadata["n_tokens"]
    with pytest.raises(MemoryPlanError, match="alone needs"):
        ni.collect_spectra(model, [random_batch()], progress=False, memory_budget=100_000)


def test_collect_spectra_precision_pass_through():
    model = make_tiny("llama")
    batches = [random_batch(seed=s) for s in range(3)]
    assert ni.collect_spectra(model, batches, progress=False).metadata["precision"] == "fp32"
    ref = ni.collect_spectra(model, batches, progress=False, precision="fp64")
    res = ni.collect_spectra(model, batches, progress=False, precision="bf16-split")
    assert res.metadata["precision"] == "bf16-split" and res.metadata["gram_dtype"] == "float32"
    for (layer, point), spec in ref.items():
        lam = spec.eigenvalues
        assert np.max(np.abs(res.eigenvalues(layer, point) - lam)) <= 1e-5 * lam[0]
    with pytest.warns(DeprecationWarning, match="gram_dtype"):
        old = ni.collect_spectra(model, batches, progress=False, gram_dtype=torch.float32)
    assert old.metadata["precision"] == "fp32"
    with pytest.raises(ValueError, match="refused"):
        ni.collect_spectra(model, batches, progress=False, precision="bf16")
