"""Token diagnostics and exclusions: outlier share, top tokens, spectra without massive tokens.

References are independent: numpy on activations we know exactly (a lookup-table model whose
FFN activation is ``table[input_ids]``) and raw torch hooks on tiny random models.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import V, make_tiny, random_batch, raw_hook_points, ref_eigenvalues

import nerve_interp as ni
from nerve_interp.diagnostics import (
    TokenNormStats,
    exclusion_rule,
    histogram_quantile,
    outlier_k,
    remove_rows,
)
from nerve_interp.errors import CaptureError, OutlierTokenWarning

D, VOCAB = 8, 4000


class _Act(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.act = torch.nn.Identity()


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = _Act()

    def forward(self, x):
        return self.mlp.act(x)


class Lookup(torch.nn.Module):
    """A token model whose FFN activation is exactly ``table[input_ids]`` (float64)."""

    def __init__(self, table):
        super().__init__()
        self.embed = torch.nn.Embedding.from_pretrained(table, freeze=True)
        self.blocks = torch.nn.ModuleList([_Block()])

    def forward(self, input_ids, attention_mask=None):
        return self.blocks[0](self.embed(input_ids))


def lookup_data(n_batches=3, batch=4, seq=40, seed=0):
    """Unique token ids (no ties), left and right padding, a massive token at position 0 of
    every sequence (norms ~100-130× the others)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(VOCAB, D, generator=g, dtype=torch.float64) + 0.5
    ids = torch.randperm(VOCAB - 100, generator=g)[: n_batches * batch * seq] + 100
    ids = ids.reshape(n_batches, batch, seq)
    batches, massive = [], []
    for b in range(n_batches):
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1, seq - 7:] = 0   # right padding
        mask[3, :5] = 0         # left padding
        x = ids[b].clone()
        for r in range(batch):
            first = int(mask[r].nonzero()[0])
            tid = 1 + len(massive)
            x[r, first] = tid
            table[tid] = (100 + 3 * len(massive)) * table[tid] / table[tid].norm() * 2.8
            massive.append(tid)
        batches.append({"input_ids": x, "attention_mask": mask})
    model = Lookup(table)
    sites = ni.find_ffn_sites(model, pre="blocks.{layer}.mlp.act.input",
                              post="blocks.{layer}.mlp.act.output")
    return model, sites, batches, table.numpy(), massive


