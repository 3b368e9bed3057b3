"""nerve_interp.models: every architecture axis runs, is causal, ignores padding, trains, and
its FFN spectra from collect_spectra match an independent raw-hook float64 reference."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import raw_hook_points, ref_eigenvalues

import nerve_interp as ni
from nerve_interp.models import (
    ACTIVATIONS,
    NORMS,
    POSITIONS,
    PRESETS,
    LMConfig,
    MixerConfig,
    MLPMixer,
    TinyLM,
    count_parameters,
    load_digits_tensors,
    make_lm,
)

V = 61
SMALL = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32)

# every norm x activation x pos, plus nGPT (norm "none") x activation x pos
ARCHS = [(n, a, p, False) for n, a, p in itertools.product(NORMS, ACTIVATIONS, POSITIONS)]
ARCHS += [("none", a, p, True) for a, p in itertools.product(ACTIVATIONS, POSITIONS)]


def arch_id(arch):
    n, a, p, g = arch
    return f"{'ngpt' if g else n}-{a}-{p}"


def small_lm(seed=0, **kw):
    return TinyLM(LMConfig(**{**SMALL, **kw}), seed=seed).eval()


def ids(batch=3, seq=12, seed=0):
    return torch.randint(1, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ every architecture
@pytest.mark.parametrize("arch", ARCHS, ids=arch_id)
def test_forward_causal_and_padding(arch):
    norm, act, pos, ngpt = arch
    model = small_lm(norm=norm, activation=act, pos=pos, ngpt=ngpt)
    x = ids()
    with torch.no_grad():
        out = model(x, labels=x)
        assert out.logits.shape == (3, 12, V)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
        assert abs(float(out.loss) - math.log(V)) < 0.3  # near-uniform predictions at init

        # causal: a change at position 7 leaves logits 0..6 untouched and changes 7
        y = x.clone()
        y[:, 7] = (y[:, 7] % (V - 1)) + 1
        changed = model(y).logits
        torch.testing.assert_close(changed[:, :7], out.logits[:, :7], atol=1e-5, rtol=1e-5)
        assert (changed[:, 7] - out.logits[:, 7]).abs().max() > 1e-6

        # padding: right- and left-padded rows equal the unpadded row on their real tokens
        row = x[:1, :8]
        pad = torch.zeros(1, 4, dtype=row.dtype)
        ones, zeros = torch.ones(1, 8, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)
        ref = model(row).logits
        right = model(torch.cat([row, pad], 1), attention_mask=torch.cat([ones, zeros], 1))
        left = model(torch.cat([pad, row], 1), attention_mask=torch.cat([zeros, ones], 1))
        torch.testing.assert_close(right.logits[:, :8], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(left.logits[:, 4:], ref, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(left.logits).all()  # padded queries stay finite


def test_loss_ignores_padding_and_minus_100():
    model = small_lm()
    x = ids(2, 10)
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    with torch.no_grad():
        logits = model(x).logits
        got = model(x, attention_mask=mask, labels=x).loss
        labels = x.clone()
        labels[0, 3] = -100
        got_ignored = model(x, labels=labels).loss
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None])[..., 0]
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    torch.testing.assert_close(got, -lp[keep].mean())
    keep2 = torch.ones_like(keep)
    keep2[0, 2] = False  # position 2 predicts label 3
    torch.testing.assert_close(got_ignored, -lp[keep2].mean())


# ------------------------------------------------------------------ sites and capture
def lm_batches(n=3, seed=0):
    out = []
    for s in range(n):
        x = ids(4, 24, seed=seed + s)
        mask = torch.ones_like(x)
        mask[1, 17:] = 0  # right padding
        mask[3, :9] = 0  # left padding
        out.append({"input_ids": x, "attention_mask": mask})
    return out


def check_against_reference(res, ref):
    for (layer, point), x in ref.items():
        got, want = res.eigenvalues(layer, point), ref_eigenvalues(x)
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) / want[0] <= 1e-6, (layer, point)
        assert res.spectrum(layer, point).n_samples == x.shape[0]


@pytest.mark.parametrize("activation,kind", [("gelu", "plain"), ("swiglu", "gated")])
def test_lm_sites_and_spectra_match_raw_hooks(activation, kind):
    model = make_lm("tiny", activation=activation, norm="mix_ln", pos="rope", n_layers=3,
                    d_model=32, d_ff=48, vocab_size=V).eval()
    sites = ni.find_ffn_sites(model)
    assert len(sites) == 3 and {s.kind for s in sites} == {kind}
    assert model.config.model_type == {"plain": "nerve_gpt", "gated": "nerve_llama"}[kind]
    batches = lm_batches()
    points = ("pre", "act", "up", "post") if kind == "gated" else ("pre", "post")
    res = ni.collect_spectra(model, batches, points=points, progress=False)
    ref = raw_hook_points(model, batches, kind)
    assert len(ref) == 3 * len(points)
    assert res.metadata["n_tokens"] == sum(int(b["attention_mask"].sum()) for b in batches)
    assert res.metadata["model"] == model.nerve_interp_info["name"]
    check_against_reference(res, ref)


def test_mixer_sites_and_spectra_match_raw_hooks():
    mixer = MLPMixer(MixerConfig(d_model=24, n_layers=3, token_mlp_dim=16, channel_mlp_dim=40),
                     seed=0).eval()
    sites = ni.find_ffn_sites(mixer)
    assert len(sites) == 3 and {s.kind for s in sites} == {"plain"}
    assert sites[0].paths == {"pre": "layers.0.ffn.act.input", "post": "layers.0.ffn.act.output"}
    images, _ = load_digits_tensors("test")
    batches = [images[:40], images[40:80]]
    res = ni.collect_spectra(mixer, batches, progress=False)  # float tensors: every row is data
    ref = raw_hook_points(mixer, batches, "mixer")
    assert ref[(0, "pre")].shape == (80 * 16, 40)  # 16 patches per image, channel MLP width
    assert res.metadata["n_tokens"] == 80 * 16
    check_against_reference(res, ref)


# ------------------------------------------------------------------ training sanity
def _fit(model, x, labels, *, optimizer=torch.optim.AdamW, steps=15, lr=3e-3):
    """Losses of ``steps`` optimizer steps on one repeated batch."""
    opt = optimizer(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_lm_loss_decreases_on_repeated_batch():
    for act in ("gelu", "swiglu"):
        model = small_lm(activation=act, pos="rope").train()
        x = ids(4, 16)
        losses = _fit(model, x, x)
        assert losses[-1] < losses[0] - 0.5, (act, losses)


def test_mixer_loss_decreases_and_digits_split():
    x, y = load_digits_tensors("train")
    xt, yt = load_digits_tensors("test")
    assert x.shape == (1437, 1, 8, 8) and xt.shape == (360, 1, 8, 8)
    assert 0.0 <= float(x.min()) and float(x.max()) == 1.0 and x.dtype == torch.float32
    assert set(yt.tolist()) == set(range(10))
    x2, y2 = load_digits_tensors("train", seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="split"):
        load_digits_tensors("valid")

    mixer = MLPMixer(MixerConfig(d_model=32, n_layers=2, channel_mlp_dim=64), seed=0).train()
    xb, yb = x[:128], y[:128]
    losses = _fit(mixer, xb, yb, optimizer=torch.optim.Adam)
    assert losses[-1] < losses[0] - 0.5, losses
    # flat and [B, 8, 8] inputs are the same images
    mixer.eval()
    with torch.no_grad():
        a = mixer(xb[:4]).logits
        torch.testing.assert_close(mixer(xb[:4].reshape(4, 64)).logits, a)
        torch.testing.assert_close(mixer(xb[:4, 0]).logits, a)
    with pytest.raises(ValueError, match="pixel_values"):
        mixer(torch.rand(2, 3, 8, 8))


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("field,value,extra", [
    ("norm", "side", {}),
    ("norm_type", "batchnorm", {}),
    ("activation", "tanh", {}),
    ("pos", "alibi", {}),
    ("d_model", 0, {}),
    ("n_layers", 2.0, {}),
    ("vocab_size", 1, {}),
    ("n_heads", 5, {}),
    ("d_ff", -3, {}),
    ("ffn_mult", 0.0, {"d_ff": None}),
    ("dropout", 1.5, {}),
    ("bias", "yes", {}),
    ("ngpt", 1, {}),
    ("mix_post_layers", 5, {"norm": "mix_ln"}),
    ("mix_post_layers", 1, {"norm": "pre_ln"}),
])
def test_bad_lm_config_names_the_field(field, value, extra):
    kw = {**SMALL, **extra, field: value}
    with pytest.raises(ValueError, match=rf"LMConfig\.{field}="):
        LMConfig(**kw)


def test_config_cross_checks():
    LMConfig(d_model=36, n_heads=4, pos="learned")  # odd head dim is fine without RoPE
    with pytest.raises(ValueError, match=r"d_ff=100 .*ffn_mult"):
        LMConfig(d_model=32, d_ff=100, ffn_mult=4.0)
    with pytest.raises(ValueError, match=r"LMConfig\.norm='pre_ln'.*ngpt"):
        LMConfig(ngpt=True)
    with pytest.raises(ValueError, match="preset_or_config"):
        make_lm("gpt-5")
    with pytest.raises(TypeError, match="widht"):
        make_lm("tiny", widht=3)
    for field, value in [("activation", "swiglu"), ("patch_size", 3), ("norm", "mix_ln"),
                         ("n_classes", 1)]:
        with pytest.raises(ValueError, match=rf"MixerConfig\.{field}="):
            MixerConfig(**{field: value})


def test_rope_head_dim_check_message():
    # d_model 36 / 4 heads = 9: odd head dim under RoPE
    with pytest.raises(ValueError, match=r"LMConfig\.n_heads=4 .*odd"):
        LMConfig(d_model=36, n_heads=4, pos="rope")


def test_norm_placements_have_their_own_names():
    """Norm placements are pre_ln / post_ln / mix_ln / none (pre / post name FFN points);
    the old spellings still work with a DeprecationWarning that names the new one, pointed
    at the caller's line; saved configs with old spellings load silently."""
    assert NORMS == ("pre_ln", "post_ln", "mix_ln", "none")
    for old, new in [("pre", "pre_ln"), ("post", "post_ln"), ("mix", "mix_ln")]:
        with pytest.warns(DeprecationWarning, match=rf"norm='{old}'.*norm='{new}'") as rec:
            m = make_lm("tiny", norm=old, n_layers=4)
        assert rec[0].filename == __file__
        assert m.config.norm == new
        assert m.nerve_interp_info["name"] == f"tiny(norm={new},n_layers=4)"
        with pytest.warns(DeprecationWarning, match=f"norm='{new}'") as rec:
            cfg = LMConfig(norm=old)
        assert cfg.norm == new and rec[0].filename == __file__
    assert [b.norm_position for b in make_lm("tiny", norm="mix_ln", n_layers=4).layers] == \
        ["post_ln", "pre_ln", "pre_ln", "pre_ln"]
    with pytest.warns(DeprecationWarning, match="norm='post_ln'"):
        assert MixerConfig(norm="post").norm == "post_ln"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading an old saved config does not warn
        old_dict = {**LMConfig(norm="mix_ln").to_dict(), "norm": "mix"}
        assert LMConfig.from_dict(old_dict) == LMConfig(norm="mix_ln")
        assert MixerConfig.from_dict({**MixerConfig().to_dict(), "norm": "pre"}).norm == "pre_ln"
        assert ni.models.norm_placement("none") == "none"
    with pytest.raises(ValueError, match=r"LMConfig\.norm='side'.*'pre_ln', 'post_ln'"):
        LMConfig(norm="side")


