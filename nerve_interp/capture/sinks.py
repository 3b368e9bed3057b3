"""Per-point sinks: what a capture keeps of each FFN point's activations.

A :class:`PointSink` owns the statistics of one point: its
:class:`~nerve_interp.covariance.CovarianceAccumulator` and, when token diagnostics or
``exclude_norm_above`` are on, its :class:`~nerve_interp.diagnostics.TokenNormStats` (which
sees the rows first and may drop some). :class:`Sinks` holds them in forward order.

A new per-point statistic (per-group accumulators, direction heaps, ...) is a class with
``update`` (or ``observe``), ``merge``, ``state_dict`` / ``load_state_dict``, a field of
:class:`PointSink` fed in :meth:`PointSink.update`, and one line in each of the two places
that see every statistic: the checkpoint (``Checkpointer._save`` / ``resume``, under its own
key prefix) and the cross-process reduction (``Shard.reduce``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..covariance import CovarianceAccumulator
from ..diagnostics import TokenNormStats
from ..groups import GroupStats
from ..moments import NormMoments
from ..sites import FFNSite
from .options import CaptureOptions

Key = tuple[int, str]
"""``(layer, point)``."""


@dataclasses.dataclass
class PointSink:
    """The statistics of one point (``key``) read at nnsight ``path``."""

    key: Key
    path: str
    acc: CovarianceAccumulator
    tokens: TokenNormStats | None = None
    moments: NormMoments | None = None
    groups: GroupStats | None = None
    joint: CovarianceAccumulator | None = None  # gated ``up`` with joint=True: pre ‖ up

    @property
    def name(self) -> str:
        return self.acc.name

    def update(self, rows: torch.Tensor, meta: torch.Tensor | None,
               labels: torch.Tensor | None = None) -> None:
        """Fold the kept rows ``[n, D]`` of one batch in (``meta``: their TOKEN_META;
        ``labels``: their groups, when the point keeps groups).

        With groups, only the group accumulators stream; ``acc`` and ``moments`` are their
        merge, formed once at the end (:meth:`merge_groups`)."""
        if self.tokens is not None:
            rows = self.tokens.observe(rows, meta)
            if labels is not None and self.tokens.kept_ is not None:
                labels = labels[self.tokens.kept_.cpu()]
        if self.groups is not None:
            self.groups.update(rows, labels)
            return
        self.acc.update(rows, moments=self.moments)  # one pass over the rows for both

    def merge_groups(self) -> None:
        """Form ``acc`` and ``moments`` as the exact merge of the groups."""
        if self.groups is not None and self.acc.n_samples_seen_ == 0:
            self.acc, self.moments = self.groups.merged()


class Sinks:
    """The sinks of every captured point, in forward order (layer, then ``POINTS``)."""

    def __init__(self, sites: Sequence[FFNSite], opts: CaptureOptions, *,
                 moments: bool = True) -> None:
        with_tokens = opts.outliers.enabled or opts.rule.norm_above is not None
        self.points = []
        for s in sites:
            for p in opts.points:
                acc = CovarianceAccumulator(s.name(p), precision=opts.precision)
                tokens = (TokenNormStats(acc.name, max_outlier_tokens=opts.outliers.max_tokens,
                                         norm_above=opts.rule.norm_above)
                          if with_tokens else None)
                groups = (GroupStats(acc.name, opts.n_groups, opts.precision, moments=moments)
                          if opts.n_groups is not None else None)
                joint = (CovarianceAccumulator(f"{s.name('pre')} ‖ up", precision=opts.precision)
                         if opts.joint and s.kind == "gated" and p == "up" else None)
                self.points.append(PointSink(
                    (s.layer, p), s.paths[p], acc, tokens,
                    NormMoments(acc.name) if moments and groups is None else None, groups,
                    joint))

    def __iter__(self) -> Iterator[PointSink]:
        return iter(self.points)

    @property
    def accs(self) -> dict[Key, CovarianceAccumulator]:
        return {p.key: p.acc for p in self.points}

    @property
    def token_stats(self) -> dict[Key, TokenNormStats]:
        """The token statistics (empty when they are off)."""
        return {p.key: p.tokens for p in self.points if p.tokens is not None}

    @property
    def moments(self) -> dict[Key, NormMoments]:
        """The fourth-moment statistics (empty when they are off)."""
        return {p.key: p.moments for p in self.points if p.moments is not None}

    def group_states(self) -> dict[str, dict[Key, Any]]:
        """Checkpoint prefix → {key: state object} of every group's statistics."""
        out: dict[str, dict[Key, Any]] = {}
        for p in self.points:
            if p.joint is not None:
                out.setdefault("joint.", {})[p.key] = p.joint
            if p.groups is None:
                continue
            for g, (mom, acc) in enumerate(p.groups.pairs()):
                out.setdefault(f"group{g}.", {})[p.key] = acc
                if mom is not None:
                    out.setdefault(f"group{g}.moments.", {})[p.key] = mom
        return out

    def reduction(self) -> tuple[list[tuple[NormMoments, CovarianceAccumulator]],
                                 list[CovarianceAccumulator]]:
        """What a cross-process reduction merges: the (moments, accumulator) pairs and the
        accumulators, of the groups where there are groups."""
        pairs, accs = [], []
        for p in self.points:
            accs += [p.joint] if p.joint is not None else []
            if p.groups is not None:
                pairs += [(m, a) for m, a in p.groups.pairs() if m is not None]
                accs += p.groups.accs
            else:
                pairs += [(p.moments, p.acc)] if p.moments is not None else []
                accs.append(p.acc)
        return pairs, accs

    def drop_moments(self) -> None:
        """Stop streaming the fourth moments (a resume whose checkpoint lacks them)."""
        for p in self.points:
            p.moments = None
            if p.groups is not None:
                p.groups.moments = None

    def missing_moments(self) -> bool:
        """Whether a resumed state has covariances but no fourth moments."""
        return any(p.moments.n_samples_seen_ != p.acc.n_samples_seen_
                   for p in self.points if p.moments is not None)

    def missing_token_stats(self) -> bool:
        """Whether a resumed state has covariances but no token statistics (a checkpoint
        written with ``diagnostics=False``)."""
        return any(p.tokens.n_samples_seen_ == 0 and p.acc.n_samples_seen_
                   for p in self.points if p.tokens is not None)


__all__ = ["Key", "PointSink", "Sinks"]