def lookup_ties(n_batches=5, seed=0):
    """``lookup_data`` with tied massive tokens: the first token of every sequence has its own
    id, but all their activations are sign flips of one vector, so their norms are exactly
    equal (and their vectors, hence variance shares, differ)."""
    model, sites, batches, table, massive = lookup_data(n_batches=n_batches, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    table = torch.from_numpy(table.copy())
    for tid in massive[1:]:
        table[tid] = table[massive[0]] * (torch.randint(0, 2, (D,), generator=g) * 2 - 1)
    model = Lookup(table)
    return model, sites, batches, table.numpy(), massive


def real_rows(batches, table):
    ids = np.concatenate([b["input_ids"][b["attention_mask"].bool()].numpy() for b in batches])
    pos = np.concatenate([(b["attention_mask"].cumsum(1) - 1)[b["attention_mask"].bool()]
                          .numpy() for b in batches])
    return table[ids], ids, pos


def test_share_top_tokens_and_exact_removal_against_numpy():
    model, sites, batches, table, massive = lookup_data()
    x, ids, pos = real_rows(batches, table)
    n = len(x)
    frac = (len(massive) - 0.5) / n  # k = ⌈frac·N⌉ = the 12 massive tokens
    with pytest.warns(OutlierTokenWarning, match=r"layer 0 post: top 12 of \d+ tokens.*"
                      r"positions 0 \(12×\)"):
        res = ni.collect_spectra(model, batches, precision="fp64", sites=sites, points=("post",),
                                 progress=False,
                                 outlier_fraction=frac, max_outlier_tokens=20)
    d = res.diagnostics[(0, "post")]
    # top-m by streaming (batch by batch) == a full sort of every norm
    norms = np.linalg.norm(x, axis=1)
    order = np.argsort(-norms)
    np.testing.assert_allclose(d.top_norms, norms[order[:20]], rtol=1e-12)
    np.testing.assert_array_equal(d.top_meta[:, 3], ids[order[:20]])
    np.testing.assert_array_equal(d.top_meta[:, 2], pos[order[:20]])
    assert set(d.top_meta[:12, 3]) == set(massive) and d.k == 12
    # variance share of the top k, directly
    xc2 = ((x - x.mean(0)) ** 2).sum(1)
    assert d.outlier_share == pytest.approx(xc2[order[:12]].sum() / xc2.sum(), rel=1e-10)
    np.testing.assert_allclose(d.top_share, xc2[order[:20]] / xc2.sum(), rtol=1e-10)
    assert d.outlier_flag and d.outlier_share > 0.9
    assert d.median_norm == pytest.approx(np.median(norms), rel=0.06)
    assert d.max_norm == pytest.approx(norms.max(), rel=1e-12)
    # the spectrum without them == numpy on the kept rows (removed in the same pass)
    base = ref_eigenvalues(x[~np.isin(ids, massive)])
    free = res.without_outliers()
    got = free.eigenvalues(0, "post")
    assert np.max(np.abs(got - base)) / base[0] <= 1e-10
    assert free.spectrum(0, "post").n_samples == n - 12
    assert free.metadata["exclusion"]["outliers_removed"] == {"layers.0.ffn.post": 12}
    # ... and == capturing again without them, by id or by position
    for kw in ({"exclude_token_ids": massive}, {"exclude_positions": (0,)}):
        again = ni.collect_spectra(model, batches, precision="fp64", sites=sites, points=("post",),
                                   progress=False, **kw)
        lam = again.eigenvalues(0, "post")
        assert np.max(np.abs(lam - base)) / base[0] <= 1e-10, kw
        assert not again.diagnostics[(0, "post")].outlier_flag
    # all tokens: the tables carry the flag and the share
    m = res.metrics()
    assert m["outlier_flag"].all() and m["outlier_share"].iloc[0] == d.outlier_share
    tokens = res.outlier_tokens(flagged_only=True)
    assert len(tokens) == 12 and (tokens["position"] == 0).all()
    assert set(tokens["token"]) == {f"id {t}" for t in massive}


def test_streaming_stats_merge_and_quantiles():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 6, generator=g, dtype=torch.float64) * torch.rand(3000, 1, generator=g)
    meta = torch.stack([torch.zeros(3000, dtype=torch.long), torch.arange(3000),
                        torch.arange(3000) % 50, torch.arange(3000)], 1)
    one = TokenNormStats("x", max_outlier_tokens=37)
    for s in range(0, 3000, 250):
        one.observe(x[s:s + 250], meta[s:s + 250])
    a, b = TokenNormStats("x", max_outlier_tokens=37), TokenNormStats("x", max_outlier_tokens=37)
    a.observe(x[:1100], meta[:1100])
    b.observe(x[1100:], meta[1100:])
    a.merge(b)
    norms = x.norm(dim=1).numpy()
    want = np.sort(norms)[::-1][:37]
    for st in (one, a):
        assert st.n_samples_seen_ == 3000
        np.testing.assert_allclose(st.top_norms_.numpy(), want, rtol=1e-12)
        np.testing.assert_array_equal(st.top_meta_[:, 1].numpy(), np.argsort(-norms)[:37])
        hist = st.histogram_.numpy()
        for q in (0.1, 0.5, 0.9, 0.99):
            assert histogram_quantile(hist, q) == pytest.approx(np.quantile(norms, q), rel=0.06)
    assert torch.equal(one.histogram_, a.histogram_)


