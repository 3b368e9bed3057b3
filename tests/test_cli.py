"""The nerve-interp command on a local model folder (no hub, no network)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import nerve_interp as ni
from nerve_interp.cli import app


def test_spectra_command(local_model, run_spectra, tmp_path):
    _, text = local_model
    out = tmp_path / "out"
    res = run_spectra("--max-tokens", "600", "--out", str(out), "--layers", "0,-1")
    assert res.exit_code == 0, res.output
    assert "PR gain" in res.output and "capture 600 tokens, 2 layers" in res.output
    # N/D < 10: the FiniteSampleWarning is printed as a line of the report, not a traceback
    assert "warning N/D = " in res.output and "white noise" in res.output
    for name in ("spectra.safetensors", "metrics.csv", "reinjection.csv", "spectra.png",
                 "reinjection.png", "capture.ckpt"):
        assert (out / name).exists(), name
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
    res = run_spectra("--out", str(tmp_path / "o"), "--layers", "9")
    assert res.exit_code != 0 and "out of range" in str(res.exception)


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
                                   "--seeds", "0"])
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
    base = ["ablate", "--model", str(folder), "--text", str(text), "--out", "x"]
    res = CliRunner().invoke(app, [*base, "--capture-tokens", "700"])
    assert seen["max_tokens"] == 700 and "--capture-tokens is deprecated" in res.output
    CliRunner().invoke(app, [*base, "--max-tokens", "900"])
    assert seen["max_tokens"] == 900
    help_text = CliRunner().invoke(app, ["ablate", "--help"]).output
    assert "--max-tokens" in help_text and "--capture-tokens" not in help_text
