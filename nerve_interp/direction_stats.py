"""Streaming statistics of projections onto a few directions (pure torch / numpy).

What :func:`nerve_interp.directions.explain_directions` keeps of the tokens it reads, in
memory that does not grow with the text:

* :class:`ExtremeHeap`: per direction, the ``k`` tokens of largest (or smallest) projection
  with their context window (token ids and the projections of the window's tokens) and their
  document, position and token id: fixed-size tensors ``[d, k, ...]``, merged batch by batch
  with one ``topk`` over ``2k`` candidates;
* :class:`TokenProjectionStats`: per token id of the vocabulary, the count and the sums of the
  projections and of their squares (``[V, d]``: the mean projection per token type and the
  variance each type holds);
* :func:`frequency_buckets`: the share of each direction's second moment held by frequent /
  middle / rare token types, the buckets cut at thirds of the token occurrences.

A projection is ``s = uᵀ(x − μ)`` with ``u`` a unit direction and ``μ`` the point's mean.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

#: Meta columns of a heap entry.
HEAP_META: tuple[str, ...] = ("document", "position", "token_id")
#: Frequency buckets, in order (see :func:`frequency_buckets`).
BUCKETS: tuple[str, ...] = ("frequent", "middle", "rare")

Context = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""``rows [m] -> (window ids [m, W], window projections [m, W, d], meta [m, 3])``."""


