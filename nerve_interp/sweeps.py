"""Experiments that train many small models: the width sweep behind spectral scaling laws.

:func:`width_sweep` trains one model per (norm placement, FFN width, seed), measures the final
spectra of every layer's FFN on fixed held-out batches, and fits ``soft_rank ∝ D^β`` and
``hard_rank ∝ D^β`` per norm placement ([SSL]'s LayerNorm table, at whatever scale the
hardware allows). Every finished run is written to ``out_dir`` so an interrupted sweep resumes
where it stopped.
"""

from __future__ import annotations

import functools
import inspect
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from ._validation import check_seeds
from .errors import RankDeficientWarning
from .training import TrainConfig

SWEEP_METRICS = ("soft_rank", "hard_rank", "participation_ratio", "spectral_entropy", "eee",
                 "soft_rank_utilization", "hard_rank_utilization")

#: Metrics of :attr:`WidthSweepResult.fits` (others: :meth:`WidthSweepResult.fit`).
FIT_METRICS = ("soft_rank", "hard_rank")


@dataclass
class WidthSweepResult:
    """Outcome of :func:`width_sweep`.

    Attributes
    ----------
    table : DataFrame
        Tidy: ``norm, width, seed, layer, point, metric, value, val_loss``.
    fits : DataFrame
        One power-law fit per ``norm`` and ``metric`` (``beta, beta_se, beta_ci_low,
        beta_ci_high, r2, n, ...``); each width × seed is one point (median over layers,
        as the authors' follow-up does).
    spectra : dict
        ``{(norm, width, seed): SpectraResult}`` of every run with ``keep_spectra=True``
        (eigenvalues and means, no eigenvectors); empty otherwise.
    """

    table: pd.DataFrame
    fits: pd.DataFrame
    spectra: dict = field(default_factory=dict, repr=False)

    def fit(self, metrics: Sequence[str] = FIT_METRICS) -> pd.DataFrame:
        """Power-law fits of ``metrics`` against width, one per ``norm``, ``point`` and
        ``metric`` (each width × seed is one point: the median over layers); ``fits`` is
        ``fit(FIT_METRICS)``. Any of :data:`SWEEP_METRICS` can be fitted."""
        from .scaling import fit_table

        per_model = (self.table.groupby(["norm", "width", "seed", "point", "metric"],
                                        as_index=False)["value"].median())
        return fit_table(per_model[per_model["metric"].isin(metrics)], x="width", y="value",
                         by=("norm", "point", "metric"))


def _run_key(norm: str, width: int, seed: int) -> str:
    return f"{norm}-D{width}-s{seed}"


def _finished_run(out: Path | None, norm: str, width: int, seed: int) -> Path | None:
    """The JSON of a finished run in ``out``: under its key, or under the key an older
    version wrote with the old norm spelling (``pre-D64-s0.json``); None if there is none."""
    from .models import DEPRECATED_NORMS

    if out is None:
        return None
    spellings = [norm, *(old for old, new in DEPRECATED_NORMS.items() if new == norm)]
    paths = [out / f"{_run_key(n, width, seed)}.json" for n in spellings]
    return next((p for p in paths if p.exists()), None)


