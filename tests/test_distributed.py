"""Data-parallel capture under torchrun (gloo, 2 CPU processes) equals a single process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import nerve_interp as ni
from nerve_interp.checkpoint import read_checkpoint_state
from nerve_interp.distributed import rank_budget, world
from nerve_interp.errors import CaptureError
from nerve_interp.models import make_lm

ROOT = Path(__file__).resolve().parents[1]

#: (name, data, options) of the diagnostics runs of WORKER and of the single-process reference
DIAG_RUNS_SRC = """
DIAG_RUNS = [
    ("distinct", lookup_data, {"outlier_fraction": 0.03, "max_outlier_tokens": 40}),
    ("ties", lookup_ties, {"max_outlier_tokens": 8}),
    ("resumed", lookup_data, {"checkpoint_every": 1}),
]
"""
WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np, torch, torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    import nerve_interp as ni
    from nerve_interp.models import make_lm

    out = Path(sys.argv[1])
    rank = dist.get_rank()
    model = make_lm("tiny", vocab_size=256, activation="swiglu")
    data = torch.load(out / "data.pt")
    runs = {
        "all": ni.collect_spectra(model, data, precision="fp64",
                                  points=("pre", "act", "up", "post"),
                                  progress=False, checkpoint=out / "run.ckpt",
                                  checkpoint_every=1),
        # rank 1 gets no batch
        "one": ni.collect_spectra(model, data[:1], precision="fp64", progress=False),
        "budget": ni.collect_spectra(model, data, precision="fp64", progress=False, max_tokens=301),
        # batch i draws its tokens from (seed, i) alone: rank i % 2 keeps what one process does
        "subsample": ni.collect_spectra(model, data, precision="fp64", progress=False,
                                        token_fraction=0.5,
                                        subsample_seed=3),
        # per-group statistics: each rank holds part of every group, merged group by group
        "groups": ni.collect_spectra(model, data, precision="fp64", progress=False, n_groups=3,
                                     checkpoint=out / "groups.ckpt", checkpoint_every=1),
    }
    arrays = {}
    for name, res in runs.items():
        arrays[f"{name}/n_tokens"] = res.metadata["n_tokens"]
        arrays[f"{name}/n_batches"] = res.metadata["n_batches"]
        arrays[f"{name}/world_size"] = res.metadata["world_size"]
        arrays[f"{name}/subsampled"] = res.metadata["n_excluded"]["subsampled"]
        for layer in res.layers:
            for point in res.points:
                arrays[f"{name}/{layer}.{point}"] = res.eigenvalues(layer, point)
                arrays[f"{name}/fourth.{layer}.{point}"] = res.spectrum(layer,
                                                                        point).fourth_moment
                groups = res.spectrum(layer, point).groups
                if groups is not None:
                    arrays[f"{name}/loo.{layer}.{point}"] = groups.loo_eigenvalues
                    arrays[f"{name}/loo_fourth.{layer}.{point}"] = groups.loo_fourth
        arrays[f"{name}/sha"] = np.frombuffer(res.metadata["data_sha1"].encode(), np.uint8)
        if res.diagnostics:
            arrays[f"{name}/outlier_share"] = res.metrics()["outlier_share"].to_numpy()
    np.savez(out / f"rank{rank}.npz", **arrays)

    # token diagnostics on a model with massive tokens (exact activations: table lookups)
    import warnings
    sys.path.insert(0, sys.argv[2])
    from test_diagnostics import lookup_data, lookup_ties
    from nerve_interp.errors import OutlierTokenWarning

    exec(sys.argv[3])  # DIAG_RUNS
    n_warned = 0
    for name, make, kw in DIAG_RUNS:
        model, sites, batches, _, _ = make(n_batches=5)
        kw = dict(sites=sites, points=("pre", "post"), progress=False, **kw)
        if name == "resumed":  # rank r checkpoints its shard of 3 batches, then resumes
            kw["checkpoint"] = out / "diag.ckpt"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ni.collect_spectra(model, batches[:3], **kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = ni.collect_spectra(model, batches, **kw)
        n_warned += sum(issubclass(w.category, OutlierTokenWarning) for w in caught)
        res.save(out / f"{name}.rank{rank}.safetensors")
    (out / f"warned{rank}.txt").write_text(str(n_warned))
    # rank 0 resumes from a checkpoint without token statistics, rank 1 from an empty one:
    # both go on without diagnostics (no rank waits for the other's gather)
    model, sites, batches, _, _ = lookup_data(n_batches=5)
    kw = dict(sites=sites, points=("post",), progress=False, checkpoint=out / "bare.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ni.collect_spectra(model, batches[:1], diagnostics=False, **kw)
        res = ni.collect_spectra(model, batches, **kw)
    said = any("without token" in str(w.message) for w in caught)
    (out / f"bare{rank}.txt").write_text(
        f"{bool(res.diagnostics)} {res.metadata['diagnostics']['enabled']} {said}")
    dist.destroy_process_group()
""")



