"""Tests of nerve_interp.data: the offline corpus, local text files and batching."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import make_tiny
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import nerve_interp as ni
from nerve_interp.data import (
    Corpus,
    DataError,
    corpus_metadata,
    load_corpus,
    read_texts,
    tokenize_batches,
)
from nerve_interp.errors import NerveInterpError

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran",
    "the quick brown fox jumps over the lazy dog again and again",
    "hello",
    "stock markets fell sharply today",
]


def _word_tokenizer(pad: str | None = "[PAD]", eos: str | None = None) -> PreTrainedTokenizerFast:
    """A tiny offline WordLevel tokenizer over the words of SENTENCES."""
    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[EOS]", *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"unk_token": "[UNK]"}
    if pad is not None:
        kwargs["pad_token"] = pad
    if eos is not None:
        kwargs["eos_token"] = eos
    return PreTrainedTokenizerFast(tokenizer_object=core, **kwargs)


# --------------------------------------------------------------------------- corpus


def test_corpus_is_large_real_text():
    docs = load_corpus()
    assert len(docs) >= 500
    assert all(isinstance(d, str) and len(d) >= 200 for d in docs)
    assert sum(len(d) for d in docs) > 500_000
    assert len(set(docs)) == len(docs)


def test_splits_are_disjoint_and_cover_all():
    train = load_corpus("python-docs", split="train")
    heldout = load_corpus("python-docs", split="heldout")
    everything = load_corpus("python-docs", split="all")
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(everything)
    assert len(train) + len(heldout) == len(everything)
    assert 0.05 < len(heldout) / len(everything) < 0.15


def test_corpus_is_deterministic_and_returns_fresh_lists():
    first = load_corpus(split="all")
    first.append("mutated")
    second = load_corpus(split="all")
    assert second[-1] != "mutated"
    assert first[:-1] == second
    assert load_corpus(split="heldout") == load_corpus(split="heldout")


def test_corpus_order_keeps_split_order():
    for seed in (0, 7, None):
        everything = load_corpus(split="all", seed=seed)
        rank = {d: i for i, d in enumerate(everything)}
        for split in ("train", "heldout"):
            positions = [rank[d] for d in load_corpus(split=split, seed=seed)]
            assert positions == sorted(positions)


@pytest.mark.parametrize("split", ["train", "heldout", "all"])
def test_default_order_is_a_seeded_permutation_of_the_source_order(split):
    source = load_corpus(split=split, seed=None)
    default = load_corpus(split=split)
    assert default.seed == 0 and source.seed is None
    assert sorted(default) == sorted(source) and default != source
    assert load_corpus(split=split, seed=0) == default  # the same for the same seed
    assert load_corpus(split=split, seed=np.int64(0)) == default
    other = load_corpus(split=split, seed=1)
    assert sorted(other) == sorted(source) and other != default
    # a prefix is a sample, not the first modules: its documents are spread over the source
    rank = {d: i for i, d in enumerate(source)}
    first = [rank[d] for d in default[:100]]
    assert max(first) > 0.8 * len(source) and min(first) < 0.2 * len(source)


def test_seed_is_a_numpy_permutation_of_all_then_split():
    """The order is numpy's, so it is the same on every machine with the same stdlib."""
    source = load_corpus(split="all", seed=None)
    order = np.random.default_rng(5).permutation(len(source))
    shuffled = [source[i] for i in order]
    assert load_corpus(split="all", seed=5) == shuffled
    held = set(load_corpus(split="heldout", seed=None))
    assert load_corpus(split="heldout", seed=5) == [d for d in shuffled if d in held]


def test_split_does_not_depend_on_the_seed():
    for split in ("train", "heldout"):
        assert {frozenset(load_corpus(split=split, seed=s)) for s in (None, 0, 3)} == {
            frozenset(load_corpus(split=split, seed=None))}


@pytest.mark.parametrize(
    ("seed", "error", "match"),
    [(-1, ValueError, "seed == -1, must be >= 0"), (1.5, TypeError, "seed must be an int"),
     ("0", TypeError, "got str '0'"), (True, TypeError, "got bool"),
     (np.float64(2.0), TypeError, "seed must be an int")],
)
def test_seed_validation(seed, error, match):
    with pytest.raises(error, match=match):
        load_corpus(seed=seed)