def test_make_lm_overrides_and_presets():
    m = make_lm("tiny", activation="relu", norm="post_ln", d_ff=512)
    assert (m.config.d_ff, m.config.ffn_mult, m.config.norm) == (512, None, "post_ln")
    assert isinstance(m.layers[0].mlp.act, torch.nn.ReLU)
    assert make_lm("tiny", d_model=32).config.d_ff == 128  # width follows the multiplier
    assert make_lm("tiny", ffn_mult=2.5).config.d_ff == 160
    assert make_lm("tiny", ngpt=True).config.norm == "none"
    a, b = make_lm("tiny", seed=3), make_lm("tiny", seed=3)
    state = torch.get_rng_state()
    make_lm("tiny", seed=4)
    assert torch.equal(torch.get_rng_state(), state)  # seeded init leaves the global RNG alone
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.embed_tokens.weight, make_lm("tiny", seed=4).embed_tokens.weight)
    assert PRESETS["tiny"].norm == "pre_ln"  # presets are not mutated by overrides
    d = m.config.to_dict()
    assert d["model_type"] == "nerve_gpt" and LMConfig.from_dict(d) == m.config
    assert MixerConfig.from_dict(MixerConfig().to_dict()) == MixerConfig()
    # the GPU presets have the published shapes (built on the meta device: no memory)
    with torch.device("meta"):
        counts = {k: count_parameters(make_lm(k, seed=None)) for k in PRESETS}
    assert counts["gpt2-small"] == 124_439_808  # = Hugging Face GPT-2 small
    assert 70e6 < counts["llama-70m"] < 72e6 and 130e6 < counts["llama-130m"] < 136e6
    assert PRESETS["llama-130m"].model_type == "nerve_llama"


