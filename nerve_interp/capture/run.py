"""The capture loop: every batch once, in order, into the sinks.

Read :func:`run` first: resume from a checkpoint, skip the batches it already counted, stop
at the token budget, leave other ranks' batches to them, select the tokens that count, trace,
tick the checkpoint, and reduce across processes at the end. Everything it calls is a small
object of its own (:mod:`.source`, :mod:`.selection`, :mod:`.backends`, :mod:`.sinks`,
:mod:`.shard`, :class:`Checkpointer`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt_io
from .._progress import tqdm
from .._warnings import user_stacklevel
from ..errors import NerveInterpError
from .options import CaptureOptions
from .selection import Tally, TokenSelector
from .shard import NormCalibration, Shard
from .sinks import Sinks
from .source import Batch, DataHash, InputLimits


@dataclasses.dataclass
class RunState:
    """Where a capture stands: tokens counted, batches consumed (the data position), batches
    this process traced, the token tally, the data's hash so far, and whether token
    diagnostics are still on (a resume without them switches them off)."""

    diagnostics: bool
    n_tokens: int = 0
    n_batches: int = 0
    n_local: int = 0
    n_seen: int = 0
    tally: Tally = dataclasses.field(default_factory=Tally)
    data: DataHash = dataclasses.field(default_factory=DataHash)
    data_sha1: str = ""

    def position(self, n_batches: int) -> dict[str, Any]:
        """The checkpoint's data position after ``n_batches`` batches."""
        return {"batches": n_batches, "tokens": self.n_tokens,
                "data_sha1": self.data.hexdigest(), "excluded": self.tally.to_dict()}


@dataclasses.dataclass
class Pipeline:
    """The parts of one capture pass (built by ``collect_spectra``)."""

    wrapper: Any
    model: str
    opts: CaptureOptions
    sinks: Sinks
    selector: TokenSelector
    backend: Any
    shard: Shard
    checkpointer: Checkpointer
    device: torch.device
    limits: InputLimits = InputLimits()


def run(p: Pipeline, data: Iterable[Batch]) -> RunState:
    """Run every batch of ``data`` through ``p``; returns the reduced state."""
    state = p.checkpointer.resume(p.sinks, RunState(diagnostics=p.opts.outliers.enabled))
    calibration = NormCalibration(p.shard, p.selector, p.sinks)
    with _progress(p, state) as bar:
        for batch in data:
            state.n_seen = batch.index + 1
            calibration.see(batch)
            if p.checkpointer.replayed(batch, state):
                continue
            if p.shard.budget is not None and state.n_tokens >= p.shard.budget:
                break
            state.n_batches = batch.index + 1
            state.data.update(batch)
            n_keep = _step(p, batch, state, calibration) if p.shard.owns(batch.index) else None
            if n_keep is not None:
                bar.update(n_keep)
                p.checkpointer.tick(p.sinks, state, batch.index + 1)
    calibration.finish()
    p.checkpointer.finish(p.sinks, state)
    state.data_sha1 = state.data.hexdigest()
    p.shard.reduce(p.sinks, state, norm_rule=p.opts.rule.norm_above is not None)
    return state


def _step(p: Pipeline, batch: Batch, state: RunState, calibration: NormCalibration
          ) -> int | None:
    """Select the tokens of one batch of this process and trace it; returns the tokens it
    added, or None when no token of it counts (it is tallied, not traced)."""
    budget = p.shard.budget
    sel = p.selector.select(batch, None if budget is None else budget - state.n_tokens,
                            state.tally)
    if sel is None:
        return None
    p.limits.check(batch.inputs, f"while capturing {p.model} ({batch.describe()})")
    inputs = {k: to_device(v, p.device) for k, v in batch.inputs.items()}
    calibration.before_trace(batch.index)
    try:
        n_keep = p.backend.trace(p.wrapper, inputs, p.sinks, sel)
    except NerveInterpError as err:
        raise type(err)(f"while capturing {p.model} ({batch.describe()}):\n  {err}") from None
    calibration.after_trace()
    state.n_tokens += n_keep
    state.n_local += 1
    return n_keep


