"""Spectra during training: a callback that measures every FFN every N steps.

:class:`SpectralTracker` runs :func:`collect_spectra` on a fixed set of held-out batches
(the same tokens every time, so metrics are comparable across steps) and appends tidy rows
``step, layer, point, metric, value, se, ci_low, ci_high, n_tokens, n_over_d, train_loss,
val_loss`` (intervals with ``n_groups=K`` among the capture options, NaN otherwise).
Reinjection metrics (see the glossary) are rows with ``point == "reinjection"``. It plugs into
:func:`nerve_interp.training.train` and, through :class:`HFSpectralCallback`, into
``transformers.Trainer``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from .errors import FiniteSampleWarning, OutlierTokenWarning
from .training import Callback, TrainState

REINJECTION_POINT = "reinjection"


class SpectralTracker(Callback):
    """Measure FFN spectra every ``every`` steps on fixed batches.

    Parameters
    ----------
    batches : sequence
        Evaluation batches (dicts with ``input_ids``/``attention_mask``, token-id tensors
        ``(B, T)`` such as validation blocks, or float inputs for the Mixer). Fixed.
    every : int, default 50
        Interval in optimizer steps; step 0 (before training) and the last step are
        measured too.
    reinjection : bool, default True
        Add the pre -> post reinjection metrics.
    precision : str, default "fp32"
        Tracking favours speed; statistics are still centred and merged in float64 (see
        :func:`collect_spectra`).
    diagnostics : bool, default False
        Token diagnostics at every measurement (adds an ``outlier_share`` row per point).
    gram_dtype : torch.dtype, optional
        Deprecated synonym of ``precision``.
    **capture
        Any other option of :func:`collect_spectra`, the same at every measurement:
        ``points`` (default ``("pre", "post")``), ``layers``, ``max_tokens``,
        ``exclude_positions`` / ``exclude_token_ids`` / ``exclude_norm_above`` (e.g.
        ``exclude_positions=(0,)`` for attention sinks), ``token_fraction`` /
        ``subsample_seed`` (the batches are fixed and the draw depends only on the seed and
        the batch index, so every measurement uses the same tokens), ... They are checked
        here, before any training step.

    Notes
    -----
    With fewer than 10 tokens per FFN dimension (N/D < 10) the first measurement (at setup,
    step 0) raises a :class:`~nerve_interp.errors.FiniteSampleWarning` with the white-noise
    floor at that N/D; later measurements use the same tokens and widths and do not repeat it.

    Attributes
    ----------
    frame : DataFrame
        Tidy rows collected so far: ``step, layer, point, metric, value, n_tokens, n_over_d,
        train_loss, val_loss`` (``n_tokens``: tokens of the spectra; ``n_over_d``: that per
        FFN dimension). ``seconds`` is the time spent measuring.
    metadata : dict
        ``exclusion``: what the spectra left out (``SpectraResult.metadata["exclusion"]``);
        ``token_fraction`` and ``subsample_seed``: the token subsampling.
    """

    def __init__(self, batches: Sequence[Any], *, every: int = 50, reinjection: bool = True,
                 precision: str = "fp32", diagnostics: bool = False,
                 gram_dtype: torch.dtype | None = None, **capture: Any):
        from .capture import CaptureOptions
        from .covariance import check_precision

        if every < 1:
            raise ValueError(f"every == {every}, must be >= 1 (steps between measurements).")
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("SpectralTracker needs at least one evaluation batch.")
        if "checkpoint" in capture or "progress" in capture:
            raise TypeError("SpectralTracker measures in one short pass each time: it takes no "
                            "checkpoint= or progress= (checkpoint the training run instead).")
        if gram_dtype is not None:
            warnings.warn("SpectralTracker(gram_dtype=...) is deprecated; pass precision="
                          "'fp32' / 'fp64'.", DeprecationWarning, stacklevel=2)
            precision = check_precision(gram_dtype=gram_dtype)
        self.every = every
        self.capture = {"points": ("pre", "post"), **capture, "precision": precision,
                        "diagnostics": diagnostics, "progress": False}
        opts = CaptureOptions.build(self.capture)  # every option checked before training
        self.points = opts.points
        self.reinjection = reinjection and {"pre", "post"} <= set(self.points)
        self.metadata: dict = {}
        self.rows: list[dict] = []
        self.seconds = 0.0
        self._measured: set[int] = set()
        self._warned_n_over_d = False

    @property
    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["step", "layer", "point", "metric", "value",
                                                "se", "ci_low", "ci_high", "n_tokens",
                                                "n_over_d", "train_loss", "val_loss"])

    def measure(self, model: torch.nn.Module, step: int, train_loss: float = math.nan,
                val_loss: float = math.nan) -> None:
        """Capture spectra now and append rows for ``step``."""
        from .capture import collect_spectra

        if step in self._measured:
            return
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with warnings.catch_warnings():
                if self._warned_n_over_d:  # same tokens and widths at every step: said
                    warnings.simplefilter("ignore", FiniteSampleWarning)  # at the first one
                warnings.simplefilter("ignore", OutlierTokenWarning)  # kept as rows instead
                res = collect_spectra(model, self.batches, **self.capture)
        finally:
            model.train(was_training)
        self.metadata["exclusion"] = res.metadata["exclusion"]
        self.metadata["token_fraction"] = res.metadata["token_fraction"]
        self.metadata["subsample_seed"] = res.metadata["subsample_seed"]
        base = {"step": step, "train_loss": train_loss, "val_loss": val_loss}
        self.rows.extend(self._rows(res, base))
        self._measured.add(step)
        self._warned_n_over_d = True
        self.seconds += time.perf_counter() - t0

    def _rows(self, res: Any, base: dict) -> list[dict]:
        """Tidy rows of one measurement, each with the N and N/D of its spectra."""
        rows = []
        for r in res.metrics().itertuples(index=False):
            rows.append({**base, "layer": r.layer, "point": r.point, "metric": r.metric,
                         "value": r.value, "se": r.se, "ci_low": r.ci_low,
                         "ci_high": r.ci_high, "n_tokens": r.n_tokens, "n_over_d": r.n_over_d})
        for (layer, point), d in res.diagnostics.items():
            spec = res.spectrum(layer, point)
            rows.append({**base, "layer": layer, "point": point, "metric": "outlier_share",
                         "value": d.outlier_share, "n_tokens": spec.n_samples,
                         "n_over_d": spec.n_samples / spec.dim})
        if self.reinjection:
            for r in res.reinjection(tidy=True).itertuples(index=False):
                rows.append({**base, "layer": r.layer, "point": REINJECTION_POINT,
                             "metric": r.metric, "value": r.value, "se": r.se,
                             "ci_low": r.ci_low, "ci_high": r.ci_high,
                             "n_tokens": r.n_tokens, "n_over_d": r.n_over_d})
        return rows

    # training-loop hooks
    def on_train_begin(self, model: torch.nn.Module, state: TrainState) -> None:
        if state.step == 0:
            self.measure(model, 0)

    def on_step_end(self, model: torch.nn.Module, state: TrainState) -> None:
        if state.step % self.every == 0:
            self.measure(model, state.step, state.train_loss, state.val_loss)

    def on_train_end(self, model: torch.nn.Module, state: TrainState) -> None:
        self.measure(model, state.step, state.train_loss, state.val_loss)

    def state_dict(self) -> dict:
        return {"rows": [{k: (float(v) if isinstance(v, float) else v) for k, v in r.items()}
                         for r in self.rows], "seconds": self.seconds,
                "metadata": self.metadata}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])
        self.seconds = float(state["seconds"])
        self.metadata = dict(state.get("metadata", {}))
        self._measured = {int(r["step"]) for r in self.rows}


def _hf_callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class HFSpectralCallback(_hf_callback_base()):
    """``transformers.Trainer`` callback wrapping a :class:`SpectralTracker`::

        tracker = SpectralTracker([val_batch], every=100)
        Trainer(model=model, args=args, train_dataset=ds,
                callbacks=[HFSpectralCallback(tracker)]).train()
        tracker.frame
    """

    def __init__(self, tracker: SpectralTracker):
        self.tracker = tracker

    def _loss(self, state: Any, key: str) -> float:
        for entry in reversed(state.log_history):
            if key in entry:
                return float(entry[key])
        return math.nan

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        if model is not None and state.global_step == 0:
            self.tracker.measure(model, 0)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        if model is not None and state.global_step % self.tracker.every == 0:
            self.tracker.measure(model, state.global_step, self._loss(state, "loss"),
                                 self._loss(state, "eval_loss"))

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        if model is not None:
            self.tracker.measure(model, state.global_step, self._loss(state, "loss"),
                                 self._loss(state, "eval_loss"))


__all__ = ["REINJECTION_POINT", "HFSpectralCallback", "SpectralTracker"]
