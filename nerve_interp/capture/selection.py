"""Which tokens count, in one place: padding, excluded positions and ids, token
subsampling and the ``max_tokens`` budget, with a :class:`Tally` of what each rule left out.

The rules apply in this order to the tokens of one batch:

1. padding is never counted (``attention_mask``);
2. ``exclude_positions`` (among the real tokens of each sequence) and ``exclude_token_ids``;
3. token subsampling (``token_fraction``), drawn from ``(subsample_seed, batch index)`` alone;
4. the budget: the first ``remaining`` kept tokens, row-major.

``exclude_norm_above`` is not here: it needs the activations and is applied per point by the
token statistics sink (:class:`nerve_interp.diagnostics.TokenNormStats`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from typing import Any

import torch

from .._warnings import user_stacklevel
from ..diagnostics import TOKEN_META, ExclusionRule
from ..errors import CaptureError
from .source import Batch

_SUMMED = ("real", "positions", "token_ids", "subsampled", "empty_batches")


@dataclasses.dataclass
class Tally:
    """Token counts of a capture: real tokens seen, tokens left out by each rule, batches
    emptied by the rules and the longest sequence (in real tokens)."""

    real: int = 0
    positions: int = 0
    token_ids: int = 0
    subsampled: int = 0
    empty_batches: int = 0
    longest: int = 0

    def to_dict(self) -> dict[str, int]:
        """The checkpoint's ``position["excluded"]``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Tally:
        return cls(**{k: int(v) for k, v in (d or {}).items()
                      if k in {f.name for f in dataclasses.fields(cls)}})

    def summed(self, reduce: Any) -> Tally:
        """The counts summed over processes by ``reduce(int) -> int`` (``longest`` stays
        this process's: only the exclusion warning reads it)."""
        return dataclasses.replace(self, **{k: reduce(getattr(self, k)) for k in _SUMMED})

    def metadata(self) -> dict[str, int]:
        """``metadata["n_excluded"]`` (without the per-point norm counts)."""
        return {"real_tokens": self.real, "positions": self.positions,
                "token_ids": self.token_ids, "subsampled": self.subsampled,
                "empty_batches": self.empty_batches}


