"""Causal subspace ablations with nnsight: is the capacity a spectrum shows actually used?

Project an FFN point's activations onto (``keep``) or away from (``remove``) its dominant
(``top``), weakest (``tail``) or a random eigen-subspace, by assigning the projected value to
the point inside an nnsight trace, and measure what the model loses on held-out text
(see the glossary): ``delta_loss`` (next-token cross-entropy, ablated − clean, nats), ``kl``
(KL(clean ‖ ablated) of next-token distributions, nats per token) and ``top1_agreement`` for
causal LMs; ``cosine`` (per token) and ``embedding_cosine`` (mean-pooled) of the final hidden
states for encoders.

Many ablations of one batch run in one forward pass: the batch is repeated once per
ablation ("copies") and each copy gets its own projection.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ._progress import tqdm
from ._validation import check_positive_int, check_seeds
from ._warnings import user_stacklevel
from .capture import iter_batches, model_label, token_hash
from .capture.collect import input_limits
from .capture.source import PREFIX_TOKENS, sequence_fingerprints
from .errors import CaptureError, ResultsFileError, SiteError
from .projection import SUBSPACES, Projection, effective_rank_count, energy_k, make_projection
from .sites import POINTS, as_nnsight, find_ffn_sites, parse_site, resolve_layer, select_sites

#: Effect metrics in ``AblationResult.table`` for causal LMs and for encoders.
LM_METRICS = ("delta_loss", "kl", "top1_agreement")
ENCODER_METRICS = ("cosine", "embedding_cosine")


class HeldOutWarning(UserWarning):
    """The evaluation text looks like the text the spectra were captured on."""


@dataclass(frozen=True)
class Ablation:
    """One ablation: a subspace of one or several sites, kept or removed.

    ``layers`` may hold several layers: they are ablated together in one forward pass.
    """

    layers: tuple[int, ...]
    point: str = "post"
    subspace: str | slice = "top"
    k: int = 1
    mode: str = "keep"
    seed: int = 0
    center: bool = True

    @property
    def subspace_name(self) -> str:
        s = self.subspace
        return f"slice[{s.start}:{s.stop}]" if isinstance(s, slice) else str(s)


@dataclass
class _Stats:
    """Per-sequence sums of each metric, and token counts, for one ablation."""

    sums: dict[str, list[float]] = field(default_factory=dict)
    counts: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, sums: torch.Tensor, counts: torch.Tensor) -> None:
        self.sums.setdefault(name, []).extend(sums.double().tolist())
        self.counts.setdefault(name, []).extend(counts.double().tolist())


def _task(root: torch.nn.Module) -> str:
    cfg = getattr(root, "config", None)
    archs = " ".join(getattr(cfg, "architectures", None) or []) + type(root).__name__
    if "CausalLM" in archs or "LMHeadModel" in archs or getattr(cfg, "is_decoder", False):
        return "causal-lm"
    return "encoder"


# --------------------------------------------------------------- interventions
def _set_value(wrapper: Any, path: str, value: torch.Tensor) -> None:
    module_path, _, io = path.rpartition(".")
    setattr(wrapper.get(module_path), io, value)


def _block_path(site_path: str, layer: int) -> str:
    """``model.layers.5.mlp.act_fn.input`` -> ``model.layers.5`` (the block of the site)."""
    head, sep, _ = site_path.partition(f".{layer}.")
    if not sep:
        raise SiteError(f"cannot find the block of layer {layer} in {site_path!r}.")
    return f"{head}.{layer}"


def _run_copies(wrapper: Any, inputs: dict, copies: list[dict[str, Projection]],
                order: list[str], *, skip: tuple[list[str], torch.Tensor] | None = None,
                save_blocks: Sequence[str] = ()) -> tuple[Any, dict]:
    """One forward of ``len(copies)`` stacked copies of ``inputs``; copy c gets its
    projections (path -> Projection) applied in forward order.

    ``skip = (block_paths, residual)``: those blocks are not run and output ``residual``
    (the clean residual stream after the last of them, repeated per copy); the blocks before
    the first ablated site compute exactly the clean run, so this only saves time.
    ``save_blocks``: block outputs to return (clean run). Returns (model output, saved).
    """
    c = len(copies)
    stacked = {k: v.repeat(c, *([1] * (v.ndim - 1))) for k, v in inputs.items()}
    saved = {}
    with torch.no_grad(), wrapper.trace(**stacked):
        if skip is not None:
            residual = skip[1].repeat(c, *([1] * (skip[1].ndim - 1)))
            for block in skip[0]:
                wrapper.get(block).skip(residual)
        for block in save_blocks:
            saved[block] = wrapper.get(block).output
        for path in order:
            x = wrapper.get(path)
            parts = list(x.chunk(c, dim=0))
            for i, projs in enumerate(copies):
                proj = projs.get(path)
                if proj is not None:
                    if x.shape[-1] != proj.basis.shape[0]:
                        raise SiteError(
                            f"{path}: activations have width {x.shape[-1]} but the spectrum "
                            f"has D = {proj.basis.shape[0]}; the spectra come from another "
                            "model or width."
                        )
                    parts[i] = proj(parts[i])
            _set_value(wrapper, path, torch.cat(parts, dim=0))
        out = wrapper.output.save()
    return out, saved


class _LMReference:
    """The clean run's next-token distributions at the real positions of one batch,
    computed once and compared with every ablated copy."""

    def __init__(self, clean_logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
        valid = mask[:, 1:] & mask[:, :-1]  # predict token t+1 from position t
        self.rows = valid.nonzero()  # (n, 2): sequence, position
        self.seq = self.rows[:, 0]
        self.n_seq = ids.shape[0]
        self.labels = ids[:, 1:][valid]
        self.lp = torch.log_softmax(clean_logits[:, :-1][valid].float(), dim=-1)
        self.ce = -self.lp.gather(-1, self.labels[:, None]).squeeze(-1)
        self.top1 = self.lp.argmax(-1)
        self.p = self.lp.exp()

    def per_sequence(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sums = torch.zeros(self.n_seq, dtype=torch.float64, device=values.device)
        sums.index_add_(0, self.seq, values.double())
        counts = torch.zeros_like(sums).index_add_(0, self.seq, torch.ones_like(sums[self.seq]))
        return sums, counts

    def effects(self, abl_logits: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-sequence sums and counts of delta_loss, kl and top1_agreement (and the clean
        loss, for the metadata)."""
        valid_logits = abl_logits[:, :-1][self.rows[:, 0], self.rows[:, 1]]
        lp_a = torch.log_softmax(valid_logits.float(), dim=-1)
        ce_a = -lp_a.gather(-1, self.labels[:, None]).squeeze(-1)
        kl = (self.p * (self.lp - lp_a)).sum(-1)
        agree = (lp_a.argmax(-1) == self.top1).float()
        return {"delta_loss": self.per_sequence(ce_a - self.ce),
                "kl": self.per_sequence(kl),
                "top1_agreement": self.per_sequence(agree),
                "clean_loss": self.per_sequence(self.ce)}