@pytest.mark.parametrize("known_rows", [True, False])
def test_merge_is_exact_and_order_free_with_tied_norms(known_rows):
    """Shards merged in any order or grouping == one stream == a full sort by (norm desc,
    batch, row, position), also when the cut of the top m falls inside tokens of equal norm;
    without rows in the metadata (inputs without tokens) ties keep the row order."""
    from itertools import permutations

    g = torch.Generator().manual_seed(3)
    n_b, per, m = 12, 50, 16
    x = torch.randn(n_b * per, 5, generator=g, dtype=torch.float64)
    sink = torch.tensor([30.0, -4.0, 2.5, 7.0, 1.0], dtype=torch.float64)
    tied = torch.randperm(n_b * per, generator=g)[:40]  # 40 tokens of one norm > m = 16
    signs = torch.randint(0, 2, (40, 5), generator=g, dtype=torch.float64) * 2 - 1
    x[tied] = sink * signs
    batch, row = torch.arange(n_b).repeat_interleave(per), torch.arange(per).repeat(n_b)
    meta = torch.stack([batch, row, row % 10, 1000 + torch.arange(n_b * per)], 1)
    if not known_rows:
        meta[:, 1:] = -1
    chunks = [(x[b * per:(b + 1) * per], meta[b * per:(b + 1) * per]) for b in range(n_b)]

    def record(which):
        st = TokenNormStats("x", max_outlier_tokens=m)
        for b in which:
            rows, mt = chunks[b]
            st.observe(rows, mt if known_rows else mt[:1])
        return st

    one = record(range(n_b))
    norms = x.norm(dim=1).numpy()
    want = np.lexsort((row.numpy(), batch.numpy(), -norms))[:m]  # row order = position order
    assert np.sum(norms == norms[tied[0]]) == 40 and norms[want[-1]] == norms[tied[0]]
    np.testing.assert_array_equal(one.top_norms_.numpy(), norms[want])
    np.testing.assert_array_equal(one.top_vectors_.numpy(), x[want].numpy())
    np.testing.assert_array_equal(one.top_meta_.numpy(), meta[want].numpy())
    shards = [record(range(r, n_b, 3)) for r in range(3)]  # batch i on "rank" i % 3
    for order in permutations(range(3)):
        merged = TokenNormStats("x", max_outlier_tokens=m)
        for r in order:
            merged.merge(shards[r])
        grouped = record(range(order[0], n_b, 3)).merge(
            record(range(order[1], n_b, 3)).merge(shards[order[2]]))
        for st in (merged, grouped):
            assert st.n_samples_seen_ == one.n_samples_seen_ and st.max_norm_ == one.max_norm_
            assert torch.equal(st.histogram_, one.histogram_)
            for attr in ("top_norms_", "top_vectors_", "top_meta_"):
                assert torch.equal(getattr(st, attr), getattr(one, attr)), (order, attr)


def test_remove_rows_against_numpy():
    g = np.random.default_rng(0)
    x = g.normal(size=(200, 5)) + 3.0
    x[:4] *= 500
    acc = ni.CovarianceAccumulator(precision="fp64").update(torch.from_numpy(x))
    n, mu, m2 = remove_rows(200, acc.mean_, acc.scatter_, torch.from_numpy(x[:4]))
    assert n == 196
    np.testing.assert_allclose(mu.numpy(), x[4:].mean(0), rtol=1e-10)
    np.testing.assert_allclose((m2 / (n - 1)).numpy(), np.cov(x[4:], rowvar=False), rtol=1e-8,
                               atol=1e-10)
    with pytest.raises(ValueError, match="2 left"):
        remove_rows(5, acc.mean_, acc.scatter_, torch.from_numpy(x[:4]))
    assert (outlier_k(4096, 0.01, 256), outlier_k(10**6, 0.01, 256), outlier_k(3, 0.01, 9)) == (
        41, 256, 1)


@pytest.mark.parametrize("name,family", [("gpt2", "plain"), ("llama", "gated")])
def test_exclusion_by_position_and_id_matches_raw_hooks(name, family):
    """Left and right padding (random_batch has both): positions count real tokens."""
    model = make_tiny(name)
    batches = [random_batch(seed=s) for s in range(3)]
    drop_ids = [int(batches[0]["input_ids"][0, 5]), int(batches[1]["input_ids"][2, 11])]
    keep, n_pos, n_ids = [], 0, 0
    for b in batches:
        mask = b["attention_mask"].bool()
        pos = torch.zeros_like(b["input_ids"])
        for r in range(mask.shape[0]):  # position among the real tokens, by a plain loop
            p = 0
            for c in range(mask.shape[1]):
                if mask[r, c]:
                    pos[r, c] = p
                    p += 1
        by_pos = mask & ((pos == 0) | (pos == 3))
        by_id = mask & ~by_pos & torch.isin(b["input_ids"], torch.tensor(drop_ids))
        n_pos, n_ids = n_pos + int(by_pos.sum()), n_ids + int(by_id.sum())
        keep.append(mask & ~by_pos & ~by_id)
    assert n_ids > 0
    ref = raw_hook_points(model, batches, family, select=keep)
    res = ni.collect_spectra(model, batches, precision="fp64", exclude_positions=[3, 0],
                             exclude_token_ids=drop_ids,
                             progress=False)
    assert res.metadata["n_tokens"] == sum(int(k.sum()) for k in keep)
    ex = res.metadata["exclusion"]
    assert ex["positions"] == [0, 3] and ex["token_ids"] == sorted(drop_ids)
    assert res.metadata["n_excluded"]["positions"] == n_pos
    assert res.metadata["n_excluded"]["token_ids"] == n_ids
    for (layer, point), x in ref.items():
        if point not in res.points:
            continue
        want = ref_eigenvalues(x)
        assert np.max(np.abs(res.eigenvalues(layer, point) - want)) / want[0] <= 1e-9
    # skip_first is exclude_positions=range(k)
    with pytest.warns(DeprecationWarning, match="skip_first"):
        a = ni.collect_spectra(model, batches, precision="fp64", skip_first=2, progress=False,
                               layers=[0])
    b = ni.collect_spectra(model, batches, precision="fp64", exclude_positions=(0, 1),
                           progress=False, layers=[0])
    np.testing.assert_array_equal(a.eigenvalues(0, "post"), b.eigenvalues(0, "post"))
    assert a.metadata["exclusion"]["positions"] == [0, 1]