class ExtremeHeap:
    """The ``k`` largest (``largest=True``) or smallest scores per column, with context.

    Parameters
    ----------
    k : int >= 1
        Entries kept per direction.
    d : int >= 1
        Directions (columns of the scores).
    window : int >= 1
        Tokens in a context window (``W``).
    largest : bool, default True
        Keep the largest scores (else the smallest).

    Attributes
    ----------
    values : float64 tensor of shape (d, k)
        The kept scores, best first; ``±inf`` where fewer than ``k`` tokens were seen.
    ids : int64 tensor of shape (d, k, W)
        The context window's token ids, -1 outside the sequence.
    proj : float64 tensor of shape (d, k, W)
        The projection of each window token onto the same direction (0 outside).
    meta : int64 tensor of shape (d, k, 3)
        Document, position (among the real tokens) and token id (:data:`HEAP_META`).

    Examples
    --------
    >>> h = ExtremeHeap(2, 1, 1)
    >>> ctx = lambda r: (r[:, None], torch.zeros(len(r), 1, 1), torch.stack([r, r, r], 1))
    >>> h.update(torch.tensor([[1.0], [5.0], [3.0]], dtype=torch.float64), ctx)
    >>> h.update(torch.tensor([[4.0]], dtype=torch.float64), ctx)
    >>> h.values.tolist(), h.meta[0, :, 0].tolist()
    ([[5.0, 4.0]], [1, 0])
    """

    def __init__(self, k: int, d: int, window: int, *, largest: bool = True) -> None:
        self.k, self.d, self.window, self.largest = k, d, window, largest
        fill = -np.inf if largest else np.inf
        self.values = torch.full((d, k), fill, dtype=torch.float64)
        self.ids = torch.full((d, k, window), -1, dtype=torch.int64)
        self.proj = torch.zeros((d, k, window), dtype=torch.float64)
        self.meta = torch.full((d, k, len(HEAP_META)), -1, dtype=torch.int64)

    def update(self, scores: torch.Tensor, context: Context) -> None:
        """Fold in the scores ``[n, d]`` of ``n`` tokens; ``context(rows)`` gives the windows
        of the candidate rows only (at most ``k·d`` of them)."""
        n = scores.shape[0]
        if n == 0:
            return
        s = scores.detach().to("cpu", torch.float64)
        vals, rows = torch.topk(s, min(self.k, n), dim=0, largest=self.largest)  # [kk, d]
        uniq, inv = torch.unique(rows, return_inverse=True)
        ids, proj, meta = (t.to("cpu") for t in context(uniq))
        cols = torch.arange(self.d)[None, :]
        new_proj = proj.to(torch.float64).permute(0, 2, 1)[inv, cols]  # [kk, d, W]
        self._merge(vals.T, ids[inv].permute(1, 0, 2), new_proj.permute(1, 0, 2),
                    meta[inv].permute(1, 0, 2))

    def merge(self, other: ExtremeHeap) -> ExtremeHeap:
        """Fold in another heap of the same shape (another process's tokens); returns self."""
        self._merge(other.values, other.ids, other.proj, other.meta)
        return self

    def _merge(self, vals: torch.Tensor, ids: torch.Tensor, proj: torch.Tensor,
               meta: torch.Tensor) -> None:
        """Keep the best ``k`` of the current entries and ``vals`` ``[d, m]`` (+ context)."""
        all_vals = torch.cat([self.values, vals], 1)
        best = torch.topk(all_vals, self.k, dim=1, largest=self.largest).indices  # [d, k]
        self.values = torch.gather(all_vals, 1, best)
        idx3 = best[:, :, None]
        self.ids = torch.gather(torch.cat([self.ids, ids], 1), 1,
                                idx3.expand(-1, -1, self.window))
        self.proj = torch.gather(torch.cat([self.proj, proj], 1), 1,
                                 idx3.expand(-1, -1, self.window))
        self.meta = torch.gather(torch.cat([self.meta, meta], 1), 1,
                                 idx3.expand(-1, -1, len(HEAP_META)))

    @property
    def n_kept(self) -> np.ndarray:
        """Entries filled per direction, shape (d,)."""
        return torch.isfinite(self.values).sum(1).numpy()

    def nbytes(self) -> int:
        """Bytes held (constant: the heap never grows)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.values, self.ids, self.proj, self.meta))


class TokenProjectionStats:
    """Per token type: count, Σ s and Σ s² of the projections onto ``d`` directions.

    Parameters
    ----------
    vocab_size : int
        Rows (token ids ``0 .. vocab_size - 1``).
    d : int
        Directions.

    Attributes
    ----------
    counts : int64 tensor of shape (vocab_size,)
    sums, sumsq : float64 tensors of shape (vocab_size, d)
    """

    def __init__(self, vocab_size: int, d: int) -> None:
        self.counts = torch.zeros(vocab_size, dtype=torch.int64)
        self.sums = torch.zeros(vocab_size, d, dtype=torch.float64)
        self.sumsq = torch.zeros(vocab_size, d, dtype=torch.float64)

    def update(self, token_ids: torch.Tensor, scores: torch.Tensor) -> None:
        """Fold in ``n`` tokens: ids ``[n]`` and their scores ``[n, d]``."""
        ids = token_ids.detach().to("cpu", torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.counts.numel()):
            raise ValueError(
                f"token id {int(ids.max())} outside the vocabulary [0, {self.counts.numel()}); "
                "pass the tokenizer that belongs to the model.")
        s = scores.detach().to("cpu", torch.float64)
        self.counts.index_add_(0, ids, torch.ones_like(ids))
        self.sums.index_add_(0, ids, s)
        self.sumsq.index_add_(0, ids, s * s)

    def merge(self, other: TokenProjectionStats) -> TokenProjectionStats:
        self.counts += other.counts
        self.sums += other.sums
        self.sumsq += other.sumsq
        return self

    def means(self, min_count: int = 1) -> np.ndarray:
        """Mean projection per token type, shape (V, d); NaN where ``count < min_count``."""
        c = self.counts.numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            m = self.sums.numpy() / c[:, None]
        m[c < max(1, min_count)] = np.nan
        return m


def frequency_buckets(counts: np.ndarray, sumsq: np.ndarray) -> dict[str, np.ndarray]:
    """Share of each direction's second moment held by frequent / middle / rare token types.

    Token types are sorted by count (descending, ties by id) and cut where their cumulative
    occurrences pass 1/3 and 2/3 of all tokens: a type goes to the bucket in which its first
    occurrence-mass falls, so each bucket holds about a third of the tokens (less evenly when
    one type alone is more than a third). Under a null where every token carries the same
    expected ``s²``, each bucket's ``variance_share`` equals its ``token_share``.

    Parameters
    ----------
    counts : array of shape (V,)
        Occurrences per token type.
    sumsq : array of shape (V, d)
        Σ s² per token type and direction.

    Returns
    -------
    dict
        ``bucket`` (names, :data:`BUCKETS`), ``n_types`` (3,), ``n_tokens`` (3,),
        ``token_share`` (3,), ``variance_share`` (3, d) (columns sum to 1; NaN where a
        direction saw no variance).

    Examples
    --------
    >>> out = frequency_buckets(np.array([2, 2, 1, 1, 0]),
    ...                         np.array([[4.0], [2.0], [1.0], [1.0], [0.0]]))
    >>> out["n_tokens"].tolist(), out["variance_share"][:, 0].tolist()
    ([2, 2, 2], [0.5, 0.25, 0.25])
    """
    counts = np.asarray(counts, dtype=np.int64)
    sumsq = np.asarray(sumsq, dtype=np.float64)
    order = np.lexsort((np.arange(counts.size), -counts))
    order = order[counts[order] > 0]
    total = counts.sum()
    before = np.cumsum(counts[order]) - counts[order]  # occurrences of more frequent types
    which = np.minimum((3 * before) // max(total, 1), 2)
    n_types = np.array([(which == b).sum() for b in range(3)])
    n_tokens = np.array([counts[order][which == b].sum() for b in range(3)])
    var = np.stack([sumsq[order][which == b].sum(0) for b in range(3)])
    with np.errstate(invalid="ignore", divide="ignore"):
        share = var / var.sum(0, keepdims=True)
    return {"bucket": np.array(BUCKETS), "n_types": n_types, "n_tokens": n_tokens,
            "token_share": n_tokens / max(total, 1), "variance_share": share}


__all__ = ["BUCKETS", "HEAP_META", "ExtremeHeap", "TokenProjectionStats", "frequency_buckets"]