def _encoder_effects(clean: torch.Tensor, abl: torch.Tensor, mask: torch.Tensor
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    m = mask.float()
    cos = torch.nn.functional.cosine_similarity(clean.float(), abl.float(), dim=-1)
    pool = lambda h: (h.float() * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)  # noqa: E731
    emb = torch.nn.functional.cosine_similarity(pool(clean), pool(abl), dim=-1)
    return {"cosine": ((cos * m).sum(1), m.sum(1)),
            "embedding_cosine": (emb, torch.ones_like(emb))}


def _hidden(out: Any) -> torch.Tensor:
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, torch.Tensor):
        return out
    raise CaptureError(f"cannot read final hidden states from a {type(out).__name__} output.")


# ------------------------------------------------------------------ confidence
def _ratio_ci(sums: np.ndarray, counts: np.ndarray, *, n_boot: int, rng: np.random.Generator
              ) -> tuple[float, float, float]:
    """Value and 95% percentile bootstrap interval of ``Σ sums / Σ counts``.

    ``sums`` has shape (n_seeds, n_sequences); sequences (and seeds, when > 1) are resampled.
    """
    value = float(np.mean(sums.sum(1) / counts.sum()))
    n_seeds, n_seq = sums.shape
    if n_seq < 2:
        return value, math.nan, math.nan
    qi = rng.integers(0, n_seq, size=(n_boot, n_seq))
    si = rng.integers(0, n_seeds, size=(n_boot, n_seeds)) if n_seeds > 1 else \
        np.zeros((n_boot, 1), dtype=int)
    per_seed = sums[:, qi].sum(-1) / counts[qi].sum(-1)  # (n_seeds, n_boot)
    boot = np.take_along_axis(per_seed.T, si, axis=1).mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return value, float(lo), float(hi)


