"""Experiments that train many small models: the width sweep behind spectral scaling laws.

:func:`width_sweep` trains one model per (norm placement, FFN width, seed), measures the final
spectra of every layer's FFN on held-out tokens, and fits ``soft_rank ∝ D^β`` and
``hard_rank ∝ D^β`` per norm placement ([SSL]'s LayerNorm table, at whatever scale the
hardware allows). Every width is measured at the same number of tokens per dimension
(``n_over_d``, default 32), so the finite-sample bias of the metrics is about the same at every
width instead of growing with D. Every finished run is written to ``out_dir`` so an
interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ._progress import tqdm
from ._validation import check_positive_int, check_seeds
from ._warnings import user_stacklevel
from .errors import FiniteSampleWarning
from .training import TrainConfig

SWEEP_METRICS = ("soft_rank", "hard_rank", "participation_ratio", "spectral_entropy", "eee",
                 "soft_rank_utilization", "hard_rank_utilization")

#: Metrics of :attr:`WidthSweepResult.fits` (others: :meth:`WidthSweepResult.fit`).
FIT_METRICS = ("soft_rank", "hard_rank")

#: Tokens per FFN dimension every width of a sweep is measured at, by default.
DEFAULT_N_OVER_D = 32.0

#: Seeds per width from which :meth:`WidthSweepResult.fit` weights the per-width means by
#: their standard error over seeds. A standard error from k seeds has k − 1 degrees of
#: freedom and weights built from it are noisy: in simulation (4–8 widths, Gaussian noise on
#: ln y) the 95 % interval of the weighted fit covered the true exponent in 64–75 % of draws
#: with 2 seeds, 78–85 % with 3, 88–92 % with 5 and 93–95 % with 10, while the unweighted fit
#: on every (width, seed) point covered 94–96 % throughout.
MIN_SEEDS_FOR_WEIGHTS = 10

#: Groups of evaluation blocks every sweep capture keeps (``collect_spectra(n_groups=...)``):
#: each row's jackknife ``se``, and each model's ``model_se`` of its median over layers.
SWEEP_GROUPS = 8


@dataclass
class WidthSweepResult:
    """Outcome of :func:`width_sweep`.

    Attributes
    ----------
    table : DataFrame
        Tidy: ``norm, width, seed, layer, point, metric, value, se, model_se, n_tokens,
        n_over_d, val_loss`` (``se``: the jackknife standard error of the value over
        :data:`SWEEP_GROUPS` groups of evaluation blocks; ``model_se``: that of the model's
        median over layers, the value a fit uses; ``n_tokens``: the tokens the spectrum was
        measured on; ``n_over_d``: that
        per FFN dimension, ``n_tokens / width``).
    fits : DataFrame
        One power-law fit per ``norm`` and ``metric`` (``beta, beta_se, beta_ci_low,
        beta_ci_high, r2, n, ..., weighted, chi2_reduced``), next to the saturating
        alternative ``a · D / (b + D)`` on the same points (``sat_a, sat_b``, the AICs of
        both in ``ln y``, ``delta_aic`` and ``preferred``; see
        :func:`nerve_interp.scaling.fit_table`): :meth:`fit` of :data:`FIT_METRICS`.
    spectra : dict
        ``{(norm, width, seed): SpectraResult}`` of every run with ``keep_spectra=True``
        (eigenvalues and means, no eigenvectors); empty otherwise.
    """

    table: pd.DataFrame
    fits: pd.DataFrame
    spectra: dict = field(default_factory=dict, repr=False)

    def per_model(self, metrics: Sequence[str] = SWEEP_METRICS) -> pd.DataFrame:
        """One value per model: the median over layers.

        Columns ``norm, width, seed, point, metric, value`` (+ the smallest ``n_tokens`` and
        ``n_over_d`` of its layers, when the table has them)."""
        t = self.table[self.table["metric"].isin(metrics)]
        extra = {c: (c, "min") for c in ("n_tokens", "n_over_d") if c in t.columns}
        return (t.groupby(["norm", "width", "seed", "point", "metric"], as_index=False)
                .agg(value=("value", "median"), **extra))

    def per_width(self, metrics: Sequence[str] = SWEEP_METRICS) -> pd.DataFrame:
        """One value per width: the mean over seeds of :meth:`per_model`.

        Columns ``norm, point, metric, width, value, value_se, n_seeds`` (+ ``n_tokens``,
        ``n_over_d``).

        ``value_se`` is the standard error of that mean: the larger of ``sd over seeds /
        sqrt(n_seeds)`` (NaN with one seed) and the jackknife one, ``sqrt(Σ model_se²) /
        n_seeds`` (:func:`_jackknife_se`; sampling of the evaluation tokens only, not the
        spread between initialisations).
        """
        pm = self.per_model(metrics)
        keys = ["norm", "point", "metric", "width"]
        extra = {c: (c, "min") for c in ("n_tokens", "n_over_d") if c in pm.columns}
        out = pm.groupby(keys, as_index=False).agg(
            value=("value", "mean"), value_sd=("value", "std"), n_seeds=("seed", "nunique"),
            **extra)
        out.insert(out.columns.get_loc("value") + 1, "value_se",
                   out.pop("value_sd") / out["n_seeds"] ** 0.5)
        jack = _jackknife_se(self.table, out)
        if jack is not None:  # the larger of the two where both exist
            out["value_se"] = np.fmax(out["value_se"], jack)
        return out

    def fit(self, metrics: Sequence[str] = FIT_METRICS, *,
            weighted: bool | None = None) -> pd.DataFrame:
        """Power-law fits of ``metrics`` against width, one per ``norm``, ``point`` and
        ``metric``; ``fits`` is ``fit(FIT_METRICS)``. Any of :data:`SWEEP_METRICS` can be
        fitted.

        Parameters
        ----------
        metrics : sequence of str
        weighted : bool, optional
            False: ordinary least squares with each width × seed one point (the median over
            layers, as the authors' follow-up does). True: weighted least squares on the
            per-width means with their standard errors (:meth:`per_width`'s ``value_se``,
            passed as ``y_se`` to :func:`nerve_interp.scaling.fit_power_law`). None
            (default): weighted when every width has a standard error that rests on enough
            data (at least :data:`MIN_SEEDS_FOR_WEIGHTS` seeds; the jackknife se alone has
            only K − 1 degrees of freedom and misses the spread between initialisations, so
            a one-seed sweep is weighted only when you ask, ``weighted=True``),
            otherwise unweighted. The ``weighted`` column of the result says which.
        """
        from .scaling import fit_table

        by = ("norm", "point", "metric")
        if weighted is None:
            weighted = self._se_is_reliable(metrics)
        if not weighted:
            return fit_table(self.per_model(metrics), x="width", y="value", by=by)
        pw = self.per_width(metrics)
        bad = pw[~(pw["value_se"] > 0) | ~np.isfinite(pw["value_se"])]
        if len(bad):
            raise ValueError(
                f"fit(weighted=True) needs a standard error > 0 at every width; "
                f"{len(bad)} of {len(pw)} (norm, point, metric, width) have none (one seed: "
                f"no spread; seeds per width: {sorted(set(pw['n_seeds']))}). Run >= 2 seeds, "
                "or fit unweighted (weighted=False).")
        return fit_table(pw, x="width", y="value", y_se="value_se", by=by)

    def _se_is_reliable(self, metrics: Sequence[str]) -> bool:
        pw = self.per_width(metrics)
        ok = (pw["value_se"] > 0) & np.isfinite(pw["value_se"])
        # the jackknife se alone does not make weights reliable: it has K - 1 degrees of
        # freedom and leaves out the spread between initialisations (fit(weighted=True))
        enough = pw["n_seeds"] >= MIN_SEEDS_FOR_WEIGHTS
        return bool(len(pw)) and bool((ok & enough).all())


def _jackknife_se(table: pd.DataFrame, per_width: pd.DataFrame) -> pd.Series | None:
    """The jackknife standard error of each row of ``per_width`` (aligned with it): each
    model's ``model_se`` (the jackknife se of its median over layers, :func:`_median_se`)
    combined over its seeds as the se of a mean, ``sqrt(Σ se_i²) / n_seeds``. None when the
    table has no ``model_se`` (older sweeps)."""
    if "model_se" not in table or table["model_se"].isna().all():
        return None
    keys = ["norm", "point", "metric", "width"]
    per_model = table.groupby([*keys, "seed"], as_index=False)["model_se"].first()
    per_model["var"] = per_model["model_se"] ** 2
    agg = per_model.groupby(keys, as_index=False).agg(var=("var", "sum"), n=("seed", "count"))
    agg["se"] = np.sqrt(agg["var"]) / agg["n"]
    return per_width[keys].merge(agg[[*keys, "se"]], on=keys, how="left")["se"].set_axis(
        per_width.index)


def _median_se(spectra: Any, point: str) -> dict[str, float]:
    """Per metric, the jackknife se of the median over layers (the value a sweep fits):
    the median is taken in every leave-one-group-out sample. Empty without groups."""
    from .jackknife import jackknife

    specs = [spectra.spectrum(layer, point) for layer in spectra.layers]
    if any(s.groups is None for s in specs):
        return {}
    full = [s.metrics() for s in specs]
    loo = [s.loo_metrics() for s in specs]  # [layer][group] -> metrics
    out = {}
    for m in SWEEP_METRICS:
        value = float(np.median([f[m] for f in full]))
        loo_med = [float(np.median([layer[g][m] for layer in loo]))
                   for g in range(len(loo[0]))]
        out[m] = float(jackknife(value, loo_med)["se"])
    return out


def _run_key(norm: str, width: int, seed: int, untrained: bool = False) -> str:
    return f"{norm}-D{width}-s{seed}" + ("-init" if untrained else "")


def _finished_run(out: Path | None, norm: str, width: int, seed: int,
                  untrained: bool = False) -> Path | None:
    """The JSON of a finished run in ``out``: under its key, or under the key an older
    version wrote with the old norm spelling (``pre-D64-s0.json``); None if there is none.
    Untrained runs are kept under ``...-init.json``."""
    from .models import DEPRECATED_NORMS

    if out is None:
        return None
    spellings = [norm, *(old for old, new in DEPRECATED_NORMS.items() if new == norm)]
    paths = [out / f"{_run_key(n, width, seed, untrained)}.json" for n in spellings]
    return next((p for p in paths if p.exists()), None)


def _train_run(preset: str, model_kw: dict[str, Any], cfg: Any, train_blocks: torch.Tensor,
               val_blocks: torch.Tensor, eval_set: torch.Tensor,
               point: str) -> tuple[list[dict], Any]:
    """Train one model of the sweep (not when ``untrained``: the model as initialised); its
    tidy rows (``norm, width, seed, layer, point, metric, value, n_tokens, n_over_d,
    val_loss``) and final spectra on ``eval_set``."""
    from .capture import collect_spectra
    from .models import make_lm
    from .training import evaluate, train

    model = make_lm(preset, seed=cfg.seed, **model_kw)
    if isinstance(cfg, _Untrained):  # the init null: no optimizer step
        val_loss = evaluate(model, val_blocks, batch_size=cfg.batch_size,
                            max_batches=cfg.eval_batches)
    else:
        run = train(model, train_blocks, val_blocks, cfg, progress=False)
        val_loss = float(run.history.query("split == 'val'")["loss"].iloc[-1])
    with warnings.catch_warnings():
        # N/D is in every row; _warn_few_tokens says it once for the whole sweep
        warnings.simplefilter("ignore", FiniteSampleWarning)
        spectra = collect_spectra(model, [eval_set], points=(point,), progress=False,
                                  n_groups=_n_groups(eval_set))
    model_se = _median_se(spectra, point)
    rows = [{"norm": model_kw["norm"], "width": model_kw["d_ff"], "seed": int(cfg.seed),
             "layer": int(r.layer), "point": r.point, "metric": r.metric,
             "value": float(r.value), "se": float(r.se),
             "model_se": model_se.get(r.metric, math.nan), "n_tokens": int(r.n_tokens),
             "n_over_d": float(r.n_over_d), "val_loss": val_loss}
            for r in spectra.metrics().itertuples(index=False) if r.metric in SWEEP_METRICS]
    return rows, spectra


def _n_groups(eval_set: torch.Tensor) -> int | None:
    """:data:`SWEEP_GROUPS` groups of evaluation blocks (fewer with fewer than 16 blocks;
    none below 4)."""
    n = int(eval_set.shape[0])
    return min(SWEEP_GROUPS, n // 2) if n >= 4 else None


@dataclass
class _Untrained(TrainConfig):
    """The training options of ``width_sweep(untrained=True)``: measure, do not train."""


@dataclass(frozen=True)
class _EvalBlocks:
    """The deprecated ``eval_blocks=n``: the first ``n`` validation blocks at every width."""

    n: int


def _old_keywords(sweep: Callable) -> Callable:
    """Keep the keywords of ``width_sweep`` from before its model fields became keywords:
    ``model_overrides={...}`` is the same as passing those LMConfig fields as keywords,
    ``fit_metrics=`` (deprecated) sets ``fits`` to :meth:`WidthSweepResult.fit` of them, and
    ``eval_blocks=n`` (deprecated for ``n_over_d``) measures every width on the first ``n``
    validation blocks. Checks the LMConfig field names and ``train_config`` before anything
    is trained. ``untrained=True`` (documented in ``width_sweep``) travels as a
    ``_Untrained`` train_config."""
    own = {name for name, p in inspect.signature(sweep).parameters.items()
           if p.kind is not p.VAR_KEYWORD}

    @functools.wraps(sweep)
    def width_sweep(*args: Any, model_overrides: dict[str, Any] | None = None,
                    fit_metrics: Sequence[str] | None = None, eval_blocks: int | None = None,
                    untrained: bool = False, n_jobs: int = 1,
                    **kwargs: Any) -> WidthSweepResult:
        token = _N_JOBS.set(_check_n_jobs(n_jobs))
        try:
            return _call_sweep(sweep, own, args, kwargs, model_overrides, fit_metrics,
                               eval_blocks, untrained)
        finally:
            _N_JOBS.reset(token)

    return width_sweep


def _call_sweep(sweep: Callable, own: set[str], args: tuple, kwargs: dict[str, Any],
                model_overrides: dict[str, Any] | None, fit_metrics: Sequence[str] | None,
                eval_blocks: int | None, untrained: bool) -> WidthSweepResult:
    """The body of the ``width_sweep`` wrapper of :func:`_old_keywords`."""
    if model_overrides:
        kwargs = {**model_overrides, **kwargs}
    _check_keywords(kwargs, own)
    if untrained:
        kwargs["train_config"] = _Untrained(**asdict(kwargs.get("train_config")
                                                     or TrainConfig()))
    if eval_blocks is not None:
        if "n_over_d" in kwargs:
            raise TypeError("width_sweep() got both n_over_d= and the deprecated "
                            "eval_blocks=; pass n_over_d only.")
        warnings.warn(
            "width_sweep(eval_blocks=...) is deprecated: it measures every width on the "
            "same tokens, so N/D falls as D grows and biases the exponents (the widest "
            f"widths most). Pass n_over_d= (default {DEFAULT_N_OVER_D:g}) to measure every "
            "width at the same N/D.", DeprecationWarning, stacklevel=3)
        kwargs["n_over_d"] = _EvalBlocks(int(eval_blocks))
    if fit_metrics is not None:
        warnings.warn("width_sweep(fit_metrics=...) is deprecated; the sweep fits "
                      f"{list(FIT_METRICS)} and result.fit(metrics) fits others.",
                      DeprecationWarning, stacklevel=3)
    result = sweep(*args, **kwargs)
    if fit_metrics is not None:
        result.fits = result.fit(fit_metrics)
    return result


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


def _eval_blocks(widths: Sequence[int], val_blocks: torch.Tensor,
                 n_over_d: float | _EvalBlocks) -> dict[int, int]:
    """Validation blocks each width is measured on: ``ceil(n_over_d · D / seq_len)``, checked
    against ``len(val_blocks)`` before any training."""
    if isinstance(n_over_d, _EvalBlocks):  # deprecated: the same blocks at every width
        return {int(w): n_over_d.n for w in widths}
    if (isinstance(n_over_d, bool) or not isinstance(n_over_d, (int, float))
            or not math.isfinite(n_over_d) or n_over_d <= 0):
        raise ValueError(f"n_over_d = {n_over_d!r}, must be a finite number > 0 (tokens per "
                         f"FFN dimension each width is measured at; default "
                         f"{DEFAULT_N_OVER_D:g}).")
    if getattr(val_blocks, "ndim", None) != 2:
        raise ValueError("val_blocks must be a 2-D LongTensor (n_blocks, seq_len) from "
                         f"data.token_blocks; got shape {tuple(getattr(val_blocks, 'shape', ()))}.")
    n_blocks, seq_len = (int(v) for v in val_blocks.shape)
    need = {int(w): math.ceil(n_over_d * int(w) / seq_len - 1e-9) for w in widths}
    widest = max(need)
    if need[widest] > n_blocks:
        raise ValueError(
            f"width_sweep(n_over_d={n_over_d:g}): the widest FFN (D = {widest}) is measured on "
            f"ceil({n_over_d:g}·{widest} / {seq_len}) = {need[widest]} validation blocks of "
            f"{seq_len} tokens ({need[widest] * seq_len} tokens), but val_blocks has "
            f"{n_blocks} ({n_blocks * seq_len} tokens). Pass more held-out text, or a smaller "
            f"n_over_d (at most {n_blocks * seq_len / widest:.3g} with these blocks; below 10 "
            "every spectrum carries a FiniteSampleWarning).")
    return need


def _warn_few_tokens(table: pd.DataFrame) -> None:
    """One FiniteSampleWarning for the whole sweep when some widths were measured at
    N/D < 10: how many, and the floor at the smallest N/D."""
    from .marchenko_pastur import FINITE_SAMPLE_N_OVER_D, finite_sample_warning

    if table.empty or "n_over_d" not in table.columns:
        return
    worst = table.loc[table.groupby("width")["n_over_d"].idxmin()]
    low = worst[worst["n_over_d"] < FINITE_SAMPLE_N_OVER_D]
    if low.empty:
        return
    row = low.loc[low["n_over_d"].idxmin()]
    n = int(row["n_tokens"])
    found = finite_sample_warning(
        n, int(round(n / row["n_over_d"])), f"at {len(low)} of {len(worst)} widths of the "
        "sweep (the smallest N/D shown)", "Measure every width at the same N/D >= 10: "
        f"width_sweep(n_over_d=...) (default {DEFAULT_N_OVER_D:g}) instead of eval_blocks, "
        "with enough validation blocks.")
    if found is not None:
        warnings.warn(found[1], found[0], stacklevel=user_stacklevel())


def _resumed_rows(done: Path, norm: str) -> list[dict]:
    """The rows of a finished run's JSON; a run written before ``n_tokens`` / ``n_over_d``
    were columns gets them from the run's token count."""
    saved = json.loads(done.read_text())
    rows = []
    for r in saved["rows"]:
        r = {**r, "norm": norm}
        if "n_tokens" not in r and "n_tokens" in saved:
            loss = r.pop("val_loss")
            r.update(n_tokens=int(saved["n_tokens"]),
                     n_over_d=int(saved["n_tokens"]) / int(r["width"]), val_loss=loss)
        rows.append(r)
    return rows


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
    n_over_d: float = DEFAULT_N_OVER_D,
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
        From :func:`nerve_interp.data.token_blocks`. ``val_blocks`` gives the validation
        loss and the tokens the spectra are measured on (see ``n_over_d``).
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
    n_over_d : float, default 32
        Tokens per FFN dimension every width is measured at (> 0): width D gets the first
        ``ceil(n_over_d · D / seq_len)`` validation blocks, so N/D >= n_over_d at every
        width. Every metric depends on N/D (white noise at N/D = 32 gives PR 0.97·D, soft
        rank 0.98·D, EEE 0.10; at 10, the line below which a ``FiniteSampleWarning`` is
        raised, 0.91·D, 0.95·D, 0.18): measured at the same N/D, that bias is about the same
        factor at every width, which a log-log slope does not see, and at 32 it is small in
        itself. A fixed token count instead biases the widest widths most (for white noise at
        1,024 tokens, soft rank / D falls from 0.97 at D = 64 to 0.78 at D = 512: a slope of
        −0.10). Refused before any training when ``val_blocks`` is too short for the widest
        width. The deprecated ``eval_blocks=n`` measures every width on the first ``n``
        blocks instead.
    point : str, default "post"
        [SSL] measures the post-activation spectrum.
    out_dir : path, optional
        One JSON per finished run (``<norm>-D<width>-s<seed>.json``); runs already there
        are not retrained (resume), whatever N they were measured at (see the ``n_tokens``
        column).
    keep_spectra : bool, default False
        Keep every run's final spectra in ``WidthSweepResult.spectra`` (to plot them
        without retraining); with ``out_dir`` they are also saved there
        (``<norm>-D<width>-s<seed>.safetensors``) and reloaded on resume.
    progress : bool, default True
        A progress bar over the runs.
    **model_overrides
        :class:`nerve_interp.models.LMConfig` fields that replace the preset's, as in
        :func:`nerve_interp.models.make_lm` (e.g. ``vocab_size=len(tok)``); also accepted as
        one dict, ``model_overrides={...}``.

    Returns
    -------
    WidthSweepResult
        ``table`` with ``n_tokens`` and ``n_over_d`` on every row; ``fits`` holds the soft-
        and hard-rank fits (:data:`FIT_METRICS`); ``fit(metrics)`` fits others
        (``fit_metrics=`` is deprecated).

    Other Parameters
    ----------------
    untrained : bool, default False
        Measure every model as initialised (the same seed, hence the same weights the
        trained run starts from, on the same evaluation tokens), with no optimizer step: the
        *init* null of a sweep. A claim about what training does to the exponents is the
        difference between a sweep and its ``untrained=True`` twin. ``val_loss`` is then the
        initial loss (``train_config``'s ``eval_batches`` × ``batch_size`` blocks); with
        ``out_dir`` the runs are kept as ``<norm>-D<width>-s<seed>-init.json``.
    n_jobs : int, default 1
        Runs trained at once, each in its own worker process with
        ``max(1, torch.get_num_threads() // n_jobs)`` threads (``-1``: one per CPU core).
        The runs are independent and seeded, so the table and spectra are the same as with
        ``n_jobs=1`` at the same thread count per run; small models train fastest one thread
        per core. Workers are started with ``spawn``: in a script, call ``width_sweep``
        under ``if __name__ == "__main__":``.

    Warns
    -----
    FiniteSampleWarning
        Once for the whole sweep (not per model) when some width was measured at N/D < 10,
        with how many and the white-noise floor at the smallest N/D.
    """
    from .models import norm_placement

    if len(set(widths)) < 3:
        raise ValueError(f"widths={list(widths)}: a power-law fit needs at least 3 distinct "
                         "widths.")
    seeds = check_seeds(seeds, context=" (width_sweep trains one model per seed)")
    n_eval = _eval_blocks(widths, val_blocks, n_over_d)
    placements = [norm_placement(n) for n in norms]
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    n_jobs = _N_JOBS.get()  # width_sweep(n_jobs=...), documented in Other Parameters
    untrained = isinstance(train_config, _Untrained)  # width_sweep(untrained=True)
    jobs = [_SweepJob((n, int(w), int(s)), out, keep_spectra, preset,
                      train_config or TrainConfig(), model_overrides, untrained,
                      train_blocks, val_blocks, n_eval[int(w)], point)
            for n in placements for w in widths for s in seeds]
    done = _run_jobs(jobs, n_jobs, progress)
    rows = [row for job in jobs for row in done[job.key][0]]  # in run order, whatever n_jobs
    kept = {job.key: done[job.key][1] for job in jobs if keep_spectra}
    result = WidthSweepResult(pd.DataFrame(rows), pd.DataFrame(), kept)
    _warn_few_tokens(result.table)
    result.fits = result.fit(FIT_METRICS)
    return result


@dataclass(frozen=True)
class _SweepJob:
    """One (norm, width, seed) run of a sweep, everything it needs (picklable: the runs of
    ``n_jobs > 1`` travel to worker processes)."""

    key: tuple[str, int, int]
    out: Path | None
    keep_spectra: bool
    preset: str
    train_config: TrainConfig
    model_overrides: dict[str, Any]
    untrained: bool
    train_blocks: torch.Tensor
    val_blocks: torch.Tensor
    n_eval: int
    point: str

    def __call__(self) -> tuple[list[dict], Any]:
        """The run's rows and (with ``keep_spectra``, else None) spectra: resumed from
        ``out`` when it is there, else trained and written to ``out``."""
        from .results import SpectraResult

        norm, width, seed = self.key
        done = _finished_run(self.out, norm, width, seed, self.untrained)
        if done is not None and (not self.keep_spectra
                                 or done.with_suffix(".safetensors").exists()):
            spectra = (SpectraResult.load(done.with_suffix(".safetensors"))
                       if self.keep_spectra else None)
            return _resumed_rows(done, norm), spectra
        cfg = type(self.train_config)(**{**asdict(self.train_config), "seed": seed})
        model_kw = {**(self.model_overrides or {}), "norm": norm, "d_ff": width}
        rows, spectra = _train_run(self.preset, model_kw, cfg, self.train_blocks,
                                   self.val_blocks, self.val_blocks[:self.n_eval], self.point)
        if self.out is not None:
            path = self.out / f"{_run_key(norm, width, seed, self.untrained)}.json"
            if self.keep_spectra:
                spectra.save(path.with_suffix(".safetensors"))
            path.write_text(json.dumps({"rows": rows, "train_config": asdict(cfg),
                                        "n_tokens": spectra.metadata["n_tokens"]}))
        return rows, spectra if self.keep_spectra else None


_N_JOBS: contextvars.ContextVar[int] = contextvars.ContextVar("width_sweep_n_jobs", default=1)
"""``width_sweep(n_jobs=...)``, from the keyword wrapper to the sweep."""


def _check_n_jobs(n_jobs: Any) -> int:
    """``n_jobs`` as a count of worker processes (``-1``: one per CPU core)."""
    import os

    if n_jobs == -1 and not isinstance(n_jobs, bool):
        return os.cpu_count() or 1
    return check_positive_int(n_jobs, "n_jobs", context=" (runs trained at once; -1 for "
                              "one per CPU core)")


def _call_job(job: _SweepJob, threads: int) -> tuple[list[dict], Any]:
    torch.set_num_threads(threads)
    return job()


def _run_jobs(jobs: list[_SweepJob], n_jobs: int, progress: bool
              ) -> dict[tuple[str, int, int], tuple[list[dict], Any]]:
    """``{key: (rows, spectra)}`` of every job, in this process (``n_jobs == 1``) or in
    ``n_jobs`` spawned worker processes, with a progress bar over finished runs."""
    import concurrent.futures as cf
    import multiprocessing

    bar = tqdm(total=len(jobs), disable=not progress, desc="width sweep", unit="model",
               dynamic_ncols=True)
    done: dict[tuple[str, int, int], tuple[list[dict], Any]] = {}
    with bar:
        if n_jobs == 1 or len(jobs) == 1:
            for job in jobs:
                bar.set_postfix(run=_run_key(*job.key, job.untrained))
                done[job.key] = job()
                bar.update()
            return done
        threads = max(1, torch.get_num_threads() // n_jobs)
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(min(n_jobs, len(jobs)), mp_context=ctx) as pool:
            futures = {pool.submit(_call_job, job, threads): job for job in jobs}
            for future in cf.as_completed(futures):
                job = futures[future]
                done[job.key] = future.result()
                bar.set_postfix(run=_run_key(*job.key, job.untrained))
                bar.update()
    return done


__all__ = ["DEFAULT_N_OVER_D", "FIT_METRICS", "MIN_SEEDS_FOR_WEIGHTS", "SWEEP_METRICS",
           "WidthSweepResult", "width_sweep"]
