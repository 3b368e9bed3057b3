"""This process's share of a capture under ``torchrun`` (or all of it), and the exact
reductions at the end. The collectives themselves live in :mod:`nerve_interp.distributed`.

Batch ``i`` belongs to rank ``i % world_size``; ``max_tokens`` stays the global budget, split
by :func:`nerve_interp.distributed.rank_budget`. ``exclude_norm_above`` needs the thresholds
of one process: :class:`NormCalibration` hands them from the rank that traces the
calibration batch to the others in one all-reduce.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from .. import distributed as dist
from .._warnings import user_stacklevel
from ..checkpoint import shard_path
from .selection import TokenSelector
from .sinks import Sinks


class Shard:
    """``rank`` of ``world_size`` processes; ``budget`` is this rank's token budget."""

    def __init__(self, distributed: bool | None, max_tokens: int | None) -> None:
        self.rank, self.world_size = dist.world(distributed)
        self.max_tokens = max_tokens
        self.budget = dist.rank_budget(max_tokens, self.rank, self.world_size)

    @property
    def is_main(self) -> bool:
        """Rank 0 (the one that warns and shows progress)."""
        return self.rank == 0

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.world_size == self.rank

    def owner_budget(self, batch_index: int) -> int | None:
        """The token budget of the rank that runs batch ``batch_index``."""
        return dist.rank_budget(self.max_tokens, batch_index % self.world_size, self.world_size)

    def checkpoint_path(self, path: Path | None) -> Path | None:
        """This rank's checkpoint file (``<stem>.rank<r>-of-<w><suffix>`` under torchrun)."""
        return None if path is None else shard_path(path, self.rank, self.world_size)

    def reduce(self, sinks: Sinks, run: Any, *, norm_rule: bool) -> None:
        """Merge every rank's statistics and counts into ``run`` (a RunState), exactly; a
        single process is left as it is."""
        if self.world_size == 1:
            return
        pairs, accs = sinks.reduction()  # the groups' statistics, where there are groups
        if pairs:  # before the accumulators: each rank re-centres with its own M2
            if dist.all_reduce_count(int(sinks.missing_moments())):
                sinks.drop_moments()  # some rank resumed without them
                pairs, accs = sinks.reduction()
            else:
                dist.all_reduce_moments(pairs)
        dist.all_reduce_accumulators(accs)
        if sinks.token_stats:
            # every rank must agree: one that resumed from a checkpoint without token
            # statistics has switched them off
            agreed = dist.all_reduce_count(int(not run.diagnostics)) == 0
            if run.diagnostics and not agreed and self.is_main:
                warnings.warn("another rank resumed from a checkpoint without token statistics "
                              "(written with diagnostics=False); resuming without token "
                              "diagnostics on every rank.", stacklevel=user_stacklevel())
            run.diagnostics = agreed
            if run.diagnostics or norm_rule:  # the norm rule's counts too
                dist.all_gather_token_stats([s.tokens for s in sinks])
        run.n_tokens = dist.all_reduce_count(run.n_tokens)
        run.n_batches, run.data_sha1 = dist.furthest_position(run.n_batches,
                                                              run.data.hexdigest())
        run.tally = run.tally.summed(dist.all_reduce_count)


class NormCalibration:
    """``exclude_norm_above`` under torchrun: the thresholds of the calibration batch (the
    first with kept tokens), found by the rank that traces it and shared once.

    The others wait for it before their first trace; a rank that traces nothing joins after
    its loop (:meth:`finish`). No batch runs twice, and every rank agrees on which batch
    calibrates because each decides from the batch alone.
    """

    def __init__(self, shard: Shard, selector: TokenSelector, sinks: Sinks) -> None:
        self.shard, self.selector, self.sinks = shard, selector, sinks
        self.pending = shard.world_size > 1 and selector.rule.norm_above is not None
        self.batch: int | None = None  # the calibration batch's index, once seen

    def see(self, batch: Any) -> None:
        if self.pending and self.batch is None and self.selector.calibrates(
                batch, self.shard.owner_budget(batch.index)):
            self.batch = batch.index

    def before_trace(self, batch_index: int) -> None:
        """Wait for the owner's thresholds (unless this is the calibration batch)."""
        if self.pending and batch_index != self.batch:
            self._share()

    def after_trace(self) -> None:
        """This rank ran the calibration batch: hand its thresholds on."""
        if self.pending:
            self._share()

    finish = after_trace  # this rank traced nothing (no batch, or all in its checkpoint)

    def _share(self) -> None:
        dist.all_reduce_norm_thresholds(list(self.sinks.token_stats.values()))
        self.pending = False


__all__ = ["NormCalibration", "Shard"]
