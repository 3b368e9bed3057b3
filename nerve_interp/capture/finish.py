"""From the merged sinks to a :class:`~nerve_interp.results.SpectraResult`: eigendecompose
every point, warn once, finish the token diagnostics and write the metadata."""

from __future__ import annotations

import dataclasses
import datetime
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .. import __version__
from .._inflight import map_in_flight
from .._progress import tqdm
from .._warnings import user_stacklevel
from ..diagnostics import TOKEN_META, decode_tokens, remove_rows, warn_outliers
from ..errors import CaptureError, NegativeEigenvalueWarning
from ..sites import FFNSite
from ..spectrum import NEGATIVE_WARN_TOL, spectrum_from_covariance
from .run import Pipeline, RunState


def finish(p: Pipeline, state: RunState, sites: Sequence[FFNSite], n_layers: int,
           tokenizer: Any) -> Any:
    """The result of one pass (``sites``: the captured ones; ``n_layers``: the model's)."""
    from ..results import SpectraResult

    p.selector.check_counted(state.n_tokens, state.tally, p.model)
    if p.shard.is_main:
        p.selector.warn(state.tally)
    points = p.sinks.points
    for sink in points:
        sink.merge_groups()
        if sink.acc.n_samples_seen_ < 2:
            raise CaptureError(f"{sink.acc.name} saw {sink.acc.n_samples_seen_} token(s); "
                               "need >= 2.")

    def decompose(sink: Any) -> Any:  # one point's own state only: runs in a worker
        acc = sink.acc
        spec = spectrum_from_covariance(acc.covariance_, acc.mean_, acc.n_samples_seen_,
                                        eigenvectors=p.opts.eigenvectors, name=acc.name,
                                        warn=False)
        if sink.moments is not None and sink.moments.n_samples_seen_ == acc.n_samples_seen_:
            spec.fourth_moment = sink.moments.fourth_
        return spec

    bar = dict(unit="point", disable=not p.opts.progress or not p.shard.is_main, leave=False,
               dynamic_ncols=True)
    spectra = {sink.key: spec for sink, spec in zip(points, tqdm(
        map_in_flight(decompose, points), total=len(points), desc="eigendecompositions",
        **bar), strict=True)}
    joint = {}
    for sink in points:
        if sink.groups is not None:  # K leave-one-out + convergence spectra, then free K·D²
            spectra[sink.key].groups = sink.groups.spectra(
                sink.acc, sink.moments, **({} if p.opts.convergence else {"orders": 0}))
            sink.groups = None
        joint.update(_joint(p, sink, sites))
    # round-off of the per-batch scatter sets how negative an eigenvalue may come out:
    # the documented -1e-8·λ_1 for float64, 64·eps ≈ 7.6e-6 for a float32 (or bf16-split) Gram
    warn_once(list(spectra.values()),
              NEGATIVE_WARN_TOL if p.opts.precision == "fp64" else 64 * 2.0**-23)
    diags, free = {}, {}
    if state.diagnostics:
        diags, free = token_diagnostics(p, tokenizer)
        if p.shard.is_main:  # the same on every rank: reported once
            warn_outliers(diags, p.model, stacklevel=user_stacklevel() + 1)
    meta = {**model_metadata(p.wrapper._module, sites, n_layers), **p.opts.metadata(),
            **_run_metadata(p, state, sites, diags)}
    return SpectraResult(spectra, meta, diagnostics=diags or None, without_outliers=free or None,
                         joint=joint or None)


def _joint(p: Pipeline, sink: Any, sites: Sequence[FFNSite]) -> dict[int, Any]:
    """``{layer: JointInputs}`` of this sink when ``joint=True`` asks for it: the ``up``
    sink's pre ‖ up accumulator (gated FFNs), the ``pre`` accumulator itself (plain FFNs)."""
    from ..joint import joint_from_accumulator

    layer, point = sink.key
    if sink.joint is not None:
        return {layer: joint_from_accumulator(sink.joint, ("pre", "up"))}
    kind = next((s.kind for s in sites if s.layer == layer), "")
    if p.opts.joint and point == "pre" and kind != "gated":
        return {layer: joint_from_accumulator(sink.acc, ("pre",))}
    return {}