def test_norm_rule_calibrated_on_first_batch():
    model, sites, batches, table, massive = lookup_data()
    first, _, _ = real_rows(batches[:1], table)
    threshold = 20 * np.median(np.linalg.norm(first, axis=1))
    x, _, _ = real_rows(batches, table)
    kept = x[np.linalg.norm(x, axis=1) <= threshold]
    res = ni.collect_spectra(model, batches, precision="fp64", sites=sites, points=("post",),
                             progress=False,
                             exclude_norm_above=20)
    assert len(kept) == len(x) - len(massive)
    want = ref_eigenvalues(kept)
    assert np.max(np.abs(res.eigenvalues(0, "post") - want)) / want[0] <= 1e-10
    n_ex = res.metadata["n_excluded"]
    assert n_ex["norm"] == {"layers.0.ffn.post": len(massive)}
    assert n_ex["norm_thresholds"]["layers.0.ffn.post"] == pytest.approx(threshold, rel=1e-12)
    assert res.metadata["n_tokens"] == len(x)  # tokens read; the point kept fewer
    assert res.spectrum(0, "post").n_samples == len(kept)


def test_save_load_round_trip_and_switch_off(tmp_path):
    model, sites, batches, _, _ = lookup_data()
    with pytest.warns(OutlierTokenWarning):
        res = ni.collect_spectra(model, batches, sites=sites, progress=False, eigenvectors=True,
                                 outlier_fraction=0.03)  # k = 14: every one of the 12 sinks
    back = ni.SpectraResult.load(res.save(tmp_path / "r.safetensors"))
    for frame in ("metrics", "reinjection", "outlier_tokens", "outlier_comparison"):
        a, b = getattr(res, frame)(), getattr(back, frame)()
        assert a.equals(b), frame
    assert back.reinjection()[["outlier_flag_pre", "outlier_flag_post"]].all(axis=None)
    np.testing.assert_array_equal(back.without_outliers().eigenvectors(0, "post"),
                                  res.without_outliers().eigenvectors(0, "post"))
    assert back.metadata["diagnostics"]["flagged"] == ["layers.0.ffn.pre", "layers.0.ffn.post"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutlierTokenWarning)
        off = ni.collect_spectra(model, batches, sites=sites, progress=False, diagnostics=False)
    m = off.metrics()
    assert m["outlier_share"].isna().all() and m["outlier_flag"].isna().all()
    with pytest.raises(ValueError, match="diagnostics=True"):
        off.without_outliers()


