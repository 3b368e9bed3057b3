"""Resumable captures: a run killed with SIGKILL and resumed equals an uninterrupted run;
checkpoints of other models, sites, options or data, and damaged files, are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny, random_batch

import nerve_interp as ni
from nerve_interp.checkpoint import read_checkpoint_state
from nerve_interp.errors import ResultsFileError

ROOT = Path(__file__).resolve().parents[1]
N_BATCHES = 12

# one TinyLM capture; the data arrive slowly (DELAY s per batch) so the test can kill it
SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np, torch
    torch.set_num_threads(1)  # same reduction order in every process
    import nerve_interp as ni
    from nerve_interp.models import make_lm

    ckpt, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    model = make_lm("tiny", vocab_size=256)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 256, (4, 32), generator=g) for _ in range({n})]

    def slow():
        for b in data:
            time.sleep(delay)
            yield b

    res = ni.collect_spectra(model, slow(), progress=False, checkpoint_every=1,
                             checkpoint=None if ckpt == "-" else ckpt)
    np.savez(out, n_tokens=res.metadata["n_tokens"],
             **{{f"{{l}}.{{p}}": res.eigenvalues(l, p) for l in res.layers for p in res.points}})
""").format(n=N_BATCHES)


def _run(script: Path, *args: str, wait: bool = True) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, str(script), *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    return p


def test_sigkill_mid_run_then_resume_is_bit_exact(tmp_path):
    script = tmp_path / "capture.py"
    script.write_text(SCRIPT)
    ckpt = tmp_path / "run.ckpt"
    killed = _run(script, str(ckpt), str(tmp_path / "killed.npz"), "0.4", wait=False)
    deadline = time.monotonic() + 240
    batches = 0
    while batches < 3:
        assert killed.poll() is None, killed.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint with >= 3 batches within 240 s"
        time.sleep(0.05)
        if ckpt.exists():
            batches = read_checkpoint_state(ckpt)["position"]["batches"]
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    position = read_checkpoint_state(ckpt)["position"]
    assert 3 <= position["batches"] < N_BATCHES  # killed mid-way
    assert not (tmp_path / "killed.npz").exists()

    _run(script, str(ckpt), str(tmp_path / "resumed.npz"), "0")
    _run(script, "-", str(tmp_path / "full.npz"), "0")
    resumed, full = np.load(tmp_path / "resumed.npz"), np.load(tmp_path / "full.npz")
    assert sorted(resumed.files) == sorted(full.files) and len(full.files) == 5
    assert int(resumed["n_tokens"]) == int(full["n_tokens"]) == N_BATCHES * 4 * 32
    for key in full.files:  # same float64 state + same updates in the same order: same bits
        assert np.array_equal(resumed[key], full[key]), key
    assert read_checkpoint_state(ckpt)["position"]["batches"] == N_BATCHES
    assert not list(tmp_path.glob("*.tmp")), "a temporary file outlived its writer"


def test_temporaries_of_killed_writers_are_removed(tmp_path):
    """A writer killed mid-write leaves .<name>.<host>.<pid>.*.tmp behind (as big as the
    checkpoint); the next write removes those of dead processes on this host, and keeps
    those of live processes and other hosts."""
    import socket

    from nerve_interp._io import atomic_path

    target = tmp_path / "run.ckpt"
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".run.ckpt.{host}.{dead.pid}.abc123.tmp"
        busy = tmp_path / f".run.ckpt.{host}.{live.pid}.def456.tmp"
        foreign = tmp_path / f".run.ckpt.other-host.{dead.pid}.ghi789.tmp"
        unrelated = tmp_path / f".other.ckpt.{host}.{dead.pid}.jkl012.tmp"
        for f in (stale, busy, foreign, unrelated):
            f.write_bytes(b"half a checkpoint")
        with atomic_path(target) as tmp:
            assert Path(tmp).name.startswith(f".run.ckpt.{host}.{os.getpid()}.")
            Path(tmp).write_bytes(b"new")
        assert target.read_bytes() == b"new"
        assert not stale.exists()
        assert busy.exists() and foreign.exists() and unrelated.exists()
    finally:
        live.kill()
        live.wait()


@pytest.fixture
def run_ckpt(tmp_path):
    """A tiny GPT-2, 4 batches and a checkpoint written after the first 2 of them."""
    model = make_tiny("gpt2")
    batches = [random_batch(seed=s) for s in range(4)]
    ckpt = tmp_path / "run.ckpt"
    ni.collect_spectra(model, batches[:2], progress=False, checkpoint=ckpt, layers=[0, 1])
    return model, batches, ckpt


def test_resume_matches_uninterrupted_and_records_position(run_ckpt):
    model, batches, ckpt = run_ckpt
    state = read_checkpoint_state(ckpt)
    n2 = sum(int(b["attention_mask"].sum()) for b in batches[:2])
    assert state["position"]["batches"] == 2 and state["position"]["tokens"] == n2
    assert state["manifest"]["options"] == {"points": ["pre", "post"], "max_tokens": None,
                                            "skip_first": 0, "precision": "fp32"}
    assert state["manifest"]["sites"]["layers.1.ffn.post"] == "transformer.h.1.mlp.act.output"
    assert state["nerve_interp"] == ni.__version__
    resumed = ni.collect_spectra(model, batches, progress=False, checkpoint=ckpt, layers=[0, 1])
    full = ni.collect_spectra(model, batches, progress=False, layers=[0, 1])
    assert resumed.metadata["n_tokens"] == full.metadata["n_tokens"]
    assert resumed.metadata["data_sha1"] == full.metadata["data_sha1"]
    for layer in (0, 1):
        for point in ("pre", "post"):
            a, b = resumed.eigenvalues(layer, point), full.eigenvalues(layer, point)
            assert np.max(np.abs(a - b)) <= 1e-12 * b[0]


