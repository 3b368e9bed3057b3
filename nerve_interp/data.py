"""Offline text for capturing activations: a built-in corpus, local files, and batching.

Nothing here downloads anything. The built-in corpus ``"python-docs"`` is harvested from the
docstrings of the Python standard library that ships with the interpreter (parsed with
:mod:`ast`, never imported), so it exists on every machine that can run nerve_interp.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import re
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nerve_interp._validation import check_positive_int
from nerve_interp._warnings import user_stacklevel
from nerve_interp.errors import NerveInterpError

__all__ = [
    "CORPORA",
    "SPLITS",
    "Corpus",
    "DataError",
    "corpus_metadata",
    "load_corpus",
    "read_texts",
    "token_blocks",
    "tokenize_batches",
    "train_tokenizer",
]

CORPORA: tuple[str, ...] = ("python-docs",)
"""Names accepted by :func:`load_corpus`."""

SPLITS: tuple[str, ...] = ("train", "heldout", "all")
"""Splits accepted by :func:`load_corpus`."""

HELDOUT_FRACTION = 0.1
"""Share of documents (chosen by a SHA-1 of their text) that go to the ``"heldout"`` split."""

MIN_DOCSTRING_CHARS = 200
"""Docstrings shorter than this (after :func:`inspect.cleandoc`) are left out of the corpus."""

_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__"}
)
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_STMT_NODES = (ast.stmt, ast.excepthandler, ast.match_case)


class DataError(NerveInterpError, ValueError):
    """A corpus name, split, text file or batching argument that cannot be used."""


# --------------------------------------------------------------------------- corpus


def _is_heldout(text: str) -> bool:
    """Whether ``text`` belongs to the held-out split (stable across runs and machines)."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < HELDOUT_FRACTION * 2**64


def _stdlib_files(root: Path) -> list[Path]:
    """``.py`` files under ``root`` outside the excluded folders, sorted by relative path."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.isdisjoint(rel.parts[:-1]):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _doc_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """The module, class and function nodes under ``node``, visiting statements only.

    Definitions never sit inside expressions, so skipping them finds the same nodes as
    :func:`ast.walk` at a fraction of the cost.
    """
    if isinstance(node, _DOC_NODES):
        yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _STMT_NODES):
            yield from _doc_nodes(child)


def _docstrings(path: Path) -> list[tuple[int, str]]:
    """``(line, cleaned docstring)`` of the module, classes and functions in one file."""
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in old modules
            tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    found = []
    for node in _doc_nodes(tree):
        doc = ast.get_docstring(node, clean=False)
        if doc:
            doc = inspect.cleandoc(doc)
            if len(doc) >= MIN_DOCSTRING_CHARS:
                found.append((getattr(node, "lineno", 0), doc))
    return sorted(found, key=lambda item: item[0])


@functools.cache  # an unbounded lru_cache
def _python_docs() -> tuple[str, ...]:
    """Every long stdlib docstring, deduplicated, ordered by source path then line."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    docs = []
    for path in _stdlib_files(root):
        for _, doc in _docstrings(path):
            if doc not in seen:
                seen.add(doc)
                docs.append(doc)
    if not docs:
        raise DataError(
            f"found no docstrings of >= {MIN_DOCSTRING_CHARS} characters under the Python "
            f"standard library at {root}; this interpreter seems to ship without its .py sources."
        )
    return tuple(docs)