def test_tied_embeddings_and_ngpt_are_normalised():
    m = small_lm(tie_embeddings=True)
    assert m.lm_head.weight is m.embed_tokens.weight
    assert small_lm(tie_embeddings=False).lm_head.weight is not None
    g = small_lm(ngpt=True, norm="none", activation="swiglu", pos="rope")
    seen = []
    h = g.layers[0].register_forward_hook(lambda mod, a, o: (seen.append(o), None)[-1])
    with torch.no_grad():
        g(ids())
    h.remove()
    torch.testing.assert_close(seen[0].norm(dim=-1), torch.ones(3, 12))


# ------------------------------------------------------------------ Mix-LN
def test_mix_ln_is_post_then_pre():
    m = make_lm("tiny", norm="mix_ln", n_layers=8, norm_type="layernorm").eval()
    assert [b.norm_position for b in m.layers] == ["post_ln"] * 2 + ["pre_ln"] * 6
    assert [b.post_ln for b in m.layers] == [True] * 2 + [False] * 6
    assert isinstance(m.norm, torch.nn.LayerNorm)  # last block Pre-LN: a final norm
    m3 = make_lm("tiny", norm="mix_ln", n_layers=8, mix_post_layers=3)
    assert [b.post_ln for b in m3.layers] == [True] * 3 + [False] * 5
    assert make_lm("tiny", norm="mix_ln", n_layers=2).config.n_post_layers == 1
    assert all(b.post_ln for b in make_lm("tiny", norm="post_ln").layers)
    assert isinstance(make_lm("tiny", norm="post_ln").norm, torch.nn.Identity)
    assert not any(b.post_ln for b in make_lm("tiny", norm="pre_ln").layers)
    assert all(isinstance(b.ln_1, torch.nn.Identity) for b in make_lm("tiny", norm="none").layers)

    # behaviour: a Post-LN block's output is layer-normalised per token, a Pre-LN one's is not
    outs = {}
    hs = [b.register_forward_hook(lambda mod, a, o, i=i: (outs.__setitem__(i, o), None)[-1])
          for i, b in enumerate(m.layers)]
    with torch.no_grad():
        m(torch.randint(0, 256, (2, 16)))
    for h in hs:
        h.remove()
    for i, o in outs.items():
        normalised = bool(torch.allclose(o.mean(-1), torch.zeros(2, 16), atol=1e-4)
                          and torch.allclose(o.var(-1, unbiased=False), torch.ones(2, 16),
                                             atol=1e-2))
        assert normalised == (i < 2), i