@pytest.mark.parametrize("change, match", [
    (dict(layers=[0, 2]), "other sites"),
    (dict(points=("post",)), "other sites"),
    (dict(max_tokens=50), r"options.max_tokens: checkpoint None, this run 50"),
    (dict(skip_first=1), r"options.skip_first"),
    (dict(gram_dtype=torch.float64), r"options.precision: checkpoint 'fp32'"),
    (dict(exclude_token_ids=(3,)), r"options.exclusion"),
])
@pytest.mark.filterwarnings("ignore:collect_spectra:DeprecationWarning")  # skip_first, gram_dtype
def test_other_sites_or_options_are_refused(run_ckpt, change, match):
    model, batches, ckpt = run_ckpt
    kw = dict(layers=[0, 1]) | change
    with pytest.raises(ResultsFileError, match=match):
        ni.collect_spectra(model, batches, progress=False, checkpoint=ckpt, **kw)


def test_checkpoint_every_must_be_positive(run_ckpt):
    model, batches, ckpt = run_ckpt
    with pytest.raises(ValueError, match="checkpoint_every == 0"):
        ni.collect_spectra(model, batches, progress=False, checkpoint=ckpt, checkpoint_every=0)


def test_other_model_is_refused(run_ckpt):
    _, batches, ckpt = run_ckpt
    with pytest.raises(ResultsFileError, match="another model"):
        ni.collect_spectra(make_tiny("pythia"), batches, progress=False, checkpoint=ckpt,
                           layers=[0, 1])


def test_other_or_shorter_data_are_refused(run_ckpt):
    model, batches, ckpt = run_ckpt
    other = [random_batch(seed=s) for s in (0, 7, 2, 3)]  # batch 1 differs
    with pytest.raises(ResultsFileError, match="written on other data"):
        ni.collect_spectra(model, other, progress=False, checkpoint=ckpt, layers=[0, 1])
    with pytest.raises(ResultsFileError, match="consumed 2 batches but this run's data have "
                                               "only 1"):
        ni.collect_spectra(model, batches[:1], progress=False, checkpoint=ckpt, layers=[0, 1])
    # the same texts in other batches: other hash, refused too
    regrouped = [{k: v[:2] for k, v in batches[0].items()}, *batches[1:]]
    with pytest.raises(ResultsFileError, match="other data"):
        ni.collect_spectra(model, regrouped, progress=False, checkpoint=ckpt, layers=[0, 1])


def test_float_input_data_are_hashed(tmp_path):
    """A non-token model's inputs are hashed by value, so other data are refused as well."""
    from test_sites import FunctionalNet

    net = FunctionalNet()
    xs = [torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    ckpt = tmp_path / "net.ckpt"
    ni.collect_spectra(net, xs[:2], progress=False, checkpoint=ckpt)
    with pytest.raises(ResultsFileError, match="other data"):
        ni.collect_spectra(net, [xs[0], xs[2], xs[1]], progress=False, checkpoint=ckpt)
    ni.collect_spectra(net, xs, progress=False, checkpoint=ckpt)  # same prefix: resumes


def test_corrupt_truncated_and_foreign_files_are_refused(run_ckpt, tmp_path):
    model, batches, ckpt = run_ckpt
    blob = ckpt.read_bytes()
    cases = {"truncated": blob[: len(blob) // 2], "garbage": b"not a checkpoint",
             "empty": b""}
    for name, data in cases.items():
        bad = tmp_path / f"{name}.ckpt"
        bad.write_bytes(data)
        with pytest.raises(ResultsFileError, match="corrupt or truncated"):
            ni.collect_spectra(model, batches, progress=False, checkpoint=bad, layers=[0, 1])
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.ckpt"), metadata={"format": "x"})
    with pytest.raises(ResultsFileError, match="not a nerve_interp capture checkpoint"):
        ni.collect_spectra(model, batches, progress=False, checkpoint=tmp_path / "other.ckpt")


def test_checkpoints_are_also_written_by_time(tmp_path):
    """checkpoint_seconds: a checkpoint as soon as that much time has passed, however many
    batches; with None, only every checkpoint_every batches."""
    from conftest import interrupted

    model = make_tiny("gpt2")
    batches = [random_batch(seed=s) for s in range(4)]
    for seconds, written in ((1e-9, True), (None, False)):
        ckpt = tmp_path / f"t{seconds}.ckpt"
        with pytest.raises(KeyboardInterrupt):
            ni.collect_spectra(model, interrupted(batches, 2), progress=False, layers=[0],
                               checkpoint=ckpt, checkpoint_every=100,
                               checkpoint_seconds=seconds)
        assert ckpt.exists() == written
    assert read_checkpoint_state(tmp_path / "t1e-09.ckpt")["position"]["batches"] == 2
