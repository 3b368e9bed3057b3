"""Where the data come from: user input normalised into batches, and their fingerprint.

:func:`iter_batches` turns what users pass (strings with a tokenizer, tokenizer output,
token-id tensors, float inputs of non-token models) into dicts of model inputs;
:func:`batches` wraps each as a :class:`Batch` (index, inputs, token ids, real-token mask);
:class:`DataHash` fingerprints the real tokens so a checkpoint can be resumed only on the same
data; :func:`peek` gives the first batch to the memory planner without losing it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from ..errors import CaptureError


def _as_batch(item: Any, i: int) -> dict[str, Any]:
    """One batch as model keyword arguments.

    Token models get ``input_ids`` (+ ``attention_mask``); any other model gets its inputs
    as given: a float tensor is passed positionally (key ``"_args"``), a dict as keywords.
    """
    if isinstance(item, torch.Tensor):
        if item.is_floating_point():
            return {"_args": (item,)}
        item = {"input_ids": item}
    if not isinstance(item, dict) and hasattr(item, "keys"):  # BatchEncoding
        item = dict(item)
    if not isinstance(item, dict):
        raise TypeError(
            f"batch {i} is a {type(item).__name__}; batches are dicts with 'input_ids' and "
            "'attention_mask' (what a tokenizer returns), token-id tensors, or pass a list of "
            "strings together with tokenizer=..."
        )
    if "input_ids" not in item:
        return dict(item)  # a non-token model: keyword inputs, every row is data
    out = {k: torch.as_tensor(v) for k, v in item.items()}
    ids = out["input_ids"]
    if ids.ndim == 1:
        out = {k: v.unsqueeze(0) if v.ndim == 1 else v for k, v in out.items()}
        ids = out["input_ids"]
    if ids.ndim != 2:
        raise CaptureError(
            f"batch {i}: input_ids must be [batch, seq]; got shape {tuple(ids.shape)}."
        )
    mask = out.get("attention_mask")
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        raise CaptureError(
            f"batch {i}: attention_mask {tuple(mask.shape)} does not match input_ids "
            f"{tuple(ids.shape)}."
        )
    return out


def iter_batches(
    batches: Any, tokenizer: Any = None, *, batch_size: int = 8, max_length: int = 256
) -> Iterator[dict[str, torch.Tensor]]:
    """Normalise what users pass as data into dicts of tensors.

    Accepts a list of strings (with ``tokenizer``), one dict / BatchEncoding, a token-id
    tensor ``[batch, seq]``, or an iterable of dicts or tensors.
    """
    if isinstance(batches, str):
        raise TypeError(
            "batches is a single string; pass a list of strings (documents) with tokenizer=..."
        )
    if isinstance(batches, Sequence) and batches and all(isinstance(b, str) for b in batches):
        if tokenizer is None:
            raise TypeError(
                "batches is a list of strings but no tokenizer was given; pass tokenizer=... "
                "(e.g. the second value of ni.load_model(...)) or tokenise them yourself."
            )
        from ..data import tokenize_batches

        yield from tokenize_batches(list(batches), tokenizer, batch_size=batch_size,
                                    max_length=max_length)
        return
    if isinstance(batches, torch.Tensor):
        if batches.is_floating_point():  # model inputs (images, features): split along dim 0
            if batches.ndim < 2:
                raise CaptureError(
                    f"batches is a float tensor of shape {tuple(batches.shape)}; pass model "
                    "inputs with a leading batch dimension, e.g. [N, ...], or a list of them.")
            for j, start in enumerate(range(0, batches.shape[0], batch_size)):
                yield _as_batch(batches[start:start + batch_size], j)
            return
        t = batches if batches.ndim == 2 else batches.unsqueeze(0)
        for j, start in enumerate(range(0, t.shape[0], batch_size)):
            yield _as_batch(t[start:start + batch_size], j)
        return
    if isinstance(batches, dict) or (hasattr(batches, "keys") and "input_ids" in batches):
        yield _as_batch(batches, 0)
        return
    for j, item in enumerate(batches):
        yield _as_batch(item, j)


def _hash_batch(h: Any, batch: dict) -> None:
    ids = batch.get("input_ids")
    if ids is None:  # non-token inputs: their raw values, in key order
        for key in sorted(batch):
            for v in batch[key] if isinstance(batch[key], tuple) else (batch[key],):
                if isinstance(v, torch.Tensor):
                    h.update(key.encode() + v.detach().cpu().contiguous().numpy().tobytes())
        return
    mask = batch.get("attention_mask")
    for j, row in enumerate(ids):
        real = row if mask is None else row[mask[j].bool()]
        h.update(real.to(torch.int64).cpu().numpy().tobytes())
        h.update(b"|")


def token_hash(batches: Iterable[dict]) -> str:
    """SHA-1 of the real (non-padding) token ids of ``batches``, row by row.

    Spectra record it (``metadata["data_sha1"]``) so an ablation can warn when it is
    evaluated on the very text the spectra came from.
    """
    h = hashlib.sha1()
    for b in batches:
        _hash_batch(h, b)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of the data.

    Parameters
    ----------
    index : int
        Its position in the data, counted from 0 (sharding, subsampling and checkpoints key
        on it).
    inputs : dict
        Model keyword arguments (``"_args"``: positional inputs of a non-token model).
    """

    index: int
    inputs: dict[str, Any]
    first_sequence: int = 0

    @property
    def n_sequences(self) -> int:
        """Sequences (or examples, for a model without token inputs) in the batch."""
        if self.ids is not None:
            return int(self.ids.shape[0])
        args = self.inputs.get("_args", ())
        first = args[0] if args else next(iter(self.inputs.values()), None)
        return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.ndim else 1

    @property
    def ids(self) -> torch.Tensor | None:
        """Token ids ``[batch, seq]``, or None for a model without token inputs."""
        return self.inputs.get("input_ids")

    @property
    def real(self) -> torch.Tensor:
        """BoolTensor ``[batch, seq]``: the real (non-padding) tokens."""
        mask = self.inputs.get("attention_mask")
        return torch.ones(self.ids.shape, dtype=torch.bool) if mask is None else mask.bool()

    def describe(self) -> str:
        """``"batch 3, input (4, 24)"`` for error messages."""
        shape = tuple(self.ids.shape) if self.ids is not None else "non-token inputs"
        return f"batch {self.index}, input {shape}"