def test_checkpoint_resume_keeps_diagnostics(tmp_path):
    model, sites, batches, _, _ = lookup_data(n_batches=4)
    kw = dict(sites=sites, points=("post",), progress=False, outlier_fraction=0.03)
    with pytest.warns(OutlierTokenWarning):
        full = ni.collect_spectra(model, batches, **kw)
        ckpt = tmp_path / "c.ckpt"
        ni.collect_spectra(model, batches[:2], checkpoint=ckpt, checkpoint_every=1, **kw)
        resumed = ni.collect_spectra(model, batches, checkpoint=ckpt, **kw)
    a, b = full.diagnostics[(0, "post")], resumed.diagnostics[(0, "post")]
    assert a.outlier_share == pytest.approx(b.outlier_share, rel=1e-12)
    np.testing.assert_array_equal(a.top_meta, b.top_meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt"]  # one file, one write
    # a checkpoint written without diagnostics resumes, without them and with a warning
    bare = tmp_path / "bare.ckpt"
    ni.collect_spectra(model, batches[:2], checkpoint=bare, checkpoint_every=1,
                       **{**kw, "diagnostics": False})
    with pytest.warns(UserWarning, match="no token statistics"):
        later = ni.collect_spectra(model, batches, checkpoint=bare, **kw)
    assert not later.diagnostics


def test_bad_exclusions_and_thresholds(tiny_tokenizer):
    model = make_tiny("gpt2")
    batches = [random_batch(seed=s) for s in range(2)]
    kw = dict(progress=False, layers=[0])
    with pytest.raises(CaptureError, match=r"every one of the \d+ real tokens .* excluded"):
        ni.collect_spectra(model, batches, exclude_positions=range(30), **kw)
    short = {"input_ids": torch.randint(2, V, (2, 3)), "attention_mask": torch.ones(2, 3)}
    with pytest.warns(UserWarning, match="1 batch.* had every real token excluded"):
        ni.collect_spectra(model, [short, *batches], exclude_positions=(0, 1, 2), **kw)
    with pytest.warns(UserWarning, match=r"exclude_positions \[50\] never occurred: the "
                      r"longest sequence had 24 real tokens"):
        ni.collect_spectra(model, batches, exclude_positions=(0, 50), **kw)
    with pytest.raises(ValueError, match="beyond the sequence length.*max_length = 16"):
        ni.collect_spectra(model, ["w3 w4 w5"] * 4, tokenizer=tiny_tokenizer, max_length=16,
                           exclude_positions=(16,), **kw)
    with pytest.raises(ValueError, match=rf"\[{V}, 500\], not in the vocabulary \(size {V}"):
        ni.collect_spectra(model, batches, exclude_token_ids=(3, V, 500), **kw)
    with pytest.raises(ValueError, match="exclude_positions has -1, must be >= 0"):
        ni.collect_spectra(model, batches, exclude_positions=(-1,), **kw)
    with pytest.raises(TypeError, match=r"sequence of integers, e.g. \(0,\)"):
        ni.collect_spectra(model, batches, exclude_positions=0, **kw)
    bad = [({"exclude_norm_above": 0.5}, "exclude_norm_above == 0.5, must be"),
           ({"outlier_fraction": 0.0}, r"outlier_fraction == 0.0, must be in \(0, 1\)"),
           ({"outlier_fraction": 1.5}, r"outlier_fraction == 1.5"),
           ({"outlier_threshold": 1.0}, r"outlier_threshold == 1.0, must be in \(0, 1\)"),
           ({"max_outlier_tokens": 0}, "max_outlier_tokens == 0, must be >= 1"),
           ({"skip_first": -1}, "skip_first == -1")]
    for args, match in bad:
        with pytest.raises(ValueError, match=match), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # skip_first
            ni.collect_spectra(model, batches, **args, **kw)
    from test_sites import FunctionalNet

    with pytest.raises(CaptureError, match="no input_ids.*need token inputs"):
        ni.collect_spectra(FunctionalNet().eval(), [torch.randn(2, 5, 8)],
                           exclude_positions=(0,), progress=False)
    rule = exclusion_rule((2, 0, 2), (), None, skip_first=1)
    assert rule.positions == (0, 2) and rule.active and not exclusion_rule().active
    assert math.isnan(histogram_quantile(np.zeros(5), 0.5))


@pytest.mark.filterwarnings("ignore::nerve_interp.errors.RankDeficientWarning")
def test_smollm2_attention_sink_is_flagged_and_excluding_it_restores_the_spectrum():
    model, tok = ni.load_model("smollm2-135m")
    texts = ni.load_corpus("python-docs", split="train")
    batches = list(ni.tokenize_batches(texts[:8], tok, batch_size=8, max_length=128))
    with pytest.warns(OutlierTokenWarning, match=r"(?s)layer 11 post: .*positions 0 \("):
        res = ni.collect_spectra(model, batches, layers=[5, 11], progress=False,
                                 tokenizer=tok)
    flagged = res.metrics().query("point == 'post' and metric == 'participation_ratio'")
    assert flagged.set_index("layer")["outlier_flag"].to_dict() == {5: False, 11: True}
    clean = ni.collect_spectra(model, batches, layers=[11], points=("post",), progress=False,
                               exclude_positions=(0,))
    pr = ni.metrics.participation_ratio
    assert pr(clean.eigenvalues(11, "post")) > 10 * pr(res.eigenvalues(11, "post"))
    # the spectrum without the flagged tokens, from the first pass alone, agrees on that
    assert pr(res.without_outliers().eigenvalues(11, "post")) > 10 * pr(
        res.eigenvalues(11, "post"))
    assert not clean.diagnostics[(11, "post")].outlier_flag


def test_ablation_and_tracking_record_the_exclusion():
    from nerve_interp.tracking import SpectralTracker

    model = make_tiny("gpt2")
    batches = [random_batch(seed=s) for s in range(3)]
    spectra = ni.collect_spectra(model, batches[:2], layers=[1], points=("post",),
                                 eigenvectors=True, exclude_positions=(0,), progress=False)
    res = ni.ablate(model, spectra, batches[2:], layers=1, k=4)
    assert res.metadata["spectra_exclusion"]["positions"] == [0]
    tracker = SpectralTracker(batches[:1], layers=[0], exclude_token_ids=(5,), diagnostics=True)
    tracker.measure(model, 0)
    assert tracker.metadata["exclusion"]["token_ids"] == [5]
    shares = tracker.frame.query("metric == 'outlier_share'")
    assert len(shares) == 2 and shares["value"].between(0, 1).all()


def test_outlier_figure_from_tables():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, sites, batches, _, _ = lookup_data()
    with pytest.warns(OutlierTokenWarning):
        res = ni.collect_spectra(model, batches, sites=sites, progress=False,
                                 outlier_fraction=0.03)
    comp = res.outlier_comparison()
    assert set(comp["tokens"]) == {"all", "without outliers"}
    pr = comp.query("metric == 'participation_ratio' and point == 'post'").set_index("tokens")
    assert pr.loc["without outliers", "value"] > 1.5 * pr.loc["all", "value"]
    axes = ni.plotting.plot_outliers(comp, res.outlier_tokens(flagged_only=True))
    assert len(axes) == 3 and axes[0].get_yscale() == "log"
    heights = [p.get_height() for p in axes[2].patches]
    assert heights[0] == 12 and sum(heights) == 14  # top k = 14: the 12 sinks at 0, 2 others
    plt.close(axes[0].figure)
    with pytest.raises(KeyError, match="lacks the column"):
        ni.plotting.plot_outliers(res.metrics(), res.outlier_tokens())


def test_cli_outlier_report_names_layers_positions_and_the_rerun_flag():
    from nerve_interp.cli import format_outliers

    model, sites, batches, _, _ = lookup_data()
    with pytest.warns(OutlierTokenWarning):
        res = ni.collect_spectra(model, batches, sites=sites, points=("post",), progress=False,
                                 outlier_fraction=0.03)
    text = format_outliers(res)
    assert "1 of 1 points dominated" in text
    assert "layer   0 post" in text and "positions 0 (12×)" in text
    assert "rerun without them: --exclude-positions 0 (" in text
    assert "--max-outlier-tokens" not in text
    # more outlier tokens (12 sinks) than kept top tokens (8): the report says how to raise it
    with pytest.warns(OutlierTokenWarning):
        few = ni.collect_spectra(model, batches, sites=sites, points=("post",), progress=False,
                                 max_outlier_tokens=8)
    text = format_outliers(few)
    assert "without 8+ tokens" in text
    assert "every one of the 8 kept top tokens is an outlier token at 0 post" in text
    assert "rerun with --max-outlier-tokens 32" in text


def test_cli_max_outlier_tokens_default_and_pass_through(run_spectra, tmp_path):
    import inspect

    from nerve_interp import cli
    from nerve_interp.diagnostics import DEFAULT_MAX_OUTLIER_TOKENS

    default = inspect.signature(cli.spectra).parameters["max_outlier_tokens"].default
    assert default == DEFAULT_MAX_OUTLIER_TOKENS
    assert inspect.signature(cli.demo).parameters["max_outlier_tokens"].default == 1024
    out = tmp_path / "o"
    res = run_spectra("--max-tokens", "300", "--out", out, "--layers", "0",
                      "--max-outlier-tokens", "16")
    assert res.exit_code == 0, res.output
    back = ni.SpectraResult.load(out / "spectra.safetensors")
    assert back.metadata["diagnostics"]["max_outlier_tokens"] == 16


def test_massive_tokens_beyond_the_top_k_are_left_out_too():
    """More sinks (12) than the top 1% (k = 5): the share flags the point, and every massive
    token (‖x − μ‖² > 20× the mean token's) is an outlier token, not only the top k."""
    model, sites, batches, table, massive = lookup_data()
    x, ids, _ = real_rows(batches, table)
    with pytest.warns(OutlierTokenWarning, match=r"top 5 of \d+ tokens .*; 12 outlier tokens at "
                      r"positions 0 \(12×\)"):
        res = ni.collect_spectra(model, batches, precision="fp64", sites=sites, points=("post",),
                                 progress=False)
    d = res.diagnostics[(0, "post")]
    assert d.k == 5 and d.n_outliers == 12 and d.outlier_flag and not d.saturated
    xc2 = ((x - x.mean(0)) ** 2).sum(1)
    want_mask = np.isin(ids, massive) | (np.argsort(np.argsort(-np.linalg.norm(x, axis=1))) < 5)
    assert (xc2 > 20 * xc2.mean()).sum() == 12 and want_mask.sum() == 12
    base = ref_eigenvalues(x[~want_mask])
    got = res.without_outliers().eigenvalues(0, "post")
    assert np.max(np.abs(got - base)) / base[0] <= 1e-10
    with pytest.warns(OutlierTokenWarning, match=r"12\+? outlier tokens|at least"):
        few = ni.collect_spectra(model, batches, precision="fp64", sites=sites, points=("post",),
                                 progress=False,
                                 max_outlier_tokens=8)
    assert few.diagnostics[(0, "post")].saturated


def test_a_second_tier_of_massive_tokens_hidden_by_the_first_is_found():
    """Known answer: 5 sinks (norm ~1000x) inflate the mean token's variance so much that 80
    tokens at ~30x norm pass the one-round test (20x the mean over all tokens) although each
    holds ~900x the variance of the others. The iterated test (mean of the tokens not yet
    marked) marks exactly the 85; the first round alone marks only the top k = 30."""
    from nerve_interp.diagnostics import MASSIVE_TOKEN_FACTOR, massive_tokens, outlier_tokens_mask

    rng = np.random.default_rng(0)
    n, d = 3000, 16
    x = rng.standard_normal((n, d))
    chosen = rng.choice(n, 85, replace=False)
    sinks, tier = chosen[:5], chosen[5:]
    x[sinks] *= 1000.0
    x[tier] *= 30.0
    truth = np.zeros(n, bool)
    truth[sinks] = truth[tier] = True
    assert truth.sum() == 85
    st = TokenNormStats("t", max_outlier_tokens=256)
    rows = torch.from_numpy(x)
    for part, meta in zip(rows.split(500), torch.arange(n).split(500), strict=True):
        st.observe(part, torch.stack([meta * 0, meta, meta, meta], 1))
    mu = x.mean(0)
    trace = float(((x - mu) ** 2).sum())
    k = outlier_k(n, 0.01, 256)
    diag = st.finish(torch.from_numpy(mu), trace)
    marked_rows = diag.top_meta[diag.outlier_mask, 1]
    assert k == 30 and diag.n_outliers == 85
    assert set(marked_rows.tolist()) == set(np.flatnonzero(truth).tolist())
    # one test against the mean over all tokens (the rule before the iteration) finds only k
    xc2 = ((x - mu) ** 2).sum(1)
    top_k = np.argsort(np.argsort(-np.linalg.norm(x, axis=1))) < k
    assert ((xc2 > MASSIVE_TOKEN_FACTOR * xc2.mean()) | top_k).sum() == 30
    assert massive_tokens is outlier_tokens_mask  # the old name stays an alias
    mask = outlier_tokens_mask(st.top_vectors_.double(), torch.from_numpy(mu), n, trace, k)
    assert mask.sum() == 85
    # the iterated answer is a fixed point: no kept token exceeds 20x the kept tokens' mean
    kept = x[~truth]
    kc2 = ((kept - kept.mean(0)) ** 2).sum(1)
    assert kc2.max() < MASSIVE_TOKEN_FACTOR * kc2.mean()