class Corpus(list):
    """The documents of a built-in corpus: a ``list`` of str that remembers where it came from.

    :func:`load_corpus` returns one. It behaves as a list everywhere (it *is* one) and
    carries three read-only attributes, ``name``, ``split`` and ``seed``, plus ``indices``:
    which positions of that corpus order it holds, as a :class:`range`
    (``range(len(corpus))`` for a whole one). :func:`~nerve_interp.capture.collect_spectra`
    records :meth:`metadata` in ``SpectraResult.metadata["corpus"]`` when it is given one.
    The constructor (used by :func:`load_corpus` and by slicing) checks the name, split and
    seed, not the documents: :meth:`is_unchanged` does that.

    Slicing keeps the provenance: ``corpus[:48]`` is a ``Corpus`` of the first 48 documents
    of the same order, its ``indices`` ``range(0, 48)``, so a capture on a slice still says
    which documents it read. Everything else that makes a new list (``+``, ``*``,
    ``.copy()``, ``list(corpus)``, ``sorted(corpus)``, a comprehension) gives a plain
    ``list``, which records nothing. A ``Corpus`` changed in place (``append``, ``sort``,
    item assignment, ...) no longer matches its attributes; ``collect_spectra`` then
    records nothing and warns (:func:`corpus_metadata`).

    Examples
    --------
    >>> docs = load_corpus("python-docs", split="heldout", seed=3)
    >>> docs[:5].metadata()
    {'name': 'python-docs', 'split': 'heldout', 'seed': 3, 'indices': [0, 5, 1]}
    >>> isinstance(docs, list), type(docs + []).__name__
    (True, 'list')
    """

    def __init__(self, docs: Sequence[str] = (), *, name: str, split: str,
                 seed: int | None, indices: range | None = None) -> None:
        if name not in CORPORA or split not in SPLITS:
            raise DataError(f"Corpus(name={name!r}, split={split!r}): the name must be one of "
                            f"{CORPORA} and the split one of {SPLITS}.")
        super().__init__(docs)
        self._name, self._split, self._seed = name, split, _check_seed(seed)
        self._indices = range(len(self)) if indices is None else indices

    @property
    def name(self) -> str:
        """The corpus name, e.g. ``"python-docs"``."""
        return self._name

    @property
    def split(self) -> str:
        """``"train"``, ``"heldout"`` or ``"all"``."""
        return self._split

    @property
    def seed(self) -> int | None:
        """Seed of the document order; None for the source order."""
        return self._seed

    @property
    def indices(self) -> range:
        """Positions of these documents in the order of ``load_corpus(name, split, seed=seed)``."""
        return self._indices

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return Corpus(super().__getitem__(index), name=self._name, split=self._split,
                          seed=self._seed, indices=self._indices[index])
        return super().__getitem__(index)

    def metadata(self) -> dict[str, Any]:
        """``{"name", "split", "seed", "indices": [start, stop, step]}``, JSON-ready.

        ``[docs[i] for i in range(start, stop, step)]`` with ``docs = load_corpus(name,
        split, seed=seed)`` gives these documents again (on the same Python version: the text
        comes from its standard library).
        """
        r = self._indices
        return {"name": self._name, "split": self._split, "seed": self._seed,
                "indices": [r.start, r.stop, r.step]}

    def is_unchanged(self) -> bool:
        """Whether the documents are still those :func:`load_corpus` gave for the attributes."""
        full = _ordered(self._name, self._split, self._seed)
        if len(self) != len(self._indices) or (self._indices and not (
                0 <= min(self._indices) and max(self._indices) < len(full))):
            return False
        return list.__eq__(self, [full[i] for i in self._indices])


def corpus_metadata(texts: Any) -> dict[str, Any] | None:
    """``texts.metadata()`` for a :class:`Corpus` whose documents are unchanged, else None.

    A ``Corpus`` changed in place gives None and a ``UserWarning`` (its attributes no longer
    say which documents it holds); anything that is not a ``Corpus`` gives None silently.
    """
    if not isinstance(texts, Corpus):
        return None
    if not texts.is_unchanged():
        warnings.warn(
            f"the {texts.name}/{texts.split} corpus (seed={texts.seed}) was changed after "
            "load_corpus (documents added, removed, replaced or reordered), so its name, split "
            "and seed are not recorded in the metadata. Slice it instead (corpus[a:b] keeps "
            "them), or pass data_label= to describe the text.", UserWarning,
            stacklevel=user_stacklevel())
        return None
    return texts.metadata()


def _check_seed(seed: Any) -> int | None:
    """``seed`` as an int >= 0 or None; a TypeError / ValueError naming it otherwise."""
    if seed is None:
        return None
    return check_positive_int(seed, "seed", minimum=0,
                              context=" (or None for the source order)")


