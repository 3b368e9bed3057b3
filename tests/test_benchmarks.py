"""The benchmark entry points run in quick mode on tiny sizes, so they cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench as module

    yield module
    sys.modules.pop("bench", None)


def test_bench_quick_runs_every_part(bench, tmp_path, capsys):
    out = tmp_path / "quick.json"
    res = bench.main(["--quick", "--out", str(out), "--memory-tokens", "256"])
    saved = json.loads(out.read_text())
    assert saved["quick"] and set(saved) >= {"throughput", "accuracy", "eigh", "memory",
                                             "directions", "peer"}
    assert {r["variant"] for r in res["directions"][0]["rows"]} == {"plain", "layer 1, d=16"}
    case = res["throughput"][0]
    assert {r["variant"] for r in case["rows"]} == {
        "plain", "nnsight fp64", "raw fp64", "nnsight fp32", "raw fp32",
        "nnsight fp32 + diagnostics", "nnsight fp32 + diagnostics + groups"}
    grouped = next(r for r in case["rows"] if r["variant"].endswith("groups"))
    assert grouped["n_groups"] == 2 and grouped["x_ungrouped"] > 0
    acc = {r["mode"]: r for r in res["accuracy"][0]["rows"]}
    # the table must rank the modes as the tests of covariance.py do
    assert acc["fp64"]["tail_decile_rel_err"] < 1e-9
    assert acc["bf16-split"]["tail_decile_rel_err"] < 1e-3
    assert acc["UNSAFE split without lo'lo"]["tail_decile_rel_err"] > \
        10 * acc["bf16-split"]["tail_decile_rel_err"]  # measured 50x
    assert acc["UNSAFE split, float32 diagonal"]["tail_decile_rel_err"] > \
        2 * acc["bf16-split"]["tail_decile_rel_err"]  # measured 5.7x
    assert res["memory"][0]["rows"][0]["N"] == 256
    peer = {(r["method"], r["N"]) for r in res["peer"]["rows"]}
    assert peer == {(m, n) for m in ("ours", "nerve") for n in (256, 1024)}
    ours = [r for r in res["peer"]["rows"] if r["method"] == "ours"]
    assert all(r["rounds"] == 1 and len(r["round_x_plain"]) == 1 and r["streaming_x_plain"] > 0
               and r["x_plain_median"] > 0 for r in ours)
    # time under glibc's defaults, memory under the fixed mmap threshold
    assert all(r["rounds_allocator"] == "glibc defaults" for r in ours)
    assert set(bench.MALLOC_FOR_RSS) <= set(bench._child_env(for_memory=True))
    assert not set(bench.MALLOC_FOR_RSS) & set(bench._child_env(for_memory=False))
    for r in ours:  # NerVE's method side by side in the same process, and ours over it
        t = r["round_seconds"]
        assert r["ours_over_nerve"] == pytest.approx(t["whole"][0] / t["nerve"][0])
        assert r["nerve_fp64_x_plain"] == pytest.approx(t["nerve_fp64"][0] / t["plain"][0])
        assert r["streaming_over_nerve_streaming"] == pytest.approx(
            t["streaming"][0] / t["nerve_streaming"][0])
    assert "[d] peak memory" in capsys.readouterr().out
    # the GPU throughput path, run on the CPU with tiny bf16 models
    gpu = bench.bench_throughput_gpu(
        bench.parse_args(["--quick"]), device="cpu", shape=(1, 2, 16),
        overrides=dict(n_layers=1, d_model=48, n_heads=4, d_ff=96, vocab_size=128,
                       max_seq_len=64))
    assert [c["dtype"] for c in gpu] == ["bfloat16", "bfloat16"]
    assert {r["variant"] for r in gpu[1]["rows"]} >= {"nnsight bf16-split", "raw bf16-split"}


def test_peer_method_measures_the_same_spectra(bench):
    """NerVE's analyzer method (rows kept, fp32 covariance and eigvalsh) sees the rows ours
    counts: its eigenvalues are ours to float32 round-off (those above 1e-4·λ_1)."""
    import numpy as np
    import torch

    import nerve_interp as ni

    model, batches, reads = bench._peer_setup(300, None, True)
    theirs = bench.nerve_analyzer_spectra(model, batches, reads)
    ours = ni.collect_spectra(model, batches, progress=False, diagnostics=False)
    assert set(theirs) == {s.name for _, s in ours.items()}
    for _, s in ours.items():
        lam = theirs[s.name].double().numpy()
        keep = s.eigenvalues > 1e-4 * s.eigenvalues[0]
        assert keep.sum() > 10 and theirs[s.name].dtype == torch.float32
        np.testing.assert_allclose(lam[keep], s.eigenvalues[keep], rtol=1e-3)
    # the float64 decomposition of the same float32 covariance, and none at all
    wide = bench.nerve_analyzer_spectra(model, batches, reads, eigvalsh="fp64")
    assert all(v.dtype == torch.float64 for v in wide.values())
    np.testing.assert_allclose(wide[s.name].numpy()[keep], s.eigenvalues[keep], rtol=1e-3)
    assert bench.nerve_analyzer_spectra(model, batches, reads, eigvalsh="none") == {}
    with pytest.raises(ValueError, match="eigvalsh must be"):
        bench.nerve_analyzer_spectra(model, batches, reads, eigvalsh="bf16")


def test_peer_rounds_of_a_layer_subset_have_no_plain_forward(bench):
    """At 64k the methods read layers 0-1 only and stop there: a plain forward through every
    layer is no reference, so those rounds time the methods against each other only."""
    r = bench._child_peer_rounds(300, (0,), True, 2)
    t = r["round_seconds"]
    assert "plain" not in t and set(t) == {"whole", "streaming", "nerve", "nerve_streaming",
                                           "nerve_fp64"}
    assert all(len(v) == 2 for v in t.values())
    assert not any("plain" in k for k in r)
    assert r["round_ours_over_nerve"] == pytest.approx(
        [w / n for w, n in zip(t["whole"], t["nerve"], strict=True)])
    assert r["ours_over_nerve"] == pytest.approx(
        sorted(r["round_ours_over_nerve"])[0] / 2 + sorted(r["round_ours_over_nerve"])[1] / 2)
    bench._print_peer_rounds(r)  # prints the ratios it has, no KeyError