def make_data(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        ids = torch.randint(0, 256, (3, 20), generator=g)
        mask = torch.ones_like(ids)
        mask[i % 3, 12 + i:] = 0  # some padding in every batch
        data.append({"input_ids": ids, "attention_mask": mask})
    return data


def test_two_gloo_processes_equal_one_process(tmp_path):
    data = make_data()
    torch.save(data, tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "worker.py"), str(tmp_path), str(ROOT / "tests"), DIAG_RUNS_SRC],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    assert sorted(r0.files) == sorted(r1.files)
    for key in r0.files:  # every rank ends with the same result, bit for bit
        assert np.array_equal(r0[key], r1[key]), key

    model = make_lm("tiny", vocab_size=256, activation="swiglu")
    single = {
        "all": ni.collect_spectra(model, data, precision="fp64",
                                  points=("pre", "act", "up", "post"),
                                  progress=False),
        "one": ni.collect_spectra(model, data[:1], precision="fp64", progress=False),
        "subsample": ni.collect_spectra(model, data, precision="fp64", progress=False,
                                        token_fraction=0.5,
                                        subsample_seed=3),
        "groups": ni.collect_spectra(model, data, precision="fp64", progress=False, n_groups=3),
    }
    worst = worst_a = 0.0
    for name, res in single.items():
        assert int(r0[f"{name}/n_tokens"]) == res.metadata["n_tokens"]
        assert int(r0[f"{name}/n_batches"]) == res.metadata["n_batches"]
        assert int(r0[f"{name}/world_size"]) == 2
        assert int(r0[f"{name}/subsampled"]) == res.metadata["n_excluded"]["subsampled"]
        assert bytes(r0[f"{name}/sha"]).decode() == res.metadata["data_sha1"]
        for layer in res.layers:
            for point in res.points:
                want, got = res.eigenvalues(layer, point), r0[f"{name}/{layer}.{point}"]
                worst = max(worst, float(np.max(np.abs(got - want)) / want[0]))
                # the fourth moments merge exactly across ranks too (re-centred, summed)
                a = res.spectrum(layer, point).fourth_moment
                b = float(r0[f"{name}/fourth.{layer}.{point}"])
                worst_a = max(worst_a, abs(b - a) / a)
                groups = res.spectrum(layer, point).groups
                if groups is not None:  # every leave-one-group-out spectrum too
                    got = r0[f"{name}/loo.{layer}.{point}"]
                    want = groups.loo_eigenvalues
                    worst = max(worst, float(np.max(np.abs(got - want)) / want[:, :1].min()))
                    np.testing.assert_allclose(r0[f"{name}/loo_fourth.{layer}.{point}"],
                                               groups.loo_fourth, rtol=1e-12)
    print(f"2-process gloo vs 1 process: max |Δλ|/λ_1 = {worst:.2e}, Σ‖x−μ‖⁴ {worst_a:.1e}")
    assert worst <= 1e-12, worst
    assert worst_a <= 1e-12, worst_a
    # the global budget is split over the ranks (151 + 150 tokens)
    assert int(r0["budget/n_tokens"]) == 301
    # one checkpoint per rank, each with its own shard's position
    for rank in (0, 1):
        state = read_checkpoint_state(tmp_path / f"run.rank{rank}-of-2.ckpt")
        assert state["manifest"]["shard"] == {"rank": rank, "world_size": 2}
        assert state["position"]["batches"] == len(data)
    assert not (tmp_path / "run.ckpt").exists()
    for name in single:  # token diagnostics of the tiny LM too (diagnostics on by default)
        share = single[name].metrics()["outlier_share"].to_numpy()
        np.testing.assert_allclose(r0[f"{name}/outlier_share"], share, rtol=1e-12)
    check_diagnostics_equal_one_process(tmp_path)


