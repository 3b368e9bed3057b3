"""Files that defend themselves: a checksum over every tensor of results files and
checkpoints (a damaged file is refused, naming it), format versions (newer: upgrade; older:
read), the user's umask, an exclusive lock on an output folder, and no temporary file left by
a writer killed mid-write."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import make_tiny, random_batch

import nerve_interp as ni
from nerve_interp._io import LOCK_NAME, FolderLock
from nerve_interp.errors import OutputFolderError, ResultsFileError

ROOT = Path(__file__).resolve().parents[1]


def _damage(path: Path, n: int = 4096) -> None:
    """Overwrite ``n`` bytes in the middle of the tensor data (the header stays valid)."""
    blob = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", blob[:8])[0]
    mid = start + (len(blob) - start) // 2 - n // 2
    n = min(n, len(blob) - mid)
    blob[mid:mid + n] = bytes((b + 1) % 256 for b in blob[mid:mid + n])
    path.write_bytes(bytes(blob))


def _rewrite_header(path: Path, edit) -> None:
    """Rewrite the safetensors header's metadata with ``edit(metadata)`` (tensors kept)."""
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    edit(header["__metadata__"])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n:])


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("files")
    model = make_tiny("gpt2")
    batches = [random_batch(seed=s) for s in range(3)]
    ckpt = tmp / "run.ckpt"
    res = ni.collect_spectra(model, batches, progress=False, checkpoint=ckpt, layers=[0, 1])
    return model, batches, ckpt, res.save(tmp / "spectra.safetensors")


def test_damaged_checkpoint_and_results_file_are_refused(captured, tmp_path):
    model, batches, ckpt, results = captured
    bad_ckpt, bad_res = tmp_path / "bad.ckpt", tmp_path / "bad.safetensors"
    bad_ckpt.write_bytes(ckpt.read_bytes())
    bad_res.write_bytes(results.read_bytes())
    _damage(bad_ckpt)
    _damage(bad_res)
    with pytest.raises(ResultsFileError, match=rf"{bad_ckpt} is damaged.*checksum.*--fresh"):
        ni.collect_spectra(model, batches, progress=False, checkpoint=bad_ckpt, layers=[0, 1])
    with pytest.raises(ResultsFileError, match=rf"{bad_res} is damaged.*Re-run the capture"):
        ni.SpectraResult.load(bad_res)
    # an edit of the metadata (not a tensor) is damage too
    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(results.read_bytes())
    _rewrite_header(edited, lambda m: m.update(metadata=m["metadata"].replace('"n_tokens": ',
                                                                              '"n_tokens": 1')))
    with pytest.raises(ResultsFileError, match="is damaged"):
        ni.SpectraResult.load(edited)
    assert ni.SpectraResult.load(results).metadata["n_tokens"] > 0  # the intact file reads


def test_format_versions_newer_refused_older_read(captured, tmp_path):
    model, batches, ckpt, results = captured
    newer = tmp_path / "newer.safetensors"
    newer.write_bytes(results.read_bytes())
    _rewrite_header(newer, lambda m: m.update(format_version="99"))
    with pytest.raises(ResultsFileError, match=r"format version 99.*reads versions up to 2\. "
                                               r"Upgrade nerve_interp"):
        ni.SpectraResult.load(newer)
    newer_ckpt = tmp_path / "newer.ckpt"
    newer_ckpt.write_bytes(ckpt.read_bytes())

    def bump(m):
        state = json.loads(m["state"])
        state["format_version"] = 99
        m["state"] = json.dumps(state)

    _rewrite_header(newer_ckpt, bump)
    with pytest.raises(ResultsFileError, match="format version 99.*Upgrade nerve_interp"):
        ni.collect_spectra(model, batches, progress=False, checkpoint=newer_ckpt, layers=[0, 1])
    older = tmp_path / "older.safetensors"  # version 1: written before checksums
    older.write_bytes(results.read_bytes())
    _rewrite_header(older, lambda m: (m.update(format_version="1"), m.pop("sha256")))
    assert ni.SpectraResult.load(older) == ni.SpectraResult.load(results)