def _train_run(preset: str, model_kw: dict[str, Any], cfg: Any, train_blocks: torch.Tensor,
               val_blocks: torch.Tensor, eval_set: torch.Tensor,
               point: str) -> tuple[list[dict], Any]:
    """Train one model of the sweep; its tidy rows (``norm, width, seed, layer, point,
    metric, value, val_loss``) and final spectra on ``eval_set``."""
    from .capture import collect_spectra
    from .models import make_lm
    from .training import train

    model = make_lm(preset, seed=cfg.seed, **model_kw)
    run = train(model, train_blocks, val_blocks, cfg, progress=False)
    val_loss = float(run.history.query("split == 'val'")["loss"].iloc[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankDeficientWarning)
        spectra = collect_spectra(model, [eval_set], points=(point,), progress=False)
    rows = [{"norm": model_kw["norm"], "width": model_kw["d_ff"], "seed": int(cfg.seed),
             "layer": int(r.layer), "point": r.point, "metric": r.metric,
             "value": float(r.value), "val_loss": val_loss}
            for r in spectra.metrics().itertuples(index=False) if r.metric in SWEEP_METRICS]
    return rows, spectra


def _old_keywords(sweep: Callable) -> Callable:
    """Keep the keywords of ``width_sweep`` from before its model fields became keywords:
    ``model_overrides={...}`` is the same as passing those LMConfig fields as keywords, and
    ``fit_metrics=`` (deprecated) sets ``fits`` to :meth:`WidthSweepResult.fit` of them.
    Checks the LMConfig field names and ``train_config`` before anything is trained."""
    own = {name for name, p in inspect.signature(sweep).parameters.items()
           if p.kind is not p.VAR_KEYWORD}

    @functools.wraps(sweep)
    def width_sweep(*args: Any, model_overrides: dict[str, Any] | None = None,
                    fit_metrics: Sequence[str] | None = None, **kwargs: Any) -> WidthSweepResult:
        if model_overrides:
            kwargs = {**model_overrides, **kwargs}
        _check_keywords(kwargs, own)
        if fit_metrics is not None:
            warnings.warn("width_sweep(fit_metrics=...) is deprecated; the sweep fits "
                          f"{list(FIT_METRICS)} and result.fit(metrics) fits others.",
                          DeprecationWarning, stacklevel=2)
        result = sweep(*args, **kwargs)
        if fit_metrics is not None:
            result.fits = result.fit(fit_metrics)
        return result

    return width_sweep


def _check_keywords(kwargs: dict[str, Any], own: set[str]) -> None:
    from .models import LMConfig

    lm_fields = {f.name for f in fields(LMConfig)}
    unknown = sorted(set(kwargs) - own - lm_fields)
    if unknown:
        raise TypeError(f"width_sweep() got unknown keyword(s) {unknown}: neither its own "
                        f"{sorted(own)} nor LMConfig fields {sorted(lm_fields)}.")
    cfg = kwargs.get("train_config")
    if cfg is not None and not isinstance(cfg, TrainConfig):
        raise TypeError(f"train_config must be a TrainConfig; got {type(cfg).__name__}.")


@_old_keywords
def width_sweep(
    widths: Sequence[int],
    train_blocks: torch.Tensor,
    val_blocks: torch.Tensor,
    *,
    norms: Sequence[str] = ("pre_ln", "post_ln", "mix_ln"),
    seeds: Sequence[int] = (0,),
    preset: str = "tiny",
    train_config: TrainConfig | None = None,
    eval_blocks: int = 16,
    point: str = "post",
    out_dir: str | Path | None = None,
    keep_spectra: bool = False,
    progress: bool = True,
    **model_overrides: Any,
) -> WidthSweepResult:
    """Train one model per norm placement × FFN width × seed and fit spectral scaling laws.

    Parameters
    ----------
    widths : sequence of int
        FFN widths D (``d_ff``), at least 3 distinct values for a fit.
    train_blocks, val_blocks : LongTensor (n_blocks, seq_len)
        From :func:`nerve_interp.data.token_blocks`.
    norms : sequence of {"pre_ln", "post_ln", "mix_ln", "none"}
        Norm placements (:data:`nerve_interp.models.NORMS`; the ``norm`` column of the
        table). The old spellings ``"pre"``, ``"post"``, ``"mix"`` still work with a
        DeprecationWarning, and an ``out_dir`` written with them still resumes.
    seeds : sequence of int
        Initialisation and data-order seeds, one run per seed (at least one, no repeats; a
        sequence as in :func:`nerve_interp.ablation.ablation_sweep`, never a count).
    preset : str
        A :data:`nerve_interp.models.PRESETS` key; ``model_overrides`` replace its fields
        (``vocab_size`` should match the tokenizer).
    train_config : TrainConfig, optional
        The training options, the same for every run (its seed is replaced by each run's
        seed).
    eval_blocks : int
        The first ``eval_blocks`` validation blocks are the fixed tokens spectra are
        measured on (N = eval_blocks · seq_len tokens; keep N >> D).
    point : str, default "post"
        [SSL] measures the post-activation spectrum.
    out_dir : path, optional
        One JSON per finished run (``<norm>-D<width>-s<seed>.json``); runs already there
        are not retrained (resume).
    keep_spectra : bool, default False
        Keep every run's final spectra in ``WidthSweepResult.spectra`` (to plot them
        without retraining); with ``out_dir`` they are also saved there
        (``<norm>-D<width>-s<seed>.safetensors``) and reloaded on resume.
    **model_overrides
        :class:`nerve_interp.models.LMConfig` fields that replace the preset's, as in
        :func:`nerve_interp.models.make_lm` (e.g. ``vocab_size=len(tok)``); also accepted as
        one dict, ``model_overrides={...}``.

    Returns
    -------
    WidthSweepResult
        ``fits`` holds the soft- and hard-rank fits (:data:`FIT_METRICS`); ``fit(metrics)``
        fits others (``fit_metrics=`` is deprecated).
    """
    from .models import norm_placement
    from .results import SpectraResult

    if len(set(widths)) < 3:
        raise ValueError(f"widths={list(widths)}: a power-law fit needs at least 3 distinct "
                         "widths.")
    seeds = check_seeds(seeds, context=" (width_sweep trains one model per seed)")
    placements = []
    for n in norms:
        placements.append(norm_placement(n))
    base_cfg = train_config or TrainConfig()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    runs = [(n, w, s) for n in placements for w in widths for s in seeds]
    rows: list[dict] = []
    kept: dict[tuple[str, int, int], Any] = {}
    bar = tqdm(runs, disable=not progress, desc="width sweep", unit="model", dynamic_ncols=True)
    for norm, width, seed in bar:
        bar.set_postfix(run=_run_key(norm, width, seed))
        done = _finished_run(out, norm, width, seed)
        if done is not None and (not keep_spectra or done.with_suffix(".safetensors").exists()):
            rows.extend({**r, "norm": norm} for r in json.loads(done.read_text())["rows"])
            if keep_spectra:
                kept[(norm, int(width), int(seed))] = SpectraResult.load(
                    done.with_suffix(".safetensors"))
            continue
        cfg = TrainConfig(**{**asdict(base_cfg), "seed": seed})
        model_kw = {**(model_overrides or {}), "norm": norm, "d_ff": int(width)}
        new, spectra = _train_run(preset, model_kw, cfg, train_blocks, val_blocks,
                                  val_blocks[:eval_blocks], point)
        rows.extend(new)
        path = out / f"{_run_key(norm, width, seed)}.json" if out is not None else None
        if keep_spectra:
            kept[(norm, int(width), int(seed))] = spectra
            if path is not None:
                spectra.save(path.with_suffix(".safetensors"))
        if path is not None:
            path.write_text(json.dumps({"rows": new, "train_config": asdict(cfg),
                                        "n_tokens": spectra.metadata["n_tokens"]}))
    result = WidthSweepResult(pd.DataFrame(rows), pd.DataFrame(), kept)
    result.fits = result.fit(FIT_METRICS)
    return result


__all__ = ["FIT_METRICS", "SWEEP_METRICS", "WidthSweepResult", "width_sweep"]
