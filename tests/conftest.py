"""Shared fixtures: tiny random-init models of every supported family and a raw-hook reference.

Raw torch hooks appear only here, as the independent reference the nnsight capture is
checked against.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers as T

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
T.logging.set_verbosity_error()

V = 97  # vocabulary of the tiny models


def _llama_kw():
    return dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=48, vocab_size=V,
                bos_token_id=0, eos_token_id=0, pad_token_id=0)


TINY = {
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(
        n_layer=3, n_embd=32, n_head=4, vocab_size=V, bos_token_id=0, eos_token_id=0)),
    "pythia": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        vocab_size=V, bos_token_id=0, eos_token_id=0)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_llama_kw())),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_llama_kw())),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_llama_kw())),
    "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**_llama_kw(), head_dim=8)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, ffn_dim=64, vocab_size=V,
        word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0, pad_token_id=1)),
    "bert": lambda: T.BertModel(T.BertConfig(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        vocab_size=V)),
}


def make_tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return TINY[name]().eval()


def interrupted(batches, n):
    """The batches, with a KeyboardInterrupt where batch ``n`` would come (a killed run)."""
    for i, b in enumerate(batches):
        if i == n:
            raise KeyboardInterrupt
        yield b


def random_batch(batch=4, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0   # right padding
    mask[3, :9] = 0    # left padding
    return {"input_ids": ids, "attention_mask": mask}


def raw_hook_points(model: torch.nn.Module, batches, family: str, select=None) -> dict:
    """Per (layer, point): fp64 [N, D] activations of real tokens, read with raw torch hooks.

    ``family``: "gated" (LLaMA-style and TinyLM gated), "bert", "opt", "mixer" (channel MLP)
    or anything else for a plain ``mlp.act``. ``select``: optional boolean masks (one per
    batch) of the tokens to keep; default the attention masks.
    """
    store: dict = {}
    handles = []
    layers = None
    for _name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
            layers = mod
            break

    def put(layer, point, t):
        store.setdefault((layer, point), []).append(t.detach())

    for i, blk in enumerate(layers):
        if family == "gated":
            mlp = blk.mlp
            handles += [
                mlp.act_fn.register_forward_hook(
                    lambda m, a, o, i=i: (put(i, "pre", a[0]), put(i, "act", o), None)[-1]),
                mlp.up_proj.register_forward_hook(
                    lambda m, a, o, i=i: (put(i, "up", o), None)[-1]),
                mlp.down_proj.register_forward_pre_hook(
                    lambda m, a, i=i: (put(i, "post", a[0]), None)[-1]),
            ]
        else:
            act = {"bert": lambda b: b.intermediate.intermediate_act_fn,
                   "opt": lambda b: b.activation_fn,
                   "mixer": lambda b: b.ffn.act}.get(family, lambda b: b.mlp.act)(blk)
            handles.append(act.register_forward_hook(
                lambda m, a, o, i=i: (put(i, "pre", a[0]), put(i, "post", o), None)[-1]))
    masks = []
    try:
        with torch.no_grad():
            for b in batches:
                if isinstance(b, torch.Tensor):  # float inputs (Mixer): every row is data
                    model(b)
                    masks.append(None)
                else:
                    model(**b)
                    masks.append(b["attention_mask"].bool())
    finally:
        for h in handles:
            h.remove()
    if select is not None:
        masks = [m.bool() for m in select]
    out = {}
    for key, ts in store.items():
        # OPT flattens [batch, seq, d] to [batch*seq, d] before its FFN
        out[key] = torch.cat([t.reshape(-1, t.shape[-1]) if m is None
                              else t[m] if t.ndim == 3 else t[m.reshape(-1)]
                              for t, m in zip(ts, masks, strict=True)]).double().numpy()
    return out


def ref_eigenvalues(x: np.ndarray) -> np.ndarray:
    return np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1].clip(0)


@pytest.fixture
def tiny():
    return make_tiny


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Offline WordLevel tokenizer for the tiny models: "w{i}" -> i, pad "w0"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w1"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w1", pad_token="w0",
                                   eos_token="w0")


# CI must be reproducible: hypothesis draws the same examples on every run
# (run `pytest --hypothesis-seed=N` locally to explore others).
from hypothesis import settings  # noqa: E402

settings.register_profile("nerve_interp", derandomize=True, deadline=None)
settings.load_profile("nerve_interp")


@pytest.fixture
def local_model(tmp_path, tiny_tokenizer):
    """A tiny GPT-2 saved as a hub-style folder, and a text file of 40 paragraphs."""
    folder = tmp_path / "tiny-gpt2"
    make_tiny("gpt2").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 90 + 2}" for j in range(30))
                                for i in range(40)))
    return folder, text


@pytest.fixture
def run_spectra(local_model):
    """``nerve-interp spectra --model <that folder> --text <its text> *args``, in process;
    returns typer's ``Result``."""
    from typer.testing import CliRunner

    from nerve_interp.cli import app

    folder, text = local_model
    return lambda *args: CliRunner().invoke(
        app, ["spectra", "--model", str(folder), "--text", str(text), *map(str, args)])