@functools.lru_cache(maxsize=16)
def _ordered(name: str, split: str, seed: int | None) -> tuple[str, ...]:
    """The documents of one split in the order :func:`load_corpus` returns them."""
    docs = _python_docs()
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(docs))
        docs = tuple(docs[i] for i in order)
    if split == "all":
        return docs
    want_heldout = split == "heldout"
    return tuple(doc for doc in docs if _is_heldout(doc) == want_heldout)


def load_corpus(name: str = "python-docs", split: str = "train", *,
                seed: int | None = 0) -> Corpus:
    """Load a built-in text corpus that needs no download, in a seeded random order.

    Parameters
    ----------
    name : str, default "python-docs"
        Which corpus. ``"python-docs"`` is every module, class and function docstring of the
        Python standard library of the running interpreter (found with ``sysconfig``; folders
        ``test``, ``tests``, ``idlelib``, ``lib2to3``, ``turtledemo`` and ``site-packages`` are
        skipped) that is at least 200 characters long after :func:`inspect.cleandoc`. The files
        are parsed with :mod:`ast`, never imported. Duplicates are dropped.
    split : {"train", "heldout", "all"}, default "train"
        ``"heldout"`` holds about 10 % of the documents, chosen by the SHA-1 of their text, so
        the split is the same on every run, machine and seed; ``"train"`` holds the rest. The
        two are disjoint and together make ``"all"``.
    seed : int >= 0 or None, default 0
        Order of the documents. An int shuffles them: the ``"all"`` documents (in source
        order) are permuted by ``numpy.random.default_rng(seed).permutation`` and each split
        keeps the documents of that order that belong to it, so the order is the same on
        every machine with the same standard library, and a split's order is a subsequence
        of ``"all"``'s for the same seed. ``None`` keeps the source order: by source path
        (``abc.py``, ``aifc.py``, ``argparse.py``, ...), then line.

    Returns
    -------
    Corpus
        A ``list`` of str (a new one on every call; the harvested corpus is cached in memory,
        so only the first call parses files) with read-only ``name``, ``split`` and ``seed``
        attributes, which :func:`~nerve_interp.capture.collect_spectra` records in the result
        metadata (``metadata["corpus"]``). Slices keep them; see :class:`Corpus`.

    Raises
    ------
    DataError
        If ``name`` or ``split`` is unknown.
    TypeError, ValueError
        If ``seed`` is not an int >= 0 or None.

    Notes
    -----
    Why shuffle by default: a capture reads the documents in order and stops at
    ``max_tokens``, so it measures a prefix of the corpus. In source order that prefix is a
    few stdlib modules, not a sample of the corpus: 12k SmolLM2-135M tokens (at
    ``max_length=128``) hold only 115 documents, all from the 8 modules whose paths sort
    first (``__future__.py`` to ``_pydecimal.py``), and the soft rank of layer 3 after SiLU
    read 531, 422 and 547 at 6k, 12k and 16k tokens taken that way, against a smooth 443,
    501, 548 and 562 at 6k, 12k, 16k and 32k tokens of randomly ordered documents. With the
    default seed every prefix is a random sample of the split.

    The text depends on the Python version (3.11.7 gives 2,179 documents, 1.2 M
    characters). Pin hashes of the output if a test needs exact bytes.

    Examples
    --------
    >>> docs = load_corpus("python-docs", split="heldout")
    >>> len(docs) > 100 and all(isinstance(d, str) for d in docs)
    True
    >>> (docs.name, docs.split, docs.seed)
    ('python-docs', 'heldout', 0)
    >>> sorted(docs) == sorted(load_corpus("python-docs", split="heldout", seed=None))
    True
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in CORPORA:
        raise DataError(
            f"unknown corpus {name!r}. Corpora available offline: {', '.join(CORPORA)}."
        )
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for corpus {key!r}. Splits: {', '.join(SPLITS)}.")
    seed = _check_seed(seed)
    return Corpus(_ordered(key, split, seed), name=key, split=split, seed=seed)


# --------------------------------------------------------------------------- local files

_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


def _read_utf8(path: Path) -> str:
    """The file as UTF-8 text, or a ``DataError`` that names it, where decoding failed and
    which encoding it looks like (with the command that converts it)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        guess = next((enc for bom, enc in ((b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
                      if data.startswith(bom)), None)
        if guess is None:
            guess = "cp1252 (Windows Latin-1)" if _decodes(data, "cp1252") else "latin-1"
        enc = guess.split()[0]
        raise DataError(
            f"{path} is not UTF-8 text: byte {data[err.start]:#04x} at offset {err.start} "
            f"({err.reason}); it looks like {guess}. Convert it to UTF-8, e.g. "
            f"iconv -f {enc} -t utf-8 {path} > {path.with_suffix('.utf8' + path.suffix)}"
        ) from None


def _decodes(data: bytes, encoding: str) -> bool:
    try:
        data.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def read_texts(path: str | Path) -> list[str]:
    """Read documents from a local text file.

    Parameters
    ----------
    path : str or path-like
        A ``.txt`` file, split into paragraphs at blank lines (each paragraph stripped, empty
        ones dropped), or a ``.jsonl`` file with one JSON object per line holding the document
        in its ``"text"`` field (blank lines are skipped).

    Returns
    -------
    list of str
        The documents in file order.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    DataError
        If the file is not UTF-8 (the message names the byte, the encoding it looks like and
        the ``iconv`` command that converts it), the suffix is neither ``.txt`` nor
        ``.jsonl``, a JSONL line is not an object with a
        string ``"text"``, or the file holds no text at all.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> _ = p.write_text("First paragraph.\\n\\n\\nSecond\\nparagraph.\\n")
    >>> read_texts(p)
    ['First paragraph.', 'Second\\nparagraph.']
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_texts: no such file: {str(path)!r}; pass an existing "
                                ".txt (paragraphs) or .jsonl ('text' field) file.")
    suffix = path.suffix.lower()
    raw = _read_utf8(path)
    if suffix == ".txt":
        texts = [p.strip() for p in _BLANK_LINES.split(raw.replace("\r\n", "\n"))]
        texts = [t for t in texts if t]
    elif suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}).") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(
                    f'{path}:{lineno}: each line must be a JSON object with a string "text" '
                    f"field; got {line[:80]!r}."
                )
            if obj["text"].strip():
                texts.append(obj["text"])
    else:
        raise DataError(
            f"read_texts: {str(path)!r} has suffix {path.suffix!r}; expected .txt (paragraphs "
            'separated by blank lines) or .jsonl (one {"text": ...} object per line).'
        )
    if not texts:
        raise DataError(f"read_texts: {str(path)!r} contains no text (0 non-empty documents).")
    return texts


# --------------------------------------------------------------------------- batching


def _pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id; raise when it has neither."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, list):  # some tokenizers list several eos ids
            value = value[0] if value else None
        if value is not None:
            return int(value)
    raise DataError(
        f"{type(tokenizer).__name__} has neither a pad token nor an eos token, so batches "
        "cannot be padded. Set one first, e.g. tokenizer.add_special_tokens({'pad_token': "
        "'<pad>'}) (and resize the model's embeddings), or use batch_size=1."
    )


def tokenize_batches(
    texts: Sequence[str],
    tokenizer: Any,
    *,
    batch_size: int = 8,
    max_length: int = 256,
    padding_side: str = "right",
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenize texts into padded batches, in input order.

    Parameters
    ----------
    texts : sequence of str
        The documents. Batch ``b`` holds ``texts[b * batch_size:(b + 1) * batch_size]``.
    tokenizer : transformers tokenizer
        Any callable Hugging Face tokenizer. Special tokens are added as the tokenizer does by
        default. The pad id is the tokenizer's pad token, else its eos token (the tokenizer
        itself is not modified).
    batch_size : int, default 8
        Documents per batch (the last batch may be smaller). Must be >= 1.
    max_length : int, default 256
        Longer documents are truncated to this many tokens. Must be >= 1.
    padding_side : {"right", "left"}, default "right"
        Right padding (the default, whatever ``tokenizer.padding_side`` says) gives every real
        token the same position id as in an unpadded forward pass, so models with absolute
        positions (GPT-2, OPT) see exactly the text. Left padding shifts them in a plain
        Hugging Face forward; it is only needed for generation.

    Yields
    ------
    dict of str to torch.Tensor
        ``"input_ids"`` and ``"attention_mask"``, both int64 of shape ``(B, T)`` where ``T`` is
        the longest (truncated) document in the batch; ``attention_mask`` is 1 on real tokens
        and 0 on padding.

    Raises
    ------
    DataError
        If ``texts`` is a bare string or holds a non-string, the sizes are < 1, or the
        tokenizer has neither a pad nor an eos token (raised on the call, before iterating).

    Examples
    --------
    >>> from nerve_interp.zoo import load_model  # doctest: +SKIP
    >>> _, tok = load_model("minilm")  # doctest: +SKIP
    >>> batch = next(tokenize_batches(["a b c", "a"], tok, batch_size=2))  # doctest: +SKIP
    >>> batch["attention_mask"].sum(1).tolist()  # doctest: +SKIP
    [5, 3]
    """
    if isinstance(texts, str):
        raise DataError("texts must be a sequence of strings, got a single str; wrap it: [text].")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"texts[{i}] is {type(text).__name__}, expected str.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size == {batch_size!r}, must be an int >= 1.")
    if not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"max_length == {max_length!r}, must be an int >= 1 (tokens per text).")
    pad_id = _pad_token_id(tokenizer)
    if padding_side not in ("right", "left"):
        raise DataError(f"padding_side == {padding_side!r}, must be 'right' or 'left'.")
    left = padding_side == "left"
    return _batches(texts, tokenizer, batch_size, max_length, pad_id, left)