def test_corpus_carries_read_only_provenance_and_slices_keep_it():
    docs = load_corpus("python-docs", split="heldout", seed=2)
    assert isinstance(docs, Corpus) and isinstance(docs, list)
    assert (docs.name, docs.split, docs.seed, docs.indices) == (
        "python-docs", "heldout", 2, range(len(docs)))
    for attr in ("name", "split", "seed", "indices"):
        with pytest.raises(AttributeError):
            setattr(docs, attr, None)
    assert docs.metadata() == {"name": "python-docs", "split": "heldout", "seed": 2,
                               "indices": [0, len(docs), 1]}
    part = docs[10:40:3][2:]
    assert isinstance(part, Corpus) and part == docs[16:40:3]
    assert part.metadata()["indices"] == [16, 40, 3] and part.is_unchanged()
    assert isinstance(docs[::-1], Corpus) and docs[::-1].is_unchanged()
    assert isinstance(docs[0], str)
    for plain in (docs + [], docs * 1, docs.copy(), list(docs), sorted(docs)):
        assert type(plain) is list
    back = pickle.loads(pickle.dumps(part))
    assert back == part and back.metadata() == part.metadata()
    made = Corpus(["not a docstring"], name="python-docs", split="train", seed=0)
    assert not made.is_unchanged()  # the constructor checks the provenance, not the text
    with pytest.raises(DataError, match="wikitext"):
        Corpus([], name="wikitext", split="train", seed=0)
    with pytest.raises(ValueError, match="seed == -2"):
        Corpus([], name="python-docs", split="train", seed=-2)


def test_corpus_metadata_only_for_an_unchanged_corpus():
    docs = load_corpus(split="heldout")
    assert corpus_metadata(docs) == docs.metadata()
    assert corpus_metadata(list(docs)) is None and corpus_metadata(["a", "b"]) is None
    for change in (lambda c: c.append("x"), lambda c: c.reverse(),
                   lambda c: c.__setitem__(0, "x")):
        changed = load_corpus(split="heldout")[:20]
        change(changed)
        assert not changed.is_unchanged()
        with pytest.warns(UserWarning, match="was changed after load_corpus"):
            assert corpus_metadata(changed) is None


def test_collect_spectra_records_the_corpus_and_save_load_keeps_it(tmp_path, tiny_tokenizer):
    model = make_tiny("gpt2")
    docs = load_corpus(split="heldout", seed=4)[3:19]
    kw = dict(tokenizer=tiny_tokenizer, max_length=16, batch_size=3, layers=[0],
              diagnostics=False, progress=False)
    res = ni.collect_spectra(model, docs, **kw)
    want = {"name": "python-docs", "split": "heldout", "seed": 4, "indices": [3, 19, 1]}
    assert res.metadata["corpus"] == want
    back = ni.SpectraResult.load(res.save(tmp_path / "run.safetensors"))
    assert back.metadata["corpus"] == want
    plain = ni.collect_spectra(model, list(docs), **kw)
    assert "corpus" not in plain.metadata
    assert plain.eigenvalues(0, "post").tolist() == res.eigenvalues(0, "post").tolist()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"name": "wikitext"}, "python-docs"), ({"split": "test"}, "heldout")],
)
def test_unknown_corpus_or_split_lists_options(kwargs, needle):
    with pytest.raises(DataError, match=needle) as info:
        load_corpus(**kwargs)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, NerveInterpError)


# --------------------------------------------------------------------------- read_texts


def test_read_texts_txt_paragraphs(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("  First para,\nline two.  \n\n\n \t\nSecond para.\n\n\n\nThird.\n")
    assert read_texts(path) == ["First para,\nline two.", "Second para.", "Third."]


def test_read_texts_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "alpha beta", "id": 1}, {"text": "gamma"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_texts(str(path)) == ["alpha beta", "gamma"]


def test_read_texts_jsonl_without_text_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r'bad\.jsonl:1: .*"text"'):
        read_texts(path)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_read_texts_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(DataError, match="no text"):
        read_texts(path)


def test_read_texts_missing_and_wrong_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_texts(tmp_path / "nope.txt")
    csv = tmp_path / "a.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"\.jsonl"):
        read_texts(csv)


# --------------------------------------------------------------------------- tokenize_batches


