"""SpectraResult tables, files (round trip, corrupt, wrong model), plots and the CLI."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from conftest import make_tiny, random_batch  # noqa: E402

import nerve_interp as ni  # noqa: E402
from nerve_interp import metrics as M  # noqa: E402
from nerve_interp.errors import ResultsFileError, SiteError  # noqa: E402


@pytest.fixture(scope="module")
def result():
    model = make_tiny("llama")
    batches = [random_batch(seed=s, seq=40) for s in range(4)]
    return ni.collect_spectra(model, batches, points=("pre", "act", "up", "post"),
                              eigenvectors=True, progress=False, data_label="random")


def test_tables(result):
    df = result.metrics()
    assert list(df.columns[:5]) == ["model", "layer", "point", "metric", "value"]
    # a local capture streams the fourth moment: participation_ratio_corrected too
    assert len(df) == 3 * 4 * (len(M.METRIC_NAMES) + len(M.CORRECTED_NAMES))
    assert not df.duplicated(["model", "layer", "point", "metric"]).any()
    pr = df.query("layer == 1 and point == 'post' and metric == 'participation_ratio'")
    assert pr["value"].item() == pytest.approx(M.participation_ratio(result.eigenvalues(1, "post")))
    r = result.reinjection()
    assert list(r["layer"]) == [0, 1, 2]
    lam_pre, lam_post = result.eigenvalues(2, "pre"), result.eigenvalues(2, "post")
    assert r.loc[2, "js_divergence"] == pytest.approx(M.js_divergence(lam_pre, lam_post))
    assert r.loc[2, "pr_gain"] == pytest.approx(
        M.participation_ratio(lam_post) / M.participation_ratio(lam_pre))
    tidy = result.reinjection(tidy=True)
    assert set(tidy["metric"]) == set(M.REINJECTION_NAMES) and len(tidy) == 3 * 6
    act = result.reinjection(post="act")
    assert "participation_ratio_act" in act.columns
    assert set(result.summary()["point"]) == {"pre", "act", "up", "post"}


def test_access(result):
    assert result.points == ["pre", "act", "up", "post"] and result.layers == [0, 1, 2]
    assert np.all(np.diff(result.eigenvalues("layers.0.ffn.up")) <= 0)
    assert result.eigenvectors(-1, "pre").shape == (48, 48)
    with pytest.raises(SiteError, match="was not captured"):
        result.spectrum(5, "pre")


def test_save_load_round_trip(result, tmp_path):
    path = result.save(tmp_path / "run.safetensors")
    back = ni.SpectraResult.load(path)
    assert back == result
    assert back.metadata == result.metadata
    np.testing.assert_array_equal(back.eigenvectors(1, "post"), result.eigenvectors(1, "post"))
    pd.testing.assert_frame_equal(back.metrics(), result.metrics())
    assert back.metadata["data"] == "random" and back.metadata["n_tokens"] > 0
    assert "nerve_interp" in back.metadata["versions"]
    assert ni.SpectraResult.load(path, model=result.model) == result


def test_bad_files(result, tmp_path):
    path = result.save(tmp_path / "run.safetensors")
    with pytest.raises(ResultsFileError, match="holds spectra of 'LlamaForCausalLM', not 'gpt2'"):
        ni.SpectraResult.load(path, model="gpt2")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ResultsFileError, match="corrupt or truncated"):
        ni.SpectraResult.load(truncated)
    with pytest.raises(ResultsFileError, match="no results file"):
        ni.SpectraResult.load(tmp_path / "missing.safetensors")
    import torch
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ResultsFileError, match="not a nerve_interp spectra file"):
        ni.SpectraResult.load(other)


def test_plots(result):
    from nerve_interp import plotting

    g = plotting.plot_spectra(result.eigenvalue_frame())
    assert len(g.axes) == 3
    ax = plotting.plot_metric(result.metrics(), metric="soft_rank")
    assert ax.get_ylabel() == "soft rank" and len(ax.get_legend().get_texts()) == 4
    axes = plotting.plot_reinjection(result.reinjection())
    assert len(axes) == 4
    with pytest.raises(KeyError, match="lacks the column"):
        plotting.plot_spectra(result.metrics())
    with pytest.raises(KeyError, match="not in the table"):
        plotting.plot_metric(result.metrics(), metric="nope")
    import matplotlib.pyplot as plt

    plt.close("all")
