"""explain_directions: known answers (a planted direction), brute force with raw torch hooks,
the readout against explicit matrix products, bounded memory, bad inputs, save / load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import V, make_tiny, random_batch

import nerve_interp as ni
from nerve_interp.direction_report import DirectionReport
from nerve_interp.direction_stats import ExtremeHeap, TokenProjectionStats, frequency_buckets
from nerve_interp.directions import (
    DirectionOptions,
    DirectionStats,
    explain_directions,
    reinjection_scores,
    run_pass,
    select_directions,
)
from nerve_interp.errors import NotFittedError, SiteError
from nerve_interp.models import make_lm
from nerve_interp.readout import readout_weights
from nerve_interp.sites import as_nnsight, find_ffn_sites

PLANT = 17  # the planted token id
pytestmark = pytest.mark.filterwarnings("ignore::nerve_interp.errors.FiniteSampleWarning")


def _spectra(model, data, layers, **kw):
    return ni.collect_spectra(model, data, layers=layers, eigenvectors=True, progress=False,
                              diagnostics=False, **kw)


# ------------------------------------------------------------------ pure statistics
def test_extreme_heap_equals_a_full_sort_over_many_batches():
    g = np.random.default_rng(0)
    scores = g.standard_normal((500, 3))
    ctx = lambda off: lambda r: (  # noqa: E731
        (r + off)[:, None].repeat(1, 2), torch.zeros(len(r), 2, 3),
        torch.stack([r + off, r, r], 1))
    top, bottom = ExtremeHeap(7, 3, 2), ExtremeHeap(7, 3, 2, largest=False)
    for start in range(0, 500, 60):
        chunk = torch.as_tensor(scores[start:start + 60])
        top.update(chunk, ctx(start))
        bottom.update(chunk, ctx(start))
    for j in range(3):
        order = np.argsort(-scores[:, j])
        np.testing.assert_array_equal(top.values[j].numpy(), scores[order[:7], j])
        np.testing.assert_array_equal(top.meta[j, :, 0].numpy(), order[:7])
        np.testing.assert_array_equal(top.ids[j, :, 0].numpy(), order[:7])
        np.testing.assert_array_equal(bottom.meta[j, :, 0].numpy(), order[::-1][:7])


def test_extreme_heap_merge_equals_one_heap():
    g = np.random.default_rng(1)
    a, b = torch.as_tensor(g.standard_normal((50, 2))), torch.as_tensor(g.standard_normal((40, 2)))
    ctx = lambda off: lambda r: ((r + off)[:, None], torch.zeros(len(r), 1, 2),  # noqa: E731
                                 torch.stack([r + off, r, r], 1))
    one, h1, h2 = ExtremeHeap(5, 2, 1), ExtremeHeap(5, 2, 1), ExtremeHeap(5, 2, 1)
    one.update(torch.cat([a, b]), ctx(0))
    h1.update(a, ctx(0))
    h2.update(b, ctx(50))
    h1.merge(h2)
    assert torch.equal(one.values, h1.values)
    assert torch.equal(one.meta[..., 0], h1.meta[..., 0])


def test_frequency_buckets_against_a_loop():
    g = np.random.default_rng(2)
    counts = g.zipf(1.5, 200).clip(0, 500)
    counts[::7] = 0
    sumsq = g.random((200, 2)) * counts[:, None]
    out = frequency_buckets(counts, sumsq)
    total, acc, want_var = counts.sum(), 0, np.zeros((3, 2))
    for t in sorted(range(200), key=lambda t: (-counts[t], t)):
        if counts[t] == 0:
            continue
        want_var[min(3 * acc // total, 2)] += sumsq[t]
        acc += counts[t]
    np.testing.assert_allclose(out["variance_share"], want_var / want_var.sum(0), rtol=1e-12)
    assert out["n_tokens"].sum() == total and out["n_types"].sum() == (counts > 0).sum()


def test_token_stats_refuse_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TokenProjectionStats(10, 1).update(torch.tensor([3, 10]), torch.zeros(2, 1))


# ------------------------------------------------------------------ direction specs
class _FakeSpectra:
    """eigenvalues / eigenvectors / mean of pre and post of one layer."""

    def __init__(self, lam, vecs):
        self.lam, self.vecs = lam, vecs

    def eigenvalues(self, layer, point):
        return self.lam[point]

    def eigenvectors(self, layer, point):
        return self.vecs[point]


def test_reinjected_scores_known_answer():
    # post eigenvectors = pre eigenvectors: the first r (90% of the pre variance) lie inside
    # the pre subspace (ρ = 0), the others wholly outside (ρ = λ_post).
    d = 6
    q = np.linalg.qr(np.random.default_rng(3).standard_normal((d, d)))[0]
    lam_pre = np.array([10.0, 8.0, 1.0, 0.5, 0.3, 0.2])  # r = 2 holds 18/20 = 90%
    lam_post = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    fake = _FakeSpectra({"pre": lam_pre, "post": lam_post}, {"pre": q, "post": q})
    np.testing.assert_allclose(reinjection_scores(fake, 0, 0.9), [0, 0, 3, 2, 1, 0.5],
                               atol=1e-12)
    chosen = select_directions(fake, 0, "post", "reinjected:2")
    assert chosen.index.tolist() == [2, 3] and chosen.kind.tolist() == ["reinjected"] * 2
    # a post basis rotated away from the pre one: ρ_i = λ_i (1 − ‖U_rᵀ u_i‖²), by hand
    q2 = np.linalg.qr(np.random.default_rng(4).standard_normal((d, d)))[0]
    fake.vecs["post"] = q2
    inside = np.array([np.sum((q[:, :2].T @ q2[:, i]) ** 2) for i in range(d)])
    np.testing.assert_allclose(reinjection_scores(fake, 0), lam_post * (1 - inside))


def test_direction_specs():
    d = 5
    q = np.eye(d)
    fake = _FakeSpectra({"post": np.array([5.0, 4, 3, 2, 0]), "pre": np.ones(d)},
                        {"post": q, "pre": q})
    assert select_directions(fake, 0, "post", "top:2").index.tolist() == [0, 1]
    assert select_directions(fake, 0, "post", "tail:2").index.tolist() == [2, 3]  # λ=0 out
    assert select_directions(fake, 0, "post", [4, 1]).index.tolist() == [4, 1]
    both = select_directions(fake, 0, "post", "top:2, tail:1,4")
    assert both.index.tolist() == [0, 1, 3, 4]
    assert both.kind.tolist() == ["top", "top", "tail", "index"] and both.basis.shape == (d, 4)
    mixed = select_directions(fake, 0, "post", ["top:1", np.ones((d, 2))])
    assert mixed.kind.tolist() == ["top", "custom", "custom"] and mixed.index[1] == -1
    custom = select_directions(fake, 0, "post", np.ones((d, 1)))
    np.testing.assert_allclose(custom.variance, [14 / 5])  # uᵀΣu of the unit mean vector
    for bad in ("middle:3", "top:0", "top:x", "top", 1.5, [7], [], "top:1,,x"):
        with pytest.raises(ValueError, match="directions=|out of range"):
            select_directions(fake, 0, "post", bad)
    with pytest.raises(ValueError, match="k == 9"):
        select_directions(fake, 0, "post", "top:9")
    with pytest.raises(ValueError, match="point='post'"):
        select_directions(fake, 0, "pre", "reinjected:2")
    with pytest.raises(ValueError, match=r"\[D, d\]"):
        select_directions(fake, 0, "post", np.ones((3, 1)))


def test_options_are_checked():
    for kw, match in [({"context": (3,)}, "context"), ({"k_examples": 0}, "k_examples"),
                      ({"min_count": 0}, "min_count"), ({"reinjected_energy": 0}, "energy")]:
        with pytest.raises(ValueError, match=match):
            DirectionOptions(**kw)


# ------------------------------------------------------------------ planted direction
class _Planted(torch.nn.Module):
    """The activation of one FFN, plus ``v`` wherever the input token is ``PLANT``."""

    def __init__(self, act, v, ids_box):
        super().__init__()
        self.act, self.v, self.ids_box = act, v, ids_box

    def forward(self, x):
        hit = (self.ids_box[0] == PLANT).to(x.dtype)[..., None]
        return self.act(x) + hit * self.v


def _planted_model():
    model = make_lm("tiny", activation="gelu", seed=0).eval()
    box = [None]
    model.register_forward_pre_hook(
        lambda m, args, kwargs: box.__setitem__(0, kwargs.get("input_ids", args[0] if args
                                                             else None)), with_kwargs=True)
    g = torch.Generator().manual_seed(5)
    v = torch.randn(model.config.d_ff, generator=g)
    v = 100 * v / v.norm()
    model.layers[1].mlp.act = _Planted(model.layers[1].mlp.act, v, box)
    with torch.no_grad():  # a non-trivial final-norm gain, so folding it matters
        model.norm.weight.copy_(torch.rand(model.config.d_model, generator=g) * 2 + 0.1)
    return model, v


def _planted_data(n_seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 50, (n_seq, 32), generator=g)  # PLANT is one of 40 types


def test_planted_direction_top_examples_and_readout():
    model, v = _planted_model()
    spectra = _spectra(model, _planted_data(), [1])
    rep = explain_directions(model, spectra, _planted_data(seed=1), layer=1,
                             directions="top:2", k_examples=10)
    top = rep.examples[(rep.examples.direction == 0) & (rep.examples.side == "top")]
    assert len(top) == 10 and (top.token_id == PLANT).all()
    assert rep.directions.top_token_share.iloc[0] == 1.0
    assert (top.token == f"#{PLANT}").all()  # no tokenizer: ids are shown
    high = rep.tokens[(rep.tokens.direction == 0) & (rep.tokens.side == "high")]
    assert high.token_id.iloc[0] == PLANT
    # readout: W_U (γ ⊙ W_down v), by hand
    w_u, w_down = model.lm_head.weight.double(), model.layers[1].mlp.fc_out.weight.double()
    want = (w_u @ (model.norm.weight.double() * (w_down @ v.double()))).detach().numpy()
    got = rep.readout[(rep.readout.direction == 0) & (rep.readout.side == "promoted")]
    assert got.token_id.tolist()[:3] == np.argsort(-want)[:3].tolist()
    sup = rep.readout[(rep.readout.direction == 0) & (rep.readout.side == "suppressed")]
    assert sup.token_id.tolist()[:3] == np.argsort(want)[:3].tolist()
    # u ≈ v/|v| (signed towards v), so the logits are those of v over |v| = 100
    scale = np.abs(want).max() / 100
    np.testing.assert_allclose(got.logit, want[got.token_id] / 100, atol=0.02 * scale)


def test_planted_direction_control_unplanted_model_is_not_token_pure():
    # the same model and text without v: its top direction is not the planted token's
    model = make_lm("tiny", activation="gelu", seed=0).eval()
    spectra = _spectra(model, _planted_data(), [1])
    rep = explain_directions(model, spectra, _planted_data(seed=1), layer=1,
                             directions="top:1", k_examples=10)
    top = rep.examples[(rep.examples.direction == 0) & (rep.examples.side == "top")]
    assert not (top.token_id == PLANT).all()


# ------------------------------------------------------------------ brute force
def test_top_examples_and_token_means_equal_brute_force_with_raw_hooks():
    model = make_tiny("llama")
    data = [random_batch(seed=s) for s in range(3)]
    spectra = _spectra(model, data, [1])
    opts = DirectionOptions(context=(3, 2), exclude_positions=(0,), min_count=1, n_tokens=V)
    rep = explain_directions(model, spectra, data, layer=1, directions="top:3", k_examples=6,
                             max_tokens=None, options=opts)
    acts, rows = [], []
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: acts.append(a[0].detach().double()))
    with torch.no_grad():
        for bi, b in enumerate(data):
            model(**b)
            real = b["attention_mask"].bool()
            pos = real.long().cumsum(1) - 1
            for r in range(real.shape[0]):
                for s in range(real.shape[1]):
                    if real[r, s] and pos[r, s] > 0:
                        rows.append((bi, r, s, 4 * bi + r, int(pos[r, s]),
                                     int(b["input_ids"][r, s])))
    h.remove()
    u = spectra.eigenvectors(1, "post")[:, :3] * rep.directions.sign.to_numpy()
    mu = spectra.mean(1, "post")
    s_all = np.array([(acts[bi][r, s].numpy() - mu) @ u for bi, r, s, *_ in rows])
    meta = np.array([(doc, pos) for *_, doc, pos, _ in rows])
    tok = np.array([t for *_, t in rows])
    assert rep.directions.n_tokens.iloc[0] == len(rows)
    for j in range(3):
        for side, order in (("top", np.argsort(-s_all[:, j])),
                            ("bottom", np.argsort(s_all[:, j]))):
            got = rep.examples[(rep.examples.direction == j) & (rep.examples.side == side)]
            np.testing.assert_allclose(got.projection, s_all[order[:6], j], rtol=1e-9)
            assert got[["document", "position"]].to_numpy().tolist() == meta[order[:6]].tolist()
            first = order[0]  # its context: 3 tokens before, 2 after, inside the real tokens
            bi, r, s = rows[first][:3]
            b = data[bi]
            lo, hi = max(s - 3, 0), min(s + 3, b["input_ids"].shape[1])
            want = [f"#{int(t)}" for t, m in zip(b["input_ids"][r, lo:hi],
                                                  b["attention_mask"][r, lo:hi], strict=True)
                    if m]
            assert got.context.iloc[0] == want
        means = pd.Series(s_all[:, j]).groupby(tok).mean()
        t = rep.tokens[(rep.tokens.direction == j) & (rep.tokens.side == "high")]
        np.testing.assert_allclose(t.mean_projection, means.loc[t.token_id].to_numpy(),
                                   rtol=1e-9)
        assert t.token_id.iloc[0] == means.idxmax()


# ------------------------------------------------------------------ readout
@pytest.mark.parametrize("family", ["gpt2", "pythia", "opt", "llama", "gemma3"])
def test_readout_equals_the_explicit_product(family):
    model = make_tiny(family)
    torch.manual_seed(1)
    layer, (down, norm, unembed) = 1, {
        "gpt2": lambda m: (m.transformer.h[1].mlp.c_proj.weight.T, m.transformer.ln_f.weight,
                           m.lm_head.weight),
        "pythia": lambda m: (m.gpt_neox.layers[1].mlp.dense_4h_to_h.weight,
                             m.gpt_neox.final_layer_norm.weight, m.lm_head.weight),
        "opt": lambda m: (m.model.decoder.layers[1].fc2.weight,
                          m.model.decoder.final_layer_norm.weight, m.lm_head.weight),
        "llama": lambda m: (m.model.layers[1].mlp.down_proj.weight, m.model.norm.weight,
                            m.lm_head.weight),
        "gemma3": lambda m: (m.model.layers[1].mlp.down_proj.weight, m.model.norm.weight,
                             m.lm_head.weight),
    }[family](model)
    with torch.no_grad():
        norm.copy_(torch.rand_like(norm) + 0.2)
    gain = norm.double() + (1.0 if family == "gemma3" else 0.0)
    site = find_ffn_sites(model)[layer]
    u = np.random.default_rng(0).standard_normal((down.shape[1], 2))
    w = readout_weights(model, site, "post", down.shape[1])
    want = (unembed.double() @ (gain[:, None] * (down.double() @ torch.as_tensor(u))))
    np.testing.assert_allclose(w.logits(u), want.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_no_readout_for_encoders_and_pre():
    bert = make_tiny("bert")
    site = find_ffn_sites(bert)[0]
    assert "no LM head" in readout_weights(bert, site, "post", 64)
    llama = make_tiny("llama")
    assert "only post" in readout_weights(llama, find_ffn_sites(llama)[0], "pre", 48)


def test_encoder_report_says_there_is_no_readout():
    bert = make_tiny("bert")
    data = [random_batch(seed=s) for s in range(2)]
    rep = explain_directions(bert, _spectra(bert, data, [0]), data, layer=0,
                             directions="top:2", k_examples=3)
    assert rep.readout.empty and "no LM head" in rep.metadata["readout_note"]
    assert "no LM head" in rep.to_html()


def test_readout_on_smollm2_equals_the_explicit_product():
    model, tok = ni.load_model("smollm2-135m")
    texts = ni.load_corpus("python-docs", split="heldout")[:8]
    spectra = _spectra(model, list(texts), [3], tokenizer=tok, max_tokens=300,
                       points=("post",))
    rep = explain_directions(model, spectra, list(texts), tokenizer=tok, layer=3,
                             directions=[0], k_examples=3, max_tokens=200)
    u = spectra.eigenvectors(3, "post")[:, 0] * rep.directions.sign.iloc[0]
    m = model.model
    want = (model.lm_head.weight.double() @ (m.norm.weight.double() * (
        m.layers[3].mlp.down_proj.weight.double() @ torch.as_tensor(u)))).detach().numpy()
    got = rep.readout[rep.readout.side == "promoted"]
    np.testing.assert_allclose(got.logit, np.sort(want)[::-1][:10], rtol=1e-9)
    assert got.token.tolist() == [tok.decode([int(i)]) for i in np.argsort(-want)[:10]]


# ------------------------------------------------------------------ memory, errors, files
def test_memory_stays_flat_as_the_text_grows():
    model = make_tiny("llama")
    wrapper = as_nnsight(model)
    site = find_ffn_sites(model)[1]
    sizes = []
    for n_batches in (1, 8):
        stats = DirectionStats(torch.eye(48, dtype=torch.float64)[:, :4],
                               torch.zeros(48, dtype=torch.float64), 5, 3, 2, V)
        run_pass(wrapper, site, "post", [random_batch(seed=s) for s in range(n_batches)],
                 None, stats, DirectionOptions(max_tokens=None))
        held = [stats.top, stats.bottom]
        sizes.append((sum(h.nbytes() for h in held), stats.types.sums.numel(),
                      stats.types.counts.numel(), stats.n_tokens))
    assert sizes[0][:3] == sizes[1][:3]
    assert sizes[1][3] > 7 * sizes[0][3]  # 8x the tokens went through


def test_bad_inputs_raise_clear_errors():
    model = make_tiny("llama")
    data = [random_batch()]
    no_vecs = ni.collect_spectra(model, data, layers=[1], progress=False, diagnostics=False)
    with pytest.raises(NotFittedError, match="eigenvectors=True"):
        explain_directions(model, no_vecs, data, layer=1)
    spectra = _spectra(model, data, [1])
    with pytest.raises(SiteError, match="out of range: the model has 3"):
        explain_directions(model, spectra, data, layer=5)
    with pytest.raises(SiteError, match="was not captured"):
        explain_directions(model, spectra, data, layer=0)
    with pytest.raises(ValueError, match="'bottom:3' is not a direction spec"):
        explain_directions(model, spectra, data, layer=1, directions="bottom:3")
    with pytest.raises(ValueError, match="k_examples"):
        explain_directions(model, spectra, data, layer=1, k_examples=0)
    gpt2 = make_tiny("gpt2")  # FFN width 128, not 48
    with pytest.raises(ni.errors.CaptureError, match="width 128 .* D = 48"):
        explain_directions(gpt2, spectra, data, layer=1)


class _TrickyTokenizer:
    """Decodes ids to strings CSV and HTML must survive."""

    TOKENS = ("", "\n", '"', ",", "NA", "None", "<u>x</u>", "  x ")

    def decode(self, ids):
        return self.TOKENS[ids[0] % len(self.TOKENS)]


def test_save_load_round_trip_and_self_contained_html(tmp_path):
    model = make_tiny("llama")
    data = [random_batch(seed=s) for s in range(2)]
    rep = explain_directions(model, _spectra(model, data, [1]), data, layer=1,
                             tokenizer=_TrickyTokenizer(), directions="top:2", k_examples=4,
                             options=DirectionOptions(min_count=1))
    assert set(rep.tokens.token) >= {"", "NA", "\n"}
    out = rep.save(tmp_path / "rep")
    back = DirectionReport.load(out)
    for name in ("directions", "examples", "tokens", "readout", "buckets"):
        pd.testing.assert_frame_equal(getattr(back, name), getattr(rep, name),
                                      check_dtype=False)
    assert back.metadata == rep.metadata
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert "http://" not in page and "https://" not in page
    assert page.count("class='ni-card'") == 2 and "<u>" not in page  # tokens escaped
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        DirectionReport.load(tmp_path)


def test_directions_command(local_model, tmp_path):
    from typer.testing import CliRunner

    from nerve_interp.cli import app

    folder, text = local_model
    out = tmp_path / "dirs"
    res = CliRunner().invoke(app, ["directions", "--model", str(folder), "--text", str(text),
                                   "--layer", "1", "--directions", "top:3", "--out", str(out),
                                   "--max-tokens", "800", "--k-examples", "4"])
    assert res.exit_code == 0, res.output
    assert "layers.1.ffn.post" in res.output and "promotes:" in res.output
    back = DirectionReport.load(out)
    assert back.directions["index"].tolist() == [0, 1, 2]
    assert (out / "report.html").exists() and not back.readout.empty
    bad = CliRunner().invoke(app, ["directions", "--model", str(folder), "--text", str(text),
                                   "--layer", "1", "--directions", "middle:3", "--out",
                                   str(out), "--max-tokens", "200"])
    # the CLI's one-line errors: "Error: ..." and exit code 2, no traceback
    assert bad.exit_code == 2 and "not a direction spec" in bad.output, bad.output
    assert "Traceback" not in bad.output


def test_directions_command_checks_the_spec_before_loading(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import nerve_interp.zoo
    from nerve_interp.cli import app
    from nerve_interp.directions import check_spec_text

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before --directions was checked")

    monkeypatch.setattr(nerve_interp.zoo, "load_model", no_load)
    for bad in ("middle:3", "top:0", "top:8,,tail:2", "top"):
        res = CliRunner().invoke(app, ["directions", "--model", "x", "--layer", "1",
                                       "--directions", bad, "--out", str(tmp_path / "d")])
        assert res.exit_code == 2 and "not a direction spec" in res.output, (bad, res.output)
    for good in ("top:8", "top:8,tail:8,reinjected:8", "0,3,7", "tail:1, 5"):
        assert check_spec_text(good) == good