def test_tokenize_batches_shapes_and_mask():
    tok = _word_tokenizer()
    batches = list(tokenize_batches(SENTENCES, tok, batch_size=2, max_length=8))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    lengths = [min(len(s.split()), 8) for s in SENTENCES]
    got = torch.cat([b["attention_mask"].sum(dim=1) for b in batches]).tolist()
    assert got == lengths
    for batch, start in zip(batches, range(0, len(SENTENCES), 2), strict=True):
        assert set(batch) == {"input_ids", "attention_mask"}
        assert batch["input_ids"].dtype == torch.long
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        assert batch["input_ids"].shape[1] == max(lengths[start : start + 2])
        # real tokens equal the unbatched encoding; padding uses the pad id
        for row, text in enumerate(SENTENCES[start : start + 2]):
            ids = tok(text, truncation=True, max_length=8)["input_ids"]
            n = len(ids)
            assert batch["input_ids"][row, :n].tolist() == ids
            assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()


def test_tokenize_batches_left_padding_and_determinism():
    tok = _word_tokenizer()
    tok.padding_side = "left"  # ignored: right padding keeps position ids as unpadded
    assert next(tokenize_batches(SENTENCES, tok, batch_size=3, max_length=4))[
        "attention_mask"][1].tolist() == [1, 1, 1, 0]
    a = list(tokenize_batches(SENTENCES, tok, batch_size=3, max_length=4, padding_side="left"))
    b = list(tokenize_batches(SENTENCES, tok, batch_size=3, max_length=4, padding_side="left"))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["attention_mask"], y["attention_mask"])
    mask = a[0]["attention_mask"]
    assert mask.shape == (3, 4)
    assert mask[:, -1].all()  # left padding: every row ends with a real token
    assert mask[1].tolist() == [0, 1, 1, 1]  # "a dog ran": 3 words, padded on the left
    assert mask.sum(dim=1).tolist() == [4, 3, 4]  # the other two are truncated to 4


def test_tokenize_batches_falls_back_to_eos_without_touching_tokenizer():
    tok = _word_tokenizer(pad=None, eos="[EOS]")
    assert tok.pad_token is None
    (batch,) = tokenize_batches(["hello", "the cat sat"], tok, batch_size=2)
    assert batch["input_ids"][0].tolist() == [tok.convert_tokens_to_ids("hello")] + 2 * [
        tok.eos_token_id
    ]
    assert batch["attention_mask"].sum(dim=1).tolist() == [1, 3]
    assert tok.pad_token is None


def test_tokenize_batches_errors_are_raised_on_call():
    with pytest.raises(DataError, match="neither a pad token nor an eos token"):
        tokenize_batches(SENTENCES, _word_tokenizer(pad=None))  # no next(): eager check
    tok = _word_tokenizer()
    with pytest.raises(DataError, match="single str"):
        tokenize_batches("hello", tok)
    with pytest.raises(DataError, match=r"texts\[1\] is int"):
        tokenize_batches(["hello", 3], tok)
    with pytest.raises(DataError, match="batch_size == 0"):
        tokenize_batches(SENTENCES, tok, batch_size=0)
    with pytest.raises(DataError, match="max_length == -1"):
        tokenize_batches(SENTENCES, tok, max_length=-1)
    assert list(tokenize_batches([], tok)) == []


def test_train_tokenizer_and_blocks():
    from nerve_interp.data import token_blocks, train_tokenizer

    texts = ["the quick brown fox jumps over the lazy dog"] * 40 + ["a b c"] * 10
    tok = train_tokenizer(texts, vocab_size=320)
    assert 257 < len(tok) <= 320 and tok.eos_token_id == tok.pad_token_id == 0
    assert tok.decode(tok("the lazy dog")["input_ids"]) == "the lazy dog"
    assert train_tokenizer(texts, vocab_size=320) is tok  # cached, deterministic
    b = token_blocks(texts, tok, seq_len=16)
    n_ids = sum(len(tok(t)["input_ids"]) + 1 for t in texts)
    assert b.shape == (n_ids // 16, 16) and b.dtype == torch.long
    with pytest.raises(ValueError, match="fewer than one block"):
        token_blocks(["a"], tok, seq_len=64)
    with pytest.raises(ValueError, match="vocab_size == 100"):
        train_tokenizer(texts, vocab_size=100)