# ------------------------------------------------------------------ results
class AblationResult:
    """Effects of subspace ablations, tidy (one row per observation).

    Attributes
    ----------
    table : DataFrame
        ``model, layer, point, subspace, mode, k, variance_fraction, metric, value, ci_low,
        ci_high`` (``layer`` is a comma-joined string when several layers were ablated
        together). ``clean_loss`` rows hold the clean run's loss.
    metadata : dict
        Model, evaluation tokens and sequences, data hash, spectra source, held-out check,
        ``clean_loss`` (value, ci_low, ci_high) of causal LMs.
    """

    def __init__(self, table: pd.DataFrame, metadata: dict):
        self.table = table
        self.metadata = metadata

    def summary(self, thresholds: Sequence[float] = (0.9, 0.99)) -> pd.DataFrame:
        """Per layer: the smallest kept top-k that recovers 90% / 99% of clean loss.

        ``recovered(k) = 1 − delta_loss(keep top k) / delta_loss(mean ablation)``, with mean
        ablation = keep 0 = remove all (both are in a sweep). Next to it the spectrum's
        ``participation_ratio`` and ``soft_rank`` (kept in the metadata) — the test of
        whether the capacity the spectrum shows is used.
        """
        t = self.table
        rows = []
        for (layer, point), g in t[t["metric"] == "delta_loss"].groupby(["layer", "point"]):
            keep = g[(g["subspace"] == "top") & (g["mode"] == "keep")].sort_values("k")
            base = g[((g["subspace"] == "top") & (g["mode"] == "keep") & (g["k"] == 0))
                     | ((g["subspace"] == "top") & (g["mode"] == "remove")
                        & (g["k"] == g["dim"]))]
            if keep.empty or base.empty:
                continue
            loss_mean = float(base["value"].iloc[0])
            rec = 1.0 - keep["value"].to_numpy() / loss_mean if loss_mean > 0 else \
                np.ones(len(keep))
            row = {"model": self.metadata.get("model"), "layer": layer, "point": point,
                   "dim": int(g["dim"].iloc[0]), "mean_ablation_delta_loss": loss_mean}
            for thr in thresholds:
                ok = np.nonzero(rec >= thr)[0]
                k = int(keep["k"].iloc[ok[0]]) if ok.size else math.nan
                row[f"k{round(thr * 100)}"] = k
                row[f"variance_fraction_k{round(thr * 100)}"] = (
                    float(keep["variance_fraction"].iloc[ok[0]]) if ok.size else math.nan)
            spec_metrics = self.metadata.get("spectrum_metrics", {}).get(f"{layer}/{point}")
            if spec_metrics:
                row.update(spec_metrics)
            rows.append(row)
        return pd.DataFrame(rows)

    def to_csv(self, path: Any) -> None:
        """Write the tidy table (the figures can be redrawn from it)."""
        self.table.to_csv(path, index=False)

    def save(self, path: Any) -> Path:
        """Write ``<path>.csv`` (the table) and ``<path>.json`` (the metadata); no pickle."""
        base = Path(path).with_suffix("")
        base.parent.mkdir(parents=True, exist_ok=True)
        self.table.to_csv(base.with_suffix(".csv"), index=False)
        base.with_suffix(".json").write_text(json.dumps(
            {"format": "nerve_interp.ablation", "metadata": self.metadata}, indent=1,
            default=str))
        return base.with_suffix(".csv")

    @classmethod
    def load(cls, path: Any) -> AblationResult:
        """Read what :meth:`save` wrote (give either file or the common stem)."""
        base = Path(path).with_suffix("")
        try:
            meta = json.loads(base.with_suffix(".json").read_text())
            table = pd.read_csv(base.with_suffix(".csv"))
        except (OSError, ValueError) as err:
            raise ResultsFileError(
                f"cannot read ablation results at {base}.csv/.json ({type(err).__name__}: "
                f"{err}); write them with AblationResult.save()."
            ) from None
        if meta.get("format") != "nerve_interp.ablation":
            raise ResultsFileError(f"{base}.json is not a nerve_interp ablation file.")
        return cls(table, meta["metadata"])

    def __repr__(self) -> str:
        n = self.table.groupby(["layer", "point", "subspace", "mode", "k"]).ngroups
        return (f"AblationResult(model={self.metadata.get('model')!r}, ablations={n}, "
                f"eval_tokens={self.metadata.get('eval_tokens')})")


# ------------------------------------------------------------------ public API
def _projections(spectra: Any, sites_by_layer: dict, ab: Ablation) -> tuple[dict, float]:
    projs, fracs = {}, []
    for layer in ab.layers:
        spec = spectra.spectrum(layer, ab.point)
        ctx = f" at {spec.name}, D = {spec.dim}"
        proj, frac = make_projection(spec.eigenvalues, spec.require_eigenvectors(), spec.mean,
                                     subspace=ab.subspace, k=ab.k, mode=ab.mode,
                                     center=ab.center, seed=ab.seed, context=ctx)
        projs[sites_by_layer[layer].path(ab.point)] = proj
        fracs.append(frac)
    return projs, float(np.mean(fracs))