def check_diagnostics_equal_one_process(out):
    """Outlier shares, flags, top tokens and spectra without them: 2 ranks == 1 process."""
    import warnings

    from test_diagnostics import lookup_data, lookup_ties

    from nerve_interp.errors import OutlierTokenWarning

    scope = {"lookup_data": lookup_data, "lookup_ties": lookup_ties}
    exec(DIAG_RUNS_SRC, scope)
    # the flag is reported once, by rank 0
    assert (out / "warned0.txt").read_text() == str(len(scope["DIAG_RUNS"]))
    assert (out / "warned1.txt").read_text() == "0"
    assert (out / "bare0.txt").read_text() == "False False True"
    assert (out / "bare1.txt").read_text() == "False False False"
    worst = {"share": 0.0, "eig": 0.0, "free": 0.0}
    for name, make, kw in scope["DIAG_RUNS"]:
        model, sites, batches, _, _ = make(n_batches=5)
        kw = {k: v for k, v in kw.items() if k != "checkpoint_every"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OutlierTokenWarning)
            want = ni.collect_spectra(model, batches, sites=sites, points=("pre", "post"),
                                      progress=False, **kw)
        ranks = [ni.SpectraResult.load(out / f"{name}.rank{r}.safetensors") for r in (0, 1)]
        for got in ranks:
            assert got.metadata["world_size"] == 2 and got.metadata["diagnostics"]["enabled"]
            assert got.metadata["diagnostics"]["flagged"] == want.metadata["diagnostics"][
                "flagged"] == ["layers.0.ffn.pre", "layers.0.ffn.post"], name
            assert got.diagnostics.keys() == want.diagnostics.keys()
            for key, w in want.diagnostics.items():
                d = got.diagnostics[key]
                for attr in ("n_tokens", "k", "n_outliers", "capped", "outlier_flag",
                             "max_norm", "median_norm", "p99_norm"):
                    assert getattr(d, attr) == getattr(w, attr), (name, key, attr)
                np.testing.assert_array_equal(d.top_meta, w.top_meta)  # the same tokens
                np.testing.assert_array_equal(d.top_norms, w.top_norms)
                assert d.top_tokens == w.top_tokens
                np.testing.assert_allclose(d.top_share, w.top_share, rtol=1e-12, atol=0)
                worst["share"] = max(worst["share"],
                                     abs(d.outlier_share - w.outlier_share) / w.outlier_share)
            a, b = got.outlier_tokens(), want.outlier_tokens()
            exact = ["layer", "point", "rank", "batch", "row", "position", "token_id", "token",
                     "outlier"]
            assert a[exact].equals(b[exact]) and len(a) == len(b) > 0
            np.testing.assert_allclose(a["share"], b["share"], rtol=1e-12, atol=0)
            for label, x, y in (("eig", got, want),
                                ("free", got.without_outliers(), want.without_outliers())):
                for layer in y.layers:
                    for point in y.points:
                        lam, ref = x.eigenvalues(layer, point), y.eigenvalues(layer, point)
                        worst[label] = max(worst[label],
                                           float(np.max(np.abs(lam - ref)) / ref[0]))
                        assert x.spectrum(layer, point).n_samples == \
                            y.spectrum(layer, point).n_samples
        d0, d1 = (r.diagnostics[(0, "post")] for r in ranks)  # ranks agree bit for bit
        assert d0.outlier_share == d1.outlier_share
        np.testing.assert_array_equal(d0.top_share, d1.top_share)
    print("2-process vs 1-process diagnostics: max relative difference of the outlier share "
          f"{worst['share']:.1e}, eigenvalues {worst['eig']:.1e}, without outliers "
          f"{worst['free']:.1e}")
    assert max(worst.values()) <= 1e-12, worst


def test_rank_budgets_add_up():
    for total in (2, 301, 1000, 7):
        for w in (1, 2, 3, 8):
            shares = [rank_budget(total, r, w) for r in range(w)]
            assert sum(shares) == total and max(shares) - min(shares) <= 1
    assert rank_budget(None, 0, 2) is None


def test_distributed_true_without_process_group():
    assert world(None) == (0, 1) and world(False) == (0, 1)
    with pytest.raises(CaptureError, match="torchrun --nproc_per_node"):
        ni.collect_spectra(make_lm("tiny", vocab_size=256), [torch.randint(0, 256, (2, 8))],
                           progress=False, distributed=True)