def batches(data: Any, tokenizer: Any = None, *, batch_size: int = 8, max_length: int = 256
            ) -> Iterator[Batch]:
    """:func:`iter_batches` with each batch numbered, as a :class:`Batch`."""
    first = 0
    for i, inputs in enumerate(iter_batches(data, tokenizer, batch_size=batch_size,
                                            max_length=max_length)):
        batch = Batch(i, inputs, first)
        first += batch.n_sequences
        yield batch


PREFIX_TOKENS = (16, 64)
"""A sequence's fingerprints hash its first 16 and first 64 real tokens: the same document
truncated at another ``max_length`` (or packed in other batches) gets the same ones. 64
shared tokens mean the same text; 16 (used when a sequence is shorter than 64) can also be a
common opening ("Return the ...")."""


def sequence_fingerprints(inputs: dict) -> list[list[str]]:
    """Per sequence of a batch, its fingerprints ``"<P>:<16 hex digits>"``: SHA-1 of its first
    ``P`` real token ids for each ``P`` of :data:`PREFIX_TOKENS` it reaches (its whole length
    when shorter than all), the longest last; none for a model without token inputs."""
    ids = inputs.get("input_ids")
    if ids is None:
        return []
    mask = inputs.get("attention_mask")
    out = []
    for j, row in enumerate(ids):
        real = (row if mask is None else row[mask[j].bool()]).to(torch.int64).cpu()
        sizes = [p for p in PREFIX_TOKENS if len(real) >= p] or [len(real)]
        out.append([f"{p}:" + hashlib.sha1(real[:p].numpy().tobytes()).hexdigest()[:16]
                    for p in sizes])
    return out


@dataclasses.dataclass(frozen=True)
class InputLimits:
    """What a model's token inputs must respect: ids in ``[0, vocab_size)`` and, for models
    with learned absolute position embeddings, at most ``max_positions`` tokens."""

    vocab_size: int | None = None
    max_positions: int | None = None

    def check(self, inputs: dict, where: str) -> None:
        """Raise a ``DataError`` naming the batch, the bad value and the limit."""
        from ..data import DataError

        ids = inputs.get("input_ids")
        if ids is None or not ids.numel():
            return
        lo, hi = int(ids.min()), int(ids.max())
        if self.vocab_size is not None and (lo < 0 or hi >= self.vocab_size):
            bad = lo if lo < 0 else hi
            raise DataError(f"{where}: token id {bad} is outside the model's vocabulary "
                            f"(ids 0 to {self.vocab_size - 1}); tokenize with this model's "
                            "own tokenizer (pass texts with tokenizer=...).")
        if self.max_positions is not None and ids.shape[-1] > self.max_positions:
            raise DataError(f"{where}: {ids.shape[-1]} tokens per sequence, but the model has "
                            f"{self.max_positions} positions; pass max_length <= "
                            f"{self.max_positions} (or cut the sequences).")


class DataHash:
    """Running SHA-1 of the batches seen (their real token ids, row by row), and the
    fingerprint of every sequence (:func:`sequence_fingerprints`)."""

    def __init__(self) -> None:
        self._h = hashlib.sha1()
        self.documents: set[str] = set()

    def update(self, batch: Batch) -> None:
        _hash_batch(self._h, batch.inputs)
        for prints in sequence_fingerprints(batch.inputs):
            self.documents.update(prints)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def peek(data: Any, tokenizer: Any = None, *, batch_size: int = 8, max_length: int = 256
         ) -> tuple[Any, dict[str, Any]]:
    """The first batch's inputs, and ``data`` still whole (an iterator gets its first item
    put back).

    Raises
    ------
    CaptureError
        No batch at all.
    """
    if iter(data) is data:  # an iterator: peek, then put the first item back
        try:
            first_raw = next(data)
        except StopIteration:
            raise CaptureError("no batches: the iterator passed as batches is empty.") from None
        return itertools.chain([first_raw], data), _as_batch(first_raw, 0)
    first = next(iter_batches(data, tokenizer, batch_size=batch_size, max_length=max_length),
                 None)
    if first is None:
        raise CaptureError("no batches: batches is empty.")
    return data, first


def is_texts(data: Any) -> bool:
    """Whether ``data`` is a non-empty list of strings (tokenised here)."""
    return isinstance(data, Sequence) and bool(data) and all(isinstance(b, str) for b in data)


__all__ = ["PREFIX_TOKENS", "Batch", "DataHash", "InputLimits", "batches", "is_texts",
           "iter_batches", "peek", "sequence_fingerprints", "token_hash"]
