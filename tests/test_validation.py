"""Bad input at the public entry points: one test per class of problem, each asserting that
the message names the problem and the fix (and that nothing reaches torch or is silently
wrong)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import V, make_tiny

import nerve_interp as ni
from nerve_interp.ablation import HeldOutWarning
from nerve_interp.data import DataError

TEXTS = [" ".join(f"w{(i * 11 + j) % 70 + 20}" for j in range(40)) for i in range(48)]


@pytest.fixture(scope="module")
def gpt2():
    return make_tiny("gpt2")


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def spectra(gpt2, tok):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ni.collect_spectra(gpt2, TEXTS[:32], tokenizer=tok, layers=[0, 1],
                                  eigenvectors=True, progress=False, max_length=32)


def _capture(model, data, **kw):
    return ni.collect_spectra(model, data, progress=False, **kw)


@pytest.mark.parametrize("kw, error, problem, fix", [
    (dict(max_tokens="500"), TypeError, "max_tokens must be an int; got str '500'",
     "pass the number itself, max_tokens=500"),
    (dict(layers="0,5"), TypeError, "got str '0,5'", "a sequence of ints"),
    (dict(layers=[0.5]), TypeError, "got float 0.5", "e.g. [0, -1]"),
    (dict(eigenvectors="no"), TypeError, "got str 'no'", "must be True or False"),
    (dict(max_tokens=1), ValueError, "max_tokens == 1", "must be >= 2"),
    (dict(checkpoint_seconds=0), ValueError, "got int 0", "e.g. 300"),
])
def test_numbers_flags_and_layer_lists(gpt2, tok, kw, error, problem, fix):
    with pytest.raises(error) as info:
        _capture(gpt2, TEXTS, tokenizer=tok, **kw)
    assert problem in str(info.value) and fix in str(info.value)


def test_empty_selections(gpt2, tok, spectra):
    cases = [
        (lambda: _capture(gpt2, TEXTS, tokenizer=tok, points=()), "points is empty",
         "points=('pre', 'post')"),
        (lambda: ni.ablate(gpt2, spectra, TEXTS[32:], layers=[], k=2, tokenizer=tok),
         "layers is empty", "layers=[0]"),
        (lambda: ni.ablation_sweep(gpt2, spectra, TEXTS[32:], ks=[], tokenizer=tok),
         "ks is empty", "ks=[1, 8, 64]"),
        (lambda: ni.ablation_sweep(gpt2, spectra, TEXTS[32:], subspaces=(), tokenizer=tok),
         "subspaces=(): empty", "pass some of"),
        (lambda: ni.ablation_sweep(gpt2, spectra, TEXTS[32:], layers=[], tokenizer=tok),
         "layers is empty", "or None"),
        (lambda: ni.ablation_sweep(gpt2, spectra, TEXTS[32:], seeds=0, tokenizer=tok),
         "would run no random subspaces", "seeds=(0, 1, 2)"),
    ]
    for call, problem, fix in cases:
        with pytest.raises(ValueError) as info:
            call()
        assert problem in str(info.value) and fix in str(info.value), str(info.value)


def test_nulls_in_place_of_results(gpt2, tok):
    for call in (lambda: ni.ablation_sweep(gpt2, None, TEXTS, tokenizer=tok),
                 lambda: ni.ablate(gpt2, None, TEXTS, layers=[0], k=1, tokenizer=tok)):
        with pytest.raises(TypeError, match=r"spectra must be a SpectraResult \(from "
                                            r"collect_spectra\(\.\.\., eigenvectors=True\)"):
            call()


def test_token_ids_and_lengths_the_model_cannot_take(gpt2, tok, spectra):
    """Ids outside the vocabulary and sequences longer than the learned positions: refused
    naming the batch, the value and the limit, before they reach torch's embedding."""
    for ids, problem in [(torch.full((2, 8), V + 3), f"token id {V + 3} is outside"),
                         (torch.full((2, 8), -1), "token id -1 is outside")]:
        with pytest.raises(DataError, match=rf"batch 0.*{problem} the model's vocabulary "
                                            rf"\(ids 0 to {V - 1}\); tokenize with"):
            _capture(gpt2, [ids])
    with pytest.raises(DataError, match="2000 tokens per sequence, but the model has 1024 "
                                        "positions; pass max_length <= 1024"):
        _capture(gpt2, [torch.full((1, 2000), 3)])
    with pytest.raises(ValueError, match="max_length == 5000, but the model has 1024 "
                                         "positions; pass max_length <= 1024"):
        _capture(gpt2, TEXTS, tokenizer=tok, max_length=5000)
    with pytest.raises(DataError, match=r"evaluation batch 0: token id 500"):
        ni.ablate(gpt2, spectra, [torch.full((2, 8), 500)], layers=[0], k=1, progress=False)


def test_devices_this_machine_lacks():
    with pytest.raises(ValueError, match=r"device='gpu' is not a device; pass 'cpu', 'cuda'"):
        ni.load_model("smollm2-135m", device="gpu")  # refused before anything loads
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"has no CUDA .*; pass device='cpu'"):
            ni.load_model("smollm2-135m", device="cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device\\(s\\) are visible"):
            ni.load_model("smollm2-135m", device=f"cuda:{torch.cuda.device_count()}")


def test_file_encodings(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("Un caf\xe9 \u2014 d\xe9j\xe0 vu.\n\nSecond.".encode("cp1252"))
    with pytest.raises(DataError, match=rf"{path} is not UTF-8 text: byte 0xe9 at offset 6.*"
                                        r"looks like cp1252.*iconv -f cp1252 -t utf-8"):
        ni.read_texts(path)
    path.write_bytes("Un café.".encode("utf-16"))
    with pytest.raises(DataError, match="looks like utf-16"):
        ni.read_texts(path)


def test_held_out_is_checked_by_document(gpt2, tok, spectra):
    """Evaluation sequences that share documents with the capture warn, even when cut at
    another length and batched differently; other documents do not."""
    with pytest.warns(HeldOutWarning, match=r"6 of 12 evaluation sequences start like "
                                            r"sequences the spectra were captured on"):
        res = ni.ablate(gpt2, spectra, TEXTS[26:38], layers=[0], k=2, tokenizer=tok,
                        max_length=24, batch_size=5, progress=False)
    assert res.metadata["held_out"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error", HeldOutWarning)
        res = ni.ablate(gpt2, spectra, TEXTS[32:], layers=[0], k=2, tokenizer=tok,
                        progress=False)
    assert res.metadata["held_out"] is True
