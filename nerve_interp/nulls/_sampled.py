"""Spectra of samples drawn from a null model, at the N of a measured result.

A null is compared with a measurement only at the same number of tokens N: every metric is
biased at finite N (:mod:`nerve_interp.marchenko_pastur`), so the null is *what the same
estimator gives on N samples of the null model*. The rows stream through the same
accumulators as a capture (:class:`~nerve_interp.groups.GroupStats`, float64 merges), in
batches assigned round-robin to K groups, so the null's metrics carry jackknife intervals
like the measured ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .._progress import tqdm
from ..covariance import CovarianceAccumulator
from ..groups import GroupStats
from ..moments import NormMoments
from ..spectrum import Spectrum, spectrum_from_covariance

Draw = Callable[[int, torch.Generator], dict[str, torch.Tensor]]
"""``(n, generator) -> {point: rows [n, D]}``: n samples of every point of one layer."""

MAX_BATCH = 4096


def batch_rows(n_tokens: int, n_groups: int | None) -> int:
    """Rows per batch: at most :data:`MAX_BATCH`, and at least 2 batches per group."""
    k = n_groups or 1
    return max(2, min(MAX_BATCH, math.ceil(n_tokens / (2 * k))))


def _finish(name: str, acc: CovarianceAccumulator, moments: NormMoments | None,
            groups: GroupStats | None) -> Spectrum:
    if groups is not None:
        acc, moments = groups.merged()
    spec = spectrum_from_covariance(acc.covariance_, acc.mean_, acc.n_samples_seen_,
                                    name=name, warn=False)
    if moments is not None:
        spec.fourth_moment = moments.fourth_
    if groups is not None:  # leave-one-out only: the null needs no convergence curve
        spec.groups = groups.spectra(acc, moments, orders=0)
    return spec


def sample_layer(draw: Draw, names: dict[str, str], n_tokens: int, n_groups: int | None,
                 seed: int, precision: str = "fp64") -> dict[str, Spectrum]:
    """The spectra of ``n_tokens`` samples of one layer's points (``names``: point -> site
    name), batch ``b`` in group ``b mod n_groups``."""
    gen = torch.Generator().manual_seed(int(seed))
    stats = {p: (CovarianceAccumulator(n, precision=precision), NormMoments(n),
                 GroupStats(n, n_groups, precision) if n_groups else None)
             for p, n in names.items()}
    step = batch_rows(n_tokens, n_groups)
    for b, start in enumerate(range(0, n_tokens, step)):
        rows = draw(min(step, n_tokens - start), gen)
        for p, (acc, mom, grp) in stats.items():
            x = rows[p].to(torch.float64)
            if grp is not None:
                grp.update(x, torch.full((x.shape[0],), b % n_groups, dtype=torch.long))
            else:
                acc.update(x, moments=mom)
    return {p: _finish(names[p], *s) for p, s in stats.items()}


def null_metadata(like, null: str, seed: int, n_groups: int | None, **extra) -> dict:
    """The measured result's metadata, relabelled as its ``null``."""
    meta = {k: v for k, v in like.metadata.items() if k not in ("diagnostics", "joint")}
    return {**meta, "model": f"{like.model} [{null} null]", "null": null, "null_seed": seed,
            "null_of": like.model, "n_groups": n_groups, **extra}


def result_from_layers(like, null: str, draws: dict[int, Draw], *, n_groups: int | None,
                       seed: int, progress: bool = True, **extra):
    """A :class:`~nerve_interp.results.SpectraResult` of ``like``'s points sampled from
    ``draws`` (one per layer) at each layer's measured N."""
    from ..results import SpectraResult

    spectra = {}
    for layer in tqdm(like.layers, desc=f"{null} null", unit="layer", disable=not progress,
                      leave=False):
        names = {p: like.spectrum(layer, p).name for p in like.points}
        n = min(like.spectrum(layer, p).n_samples for p in like.points)
        for p, spec in sample_layer(draws[layer], names, n, n_groups,
                                    seed + 7919 * layer).items():
            spectra[(layer, p)] = spec
    return SpectraResult(spectra, null_metadata(like, null, seed, n_groups, **extra))


__all__ = ["Draw", "batch_rows", "null_metadata", "result_from_layers", "sample_layer"]