def _progress(p: Pipeline, state: RunState) -> Any:
    return tqdm(total=p.shard.budget, initial=state.n_tokens, unit="tok",
                disable=not p.opts.progress or not p.shard.is_main,
                desc=f"spectra {p.model}", dynamic_ncols=True)


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    return value


class Checkpointer:
    """Resume from, check against and write a capture checkpoint
    (:mod:`nerve_interp.checkpoint`); does nothing without a path."""

    def __init__(self, path: Path | None, every: int, manifest: dict, *,
                 seconds: float | None = None, announce: bool = False) -> None:
        self.path, self.every, self.manifest = path, every, manifest
        self.seconds, self.announce = seconds, announce
        self.position: dict | None = None  # the checkpoint's, when resuming
        self.done = 0  # batches it counted
        self.last = time.monotonic()  # of the last write (or the start)

    def resume(self, sinks: Sinks, state: RunState) -> RunState:
        if self.path is None or not self.path.exists():
            return state
        self.position = ckpt_io.load_checkpoint(self.path, sinks.accs, self.manifest,
                                                token_stats=sinks.token_stats,
                                                moments=sinks.moments,
                                                extra=sinks.group_states())
        self.done = state.n_batches = int(self.position["batches"])
        state.n_tokens = int(self.position["tokens"])
        state.tally = Tally.from_dict(self.position.get("excluded"))
        if self.announce:
            tqdm.write(f"resuming from batch {self.done} ({state.n_tokens} tokens) of the "
                       f"checkpoint {self.path}", file=sys.stderr)
        if sinks.missing_token_stats():
            warnings.warn(f"{self.path} has no token statistics (written with "
                          "diagnostics=False); resuming without token diagnostics (outlier "
                          "shares would miss the counted batches).", stacklevel=user_stacklevel())
            state.diagnostics = False
        if sinks.missing_moments():
            warnings.warn(f"{self.path} has no fourth moments (written by an older "
                          "nerve_interp); resuming without participation_ratio_corrected.",
                          stacklevel=user_stacklevel())
            sinks.drop_moments()
        return state

    def replayed(self, batch: Batch, state: RunState) -> bool:
        """Whether the checkpoint counted ``batch`` already: then it is only hashed, and
        the hash of all of them checked against the checkpoint's at the last one."""
        if batch.index >= self.done:
            return False
        state.data.update(batch)
        if batch.index == self.done - 1:
            ckpt_io.check_data_prefix(self.path, self.position, state.data.hexdigest(),
                                      batch.index + 1)
        return True

    def tick(self, sinks: Sinks, state: RunState, n_batches: int) -> None:
        """Write every ``every`` traced batches of this process, and when ``seconds`` have
        passed since the last write."""
        if self.path is not None and (state.n_local % self.every == 0 or (
                self.seconds is not None and time.monotonic() - self.last >= self.seconds)):
            self._save(sinks, state, n_batches)

    def finish(self, sinks: Sinks, state: RunState) -> None:
        """Check that the data reached the checkpoint, and write the final state."""
        if self.position is not None and state.n_seen < self.done:
            ckpt_io.check_data_prefix(self.path, self.position, state.data.hexdigest(),
                                      state.n_seen)
        if self.path is not None:
            self._save(sinks, state, state.n_batches)

    def _save(self, sinks: Sinks, state: RunState, n_batches: int) -> None:
        ckpt_io.save_checkpoint(self.path, sinks.accs, self.manifest, state.position(n_batches),
                                token_stats=sinks.token_stats, moments=sinks.moments,
                                extra=sinks.group_states())
        self.last = time.monotonic()


__all__ = ["Checkpointer", "Pipeline", "RunState", "run"]