def test_cli_under_torchrun(tmp_path, tiny_tokenizer):
    """`torchrun --nproc_per_node 2 -m nerve_interp.cli spectra ...` writes one result, the
    single-process one."""
    from conftest import make_tiny

    folder = tmp_path / "tiny-gpt2"
    make_tiny("gpt2").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(f"w{(i * 7 + j * 3) % 90 + 2}" for j in range(20 + i))
                                for i in range(30)))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "nerve_interp.cli", "spectra", "--model", str(folder), "--text", str(text),
         "--out", str(out), "--batch-size", "4"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("torchrun: 2 processes") == 1  # rank 0 alone prints
    got = ni.SpectraResult.load(out / "spectra.safetensors")
    model, tok = ni.load_model(str(folder))
    want = ni.collect_spectra(model, ni.read_texts(text), tokenizer=tok, batch_size=4,
                              progress=False)
    assert got.metadata["n_tokens"] == want.metadata["n_tokens"]
    assert got.metadata["world_size"] == 2
    for layer in want.layers:
        for point in want.points:
            a, b = got.eigenvalues(layer, point), want.eigenvalues(layer, point)
            assert np.max(np.abs(a - b)) <= 1e-12 * b[0]
    # each rank checkpointed into its own file and removed it after success
    assert "removed the checkpoint " in proc.stdout and not list(out.glob("*.ckpt"))


NORM_WORKER = textwrap.dedent("""
    import sys, warnings
    from pathlib import Path
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    import nerve_interp as ni

    out = Path(sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    from test_distributed import norm_runs
    rank = dist.get_rank()
    warnings.simplefilter("ignore")
    for name, model, batches, kw in norm_runs():
        if "checkpoint" in kw:  # rank r checkpoints its shard of 3 batches, then resumes
            kw["checkpoint"] = out / kw["checkpoint"]
            ni.collect_spectra(model, batches[:3], **kw)
        ni.collect_spectra(model, batches, **kw).save(out / f"{name}.rank{rank}.safetensors")
    dist.destroy_process_group()
""")


def norm_runs():
    """``(name, model, batches, options)`` of the exclude_norm_above runs under torchrun."""
    from test_diagnostics import lookup_data

    model, sites, batches, _, _ = lookup_data(n_batches=5)
    late = [dict(b) for b in batches]  # batch 0 all padding: batch 1 (rank 1's) calibrates
    late[0]["attention_mask"] = torch.zeros_like(late[0]["attention_mask"])
    kw = dict(sites=sites, points=("pre", "post"), progress=False)
    return [
        ("norm", model, batches, {**kw, "exclude_norm_above": 5.0}),
        ("nodiag", model, batches, {**kw, "exclude_norm_above": 20.0, "diagnostics": False}),
        ("one", model, batches[:1], {**kw, "exclude_norm_above": 5.0}),  # rank 1: no batch
        ("late", model, late, {**kw, "exclude_norm_above": 5.0, "exclude_positions": (1,)}),
        ("resumed", model, batches, {**kw, "exclude_norm_above": 5.0, "checkpoint": "n.ckpt",
                                     "checkpoint_every": 1}),
    ]


def test_exclude_norm_above_two_gloo_processes_equal_one_process(tmp_path):
    """The thresholds of the first batch reach every rank: 2 ranks == 1 process."""
    (tmp_path / "worker.py").write_text(NORM_WORKER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "worker.py"), str(tmp_path), str(ROOT / "tests")],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import warnings

    worst = 0.0
    for name, model, batches, kw in norm_runs():
        kw = {k: v for k, v in kw.items() if k not in ("checkpoint", "checkpoint_every")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = ni.collect_spectra(model, batches, **kw)
        wanted = want.metadata["n_excluded"]
        assert all(wanted["norm"].values()) and all(wanted["norm_thresholds"].values()), name
        for rank in (0, 1):
            got = ni.SpectraResult.load(tmp_path / f"{name}.rank{rank}.safetensors")
            assert got.metadata["world_size"] == 2
            assert got.metadata["n_tokens"] == want.metadata["n_tokens"], name
            assert got.metadata["n_excluded"] == wanted, name  # thresholds bit for bit
            for layer in want.layers:
                for point in want.points:
                    lam, ref = got.eigenvalues(layer, point), want.eigenvalues(layer, point)
                    assert got.spectrum(layer, point).n_samples == \
                        want.spectrum(layer, point).n_samples, (name, point)
                    worst = max(worst, float(np.max(np.abs(lam - ref)) / ref[0]))
    print(f"exclude_norm_above, 2 processes vs 1: max |Δλ|/λ_1 = {worst:.2e}")
    assert worst <= 1e-12, worst


def test_exclude_norm_above_refused_with_remote():
    from test_diagnostics import lookup_data

    model, sites, batches, _, _ = lookup_data(n_batches=1)
    with pytest.raises(ValueError, match=r"not available with remote=.*D×D statistics"):
        ni.collect_spectra(model, batches, sites=sites, progress=False, remote="local",
                           exclude_norm_above=5.0)
