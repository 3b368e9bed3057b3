"""Null models: what each spectral number would be without the structure it is read as.

Every null returns a :class:`~nerve_interp.results.SpectraResult` with the measured result's
layers and points at the same N, so ``metrics()`` and ``reinjection()`` have the same rows,
and :func:`nerve_interp.compare` lines them up with intervals:

* ``init`` (:func:`init`, :func:`nerve_interp.reinitialized`): the architecture and the
  tokens with fresh weights, captured; measured − init is what training added.
* ``independent`` (:func:`independent`, sampled): each unit's mean and variance without
  correlations; the difference is what the correlations between units add.
* ``marchenko_pastur`` (:func:`marchenko_pastur`, sampled): white noise with the total
  variance at N and D; the finite-sample floor of every metric, EEE included.
* ``gaussian_equivalent`` (:func:`gaussian_equivalent`, sampled): the first two moments of
  the nonlinearity's inputs pushed through the FFN's own nonlinearity; measured − null is
  the *excess reinjection*, what non-Gaussian inputs add.

The sampled nulls draw N Gaussian rows per layer (N: the measured tokens of that layer) and
stream them through the capture's own accumulators in K groups (K: the measured result's
``n_groups``, else 8), so their metrics carry jackknife intervals; they are Monte Carlo at
the measured N, not population values, because every metric is biased at finite N and the
comparison must carry the same bias. Seeds make them reproducible.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._validation import check_positive_int
from ..errors import NotFittedError
from ..joint import activation_function
from ._sampled import Draw, result_from_layers

DEFAULT_GROUPS = 8


def _groups(like: Any, n_groups: int | None | str) -> int | None:
    if n_groups == "auto":
        k = like.metadata.get("n_groups")
        return int(k) if k else DEFAULT_GROUPS
    return None if n_groups is None else check_positive_int(n_groups, "n_groups", minimum=2)


def _check_result(result: Any, name: str) -> None:
    from ..results import SpectraResult

    if not isinstance(result, SpectraResult):
        raise TypeError(f"nulls.{name}() needs the SpectraResult of a capture (collect_spectra "
                        f"or SpectraResult.load); got {type(result).__name__}.")


def _variances(spec: Any) -> torch.Tensor:
    if spec.variances is not None:
        return torch.from_numpy(np.asarray(spec.variances, dtype=np.float64))
    if spec.eigenvectors is not None:
        u = torch.from_numpy(spec.eigenvectors)
        return (u * u) @ torch.from_numpy(spec.eigenvalues)
    raise NotFittedError(
        f"{spec.name} has no per-unit variances (a file written before nerve_interp kept "
        "them, without eigenvectors): re-run collect_spectra to get them.")


def _diagonal_draw(like: Any, layer: int, sd: dict[str, torch.Tensor]) -> Draw:
    means = {p: torch.from_numpy(like.spectrum(layer, p).mean) for p in like.points}

    def draw(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {p: means[p] + torch.randn(n, s.numel(), generator=gen, dtype=torch.float64) * s
                for p, s in sd.items()}

    return draw


def independent(result: Any, *, n_groups: int | None | str = "auto", seed: int = 0,
                progress: bool = True) -> Any:
    """Independent units: each point's mean and per-unit variances, no correlations.

    Samples ``x_n ~ N(μ, diag(σ²))`` (σ²: the measured covariance's diagonal) at the measured
    N. The difference measured − null is what the correlations between units contribute.

    Parameters
    ----------
    result : SpectraResult
        The measured spectra.
    n_groups : int >= 2, None or "auto", default "auto"
        Groups of the null's jackknife: the measured result's, else 8; None: no intervals.
    seed : int, default 0
    progress : bool, default True

    Returns
    -------
    SpectraResult
        Same layers, points and N; ``metadata["null"] == "independent"``.
    """
    _check_result(result, "independent")
    k, seed = _groups(result, n_groups), check_positive_int(seed, "seed", minimum=0)
    draws = {layer: _diagonal_draw(result, layer, {
        p: _variances(result.spectrum(layer, p)).sqrt() for p in result.points})
        for layer in result.layers}
    return result_from_layers(result, "independent", draws, n_groups=k, seed=seed,
                              progress=progress)


def marchenko_pastur(result: Any, *, n_groups: int | None | str = "auto", seed: int = 0,
                     progress: bool = True) -> Any:
    """White noise at the measured N and D: the finite-sample floor of every metric.

    Samples ``x_n ~ N(μ, (tr Σ / D)·I)`` at the measured N (the total variance kept, so
    eigenvalue plots share a scale). Its metrics match
    :func:`nerve_interp.marchenko_pastur.white_noise_metrics` (the large-D closed form)
    within about 2 %; unlike it, they carry the sampling spread at this N and D.

    Parameters and Returns as :func:`independent`; ``metadata["null"] ==
    "marchenko_pastur"``.
    """
    _check_result(result, "marchenko_pastur")
    k, seed = _groups(result, n_groups), check_positive_int(seed, "seed", minimum=0)
    draws = {}
    for layer in result.layers:
        sd = {}
        for p in result.points:
            lam = result.spectrum(layer, p).eigenvalues
            sd[p] = torch.full((lam.size,), float(np.sqrt(lam.sum() / lam.size)),
                               dtype=torch.float64)
        draws[layer] = _diagonal_draw(result, layer, sd)
    return result_from_layers(result, "marchenko_pastur", draws, n_groups=k, seed=seed,
                              progress=progress)


def _ffn_draw(joint: Any, act: Any, points: list[str]) -> Draw:
    sample = joint.sampler()

    def draw(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        x = sample(n, gen)
        out = {"pre": x["pre"], "act": act(x["pre"])}
        out["post"] = out["act"] * x["up"] if "up" in x else out["act"]
        out["up"] = x.get("up")
        return {p: out[p] for p in points}

    return draw


def _activation(result: Any, layer: int, activation: Any) -> Any:
    if activation is not None:
        return activation_function(activation)
    name = (result.metadata.get("activations") or {}).get(str(layer))
    if name is None:
        raise ValueError(
            f"layer {layer}: nerve_interp does not know this FFN's nonlinearity (the result's "
            "metadata names none); pass it, e.g. gaussian_equivalent(result, "
            "activation='gelu') or activation=torch.nn.functional.mish.")
    return activation_function(name)


def gaussian_equivalent(result: Any, *, activation: Any = None,
                        n_groups: int | None | str = "auto", seed: int = 0,
                        progress: bool = True) -> Any:
    """Gaussian inputs with the measured first two moments, through the FFN's nonlinearity.

    Per layer, samples the nonlinearity's inputs from ``N(μ, Σ)`` with the measured mean and
    covariance (``pre`` for plain FFNs; ``pre`` and ``up`` *jointly* for gated FFNs, so the
    gate-up correlations are kept) at the measured N, and forms every captured point from
    them: ``post = σ(pre)`` (plain) or ``act = σ(pre)``, ``post = σ(pre) ⊙ up`` (gated). The
    null's reinjection is what a pointwise nonlinearity does to Gaussian inputs with these
    covariances; measured − null is the **excess reinjection**, what the inputs'
    non-Gaussian structure (heavy tails, clusters, outlier tokens) adds.

    Monte Carlo, not a closed form: exact in distribution for any pointwise σ, with the
    sampling error of N tokens, which the null's own jackknife interval states.

    Parameters
    ----------
    result : SpectraResult
        Captured with ``collect_spectra(..., joint=True)`` (``result.joint``).
    activation : str or callable, optional
        The nonlinearity (a name of :data:`nerve_interp.joint.ACTIVATIONS` or a torch
        function); default: the one the capture recorded for each layer.
    n_groups, seed, progress
        As :func:`independent`.

    Returns
    -------
    SpectraResult
        Same layers, points and N; ``metadata["null"] == "gaussian_equivalent"``.

    Raises
    ------
    NotFittedError
        The result holds no joint input statistics (capture with ``joint=True``).
    """
    _check_result(result, "gaussian_equivalent")
    k, seed = _groups(result, n_groups), check_positive_int(seed, "seed", minimum=0)
    missing = [layer for layer in result.layers if layer not in result.joint]
    if missing:
        raise NotFittedError(
            f"layers {missing[:8]} have no joint input statistics; capture with "
            "collect_spectra(..., joint=True) (and points including 'pre', plus 'up' for "
            "gated FFNs) to sample the Gaussian-equivalent null.")
    draws = {layer: _ffn_draw(result.joint[layer], _activation(result, layer, activation),
                              result.points) for layer in result.layers}
    return result_from_layers(result, "gaussian_equivalent", draws, n_groups=k, seed=seed,
                              progress=progress)


def init(model: Any, data: Any, *, like: Any = None, seed: int = 0, **capture: Any) -> Any:
    """The same architecture at initialisation, captured on the same data.

    ``collect_spectra(reinitialized(model, seed), data, **capture)``, with ``layers``,
    ``points``, ``max_tokens``, ``n_groups``, ``joint`` and ``convergence`` taken from
    ``like`` (the measured result) unless given, so the rows line up. With the same data
    and groups, the difference measured − init has a paired jackknife interval in
    :func:`nerve_interp.compare`.

    Parameters
    ----------
    model : torch.nn.Module or nnsight wrapper
        The trained model (see :func:`nerve_interp.reinitialized`).
    data
        What ``collect_spectra`` takes (texts with ``tokenizer=``, or token batches): the
        same data as the measured result.
    like : SpectraResult, optional
        The measured result, whose capture options are reused.
    seed : int, default 0
        Seed of the fresh weights.
    **capture
        Any other ``collect_spectra`` keyword (``tokenizer``, ``batch_size``, ...).

    Returns
    -------
    SpectraResult
        ``metadata["null"] == "init"``.
    """
    from ..capture import collect_spectra
    from ..reinit import reinitialized

    if like is not None:
        _check_result(like, "init")
        for key in ("layers", "points", "max_tokens", "n_groups", "joint", "convergence"):
            if key not in capture and like.metadata.get(key) is not None:
                capture[key] = like.metadata[key]
    fresh = reinitialized(model, seed)
    out = collect_spectra(fresh, data, **capture)
    out.metadata.update(null="init", null_seed=seed,
                        null_of=like.model if like is not None else None)
    return out


__all__ = ["gaussian_equivalent", "independent", "init", "marchenko_pastur"]