@dataclasses.dataclass(frozen=True)
class Selection:
    """The rows of one batch that count.

    Parameters
    ----------
    idx : LongTensor of shape (n_keep,) or None
        Flat (row-major) indices of the kept tokens of a ``mask_shape`` batch; None for a
        model without token inputs (every row is data, cut to ``remaining``).
    mask_shape : tuple (batch, seq) or None
    remaining : int or None
        The budget left before this batch (None: no budget).
    meta : LongTensor of shape (n_keep, 4) or (1, 4), or None
        Batch, row, position and token id of each kept token (``TOKEN_META``), for the
        token statistics; one row of the batch index for non-token inputs.
    first_sequence : int
        The data's count of sequences before this batch (``Batch.first_sequence``).
    """

    idx: torch.Tensor | None
    mask_shape: tuple[int, int] | None
    remaining: int | None
    meta: torch.Tensor | None = None
    first_sequence: int = 0

    def groups(self, shape: tuple[int, ...], n_rows: int, k: int) -> torch.Tensor:
        """The group ``(first_sequence + s) mod k`` of each kept row of activations of
        ``shape`` (``[batch, seq, D]``, or ``[batch, ..., D]`` for non-token inputs, whose
        first ``n_rows`` rows are kept), as a LongTensor ``[n_rows]``."""
        if self.idx is not None:
            seq = self.idx // self.mask_shape[1]
        else:
            per_example = max(1, int(torch.Size(shape[:-1]).numel()) // max(1, int(shape[0])))
            seq = torch.arange(n_rows, device="cpu") // per_example
        return (seq.to("cpu") + self.first_sequence) % k


class TokenSelector:
    """Applies the rules above to each batch and tallies what they leave out."""

    def __init__(self, rule: ExclusionRule, token_fraction: float | None, seed: int,
                 device: torch.device, *, with_meta: bool) -> None:
        self.rule, self.token_fraction, self.seed = rule, token_fraction, seed
        self.device, self.with_meta = device, with_meta

    def kept(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(real, kept, counts)``: the real tokens, those the position / id rules and the
        subsampling keep, and how many each rule left out."""
        real = batch.real
        mask, counts = real, {"positions": 0, "token_ids": 0, "subsampled": 0}
        if self.rule.by_token:
            mask, by_rule = self.rule.token_mask(batch.ids, real)
            counts.update(by_rule)
        if self.token_fraction is not None:  # before the budget: it fills with kept tokens
            drawn = subsample_mask(real, self.token_fraction, self.seed, batch.index)
            counts["subsampled"] = int((mask & ~drawn).sum())
            mask = mask & drawn
        return real, mask, counts

    def select(self, batch: Batch, remaining: int | None, tally: Tally) -> Selection | None:
        """The rows of ``batch`` that count, or None when none does (tallied either way)."""
        if batch.ids is None:
            self._check_untokenised(batch)
            meta = (torch.tensor([[batch.index] + [-1] * (len(TOKEN_META) - 1)],
                                 device=self.device) if self.with_meta else None)
            return Selection(None, None, remaining, meta, batch.first_sequence)
        real, mask, counts = self.kept(batch)
        tally.positions += counts["positions"]
        tally.token_ids += counts["token_ids"]
        if self.rule.by_token:
            tally.longest = max(tally.longest, int(real.sum(1).max()))
        tally.subsampled += counts["subsampled"]
        keep = budget_mask(mask, remaining)
        tally.real += int(real.sum())
        if not bool(keep.any()):
            tally.empty_batches += bool(real.any())
            return None  # an all-padding batch adds nothing; counted in the final check
        idx = keep.reshape(-1).nonzero().squeeze(1).to(self.device)
        meta = (token_meta(batch.index, batch.ids, real, keep).to(self.device)
                if self.with_meta else None)
        return Selection(idx, tuple(keep.shape), remaining, meta, batch.first_sequence)

    def calibrates(self, batch: Batch, owner_budget: int | None) -> bool:
        """Whether ``batch`` can calibrate ``exclude_norm_above``: some token of it survives
        the position / id rules and the subsampling (any batch without token inputs) and its
        owner rank has a token budget. The first such batch is where one process measures
        its medians; every rank decides this alike, from the batch alone."""
        if owner_budget == 0:
            return False
        return batch.ids is None or bool(self.kept(batch)[1].any())

    def _check_untokenised(self, batch: Batch) -> None:
        if self.rule.by_token:
            raise CaptureError(
                f"batch {batch.index} has no input_ids, so exclude_positions / "
                "exclude_token_ids cannot apply; they need token inputs (exclude_norm_above "
                "works on any).")
        if self.token_fraction is not None:
            raise CaptureError(
                f"batch {batch.index} has no input_ids, so token_fraction="
                f"{self.token_fraction} cannot apply: token subsampling needs token inputs. "
                "Pass token_fraction=None, or subsample the inputs yourself (e.g. every k-th "
                "sample).")

    # ------------------------------------------------------------------ the end
    def check_counted(self, n_tokens: int, tally: Tally, model: str) -> None:
        """Refuse a capture that counted no token, saying which rule took them all."""
        if n_tokens == 0 and tally.real > 0:
            raise CaptureError(
                f"every one of the {tally.real} real tokens given to {model} was "
                f"excluded ({tally.positions} by exclude_positions="
                f"{list(self.rule.positions)}, {tally.token_ids} by exclude_token_ids="
                f"{list(self.rule.token_ids)}, {tally.subsampled} by token_fraction="
                f"{self.token_fraction}); nothing is left for a spectrum. Exclude fewer "
                "positions or ids, raise token_fraction, or pass longer texts.")
        if n_tokens == 0:
            raise CaptureError(
                f"no tokens reached {model}: the data were empty or every token was padding "
                "(attention_mask all 0). Pass non-empty texts or batches with real tokens.")

    def warn(self, tally: Tally) -> None:
        """Batches emptied by the rules, and excluded positions that never occurred."""
        rule = self.rule
        if tally.empty_batches:
            warnings.warn(
                f"{tally.empty_batches} batch(es) had every real token excluded "
                f"(exclude_positions={list(rule.positions)}, exclude_token_ids="
                f"{list(rule.token_ids)}, token_fraction={self.token_fraction}) and added "
                "nothing to the spectra.", stacklevel=user_stacklevel())
        longest = tally.longest
        if rule.positions and longest and rule.positions[-1] >= longest:
            never = [p for p in rule.positions if p >= longest]
            warnings.warn(
                f"exclude_positions {never} never occurred: the longest sequence had "
                f"{longest} real tokens (positions 0..{longest - 1}). Positions count the "
                "real tokens of each sequence from 0.", stacklevel=user_stacklevel())


# ------------------------------------------------------------------ pure helpers
def budget_mask(mask: torch.Tensor, remaining: int | None) -> torch.Tensor:
    """Keep the first ``remaining`` real tokens (row-major) of a boolean mask."""
    if remaining is None or int(mask.sum()) <= remaining:
        return mask
    flat = mask.reshape(-1)
    keep = flat & (flat.cumsum(0) <= remaining)
    return keep.reshape(mask.shape)


def token_meta(i: int, ids: torch.Tensor, real: torch.Tensor, keep: torch.Tensor
               ) -> torch.Tensor:
    """Batch, row, position (among real tokens) and token id of each kept token,
    row-major like ``keep.nonzero()``: LongTensor of shape (n_keep, 4)."""
    rows, _ = keep.nonzero(as_tuple=True)
    pos = (real.long().cumsum(1) - 1)[keep]
    return torch.stack([torch.full_like(rows, i), rows, pos, ids.to(rows.device)[keep]], 1)


def subsample_generator(seed: int, batch_index: int) -> torch.Generator:
    """The CPU generator that decides which tokens of batch ``batch_index`` are kept.

    Seeded from ``(seed, batch_index)`` alone: the first 8 bytes (little-endian) of
    ``sha256(f"{seed}:{batch_index}")``, top bit cleared. A resumed run, a torchrun rank and
    a remote trace therefore draw the same numbers for batch ``i`` as one local run.
    """
    digest = hashlib.sha256(f"{int(seed)}:{int(batch_index)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def subsample_mask(real: torch.Tensor, fraction: float, seed: int, batch_index: int
                   ) -> torch.Tensor:
    """Bernoulli(``fraction``) token subsampling of one batch.

    One float64 uniform ``u`` is drawn per *real* token, row-major over the real tokens of
    the batch (padding draws nothing, so the padding side does not change the choice), from
    :func:`subsample_generator`; a token is kept when ``u < fraction``.

    Parameters
    ----------
    real : BoolTensor of shape (batch, seq)
        The batch's real (non-padding) tokens.
    fraction : float in (0, 1]
        Probability of keeping each token (1 keeps every one).
    seed, batch_index : int
        ``subsample_seed`` and the batch's index in the data (counted from 0).

    Returns
    -------
    BoolTensor of shape (batch, seq)
        True for the kept real tokens, False elsewhere (padding included).
    """
    device, real = real.device, real.bool().cpu()
    u = torch.rand(int(real.sum()), generator=subsample_generator(seed, batch_index),
                   dtype=torch.float64)
    keep = torch.zeros_like(real)
    keep[real] = u < fraction
    return keep.to(device)


__all__ = ["Selection", "Tally", "TokenSelector", "budget_mask", "subsample_generator",
           "subsample_mask", "token_meta"]