def _run_metadata(p: Pipeline, state: RunState, sites: Sequence[FFNSite], diags: dict
                  ) -> dict[str, Any]:
    norm = p.opts.rule.norm_above is not None
    first = p.sinks.points[0].acc
    return {
        "n_tokens": state.n_tokens, "n_batches": state.n_batches,
        "n_excluded": {**state.tally.metadata(),
                       "norm": {s.name: s.tokens.n_excluded_norm_ for s in p.sinks if norm},
                       "norm_thresholds": {s.name: s.tokens.norm_threshold_
                                           for s in p.sinks if norm}},
        "diagnostics": dataclasses.replace(p.opts.outliers, enabled=state.diagnostics).to_dict(
            flagged=[d.name for d in diags.values() if d.outlier_flag]),
        "gram_dtype": str(first.gram_dtype).replace("torch.", ""),
        "data_sha1": state.data_sha1, "world_size": p.shard.world_size,
        "document_hashes": sorted(state.data.documents),
        "layers": [s.layer for s in sites],
        "site_paths": {s.name(pt): s.paths[pt] for s in sites for pt in p.opts.points},
        "activations": _activations(p.wrapper._module, sites),
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _activations(root: torch.nn.Module, sites: Sequence[FFNSite]) -> dict[str, str | None]:
    """``{layer: name}`` of each site's nonlinearity (:func:`nerve_interp.joint.activation_name`
    of the module whose input is ``pre``; None when unknown)."""
    from ..joint import activation_name

    out = {}
    for s in sites:
        mod_path, _, io = s.paths.get("pre", "").rpartition(".")
        try:
            module = root.get_submodule(mod_path) if io == "input" else None
        except AttributeError:
            module = None
        out[str(s.layer)] = activation_name(module)
    return out


def token_diagnostics(p: Pipeline, tokenizer: Any) -> tuple[dict, dict]:
    """Per point: TokenDiagnostics, and for flagged points the spectrum without their
    outlier tokens (``TokenDiagnostics.outlier_mask``)."""
    tokenizer = tokenizer if tokenizer is not None else getattr(p.wrapper, "tokenizer", None)
    out = p.opts.outliers
    diags, flagged = {}, []
    for sink in tqdm(p.sinks.points, desc="token diagnostics", unit="point", leave=False,
                     disable=not p.opts.progress or not p.shard.is_main, dynamic_ncols=True):
        acc, st = sink.acc, sink.tokens
        if st.n_samples_seen_ == 0:
            continue
        d = st.finish(acc.mean_, float(torch.diagonal(acc.scatter_).sum()),
                      outlier_fraction=out.fraction, outlier_threshold=out.threshold)
        d.top_tokens = decode_tokens(d.top_meta[:, TOKEN_META.index("token_id")], tokenizer)
        diags[sink.key] = d
        if d.outlier_flag and acc.n_samples_seen_ - d.n_outliers >= 2:
            flagged.append(sink)

    def without_outliers(sink: Any) -> Any:  # one point's own state only: runs in a worker
        acc, st, d = sink.acc, sink.tokens, diags[sink.key]
        mask = torch.from_numpy(d.outlier_mask).to(st.top_vectors_.device)
        n_a, mean_a, m2_a = remove_rows(acc.n_samples_seen_, acc.mean_, acc.scatter_,
                                        st.top_vectors_[mask])
        spec = spectrum_from_covariance(m2_a / (n_a - 1), mean_a, n_a,
                                        eigenvectors=p.opts.eigenvectors, name=acc.name,
                                        warn=False)
        if sink.moments is not None and sink.moments.n_samples_seen_ == acc.n_samples_seen_:
            spec.fourth_moment = sink.moments.without(st.top_vectors_[mask], mean_a, m2_a)
        return spec

    free = dict(zip([s.key for s in flagged], tqdm(
        map_in_flight(without_outliers, flagged), total=len(flagged),
        desc="spectra without outliers", unit="point", leave=False, dynamic_ncols=True,
        disable=not p.opts.progress or not p.shard.is_main or not flagged), strict=True))
    return diags, free


def warn_once(spectra: list, neg_tol: float = NEGATIVE_WARN_TOL) -> None:
    """One warning per capture (not one per point) for few tokens per dimension and for
    negatives: a ``FiniteSampleWarning`` when N/D < 10 at some point, a
    ``RankDeficientWarning`` (its subclass) when N <= D; both quote the white-noise floor at
    the smallest N/D."""
    from ..marchenko_pastur import FINITE_SAMPLE_N_OVER_D, finite_sample_warning

    short = [s for s in spectra if s.n_samples < FINITE_SAMPLE_N_OVER_D * s.dim]
    if short:
        worst = min(short, key=lambda s: s.n_samples / s.dim)
        names = ", ".join(s.name for s in short[:3]) + (", ..." if len(short) > 3 else "")
        target = int(math.ceil(FINITE_SAMPLE_N_OVER_D * worst.dim))
        category, message = finite_sample_warning(
            int(worst.n_samples), int(worst.dim), f"at {len(short)} of {len(spectra)} points "
            f"({names})", f"Raise max_tokens to >= {target} (N/D >= "
            f"{FINITE_SAMPLE_N_OVER_D:g}; the papers use ~65k tokens, N >> D) before comparing "
            "metrics, or compare only spectra measured at the same N/D.")
        warnings.warn(message, category, stacklevel=user_stacklevel())
    bad = [s for s in spectra
           if s.min_eigenvalue < -neg_tol * max(float(s.eigenvalues[0]), 1e-300)]
    if bad:
        worst = min(bad, key=lambda s: s.min_eigenvalue / max(float(s.eigenvalues[0]), 1e-300))
        warnings.warn(
            f"{len(bad)} point(s) had eigenvalues below -{neg_tol:.1e}·λ_1 (worst {worst.name}: "
            f"{worst.min_eigenvalue:.3e}, λ_1 = {worst.eigenvalues[0]:.3e}); clipped to 0. "
            "This is more than round-off: report it with the model and dtype.",
            NegativeEigenvalueWarning, stacklevel=user_stacklevel())


# ------------------------------------------------------------------ model metadata
def model_label(model: Any) -> str:
    """A short name for the model: its nerve_interp name, its hub path, or its class."""
    root = getattr(model, "_module", model)
    info = getattr(root, "nerve_interp_info", None) or {}
    if info.get("name"):
        return str(info["name"])
    cfg = getattr(root, "config", None)
    path = getattr(cfg, "_name_or_path", "") if cfg is not None else ""
    return str(path) if path else type(root).__name__


def model_metadata(root: torch.nn.Module, sites: Sequence[FFNSite], n_layers: int) -> dict:
    """Model name, class, type, source, FFN kind and family, dtype and device."""
    info = dict(getattr(root, "nerve_interp_info", None) or {})
    try:
        param = next(root.parameters())
        dtype, device = str(param.dtype).replace("torch.", ""), str(param.device)
    except StopIteration:
        dtype, device = "none", "cpu"
    cfg = getattr(root, "config", None)
    return {
        "model": model_label(root), "model_class": type(root).__name__,
        "model_type": str(getattr(cfg, "model_type", "") or ""),
        "model_source": info.get("source", ""), "model_note": info.get("note", ""),
        "n_layers": n_layers, "ffn_kind": sites[0].kind if sites else "",
        "family": sites[0].family if sites else "", "dtype": dtype, "device": device,
    }


def _versions() -> dict[str, str]:
    import nnsight
    import transformers

    return {"nerve_interp": __version__, "torch": torch.__version__,
            "nnsight": getattr(nnsight, "__version__", "?"),
            "transformers": transformers.__version__}


__all__ = ["finish", "model_label", "model_metadata", "token_diagnostics", "warn_once"]
