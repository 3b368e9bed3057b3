"""Subspace ablations: identities, an independent raw-hook reference, batching, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny, random_batch

import nerve_interp as ni
from nerve_interp.ablation import (
    Ablation,
    HeldOutWarning,
    _run_copies,
    ablate,
    ablation_sweep,
    run_ablations,
)
from nerve_interp.errors import NotFittedError, SiteError
from nerve_interp.projection import make_projection
from nerve_interp.sites import as_nnsight

TRAIN = [random_batch(seed=s, seq=40) for s in range(6)]
HELD = [random_batch(seed=100 + s, seq=40) for s in range(2)]


@pytest.fixture(scope="module")
def llama():
    model = make_tiny("llama")
    spectra = ni.collect_spectra(model, TRAIN, points=("pre", "post"), eigenvectors=True,
                                 progress=False)
    return model, spectra


def value(result, metric, **where):
    t = result.table[result.table["metric"] == metric]
    for k, v in where.items():
        t = t[t[k] == v]
    assert len(t) == 1, t
    return float(t["value"].iloc[0])


def raw_hook_loss(model, batches, layer, proj_fn):
    """Mean next-token CE over real positions with ``proj_fn`` applied to the gated post
    point (down_proj input) by a raw forward pre-hook; proj_fn=None is the clean run."""
    handle = None
    if proj_fn is not None:
        handle = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
            lambda m, a: (proj_fn(a[0]),))
    total, count, logits = 0.0, 0, []
    try:
        with torch.no_grad():
            for b in batches:
                out = model(**b).logits
                logits.append(out)
                valid = (b["attention_mask"][:, 1:] & b["attention_mask"][:, :-1]).bool()
                ce = torch.nn.functional.cross_entropy(
                    out[:, :-1].transpose(1, 2), b["input_ids"][:, 1:], reduction="none")
                total += float(ce[valid].sum())
                count += int(valid.sum())
    finally:
        if handle is not None:
            handle.remove()
    return total / count, logits


def test_identities(llama):
    model, spectra = llama
    d = spectra.spectrum(1, "post").dim
    abls = [Ablation((1,), "post", "top", d, "keep"), Ablation((1,), "post", "top", 0, "remove"),
            Ablation((1,), "pre", "top", d, "keep")]
    res = run_ablations(model, spectra, HELD, abls, progress=False)
    for mode, k, point in (("keep", d, "post"), ("remove", 0, "post"), ("keep", d, "pre")):
        assert abs(value(res, "delta_loss", mode=mode, k=k, point=point)) <= 1e-6
        assert value(res, "kl", mode=mode, k=k, point=point) <= 1e-6
        assert value(res, "top1_agreement", mode=mode, k=k, point=point) == 1.0
    assert res.metadata["held_out"] is True


def test_remove_all_is_mean_ablation_and_matches_raw_hooks(llama):
    model, spectra = llama
    spec = spectra.spectrum(2, "post")
    mu = torch.from_numpy(spec.mean).float()
    clean, _ = raw_hook_loss(model, HELD, 2, None)
    mean_abl, _ = raw_hook_loss(model, HELD, 2, lambda x: mu.expand_as(x).clone())
    res = ablate(model, spectra, HELD, layers=2, subspace="top", k=spec.dim, mode="remove",
                 progress=False)
    assert value(res, "delta_loss") == pytest.approx(mean_abl - clean, abs=1e-5)
    assert res.metadata["clean_loss"][0] == pytest.approx(clean, abs=1e-5)
    # and a random-subspace removal at the pre point, against the same raw-hook reference
    proj, _ = make_projection(spec.eigenvalues, spec.require_eigenvectors(), spec.mean,
                              subspace="random", k=5, mode="remove", seed=3)
    ref, ref_logits = raw_hook_loss(model, HELD, 2, lambda x: proj(x.double()).float())
    res = ablate(model, spectra, HELD, layers=[2], subspace="random", k=5, mode="remove",
                 seed=3, progress=False)
    assert value(res, "delta_loss") == pytest.approx(ref - clean, abs=1e-5)
    # same logits as the raw hook
    path = ni.find_ffn_sites(model)[2].path("post")
    out, _ = _run_copies(as_nnsight(model), HELD[0], [{path: proj}], [path])
    torch.testing.assert_close(out.logits, ref_logits[0], rtol=1e-5, atol=1e-5)


def test_copies_do_not_change_results(llama):
    model, spectra = llama
    kw = dict(layers=[0, 2], ks=[1, 4, 16], progress=False)
    a = ablation_sweep(model, spectra, HELD, copies=1, skip_clean_prefix=False, **kw).table
    b = ablation_sweep(model, spectra, HELD, copies=7, **kw).table
    np.testing.assert_allclose(a["value"], b["value"], atol=1e-6)
    np.testing.assert_allclose(a["variance_fraction"], b["variance_fraction"], rtol=1e-12)


def test_sweep_table_and_summary(llama):
    model, spectra = llama
    res = ablation_sweep(model, spectra, HELD, layers=[1], progress=False, seeds=(0, 1))
    t = res.table
    assert {"layer", "point", "subspace", "mode", "k", "variance_fraction", "metric", "value",
            "ci_low", "ci_high"} <= set(t.columns)
    assert set(t["subspace"]) == {"top", "tail", "random"}
    assert (t.loc[t["subspace"] == "random", "n_seeds"] == 2).all()
    dl = t[t["metric"] == "delta_loss"]
    ok = dl.dropna(subset=["ci_low"])
    assert ((ok["ci_low"] <= ok["value"] + 1e-12) & (ok["value"] <= ok["ci_high"] + 1e-12)).all()
    top_keep = dl[(dl["subspace"] == "top") & (dl["mode"] == "keep")].sort_values("k")
    assert top_keep["variance_fraction"].is_monotonic_increasing
    s = res.summary()
    assert list(s["layer"]) == [1] and s["k90"].iloc[0] in set(top_keep["k"])
    assert s["participation_ratio"].iloc[0] == pytest.approx(
        ni.metrics.participation_ratio(spectra.eigenvalues(1, "post")))


def test_encoder_effects():
    model = make_tiny("bert")
    spectra = ni.collect_spectra(model, TRAIN, eigenvectors=True, progress=False)
    d = spectra.spectrum(0, "post").dim
    res = run_ablations(model, spectra, HELD, [Ablation((0,), "post", "top", d, "keep"),
                                               Ablation((0,), "post", "top", d, "remove")],
                        progress=False)
    assert value(res, "cosine", mode="keep") == pytest.approx(1.0, abs=1e-6)
    assert value(res, "embedding_cosine", mode="keep") == pytest.approx(1.0, abs=1e-6)
    # remove-all = mean ablation, against a raw-hook reference
    mu = torch.from_numpy(spectra.mean(0, "post")).float()
    with torch.no_grad():
        clean = [model(**b).last_hidden_state for b in HELD]
        h = model.encoder.layer[0].intermediate.intermediate_act_fn.register_forward_hook(
            lambda m, a, o: mu.expand_as(o).clone())
        abl = [model(**b).last_hidden_state for b in HELD]
        h.remove()
    cos = [torch.nn.functional.cosine_similarity(c, a, dim=-1)[b["attention_mask"].bool()]
           for c, a, b in zip(clean, abl, HELD, strict=True)]
    ref = float(torch.cat(cos).mean())
    assert ref < 1 - 1e-6
    assert value(res, "cosine", mode="remove") == pytest.approx(ref, abs=1e-6)
    assert res.metadata["task"] == "encoder"


def test_bad_input(llama):
    model, spectra = llama
    with pytest.raises(ValueError, match=r"k == 99, must be in \[0, 48\].*layers.1.ffn.post"):
        ablate(model, spectra, HELD, layers=1, k=99, progress=False)
    with pytest.raises(SiteError, match="out of range"):
        ablate(model, spectra, HELD, layers=7, k=1, progress=False)
    no_vec = ni.collect_spectra(model, TRAIN, layers=[0], progress=False)
    with pytest.raises(NotFittedError, match="eigenvectors=True"):
        ablate(model, no_vec, HELD, layers=0, k=1, progress=False)
    with pytest.raises(SiteError, match="was not captured"):
        ablate(model, no_vec, HELD, layers=1, k=1, progress=False)
    with pytest.raises(SiteError, match="captured on 'LlamaForCausalLM', not on"):
        ablate(make_tiny("gpt2"), spectra, HELD, layers=0, k=1, progress=False)
    with pytest.warns(HeldOutWarning, match="24 of 24 evaluation sequences start like "
                                            "sequences the spectra were captured on"):
        res = ablate(model, spectra, TRAIN, layers=0, k=1, progress=False)
    assert res.metadata["held_out"] is False


def test_energy_matched_k(llama):
    model, spectra = llama
    from nerve_interp.projection import energy_k

    res = ablate(model, spectra, HELD, layers=1, energy=0.5, mode="keep", progress=False)
    k = int(res.table["k"].iloc[0])
    assert k == energy_k(spectra.eigenvalues(1, "post"), 0.5)
    assert res.table["variance_fraction"].iloc[0] >= 0.5
    with pytest.raises(ValueError, match="exactly one of k="):
        ablate(model, spectra, HELD, layers=1, progress=False)


def test_sweep_seeds_are_a_sequence(llama):
    """seeds names the seeds (as in width_sweep); the old count still works with a
    DeprecationWarning and means range(n); 0, empty or repeated seeds are refused, since
    they would drop (or double-count) the random controls."""
    model, spectra = llama
    kw = dict(layers=[1], ks=[2], subspaces=("random",), modes=("remove",), progress=False)
    new = ablation_sweep(model, spectra, HELD, seeds=(0, 1), **kw).table
    assert (new["n_seeds"] == 2).all()
    with pytest.warns(DeprecationWarning, match=r"seeds=range\(2\)") as rec:
        old = ablation_sweep(model, spectra, HELD, seeds=2, **kw).table
    assert rec[0].filename == __file__
    assert old.equals(new)
    other = ablation_sweep(model, spectra, HELD, seeds=[5, 6], **kw).table
    assert not other["value"].equals(new["value"])  # the seeds pick the subspaces
    for bad, match in [(0, "no random subspaces"), ((), "seeds is empty"),
                       ([3, 3], "repeats a seed")]:
        with pytest.raises(ValueError, match=match):
            ablation_sweep(model, spectra, HELD, seeds=bad, **kw)
    with pytest.raises(TypeError, match="seeds must hold ints"):
        ablation_sweep(model, spectra, HELD, seeds=[0.5], **kw)


def test_save_load(llama, tmp_path):
    import pandas as pd

    from nerve_interp.ablation import AblationResult
    from nerve_interp.errors import ResultsFileError

    model, spectra = llama
    res = ablation_sweep(model, spectra, HELD, layers=[0], ks=[1, 4], progress=False)
    path = res.save(tmp_path / "sweep.csv")
    back = AblationResult.load(path)
    pd.testing.assert_frame_equal(back.table, res.table, check_dtype=False)
    assert back.metadata["eval_sha1"] == res.metadata["eval_sha1"]
    pd.testing.assert_frame_equal(back.summary(), res.summary(), check_dtype=False)
    with pytest.raises(ResultsFileError, match="cannot read ablation results"):
        AblationResult.load(tmp_path / "missing.csv")


def test_options_object_and_keywords(llama):
    from nerve_interp.ablation import AblationOptions

    model, spectra = llama
    abls = [Ablation((1,), "post", "top", 3, "keep"), Ablation((2,), "pre", "tail", 2, "remove")]
    opts = AblationOptions(copies=1, n_boot=50, progress=False, data_label="held")
    a = run_ablations(model, spectra, HELD, abls, options=opts)
    b = run_ablations(model, spectra, HELD, abls, copies=1, n_boot=50, progress=False,
                      data_label="held")
    c = run_ablations(model, spectra, HELD, abls, options=opts, copies=2)  # keyword wins
    assert a.table.equals(b.table) and a.metadata == b.metadata
    assert c.metadata["copies_per_forward"] == 2
    np.testing.assert_allclose(a.table["value"], c.table["value"], atol=1e-6)
    with pytest.raises(TypeError, match=r"\['batchsize'\]; its options are"):
        run_ablations(model, spectra, HELD, abls, batchsize=4)
    with pytest.raises(ValueError, match="copies == 0, must be >= 1"):
        ablate(model, spectra, HELD, layers=1, k=1, copies=0)


def test_random_matched_control(llama):
    """The variance-matched random control: as much variance as the top-k, more directions,
    and the same loss as the raw-hook projection it stands for."""
    model, spectra = llama
    spec = spectra.spectrum(2, "post")
    clean, _ = raw_hook_loss(model, HELD, 2, None)
    proj, frac = make_projection(spec.eigenvalues, spec.require_eigenvectors(), spec.mean,
                                 subspace="random_matched", k=3, mode="remove", seed=1)
    ref, _ = raw_hook_loss(model, HELD, 2, lambda x: proj(x.double()).float())
    res = ablate(model, spectra, HELD, layers=2, subspace="random_matched", k=3, mode="remove",
                 seed=1, progress=False)
    assert value(res, "delta_loss") == pytest.approx(ref - clean, abs=1e-5)
    row = res.table.iloc[0]
    assert row["n_directions"] == proj.basis.shape[1] > 3
    assert row["variance_fraction"] == pytest.approx(frac)
    sweep = ablation_sweep(model, spectra, HELD, layers=[2], ks=[1, 3],
                           subspaces=("top", "random_matched"), modes=("remove",),
                           seeds=(0, 1), progress=False).table
    dl = sweep[sweep["metric"] == "delta_loss"].set_index(["subspace", "k"])
    assert (dl.loc["random_matched", "n_seeds"] == 2).all()
    for k in (1, 3):
        top = dl.loc[("top", k), "variance_fraction"]
        assert top - 1e-12 <= dl.loc[("random_matched", k), "variance_fraction"] < top + 0.2