def test_files_follow_the_umask(captured, tmp_path):
    _, _, _, results = captured
    old = os.umask(0o027)
    try:
        path = ni.SpectraResult.load(results).save(tmp_path / "r.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


def test_folder_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / LOCK_NAME
    try:
        lock.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(),
                                    "command": "spectra", "started": "then"}))
        with pytest.raises(OutputFolderError, match=rf"in use by another run: pid {live.pid} "
                                                    r"on host .*choose another --out"):
            FolderLock(tmp_path).__enter__()
        lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
        with FolderLock(tmp_path, "test") as held:
            assert held.took_over["pid"] == dead.pid
            assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert not lock.exists()
        # another host's lock is never taken over (its pid means nothing here)
        lock.write_text(json.dumps({"pid": dead.pid, "host": "other-host"}))
        with pytest.raises(OutputFolderError, match="other-host"):
            FolderLock(tmp_path).__enter__()
    finally:
        live.kill()
        live.wait()


KILLED_WRITER = textwrap.dedent("""
    import sys, time, pathlib
    import safetensors.torch as st
    import nerve_interp as ni
    sys.path.insert(0, sys.argv[3])
    from conftest import make_tiny, random_batch

    real = st.save_file

    def stall(tensors, filename, metadata=None):  # write half a file, then hang
        real(tensors, filename, metadata=metadata)
        data = pathlib.Path(filename).read_bytes()
        pathlib.Path(filename).write_bytes(data[: len(data) // 2])
        pathlib.Path(sys.argv[2]).write_text(filename)
        time.sleep(600)

    st.save_file = stall
    ni.collect_spectra(make_tiny("gpt2"), [random_batch(seed=s) for s in range(3)],
                       progress=False, checkpoint=sys.argv[1], layers=[0, 1])
""")


def test_kill_during_a_checkpoint_write_leaves_no_temporary_after_the_resume(tmp_path):
    script, ready, ckpt = tmp_path / "w.py", tmp_path / "ready", tmp_path / "run.ckpt"
    script.write_text(KILLED_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), str(ready),
                             str(ROOT / "tests")], env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 600  # a loaded CI machine
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), "the writer never reached its checkpoint write"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    tmp = Path(ready.read_text())
    assert tmp.exists() and tmp.name.startswith(".run.ckpt.") and not ckpt.exists()
    ni.collect_spectra(make_tiny("gpt2"), [random_batch(seed=s) for s in range(3)],
                       progress=False, checkpoint=ckpt, layers=[0, 1])
    assert ckpt.exists() and not list(tmp_path.glob(".*.tmp"))


def test_damaged_training_checkpoint_is_refused(tmp_path):
    from test_training import blocks

    from nerve_interp.training import TrainConfig, train

    ckpt, cfg = tmp_path / "run.pt", TrainConfig(steps=2, warmup=1)
    train(make_tiny("llama"), blocks(), None, cfg, checkpoint=ckpt, progress=False)
    train(make_tiny("llama"), blocks(), None, cfg, checkpoint=ckpt, progress=False)  # intact
    blob = bytearray(ckpt.read_bytes())
    mid = len(blob) // 2  # inside the weights (torch.load itself would not notice)
    blob[mid:mid + 64] = bytes((b + 1) % 256 for b in blob[mid:mid + 64])
    ckpt.write_bytes(bytes(blob))
    with pytest.raises(ResultsFileError, match=rf"{ckpt} (is damaged|cannot be read).*Delete"):
        train(make_tiny("llama"), blocks(), None, cfg, checkpoint=ckpt, progress=False)


def test_training_checkpoint_of_a_newer_format_is_refused(tmp_path):
    import torch
    from test_training import blocks

    from nerve_interp.training import CHECKPOINT_VERSION, TrainConfig, train

    ckpt, cfg = tmp_path / "run.pt", TrainConfig(steps=2, warmup=1)
    train(make_tiny("llama"), blocks(), None, cfg, checkpoint=ckpt, progress=False)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["format_version"] == CHECKPOINT_VERSION and saved["nerve_interp"]
    torch.save({**saved, "format_version": CHECKPOINT_VERSION + 97}, ckpt)
    with pytest.raises(ResultsFileError, match=rf"format version {CHECKPOINT_VERSION + 97}.*"
                                                r"Upgrade nerve_interp"):
        train(make_tiny("llama"), blocks(), None, cfg, checkpoint=ckpt, progress=False)
    del saved["format_version"], saved["nerve_interp"]  # written before versions: still read
    torch.save(saved, ckpt)
    train(make_tiny("llama"), blocks(), None, cfg, checkpoint=ckpt, progress=False)