def _batches(
    texts: list[str], tokenizer: Any, batch_size: int, max_length: int, pad_id: int, left: bool
) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        ids = tokenizer(chunk, truncation=True, max_length=max_length, padding=False)["input_ids"]
        width = max((len(row) for row in ids), default=0)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, tokens in enumerate(ids):
            n = len(tokens)
            cols = slice(width - n, width) if left else slice(0, n)
            input_ids[row, cols] = torch.tensor(tokens, dtype=torch.long)
            attention_mask[row, cols] = 1
        yield {"input_ids": input_ids, "attention_mask": attention_mask}


# --------------------------------------------------------------------------- training data
EOS = "<|endoftext|>"


@functools.cache
def _trained_tokenizer(texts: tuple[str, ...], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS,
                                   bos_token=EOS, unk_token=EOS)


def train_tokenizer(texts: Sequence[str] | None = None, vocab_size: int = 4096) -> Any:
    """A byte-level BPE tokenizer trained offline (``tokenizers``), for the package's models.

    Parameters
    ----------
    texts : sequence of str, optional
        Training text; default the python-docs train split (~1.1 M characters, ~1 s).
    vocab_size : int, default 4096
        Including the single special token ``<|endoftext|>`` (eos = pad = bos).

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        Deterministic for the same texts and size; cached in memory.
    """
    if vocab_size < 300:
        raise DataError(f"vocab_size == {vocab_size}, must be >= 300 (256 bytes + merges).")
    texts = tuple(load_corpus("python-docs", "train") if texts is None else texts)
    if not texts:
        raise DataError("no texts to train the tokenizer on.")
    return _trained_tokenizer(texts, int(vocab_size))


def token_blocks(texts: Sequence[str], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Concatenate documents (separated by eos) and cut them into blocks of ``seq_len``.

    Returns
    -------
    torch.LongTensor of shape (n_blocks, seq_len)
        Every position is a real token (no padding); the remainder is dropped.

    Examples
    --------
    >>> tok = train_tokenizer(["a b c d e f g h"] * 50, vocab_size=300)
    >>> token_blocks(["a b c d"] * 10, tok, seq_len=8).shape[1]
    8
    """
    if seq_len < 2:
        raise DataError(f"seq_len == {seq_len}, must be >= 2.")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"{len(ids)} tokens are fewer than one block of {seq_len}; pass more "
                        "text or a smaller seq_len.")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