@dataclass(frozen=True)
class AblationOptions:
    """How :func:`run_ablations` evaluates; each field is also a keyword of
    :func:`run_ablations`, :func:`ablate` and :func:`ablation_sweep`.

    Attributes
    ----------
    batch_size, max_length : int
        Tokenization of the evaluation texts (as in ``collect_spectra``).
    max_batches : int, optional
        Evaluate on the first ``max_batches`` batches only.
    copies : int, optional
        Ablations run together in one forward pass (the batch repeated once per ablation);
        default: as many as fit ~2 GB of logits, at most 16. Results do not depend on it.
    n_boot : int
        Bootstrap resamples of the 95% intervals.
    progress : bool
        Show a progress bar.
    data_label : str
        A name for the evaluation data, kept in the metadata.
    skip_clean_prefix : bool
        Do not recompute the blocks before the first ablated layer: nnsight's ``skip`` feeds
        them the clean residual stream saved from the clean run (same result, less time).
    """

    batch_size: int = 8
    max_length: int = 128
    max_batches: int | None = None
    copies: int | None = None
    n_boot: int = 1000
    progress: bool = True
    data_label: str = ""
    skip_clean_prefix: bool = True

    def __post_init__(self) -> None:
        if self.copies is not None:
            check_positive_int(self.copies, "copies", context=" (ablations per forward pass)")
        check_positive_int(self.n_boot, "n_boot", context=" (bootstrap resamples)")

    @classmethod
    def from_keywords(cls, options: AblationOptions | None, keywords: dict) -> AblationOptions:
        """``options`` (or the defaults) with ``keywords`` replacing its fields."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(keywords) - set(names))
        if unknown:
            raise TypeError(f"run_ablations() got unexpected keyword argument(s) {unknown}; "
                            f"its options are {names}.")
        return replace(options or cls(), **keywords)


@dataclass(frozen=True)
class _Target:
    """The model under ablation: nnsight wrapper, its FFN sites, task and device."""

    wrapper: Any
    label: str
    sites: list
    task: str
    device: torch.device

    @property
    def root(self) -> torch.nn.Module:
        return self.wrapper._module


def _target(model: Any, spectra: Any, ablations: Sequence[Ablation]) -> _Target:
    """Wrap ``model`` and check that the spectra and every ablation fit it."""
    wrapper = as_nnsight(model)
    root = wrapper._module
    label = model_label(root)
    if spectra.metadata.get("model") not in (None, label):
        raise SiteError(f"the spectra were captured on {spectra.metadata.get('model')!r}, not "
                        f"on {label!r}; capture spectra of this model first.")
    sites = find_ffn_sites(wrapper)
    for ab in ablations:
        if ab.point not in POINTS:
            raise SiteError(f"unknown point {ab.point!r}; use one of {', '.join(POINTS)}.")
        for layer in ab.layers:
            select_sites(sites, [layer])
    return _Target(wrapper, label, sites, _task(root), next(root.parameters()).device)


@dataclass(frozen=True)
class _EvalSet:
    """The evaluation batches, their token hash and whether they differ from the spectra's."""

    batches: list[dict]
    sha1: str
    held_out: bool


def _eval_set(batches: Any, tokenizer: Any, spectra: Any, opts: AblationOptions,
              target: _Target) -> _EvalSet:
    batch_list = list(iter_batches(batches, tokenizer, batch_size=opts.batch_size,
                                   max_length=opts.max_length))
    if opts.max_batches is not None:
        batch_list = batch_list[:opts.max_batches]
    if not batch_list:
        raise CaptureError("no evaluation batches: pass held-out texts or batches.")
    limits = input_limits(target.root, tokenizer)
    for i, b in enumerate(batch_list):
        limits.check(b, f"evaluation batch {i}")
    sha1 = token_hash(batch_list)
    held_out = _check_held_out(batch_list, sha1, spectra)
    return _EvalSet(batch_list, sha1, held_out)


def _check_held_out(batch_list: list[dict], sha1: str, spectra: Any) -> bool:
    """Whether no evaluation sequence is a document the spectra were captured on (by the
    fingerprint of its first 64 tokens,
    :func:`~nerve_interp.capture.source.sequence_fingerprints`;
    spectra without fingerprints: the whole token hash); warns when some are."""
    captured = spectra.metadata.get("document_hashes")
    if captured is None:
        shared, n = (batch_list and sha1 == spectra.metadata.get("data_sha1")), 1
        what = "the evaluation tokens are exactly the tokens the spectra were captured on"
    else:
        prints = [f[-1] for b in batch_list for f in sequence_fingerprints(b)]  # longest
        captured = set(captured)
        shared, n = sum(f in captured for f in prints), len(prints)
        what = (f"{shared} of {n} evaluation sequences start like sequences the spectra were "
                f"captured on (the same first {PREFIX_TOKENS[-1]} tokens, first "
                f"{PREFIX_TOKENS[0]} of shorter ones: the same documents)")
    if shared:
        warnings.warn(f"{what}; effects measured on the same text overstate how general they "
                      "are. Evaluate on held-out text (e.g. load_corpus(split='heldout')).",
                      HeldOutWarning, stacklevel=user_stacklevel())
    return not shared


