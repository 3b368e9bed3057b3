r"""Outlier tokens: per-token statistics gathered in the capture pass.

A spectrum should describe an FFN, not a handful of tokens. In many language models the
first token of every sequence (an *attention sink*) has FFN activations hundreds of times
larger than the others (SmolLM2-135M, layer 11 ``post``: norm ~570× the median), and those
few tokens alone then hold almost all the variance: the participation ratio collapses to ~1.

Two things live here, both used by :func:`nerve_interp.collect_spectra`:

* :class:`TokenNormStats`, a streaming, mergeable record per point of the activation norms
  ``‖x_n‖`` of the tokens that enter the spectrum: count, maximum, a fixed log-spaced norm
  histogram (quantiles within 6 %), and the ``m`` tokens of largest norm with their
  activation vectors (``m × D``, bounded) and where they came from (batch, row, position,
  token id). At the end, with the final mean ``μ`` and centred scatter ``M2`` of the
  point, :meth:`TokenNormStats.finish` gives each top token's exact **variance share**
  ``‖x_i − μ‖² / trace(M2)`` and returns a :class:`TokenDiagnostics`.
* :class:`ExclusionRule`, which leaves tokens out of the spectrum by position, by token id,
  or by norm (more than a multiple of the point's median norm).

The *outlier tokens* of a point are its ``k`` tokens of largest activation norm, with
``k = min(max_outlier_tokens, max(1, ⌈outlier_fraction · N⌉))`` and ``N`` the tokens of the
spectrum. Their **outlier share** is the share of the variance (trace of the centred
covariance) they hold; a point is **flagged** (``outlier_flag``) when the share exceeds
``outlier_threshold``. Defaults: the top 1 % holding more than a quarter of the variance,
25× their fair share. Measured on SmolLM2-135M (16 × 256 tokens of Python docstrings), the
top 1 % hold 2-8 % of the ``post`` variance in 23 of 30 layers and 19-24 % in layers 10 and
29, where leaving out position 0 changes the participation ratio by < 25 %; in layers 1,
9, 11 and 28 (28-99 %) leaving it out raises the ratio 3-92×, and in layer 2 (66 %) the top
tokens sit at several positions. MiniLM: at most 4 %. An attention sink is one token per
sequence, i.e. ``1/seq_len`` of ``N`` (0.4 % at 256 tokens), so a top group of 1 % contains
every sink of sequences of 100 tokens or more. When
``⌈outlier_fraction · N⌉`` exceeds ``max_outlier_tokens`` the share is that of the top
``max_outlier_tokens`` tokens, a lower bound of the top-fraction share
(``TokenDiagnostics.capped`` says so).

The module is pure torch/numpy (no nnsight).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .covariance import fill_lower
from .errors import OutlierTokenWarning

#: Norm histogram: log10-spaced bins over [1e-8, 1e12) plus an underflow and an overflow bin.
NORM_LOG10_MIN, NORM_LOG10_MAX, NORM_BINS_PER_DECADE = -8.0, 12.0, 40
_N_BINS = int((NORM_LOG10_MAX - NORM_LOG10_MIN) * NORM_BINS_PER_DECADE)
#: Length of ``TokenNormStats.histogram_``: the log bins plus underflow and overflow.
NORM_HISTOGRAM_SIZE = _N_BINS + 2

#: Columns of ``TokenNormStats.top_meta`` / the token tables.
TOKEN_META = ("batch", "row", "position", "token_id")

DEFAULT_OUTLIER_FRACTION = 0.01
DEFAULT_OUTLIER_THRESHOLD = 0.25
DEFAULT_MAX_OUTLIER_TOKENS = 256

#: Besides the top ``k``, a kept top token counts as an outlier token when its centred squared
#: norm exceeds this multiple of the mean token's, ``‖x − μ‖² > 20 · trace(M2) / N``, the
#: mean taken over the tokens not yet marked, iterated (:func:`outlier_tokens_mask`)
#: (typical tokens' largest is 5-10×; SmolLM2's attention sinks are 70-250×).
MASSIVE_TOKEN_FACTOR = 20.0


def outlier_k(n_tokens: int, outlier_fraction: float, max_outlier_tokens: int) -> int:
    """Size of the top group: ``min(max_outlier_tokens, max(1, ⌈outlier_fraction · N⌉))``.

    Examples
    --------
    >>> outlier_k(4096, 0.01, 256), outlier_k(65536, 0.01, 256), outlier_k(50, 0.01, 256)
    (41, 256, 1)
    """
    return int(min(max_outlier_tokens, max(1, math.ceil(outlier_fraction * n_tokens - 1e-9))))


def check_outlier_parameters(outlier_fraction: float, outlier_threshold: float,
                             max_outlier_tokens: int) -> None:
    """Raise ``ValueError`` naming the parameter that is out of range."""
    if not 0.0 < float(outlier_fraction) < 1.0:
        raise ValueError(f"outlier_fraction == {outlier_fraction}, must be in (0, 1) (share of "
                         "the tokens, by norm, whose variance share is measured; e.g. 0.01).")
    if not 0.0 < float(outlier_threshold) < 1.0:
        raise ValueError(f"outlier_threshold == {outlier_threshold}, must be in (0, 1) (share "
                         "of the variance above which a point is flagged; e.g. 0.5).")
    if int(max_outlier_tokens) < 1:
        raise ValueError(f"max_outlier_tokens == {max_outlier_tokens}, must be >= 1 (top "
                         "tokens kept per point; memory max_outlier_tokens × D floats).")


# ------------------------------------------------------------------ exclusion
@dataclass(frozen=True)
class ExclusionRule:
    """Which tokens are left out of the spectra.

    Parameters
    ----------
    positions : tuple of int
        Positions among the *real* (non-padding) tokens of each sequence, 0 = its first
        real token, whatever the padding side. ``skip_first=k`` is ``positions=range(k)``.
    token_ids : tuple of int
        Token ids (e.g. special tokens) left out wherever they occur.
    norm_above : float or None
        Leave out, at each point separately, the tokens whose activation norm exceeds
        ``norm_above`` × the median norm of that point. The median is measured once, on the
        real tokens of the **first batch** that remain after the position and id rules (the
        calibration batch), and then fixed; the same threshold applies to that batch and
        every later one. Points of one layer may then keep different tokens (each point's
        ``n_samples`` says how many).
    """

    positions: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()
    norm_above: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.positions or self.token_ids or self.norm_above is not None)

    @property
    def by_token(self) -> bool:
        """Whether the rule needs token inputs (positions or ids)."""
        return bool(self.positions or self.token_ids)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (kept in ``SpectraResult.metadata["exclusion"]``)."""
        return {"positions": list(self.positions), "token_ids": list(self.token_ids),
                "norm_above": self.norm_above,
                "norm_calibration": "median norm of the first batch, per point"
                if self.norm_above is not None else None}

    def token_mask(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Real tokens that the position and id rules keep.

        Parameters
        ----------
        ids : LongTensor of shape (batch, seq)
        mask : BoolTensor of shape (batch, seq)
            Real (non-padding) tokens.

        Returns
        -------
        keep : BoolTensor of shape (batch, seq)
        counts : dict
            ``{"positions": n, "token_ids": n}``: real tokens left out by each rule (a token
            hit by both counts under ``positions``).
        """
        keep = mask.clone()
        counts = {"positions": 0, "token_ids": 0}
        if self.positions:
            pos = mask.long().cumsum(1) - 1
            hit = mask & torch.isin(pos, torch.tensor(self.positions, dtype=pos.dtype))
            counts["positions"] = int(hit.sum())
            keep &= ~hit
        if self.token_ids:
            hit = keep & torch.isin(ids, torch.tensor(self.token_ids, dtype=ids.dtype,
                                                      device=ids.device))
            counts["token_ids"] = int(hit.sum())
            keep &= ~hit
        return keep, counts


def _int_tuple(values: Any, name: str, example: str) -> tuple[int, ...]:
    if values is None:
        return ()
    if isinstance(values, (int, np.integer)) or isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of integers, e.g. {example}; got "
                        f"{values!r}.")
    try:
        out = tuple(sorted({int(v) for v in values}))
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of integers, e.g. {example}; got "
                        f"{values!r}.") from None
    return out


def exclusion_rule(
    exclude_positions: Iterable[int] | None = (),
    exclude_token_ids: Iterable[int] | None = (),
    exclude_norm_above: float | None = None,
    *,
    skip_first: int = 0,
    vocab_size: int | None = None,
    max_length: int | None = None,
) -> ExclusionRule:
    """Validate the exclusion arguments of ``collect_spectra`` and build the rule.

    Raises
    ------
    ValueError
        Negative positions, positions >= ``max_length`` (when the texts are tokenised here),
        token ids outside ``[0, vocab_size)``, ``exclude_norm_above <= 1`` or
        ``skip_first < 0``.
    TypeError
        A bare integer instead of a sequence (``exclude_positions=0``).
    """
    if skip_first < 0:
        raise ValueError(f"skip_first == {skip_first}, must be >= 0 (tokens per sequence).")
    positions = _int_tuple(exclude_positions, "exclude_positions", "(0,)")
    positions = tuple(sorted(set(positions) | set(range(int(skip_first)))))
    if positions and positions[0] < 0:
        raise ValueError(f"exclude_positions has {positions[0]}, must be >= 0: positions count "
                         "the real tokens of each sequence from 0 (its first real token).")
    if positions and max_length is not None and positions[-1] >= max_length:
        raise ValueError(f"exclude_positions has {positions[-1]}, beyond the sequence length: "
                         f"texts are truncated to max_length = {max_length} tokens "
                         f"(positions 0..{max_length - 1}).")
    token_ids = _int_tuple(exclude_token_ids, "exclude_token_ids", "(tokenizer.bos_token_id,)")
    if token_ids and token_ids[0] < 0:
        raise ValueError(f"exclude_token_ids has {token_ids[0]}; token ids are >= 0.")
    if token_ids and vocab_size is not None and token_ids[-1] >= vocab_size:
        bad = [t for t in token_ids if t >= vocab_size]
        raise ValueError(f"exclude_token_ids has {bad}, not in the vocabulary (size "
                         f"{vocab_size}, ids 0..{vocab_size - 1}); e.g. "
                         "tokenizer.all_special_ids lists the special tokens.")
    if exclude_norm_above is not None:
        f = float(exclude_norm_above)
        if not math.isfinite(f) or f <= 1.0:
            raise ValueError(f"exclude_norm_above == {exclude_norm_above}, must be a finite "
                             "multiple of the median norm > 1 (e.g. 20: leave out tokens "
                             "whose activation norm is over 20× the point's median).")
        exclude_norm_above = f
    return ExclusionRule(positions, token_ids, exclude_norm_above)


# ------------------------------------------------------------------ streaming statistics
def _top_order(norms: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Indices that sort tokens by norm descending, then by ``meta`` columns (batch, row,
    position, token id) ascending; full ties keep their index order (stable sorts)."""
    order = torch.arange(norms.shape[0], device=norms.device)
    for col in reversed(range(meta.shape[1])):
        order = order[torch.sort(meta[order, col], stable=True).indices]
    return order[torch.sort(norms[order], descending=True, stable=True).indices]


def _bin_of(norms: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each norm: 0 underflow, 1.._N_BINS log bins, _N_BINS + 1 overflow."""
    logn = torch.log10(norms.clamp_min(1e-300))
    b = torch.floor((logn - NORM_LOG10_MIN) * NORM_BINS_PER_DECADE).long() + 1
    return b.clamp(0, _N_BINS + 1)


def histogram_quantile(counts: np.ndarray, q: float) -> float:
    """Quantile ``q`` of the norms from the log-spaced histogram (geometric interpolation).

    Relative error below ``10**(1/40) − 1`` ≈ 6 % inside [1e-8, 1e12).
    """
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum()
    if n == 0:
        return math.nan
    target = q * n
    cum = np.cumsum(counts)
    b = int(np.searchsorted(cum, target, side="left"))
    b = min(b, counts.size - 1)
    if b == 0:
        return 10.0 ** NORM_LOG10_MIN
    if b == counts.size - 1:
        return 10.0 ** NORM_LOG10_MAX
    before = cum[b - 1] if b > 0 else 0.0
    frac = (target - before) / counts[b] if counts[b] else 0.5
    lo = NORM_LOG10_MIN + (b - 1) / NORM_BINS_PER_DECADE
    return float(10.0 ** (lo + min(max(frac, 0.0), 1.0) / NORM_BINS_PER_DECADE))


class TokenNormStats:
    """Streaming per-token statistics of one point (bounded memory, mergeable).

    Parameters
    ----------
    name : str
        The point, e.g. ``"layers.11.ffn.post"`` (for messages).
    max_outlier_tokens : int, default 256
        ``m``: how many tokens of largest norm are kept, with their activation vectors
        (``m × D`` floats in the activations' dtype, at least float32).
    norm_above : float, optional
        The norm exclusion rule of :class:`ExclusionRule` (calibrated on the first batch).

    Attributes
    ----------
    n_samples_seen_ : int
        Tokens that passed (entered the spectrum).
    n_excluded_norm_ : int
        Tokens left out by the norm rule.
    norm_threshold_ : float or None
        ``norm_above × median`` of the calibration batch, once set.
    histogram_ : LongTensor of shape (_N_BINS + 2,)
    max_norm_ : float
    top_norms_ : Tensor of shape (k,), float64, descending (k <= m)
    top_vectors_ : Tensor of shape (k, D)
    top_meta_ : LongTensor of shape (k, 4): batch, row, position, token_id (-1 if unknown)

    Notes
    -----
    The top tokens are the first ``m`` in the order *norm descending, then batch, row,
    position, token id ascending*: tokens of equal norm (e.g. the same first token of every
    sequence in a model without context there) are kept from the earliest batch and row.
    With that total order the top ``m`` of a stream does not depend on how the stream is
    split or in which order the parts are merged: observing every batch in one process and
    merging per-process records (:meth:`merge`, in any order) keep the same tokens, and the
    histogram (integer counts), count and maximum merge exactly. Rows whose ``meta`` is
    entirely equal (unknown ``-1``) and of equal norm keep the order they were observed in.
    """

    def __init__(self, name: str = "activations", *, max_outlier_tokens: int =
                 DEFAULT_MAX_OUTLIER_TOKENS, norm_above: float | None = None):
        self.name = name
        self.max_outlier_tokens = int(max_outlier_tokens)
        self.norm_above = norm_above
        self.n_samples_seen_ = 0
        self.n_excluded_norm_ = 0
        self.norm_threshold_: float | None = None
        self.kept_: torch.Tensor | None = None
        self.histogram_: torch.Tensor | None = None
        self.max_norm_ = 0.0
        self.top_norms_: torch.Tensor | None = None
        self.top_vectors_: torch.Tensor | None = None
        self.top_meta_: torch.Tensor | None = None

    def observe(self, rows: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        """Record a batch of rows; return the rows the norm rule keeps.

        Parameters
        ----------
        rows : Tensor of shape (N, D)
            Activations of real tokens (padding and position/id exclusions already removed).
        meta : LongTensor of shape (N, 4) or (1, 4), optional
            Batch, row, position, token id of each row (``-1`` where unknown); one row
            applies to every row (e.g. ``[[batch, -1, -1, -1]]`` for inputs without tokens).

        Returns
        -------
        Tensor of shape (N', D), N' <= N
            ``rows`` without the norm-excluded tokens.
        """
        n = int(rows.shape[0])
        self.kept_ = None
        if n == 0:
            return rows
        # norms in the rows' precision (float32 is 10× faster than float64 on CPU and exact
        # to 1e-7 relative, plenty for ranking); the shares use the kept vectors in float64
        norms = torch.linalg.vector_norm(
            rows, dim=1, dtype=None if rows.dtype == torch.float64 else torch.float32
        ).to(torch.float64)
        if meta is None:
            meta = torch.full((n, len(TOKEN_META)), -1, dtype=torch.long, device=rows.device)
        else:
            meta = meta.to(rows.device)
            if meta.shape[0] == 1 and n > 1:
                meta = meta.expand(n, -1)
        if self.norm_above is not None:
            if self.norm_threshold_ is None:
                self.norm_threshold_ = float(self.norm_above * norms.quantile(0.5))
            # non-finite rows stay, so the accumulator reports them (NaN/inf error)
            keep = (norms <= self.norm_threshold_) | ~torch.isfinite(norms)
            if not bool(keep.all()):
                self.kept_ = keep  # which rows of the last call were kept (None: all)
                self.n_excluded_norm_ += int((~keep).sum())
                rows, norms, meta = rows[keep], norms[keep], meta[keep]
                n = int(rows.shape[0])
                if n == 0:
                    return rows
        self.n_samples_seen_ += n
        counts = torch.bincount(_bin_of(norms), minlength=_N_BINS + 2)
        self.histogram_ = counts if self.histogram_ is None else self.histogram_ + counts
        self.max_norm_ = max(self.max_norm_, float(norms.max()))
        k = min(self.max_outlier_tokens, n)
        cut = norms.topk(k).values[-1]
        if self.top_norms_ is not None and self.top_norms_.shape[0] == self.max_outlier_tokens:
            # only tokens that may enter the top m are copied (ties go to _merge_top's order)
            cut = torch.maximum(cut, self.top_norms_[-1].to(cut.device))
        # every row of norm >= the k-th largest: ties at the cut are all candidates
        ix = (norms >= cut).nonzero().squeeze(1)
        if ix.numel() == 0:
            return rows
        self._merge_top(norms[ix], rows, ix, meta)
        return rows

    def _merge_top(self, norms: torch.Tensor, rows: torch.Tensor, ix: torch.Tensor,
                   meta: torch.Tensor) -> None:
        """Keep the top m of the current top tokens and candidates ``rows[ix]`` (norms
        ``norms``); only the candidate rows that make it are copied."""
        n_old = 0 if self.top_norms_ is None else int(self.top_norms_.shape[0])
        cand_meta = meta.index_select(0, ix.to(meta.device))
        if n_old:
            norms = torch.cat([self.top_norms_, norms.to(self.top_norms_.device)])
            cand_meta = torch.cat([self.top_meta_, cand_meta.to(self.top_meta_.device)])
        k = min(self.max_outlier_tokens, int(norms.shape[0]))
        order = _top_order(norms, cand_meta.to(norms.device))[:k]
        vals = norms[order]
        old = order < n_old
        new = order[~old] - n_old
        take = ix.to(rows.device)[new.to(rows.device)]
        dtype = rows.dtype if rows.dtype == torch.float64 else torch.float32
        vectors = torch.empty(k, rows.shape[1], dtype=dtype, device=vals.device)
        meta_k = torch.empty(k, len(TOKEN_META), dtype=torch.long, device=vals.device)
        new_pos = (~old).nonzero().squeeze(1)
        vectors[new_pos] = rows.index_select(0, take).to(vals.device, dtype)
        meta_k[new_pos] = meta.index_select(0, take).to(vals.device)
        if n_old:
            old_pos = old.nonzero().squeeze(1)
            vectors[old_pos] = self.top_vectors_.index_select(0, order[old]).to(dtype)
            meta_k[old_pos] = self.top_meta_.index_select(0, order[old])
        self.top_norms_, self.top_vectors_, self.top_meta_ = vals, vectors, meta_k

    def merge(self, other: TokenNormStats) -> TokenNormStats:
        """Fold another record of the same point in (other processes, data shards).

        Exact and order-free: the count, the excluded count and the histogram are integer
        sums, the maximum a maximum, and the top tokens the first ``m`` of both in the
        total order of the class notes, so merging records of disjoint batches, in any order
        or grouping, gives the record of observing all of them in one stream.
        """
        if not isinstance(other, TokenNormStats):
            raise TypeError(f"merge() takes a TokenNormStats; got {type(other).__name__}.")
        self.n_excluded_norm_ += other.n_excluded_norm_
        if self.norm_threshold_ is None:
            self.norm_threshold_ = other.norm_threshold_
        if other.n_samples_seen_ == 0:
            return self
        self.n_samples_seen_ += other.n_samples_seen_
        h = other.histogram_.to(self.histogram_.device) if self.histogram_ is not None else None
        self.histogram_ = other.histogram_.clone() if h is None else self.histogram_ + h
        self.max_norm_ = max(self.max_norm_, other.max_norm_)
        self._merge_top(other.top_norms_, other.top_vectors_,
                        torch.arange(other.top_norms_.shape[0]), other.top_meta_)
        return self

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that describe the state (for capture checkpoints)."""
        nt = -1.0 if self.norm_threshold_ is None else self.norm_threshold_
        out = {"counts": torch.tensor([self.n_samples_seen_, self.n_excluded_norm_]),
               "scalars": torch.tensor([self.max_norm_, nt], dtype=torch.float64)}
        if self.top_norms_ is not None:
            out.update({"histogram": self.histogram_.cpu(), "top_norms": self.top_norms_.cpu(),
                        "top_vectors": self.top_vectors_.cpu(), "top_meta": self.top_meta_.cpu()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> TokenNormStats:
        self.n_samples_seen_, self.n_excluded_norm_ = (int(v) for v in state["counts"])
        self.max_norm_, nt = (float(v) for v in state["scalars"])
        self.norm_threshold_ = None if nt < 0 else nt
        if "top_norms" in state:
            self.histogram_ = state["histogram"].clone()
            self.top_norms_ = state["top_norms"].clone()
            self.top_vectors_ = state["top_vectors"].clone()
            self.top_meta_ = state["top_meta"].clone()
        return self

    # ---------------------------------------------------------------- result
    def finish(self, mean: torch.Tensor, scatter_trace: float, *, outlier_fraction: float =
               DEFAULT_OUTLIER_FRACTION, outlier_threshold: float = DEFAULT_OUTLIER_THRESHOLD
               ) -> TokenDiagnostics:
        """Exact variance shares with the final mean, and the summary of this point.

        Parameters
        ----------
        mean : Tensor of shape (D,)
            Final mean μ of the point (``CovarianceAccumulator.mean_``).
        scatter_trace : float
            ``trace(M2) = Σ_n ‖x_n − μ‖²`` over the same tokens (squared activation units).
        """
        n = self.n_samples_seen_
        k = outlier_k(n, outlier_fraction, self.max_outlier_tokens)
        if self.top_norms_ is None or n == 0:
            raise ValueError(f"{self.name}: no tokens were observed; nothing to summarise.")
        mu = torch.as_tensor(mean).to(self.top_vectors_.device, torch.float64)
        d2 = ((self.top_vectors_.to(torch.float64) - mu) ** 2).sum(1)
        token_share = (d2 / scatter_trace).cpu().numpy() if scatter_trace > 0 else \
            np.zeros(d2.shape[0])
        k = min(k, token_share.size)
        share = float(token_share[:k].sum())
        outliers = outlier_tokens_mask(self.top_vectors_.to(torch.float64), mu, n,
                                       float(scatter_trace), k)
        hist = self.histogram_.cpu().numpy()
        return TokenDiagnostics(
            name=self.name, n_tokens=n, k=k, n_outliers=int(outliers.sum()),
            capped=math.ceil(outlier_fraction * n - 1e-9) > k,
            outlier_fraction=float(outlier_fraction), outlier_threshold=float(outlier_threshold),
            outlier_share=share, outlier_flag=share > outlier_threshold,
            max_norm=self.max_norm_, median_norm=histogram_quantile(hist, 0.5),
            p99_norm=histogram_quantile(hist, 0.99),
            norm_threshold=self.norm_threshold_, n_excluded_norm=self.n_excluded_norm_,
            top_norms=self.top_norms_.cpu().numpy().astype(np.float64),
            top_meta=self.top_meta_.cpu().numpy().astype(np.int64),
            top_share=token_share.astype(np.float64), top_outlier=outliers)


def outlier_tokens_mask(vectors: torch.Tensor, mean: torch.Tensor, n_tokens: int,
                        scatter_trace: float, k: int, *,
                        factor: float = MASSIVE_TOKEN_FACTOR,
                        max_rounds: int = 100) -> np.ndarray:
    """Which of the top tokens are outlier tokens: the top ``k`` and, iterated, every other
    whose centred squared norm exceeds ``factor`` × the mean of the tokens that remain.

    Round 1 compares ``‖x − μ‖²`` with ``factor · trace(M2) / N`` over all tokens. Outlier
    tokens inflate that mean (one attention sink 600× the median norm holds more variance
    than thousands of ordinary tokens), which hides the next tier, so the test is repeated
    with the mean ``μ'`` and ``trace(M2')`` of the tokens not yet marked (exact:
    ``trace(M2') = trace(M2) − Σ_S ‖x_s − μ‖² − N'‖μ' − μ‖²``) until nothing changes, as
    in iterated sigma clipping. Only the ``m`` kept top tokens can be marked.

    Parameters
    ----------
    vectors : Tensor of shape (m, D), float64
        The top tokens by norm, descending.
    mean : Tensor of shape (D,), float64
        Mean μ over all N tokens of the point.
    n_tokens : int
        N.
    scatter_trace : float
        ``trace(M2) = Σ_n ‖x_n − μ‖²`` over the N tokens.
    k : int
        Size of the top group, always marked.

    Returns
    -------
    ndarray of bool, shape (m,)
    """
    m = int(vectors.shape[0])
    marked = torch.arange(m, device=vectors.device) < k
    d2 = ((vectors - mean) ** 2).sum(1)
    for _ in range(max_rounds):
        n_rest = n_tokens - int(marked.sum())
        if n_rest < 2:
            break
        mu_rest = (mean * n_tokens - vectors[marked].sum(0)) / n_rest
        trace_rest = (scatter_trace - float(d2[marked].sum())
                      - n_rest * float(((mu_rest - mean) ** 2).sum()))
        if trace_rest <= 0:
            break
        d2_rest = ((vectors - mu_rest) ** 2).sum(1)
        new = marked | (d2_rest > factor * trace_rest / n_rest)
        if bool((new == marked).all()):
            break
        marked = new
    return marked.cpu().numpy()


#: The old name of :func:`outlier_tokens_mask`, kept as an alias.
massive_tokens = outlier_tokens_mask


@dataclass
class TokenDiagnostics:
    """Summary of the tokens of one point (what :class:`SpectraResult` keeps and saves).

    Norms are Euclidean norms ``‖x_n‖`` of the activation vectors (activation units).
    ``top_*`` arrays describe the ``m`` tokens of largest norm, descending; the first ``k``
    are the top group whose summed ``top_share`` is ``outlier_share``; ``n_outliers`` counts
    the *outlier tokens* (:attr:`outlier_mask`: the top ``k`` and any other over the
    ``MASSIVE_TOKEN_FACTOR`` test).
    """

    name: str
    n_tokens: int
    k: int
    n_outliers: int
    capped: bool
    outlier_fraction: float
    outlier_threshold: float
    outlier_share: float
    outlier_flag: bool
    max_norm: float
    median_norm: float
    p99_norm: float
    norm_threshold: float | None
    n_excluded_norm: int
    top_norms: np.ndarray = field(repr=False)
    top_meta: np.ndarray = field(repr=False)
    top_share: np.ndarray = field(repr=False)
    top_tokens: list[str] | None = field(default=None, repr=False)
    top_outlier: np.ndarray | None = field(default=None, repr=False)

    SCALARS = ("n_tokens", "k", "n_outliers", "capped", "outlier_fraction", "outlier_threshold",
               "outlier_share", "outlier_flag", "max_norm", "median_norm", "p99_norm",
               "norm_threshold", "n_excluded_norm")

    @property
    def max_median_ratio(self) -> float:
        return self.max_norm / self.median_norm if self.median_norm > 0 else math.inf

    def summary(self) -> dict[str, Any]:
        """The scalars, JSON-ready."""
        out = {}
        for key in self.SCALARS:
            v = getattr(self, key)
            out[key] = v.item() if isinstance(v, np.generic) else v
        return out

    @property
    def outlier_mask(self) -> np.ndarray:
        """Which top tokens are outlier tokens: the first ``k`` (the outlier share) and any
        other with ``‖x − μ‖² > MASSIVE_TOKEN_FACTOR · trace(M2) / N``; bool, shape (m,).
        For a flagged point these are what :meth:`SpectraResult.without_outliers` leaves out.
        """
        if self.top_outlier is not None:
            return np.asarray(self.top_outlier, dtype=bool)
        m = self.top_share.size  # files written before the iterated rule: its first round
        return (np.arange(m) < self.k) | (self.top_share > MASSIVE_TOKEN_FACTOR / self.n_tokens)

    @property
    def saturated(self) -> bool:
        """Every kept top token is an outlier token: there may be more than
        ``max_outlier_tokens`` of them (raise it, or exclude them by position)."""
        return self.n_outliers == self.top_share.size and self.n_outliers > self.k

    def positions(self, flagged_only: bool = True) -> np.ndarray:
        """Positions of the outlier tokens (:attr:`outlier_mask`) or of all top tokens."""
        pos = self.top_meta[:, TOKEN_META.index("position")]
        return pos[self.outlier_mask] if flagged_only else pos

    @classmethod
    def from_parts(cls, name: str, summary: dict, top_norms: np.ndarray, top_meta: np.ndarray,
                   top_share: np.ndarray, top_tokens: list[str] | None = None,
                   top_outlier: np.ndarray | None = None) -> TokenDiagnostics:
        return cls(name=name, **{k: summary[k] for k in cls.SCALARS},
                   top_norms=np.asarray(top_norms, dtype=np.float64),
                   top_meta=np.asarray(top_meta, dtype=np.int64).reshape(-1, len(TOKEN_META)),
                   top_share=np.asarray(top_share, dtype=np.float64), top_tokens=top_tokens,
                   top_outlier=None if top_outlier is None else
                   np.asarray(top_outlier, dtype=bool))


# ------------------------------------------------------------------ exact removal
def remove_rows(n: int, mean: torch.Tensor, scatter: torch.Tensor, rows: torch.Tensor
                ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Statistics of a point with some of its rows taken out (reverse Chan update, float64).

    If ``A ∪ B`` has ``(n, μ, M2)`` and ``B`` holds ``rows`` with ``(n_b, μ_b, M2_b)``, then
    ``n_a = n − n_b``, ``μ_a = (n μ − n_b μ_b) / n_a``, ``δ = μ_b − μ_a`` and
    ``M2_a = M2 − M2_b − δ δᵀ · n_a n_b / n``. Exact up to the round-off of ``M2`` relative
    to the *total* variance: removing tokens that held ``s`` of it amplifies that round-off by
    ``1 / (1 − s)``. Fine with a float64 Gram, and with a float32 one for the tokens of massive
    activations, which the accumulator multiplies in float64
    (:func:`~nerve_interp.covariance.massive_rows`: SmolLM2-135M layer 11 ``post``, where one
    token held 99.99% of the variance, went from 0.83 to 3e-7 relative error in the tail).

    Parameters
    ----------
    n : int
    mean : Tensor of shape (D,)
    scatter : Tensor of shape (D, D)
        ``M2 = Σ (x − μ)(x − μ)ᵀ`` over all ``n`` rows.
    rows : Tensor of shape (n_b, D)
        Rows that were part of the ``n`` and are to be taken out; ``n − n_b >= 2``.

    Returns
    -------
    (n_a, mean_a, scatter_a)
    """
    rows = rows.to(scatter.device, torch.float64)
    n_b = int(rows.shape[0])
    n_a = n - n_b
    if n_a < 2:
        raise ValueError(f"cannot remove {n_b} of {n} rows: a covariance needs 2 left.")
    mean = mean.to(scatter.device, torch.float64)
    mean_b = rows.mean(0)
    mean_a = (n * mean - n_b * mean_b) / n_a
    delta = mean_b - mean_a
    # M2 − M2_b − c δδᵀ as one product, M2 − uᵀu with u = [rows − μ_b; √c δ]: one pass over
    # the D × D matrix instead of five (47 against 4 ms at D = 1536, one thread)
    u = torch.cat([rows - mean_b, (delta * math.sqrt(n_a * n_b / n)).unsqueeze(0)])
    m2_a = torch.addmm(scatter.to(torch.float64), u.T, u, alpha=-1)
    fill_lower(m2_a)  # exactly symmetric, from its upper triangle
    return n_a, mean_a, m2_a


# ------------------------------------------------------------------ reporting
def decode_tokens(token_ids: Sequence[int], tokenizer: Any = None) -> list[str]:
    """Token strings for ids (``repr`` of each decoded token), or ``"id 123"`` without a
    tokenizer; ``-1`` (unknown, e.g. float inputs) gives ``"?"``."""
    out = []
    for t in token_ids:
        t = int(t)
        if t < 0:
            out.append("?")
        elif tokenizer is None:
            out.append(f"id {t}")
        else:
            try:
                out.append(repr(tokenizer.decode([t])))
            except Exception:  # a tokenizer that cannot decode this id
                out.append(f"id {t}")
    return out


def _describe(diag: TokenDiagnostics, layer: int, point: str) -> str:
    pos = diag.positions()
    vals, cnt = np.unique(pos[pos >= 0], return_counts=True)
    order = np.argsort(-cnt)[:4]
    where = ", ".join(f"{int(vals[i])} ({int(cnt[i])}×)" for i in order) or "unknown"
    mask = diag.outlier_mask
    tokens = list(np.asarray(diag.top_tokens, dtype=object)[mask]) if diag.top_tokens else \
        decode_tokens(diag.top_meta[mask, TOKEN_META.index("token_id")])
    uniq = list(dict.fromkeys(tokens))[:5]
    more = " (at least; raise max_outlier_tokens)" if diag.saturated else ""
    return (f"  layer {layer} {point}: top {diag.k} of {diag.n_tokens} tokens hold "
            f"{100 * diag.outlier_share:.1f}% of the variance (max norm "
            f"{diag.max_median_ratio:.0f}× the median); {diag.n_outliers}{more} outlier "
            f"tokens at positions {where}; tokens {', '.join(uniq)}")


def warn_outliers(diagnostics: dict[tuple[int, str], TokenDiagnostics], model: str,
                  stacklevel: int = 3) -> None:
    """One :class:`OutlierTokenWarning` per capture listing every flagged point."""
    flagged = [(key, d) for key, d in diagnostics.items() if d.outlier_flag]
    if not flagged:
        return
    any_d = flagged[0][1]
    lines = [_describe(d, layer, point) for (layer, point), d in flagged]
    pos = np.concatenate([d.positions() for _, d in flagged])
    pos = pos[pos >= 0]
    hint = ""
    if pos.size:
        vals, cnt = np.unique(pos, return_counts=True)
        common = vals[cnt >= 0.5 * cnt.max()][:3]
        hint = (f" To measure without them, rerun with exclude_positions=("
                f"{', '.join(str(int(p)) for p in common)},) (CLI: --exclude-positions "
                f"{','.join(str(int(p)) for p in common)}) or exclude_norm_above=...;"
                " SpectraResult.without_outliers() has the spectra with these tokens left out.")
    warnings.warn(
        f"{model}: at {len(flagged)} point(s) a few tokens dominate the spectrum (the top "
        f"{100 * any_d.outlier_fraction:g}% of tokens by norm hold more than "
        f"{100 * any_d.outlier_threshold:g}% of the variance; outlier tokens):\n"
        + "\n".join(lines) + "\n" + hint.strip(),
        OutlierTokenWarning, stacklevel=stacklevel)


__all__ = [
    "DEFAULT_MAX_OUTLIER_TOKENS", "DEFAULT_OUTLIER_FRACTION", "DEFAULT_OUTLIER_THRESHOLD",
    "MASSIVE_TOKEN_FACTOR", "TOKEN_META", "ExclusionRule", "TokenDiagnostics", "TokenNormStats",
    "check_outlier_parameters", "decode_tokens", "exclusion_rule", "histogram_quantile",
    "outlier_k", "remove_rows", "warn_outliers",
]
