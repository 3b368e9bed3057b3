"""Experiments that train many small models: the width sweep behind spectral scaling laws.

:func:`width_sweep` trains one model per (norm placement, FFN width, seed), measures the final
spectra of every layer's FFN on fixed held-out batches, and fits ``soft_rank ∝ D^β`` and
``hard_rank ∝ D^β`` per norm placement ([SSL]'s LayerNorm table, at whatever scale the
hardware allows). Every finished run is written to ``out_dir`` so an interrupted sweep resumes
where it stopped.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from ._validation import check_seeds
from .errors import RankDeficientWarning

SWEEP_METRICS = ("soft_rank", "hard_rank", "participation_ratio", "spectral_entropy", "eee",
                 "soft_rank_utilization", "hard_rank_utilization")


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


def width_sweep(
    widths: Sequence[int],
    train_blocks: torch.Tensor,
    val_blocks: torch.Tensor,
    *,
    norms: Sequence[str] = ("pre_ln", "post_ln", "mix_ln"),
    seeds: Sequence[int] = (0,),
    preset: str = "tiny",
    model_overrides: dict[str, Any] | None = None,
    train_config: Any = None,
    eval_blocks: int = 16,
    point: str = "post",
    fit_metrics: Sequence[str] = ("soft_rank", "hard_rank"),
    out_dir: str | Path | None = None,
    keep_spectra: bool = False,
    progress: bool = True,
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
        Same for every run (its seed is replaced by each run's seed).
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

    Returns
    -------
    WidthSweepResult
    """
    from .models import norm_placement
    from .results import SpectraResult
    from .scaling import fit_table
    from .training import TrainConfig

    if len(set(widths)) < 3:
        raise ValueError(f"widths={list(widths)}: a power-law fit needs at least 3 distinct "
                         "widths.")
    seeds = check_seeds(seeds, context=" (width_sweep trains one model per seed)")
    placements = []
    for n in norms:  # a loop, not a comprehension, so the warning points at the caller
        placements.append(norm_placement(n, stacklevel=2))
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
    table = pd.DataFrame(rows)
    per_model = (table.groupby(["norm", "width", "seed", "point", "metric"], as_index=False)
                 ["value"].median())
    fits = fit_table(per_model[per_model["metric"].isin(fit_metrics)], x="width", y="value",
                     by=("norm", "point", "metric"))
    return WidthSweepResult(table, fits, kept)


__all__ = ["SWEEP_METRICS", "WidthSweepResult", "width_sweep"]