def _resolve(spectra: Any, target: _Target, ablations: Sequence[Ablation]) -> list[tuple]:
    """Per ablation: ({site path: Projection on the model's device}, variance fraction).

    Projections are built once (CPU, float64) and moved to the model's device."""
    by_layer = {s.layer: s for s in target.sites}
    resolved = []
    for ab in ablations:
        projs, frac = _projections(spectra, by_layer, ab)
        resolved.append(({p: pr.to(target.device) for p, pr in projs.items()}, frac))
    return resolved


def _default_copies(target: _Target, batch: dict) -> int:
    """As many copies as fit ~2 GB of float32 logits (x3 for the softmaxes), 1 to 16."""
    vocab = getattr(getattr(target.root, "config", None), "vocab_size", 1024) or 1024
    per_copy = batch["input_ids"].numel() * (vocab if target.task == "causal-lm" else 1024) * 4 * 3
    return int(max(1, min(16, 2e9 // max(per_copy, 1))))


@dataclass(frozen=True)
class _Plan:
    """Which ablations share a forward pass, and which clean blocks each pass can skip."""

    copies: int
    order: list[str]  # every site path, in forward order
    blocks: list[str]  # block path of each layer
    first_layer: dict[int, int]  # group start -> first ablated layer of the group
    save_blocks: list[str]  # clean block outputs to keep for skipping

    @property
    def starts(self) -> list[int]:
        """Index of the first ablation of each group."""
        return list(self.first_layer)

    def skip(self, start: int, residuals: dict) -> tuple[list[str], torch.Tensor] | None:
        """The blocks before the group's first ablated layer and the clean residual after
        them, from the clean run's saved ``residuals``; None when there is nothing to skip
        (the group starts at layer 0, or ``skip_clean_prefix`` is off and nothing was saved).
        """
        first = self.first_layer[start]
        residual = residuals.get(self.blocks[first - 1]) if first > 0 else None
        return (self.blocks[:first], residual) if isinstance(residual, torch.Tensor) else None


def _plan(target: _Target, ablations: Sequence[Ablation], first_batch: dict,
          opts: AblationOptions) -> _Plan:
    copies = opts.copies if opts.copies is not None else _default_copies(target, first_batch)
    sites = target.sites
    order = [s.path(p) for s in sites for p in POINTS if p in s.paths]
    blocks = [_block_path(s.paths["pre"], s.layer) for s in sites]
    first_layer = {start: min(lay for ab in ablations[start:start + copies] for lay in ab.layers)
                   for start in range(0, len(ablations), copies)}
    save_blocks = sorted({blocks[f - 1] for f in first_layer.values() if f > 0},
                         key=blocks.index) if opts.skip_clean_prefix else []
    return _Plan(copies, order, blocks, first_layer, save_blocks)


def _copy_effects(ref: _LMReference | None, clean: Any, out: Any, mask: torch.Tensor,
                  n: int, j: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Effects of copy ``j`` of ``n`` in the ablated output ``out``."""
    if ref is not None:
        return ref.effects(out.logits.chunk(n, dim=0)[j])
    return _encoder_effects(_hidden(clean), _hidden(out).chunk(n, dim=0)[j], mask)


@dataclass
class _Tally:
    """What the evaluation accumulates: per-ablation stats, the clean loss, tokens seen."""

    stats: list[_Stats]
    clean: _Stats = field(default_factory=_Stats)
    n_tokens: int = 0

    def add(self, start: int, j: int, effects: dict) -> None:
        for name, (s, n) in effects.items():
            if name != "clean_loss":
                self.stats[start + j].add(name, s, n)
            elif start == 0 and j == 0:  # the clean loss once per batch
                self.clean.add(name, s, n)


def _run_batch(target: _Target, plan: _Plan, resolved: list[tuple], batch: dict,
               tally: _Tally, bar: Any) -> None:
    """One clean forward of ``batch``, then one forward per group of ``plan.copies``."""
    inputs = {k: v.to(target.device) for k, v in batch.items()}
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    tally.n_tokens += int(mask.sum())
    clean, residuals = _run_copies(target.wrapper, inputs, [{}], [],
                                   save_blocks=plan.save_blocks)
    ref = (_LMReference(clean.logits, inputs["input_ids"], mask)
           if target.task == "causal-lm" else None)
    bar.update(1)
    for start in plan.starts:
        group = resolved[start:start + plan.copies]
        paths = {p for projs, _ in group for p in projs}
        out, _ = _run_copies(target.wrapper, inputs, [projs for projs, _ in group],
                             [p for p in plan.order if p in paths],
                             skip=plan.skip(start, residuals))
        for j in range(len(group)):
            tally.add(start, j, _copy_effects(ref, clean, out, mask, len(group), j))
        bar.update(1)


def _evaluate(target: _Target, plan: _Plan, resolved: list[tuple], eval_set: _EvalSet,
              opts: AblationOptions) -> _Tally:
    tally = _Tally([_Stats() for _ in resolved])
    n_runs = len(eval_set.batches) * (1 + math.ceil(len(resolved) / plan.copies))
    bar = tqdm(total=n_runs, disable=not opts.progress, unit="fwd",
               desc=f"ablations {target.label}", dynamic_ncols=True)
    try:
        for batch in eval_set.batches:
            _run_batch(target, plan, resolved, batch, tally, bar)
    finally:
        bar.close()
    return tally


def _metadata(target: _Target, spectra: Any, ablations: Sequence[Ablation], eval_set: _EvalSet,
              tally: _Tally, plan: _Plan, opts: AblationOptions) -> dict:
    clean_loss = None
    if tally.clean.sums:
        clean_loss = _ratio_ci(np.array([tally.clean.sums["clean_loss"]]),
                               np.array(tally.clean.counts["clean_loss"]), n_boot=opts.n_boot,
                               rng=np.random.default_rng(0))
    return {
        "clean_loss": clean_loss,
        "model": target.label, "task": target.task, "eval_tokens": tally.n_tokens,
        "eval_sequences": sum(int(b["input_ids"].shape[0]) for b in eval_set.batches),
        "eval_data": opts.data_label, "eval_sha1": eval_set.sha1,
        "spectra_data": spectra.metadata.get("data", ""),
        "spectra_tokens": spectra.metadata.get("n_tokens"), "held_out": eval_set.held_out,
        # which tokens the spectra (and so the eigen-subspaces) were measured on
        "spectra_exclusion": spectra.metadata.get("exclusion"),
        "copies_per_forward": plan.copies,
        "spectrum_metrics": {
            f"{layer}/{point}": {k: v for k, v in spectra.spectrum(layer, point).metrics().items()
                                 if k in ("participation_ratio", "soft_rank")}
            for layer, point in {(lay, ab.point) for ab in ablations for lay in ab.layers}},
    }


def run_ablations(
    model: Any,
    spectra: Any,
    batches: Any,
    ablations: Sequence[Ablation],
    *,
    tokenizer: Any = None,
    options: AblationOptions | None = None,
    **keywords: Any,
) -> AblationResult:
    """Run many ablations over the same evaluation batches (the engine behind
    :func:`ablate` and :func:`ablation_sweep`).

    Each batch is run once clean and then once per group of ``copies`` ablations (the batch
    repeated once per ablation). Random subspaces with several seeds are aggregated into one
    row with a confidence interval over seeds and sequences. With ``skip_clean_prefix`` the
    blocks before the first ablated layer are not recomputed: nnsight's ``skip`` feeds them
    the clean residual stream saved from the clean run (same result, less time).

    Parameters
    ----------
    options : AblationOptions, optional
        How to evaluate; ``keywords`` (``batch_size``, ``max_length``, ``max_batches``,
        ``copies``, ``n_boot``, ``progress``, ``data_label``, ``skip_clean_prefix``) replace
        its fields.
    """
    opts = AblationOptions.from_keywords(options, keywords)
    target = _target(model, spectra, ablations)
    eval_set = _eval_set(batches, tokenizer, spectra, opts, target)
    resolved = _resolve(spectra, target, ablations)
    plan = _plan(target, ablations, eval_set.batches[0], opts)
    tally = _evaluate(target, plan, resolved, eval_set, opts)
    table = _tabulate(target.label, ablations, resolved, tally.stats, spectra, opts.n_boot)
    return AblationResult(table, _metadata(target, spectra, ablations, eval_set, tally, plan,
                                           opts))


def _tabulate(label, ablations, resolved, stats, spectra, n_boot) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    groups: dict[tuple, list[int]] = {}
    for i, ab in enumerate(ablations):
        key = (ab.layers, ab.point, ab.subspace_name, ab.mode, ab.k, ab.center)
        groups.setdefault(key, []).append(i)
    rows = []
    for (layers, point, subspace, mode, k, _center), idx in groups.items():
        layer = layers[0] if len(layers) == 1 else ",".join(map(str, layers))
        dim = spectra.spectrum(layers[0], point).dim
        frac = float(np.mean([resolved[i][1] for i in idx]))
        n_dir = float(np.mean([next(iter(resolved[i][0].values())).basis.shape[1]
                               for i in idx]))
        for name in stats[idx[0]].sums:
            sums = np.array([stats[i].sums[name] for i in idx])
            counts = np.array(stats[idx[0]].counts[name])
            value, lo, hi = _ratio_ci(sums, counts, n_boot=n_boot, rng=rng)
            rows.append((label, layer, point, subspace, mode, k, dim, frac, name, value, lo, hi,
                         len(idx), n_dir))
    return pd.DataFrame(rows, columns=["model", "layer", "point", "subspace", "mode", "k", "dim",
                                       "variance_fraction", "metric", "value", "ci_low",
                                       "ci_high", "n_seeds", "n_directions"])


def ablate(
    model: Any,
    spectra: Any,
    batches: Any,
    *,
    layers: int | Iterable[int],
    point: str = "post",
    subspace: str | slice = "top",
    k: int | None = None,
    mode: str = "keep",
    center: bool = True,
    seed: int = 0,
    energy: float | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> AblationResult:
    """Ablate one subspace at one or several layers at once and measure the effect.

    Parameters
    ----------
    model : torch.nn.Module or nnsight wrapper
    spectra : SpectraResult
        Captured with ``eigenvectors=True`` on *other* text than ``batches``.
    batches : list of str, or batches as for collect_spectra
        Held-out evaluation text (strings need ``tokenizer``).
    layers : int or iterable of int
        Sites ablated together (negative counts from the end).
    point : {"post", "pre", "act", "up"}
        Ablating ``pre`` lets the nonlinearity act on the projected input (the reinjection
        test); ``post`` removes the subspace from what the down-projection reads.
    subspace : {"top", "tail", "random", "random_matched"} or slice
        ``random_matched`` is the variance-matched control: random orthonormal directions,
        as many as it takes to hold the variance fraction of the top-k
        (:func:`nerve_interp.projection.matched_random_basis`); the table's ``k`` is that
        top-k and ``n_directions`` the count of random directions.
    k : int
        Subspace size (0 <= k <= D; tail: <= number of directions with variance;
        ``random_matched``: the top-k whose variance is matched).
    energy : float, optional
        Instead of ``k``: the smallest k whose top (or tail) eigenvalues hold this share of
        the variance (energy matching; with several layers, the first layer's k is used).
        For ``random`` subspaces the top-k energy match sets k.
    mode : {"keep", "remove"}
    center : bool, default True
        Mean-preserving projection (x ↦ μ + P(x − μ)); False drops μ.
    seed : int
        Seed of the random subspace.
    **kwargs
        Passed to :func:`run_ablations`: ``options=AblationOptions(...)`` or its fields
        (``batch_size``, ``max_length``, ``progress``, ...).

    Returns
    -------
    AblationResult
    """
    _check_spectra(spectra, point)
    n = len(find_ffn_sites(as_nnsight(model)))
    idx = [layers] if isinstance(layers, int) else list(layers)
    if not idx:
        raise ValueError("layers is empty; pass the layer(s) to ablate together, e.g. "
                         f"layers=[{spectra.layers[0]}].")
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"layers must be ints (negative counts from the end), e.g. [0, -1]; "
                            f"got {type(i).__name__} {i!r} in {layers!r}.")
    resolved = tuple(sorted({resolve_layer(int(i), n) for i in idx}))
    if (k is None) == (energy is None):
        raise ValueError("pass exactly one of k= (subspace size) and energy= (share of variance).")
    if energy is not None:
        which = "tail" if subspace == "tail" else "top"
        k = energy_k(spectra.eigenvalues(resolved[0], point), energy, which)
    ab = Ablation(resolved, point, subspace, k, mode, seed, center)
    return run_ablations(model, spectra, batches, [ab], tokenizer=tokenizer, **kwargs)


def default_ks(d: int, n: int = 8) -> list[int]:
    """A log grid of ``n`` subspace sizes from 1 to D (D included).

    >>> default_ks(1536)
    [1, 3, 8, 23, 66, 189, 539, 1536]
    """
    return sorted({int(round(v)) for v in np.geomspace(1, d, n)})


def _sweep_seeds(seeds: Any) -> tuple[int, ...]:
    """``ablation_sweep``'s seeds as a tuple; an int ``n`` (the old count) is ``range(n)``
    with a DeprecationWarning, and 0 or an empty sequence is refused."""
    context = (" (one random subspace per seed and size: the control that top / tail "
               "effects are compared with)")
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds={seeds} would run no random subspaces, silently dropping "
                             "the control that top / tail effects are compared with; pass a "
                             "sequence of seeds, e.g. seeds=(0, 1, 2).")
        warnings.warn(f"ablation_sweep(seeds={seeds}) as a count is deprecated: seeds is a "
                      f"sequence of seeds everywhere (as in width_sweep); use "
                      f"seeds=range({seeds}), the same seeds.", DeprecationWarning,
                      stacklevel=user_stacklevel())
        seeds = range(int(seeds))
    return check_seeds(seeds, context=context)


def _choices(values: Any, allowed: tuple[str, ...], name: str) -> tuple[str, ...]:
    given = (values,) if isinstance(values, str) else tuple(values)
    bad = [v for v in given if v not in allowed]
    if bad or not given:
        raise ValueError(f"{name}={values!r}: " + (f"unknown {bad}; " if bad else "empty; ")
                         + f"pass some of {allowed}, e.g. {name}={allowed}.")
    return given


def check_sweep_options(*, point: str = "post", ks: Sequence[int] | None = None,
                        subspaces: Sequence[str] = ("top", "tail", "random"),
                        modes: Sequence[str] = ("keep", "remove"),
                        seeds: Any = (0, 1, 2)) -> tuple[int, ...]:
    """Refuse arguments of :func:`ablation_sweep` that would fail or silently do nothing
    (the CLI calls it before loading a model): an unknown point, subspace or mode, an empty
    ``subspaces`` / ``modes`` / ``ks``, a size that is not an int >= 0, no seed. Returns
    the seeds of the random subspaces (none without ``"random"`` / ``"random_matched"``)."""
    _choices(point, POINTS, "point")
    _choices(subspaces, SUBSPACES, "subspaces")
    _choices(modes, ("keep", "remove"), "modes")
    if ks is not None:
        if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
            raise TypeError(f"ks must be a sequence of subspace sizes, e.g. ks=[1, 8, 64]; "
                            f"got {type(ks).__name__} {ks!r}.")
        if not list(ks):
            raise ValueError("ks is empty: no subspace size to ablate; pass sizes, e.g. "
                             "ks=[1, 8, 64], or ks=None for a log grid up to D.")
        for k in ks:
            check_positive_int(k, "ks", minimum=0, context=f" in ks={list(ks)!r} (subspace "
                               "sizes, 0 <= k <= D)")
    return _sweep_seeds(seeds) if any(s.startswith("random") for s in subspaces) else ()


def _check_spectra(spectra: Any, point: str) -> None:
    """``spectra`` is a SpectraResult with eigenvectors at ``point``."""
    from .results import SpectraResult

    if not isinstance(spectra, SpectraResult):
        raise TypeError(f"spectra must be a SpectraResult (from collect_spectra(..., "
                        f"eigenvectors=True) or SpectraResult.load); got "
                        f"{type(spectra).__name__} {spectra!r:.60}.")
    if point not in spectra.points:
        raise SiteError(f"the spectra hold points {spectra.points}, not {point!r}; capture "
                        f"them with points=({point!r},) or ablate one of those.")


def ablation_sweep(
    model: Any,
    spectra: Any,
    batches: Any,
    *,
    layers: Iterable[int] | None = None,
    point: str = "post",
    ks: Sequence[int] | None = None,
    subspaces: Sequence[str] = ("top", "tail", "random"),
    modes: Sequence[str] = ("keep", "remove"),
    seeds: Sequence[int] = (0, 1, 2),
    center: bool = True,
    tokenizer: Any = None,
    **kwargs: Any,
) -> AblationResult:
    """Effect of ablating top / tail / random subspaces of growing size, layer by layer.

    Every layer is ablated on its own. ``ks`` defaults to :func:`default_ks` of the point's
    width; tail sizes are capped at the number of directions with variance; ``top``/``keep``
    always includes k = 0 (mean ablation), the baseline of :meth:`AblationResult.summary`.
    Random subspaces are drawn once per seed in ``seeds`` (a sequence of ints, as in
    :func:`nerve_interp.sweeps.width_sweep`; at least one, since the random subspaces are the
    control for top / tail). An int ``n`` still means ``range(n)``, with a
    DeprecationWarning.

    Add ``"random_matched"`` to ``subspaces`` for the variance-matched control (as many
    random directions as hold the top-k's variance fraction, one draw per seed): compare
    top-k with it at the same ``k``, i.e. at the same variance fraction.

    Returns
    -------
    AblationResult
        ``.table`` with columns ``layer, point, subspace, mode, k, variance_fraction, metric,
        value, ci_low, ci_high, n_seeds, n_directions``; ``.summary()``; plot with
        ``plotting.plot_ablation``.
    """
    seeds = check_sweep_options(point=point, ks=ks, subspaces=subspaces, modes=modes,
                                seeds=seeds)
    _check_spectra(spectra, point)
    layers = spectra.layers if layers is None else list(layers)
    if not layers:
        raise ValueError(f"layers is empty; pass layers to ablate, e.g. "
                         f"layers=[{spectra.layers[0]}] (or None: every layer of the spectra).")
    ablations = []
    for layer in layers:
        spec = spectra.spectrum(layer, point)
        grid = list(ks) if ks is not None else default_ks(spec.dim)
        rank = effective_rank_count(spec.eigenvalues)
        for subspace in subspaces:
            sizes = sorted({min(k, rank) if subspace == "tail" else k for k in grid})
            if subspace == "top":
                sizes = sorted({0, *sizes})
            for mode in modes:
                for k in sizes:
                    for seed in seeds if subspace.startswith("random") else (0,):
                        ablations.append(Ablation((parse_site(spec.name)[0],), point,
                                                  subspace, k, mode, seed, center))
    return run_ablations(model, spectra, batches, ablations, tokenizer=tokenizer, **kwargs)


__all__ = ["ENCODER_METRICS", "LM_METRICS", "Ablation", "AblationOptions", "AblationResult",
           "HeldOutWarning", "ablate", "ablation_sweep", "check_sweep_options", "default_ks",
           "run_ablations"]
