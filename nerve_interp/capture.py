"""Run nnsight traces over batches and feed each FFN point to its covariance accumulator.

Only D×D statistics leave the forward pass: activations are read inside the trace, padding
tokens are dropped (SPEC.md §1), the rows go into a :class:`CovarianceAccumulator` on the
activations' own device, and ``tracer.stop()`` ends the forward after the last point needed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from ._io import atomic_path
from .covariance import CovarianceAccumulator
from .diagnostics import (
    DEFAULT_MAX_OUTLIER_TOKENS,
    DEFAULT_OUTLIER_FRACTION,
    DEFAULT_OUTLIER_THRESHOLD,
    TOKEN_META,
    TokenNormStats,
    check_outlier_parameters,
    exclusion_rule,
)
from .errors import (
    CaptureError,
    NegativeEigenvalueWarning,
    NerveInterpError,
    RankDeficientWarning,
    ResultsFileError,
    SiteError,
)
from .sites import POINTS, FFNSite, as_nnsight, find_ffn_sites, select_sites, site_name
from .spectrum import NEGATIVE_WARN_TOL, spectrum_from_covariance


# ------------------------------------------------------------------ batches
def _as_batch(item: Any, i: int) -> dict[str, Any]:
    """One batch as model keyword arguments.

    Token models get ``input_ids`` (+ ``attention_mask``); any other model gets its inputs
    as given: a float tensor is passed positionally (key ``"_args"``), a dict as keywords.
    """
    if isinstance(item, torch.Tensor):
        if item.is_floating_point():
            return {"_args": (item,)}
        item = {"input_ids": item}
    if not isinstance(item, dict) and hasattr(item, "keys"):  # BatchEncoding
        item = dict(item)
    if not isinstance(item, dict):
        raise TypeError(
            f"batch {i} is a {type(item).__name__}; batches are dicts with 'input_ids' and "
            "'attention_mask' (what a tokenizer returns), token-id tensors, or pass a list of "
            "strings together with tokenizer=..."
        )
    if "input_ids" not in item:
        return dict(item)  # a non-token model: keyword inputs, every row is data
    out = {k: torch.as_tensor(v) for k, v in item.items()}
    ids = out["input_ids"]
    if ids.ndim == 1:
        out = {k: v.unsqueeze(0) if v.ndim == 1 else v for k, v in out.items()}
        ids = out["input_ids"]
    if ids.ndim != 2:
        raise CaptureError(
            f"batch {i}: input_ids must be [batch, seq]; got shape {tuple(ids.shape)}."
        )
    mask = out.get("attention_mask")
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        raise CaptureError(
            f"batch {i}: attention_mask {tuple(mask.shape)} does not match input_ids "
            f"{tuple(ids.shape)}."
        )
    return out


def iter_batches(
    batches: Any, tokenizer: Any = None, *, batch_size: int = 8, max_length: int = 256
) -> Iterator[dict[str, torch.Tensor]]:
    """Normalise what users pass as data into dicts of tensors.

    Accepts a list of strings (with ``tokenizer``), one dict / BatchEncoding, a token-id
    tensor ``[batch, seq]``, or an iterable of dicts or tensors.
    """
    if isinstance(batches, str):
        raise TypeError(
            "batches is a single string; pass a list of strings (documents) with tokenizer=..."
        )
    if isinstance(batches, Sequence) and batches and all(isinstance(b, str) for b in batches):
        if tokenizer is None:
            raise TypeError(
                "batches is a list of strings but no tokenizer was given; pass tokenizer=... "
                "(e.g. the second value of ni.load_model(...)) or tokenise them yourself."
            )
        from .data import tokenize_batches

        yield from tokenize_batches(list(batches), tokenizer, batch_size=batch_size,
                                    max_length=max_length)
        return
    if isinstance(batches, torch.Tensor):
        t = batches if batches.ndim == 2 else batches.unsqueeze(0)
        for j, start in enumerate(range(0, t.shape[0], batch_size)):
            yield _as_batch(t[start:start + batch_size], j)
        return
    if isinstance(batches, dict) or (hasattr(batches, "keys") and "input_ids" in batches):
        yield _as_batch(batches, 0)
        return
    for j, item in enumerate(batches):
        yield _as_batch(item, j)


def _hash_batch(h: Any, batch: dict) -> None:
    ids = batch.get("input_ids")
    if ids is None:
        return
    mask = batch.get("attention_mask")
    for j, row in enumerate(ids):
        real = row if mask is None else row[mask[j].bool()]
        h.update(real.to(torch.int64).cpu().numpy().tobytes())
        h.update(b"|")


def token_hash(batches: Iterable[dict]) -> str:
    """SHA-1 of the real (non-padding) token ids of ``batches``, row by row.

    Spectra record it (``metadata["data_sha1"]``) so an ablation can warn when it is
    evaluated on the very text the spectra came from.
    """
    h = hashlib.sha1()
    for b in batches:
        _hash_batch(h, b)
    return h.hexdigest()


def _budget_mask(mask: torch.Tensor, remaining: int | None) -> torch.Tensor:
    """Keep the first ``remaining`` real tokens (row-major) of a boolean mask."""
    if remaining is None or int(mask.sum()) <= remaining:
        return mask
    flat = mask.reshape(-1)
    keep = flat & (flat.cumsum(0) <= remaining)
    return keep.reshape(mask.shape)


# ------------------------------------------------------------------ metadata
def model_label(model: Any) -> str:
    """A short name for the model: its nerve_interp name, its hub path, or its class."""
    root = getattr(model, "_module", model)
    info = getattr(root, "nerve_interp_info", None) or {}
    if info.get("name"):
        return str(info["name"])
    cfg = getattr(root, "config", None)
    path = getattr(cfg, "_name_or_path", "") if cfg is not None else ""
    return str(path) if path else type(root).__name__


def _model_metadata(root: torch.nn.Module, sites: Sequence[FFNSite], n_layers: int) -> dict:
    info = dict(getattr(root, "nerve_interp_info", None) or {})
    try:
        p = next(root.parameters())
        dtype, device = str(p.dtype).replace("torch.", ""), str(p.device)
    except StopIteration:
        dtype, device = "none", "cpu"
    cfg = getattr(root, "config", None)
    return {
        "model": model_label(root),
        "model_class": type(root).__name__,
        "model_type": str(getattr(cfg, "model_type", "") or ""),
        "model_source": info.get("source", ""),
        "model_note": info.get("note", ""),
        "n_layers": n_layers,
        "ffn_kind": sites[0].kind if sites else "",
        "family": sites[0].family if sites else "",
        "dtype": dtype,
        "device": device,
    }


def _versions() -> dict[str, str]:
    import nnsight
    import transformers

    return {"nerve_interp": __version__, "torch": torch.__version__,
            "nnsight": getattr(nnsight, "__version__", "?"),
            "transformers": transformers.__version__}


# ------------------------------------------------------------------ checkpoint
def _fingerprint(meta: dict, sites: Sequence[FFNSite], points: Sequence[str]) -> str:
    return json.dumps({"model": meta["model"], "model_class": meta["model_class"],
                       "sites": [s.paths[p] for s in sites for p in points]}, sort_keys=True)


def _save_checkpoint(path: Path, accs: dict, state: dict) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for (layer, point), acc in accs.items():
        if acc.n_samples_seen_:
            for k, v in acc.state_dict().items():
                tensors[f"{site_name(layer, point)}.{k}"] = v.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "nerve_interp.capture_checkpoint",
                                          "state": json.dumps(state)})


def _load_checkpoint(path: Path, accs: dict, fingerprint: str) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "nerve_interp.capture_checkpoint":
                raise ResultsFileError(f"{path} is not a nerve_interp capture checkpoint.")
            state = json.loads(meta["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except ResultsFileError:
        raise
    except Exception as err:
        raise ResultsFileError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it is corrupt. "
            "Delete it to start the capture afresh."
        ) from None
    if state.get("fingerprint") != fingerprint:
        raise ResultsFileError(
            f"checkpoint {path} belongs to another model or other sites "
            f"({json.loads(state.get('fingerprint', '{}')).get('model')!r}); delete it or pass "
            "another checkpoint path."
        )
    for (layer, point), acc in accs.items():
        prefix = site_name(layer, point)
        sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if sub:
            acc.load_state_dict(sub)
    return state


# ------------------------------------------------------------------ capture
def collect_spectra(
    model: Any,
    batches: Any,
    *,
    tokenizer: Any = None,
    layers: int | Iterable[int] | None = None,
    points: Sequence[str] = ("pre", "post"),
    sites: Sequence[FFNSite] | None = None,
    max_tokens: int | None = None,
    skip_first: int = 0,
    exclude_positions: Iterable[int] | None = (),
    exclude_token_ids: Iterable[int] | None = (),
    exclude_norm_above: float | None = None,
    batch_size: int = 8,
    max_length: int = 256,
    eigenvectors: bool = False,
    gram_dtype: torch.dtype = torch.float64,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 20,
    data_label: str = "",
    diagnostics: bool = True,
    outlier_fraction: float = DEFAULT_OUTLIER_FRACTION,
    outlier_threshold: float = DEFAULT_OUTLIER_THRESHOLD,
    max_outlier_tokens: int = DEFAULT_MAX_OUTLIER_TOKENS,
):
    """Eigenspectra of FFN activations before and after the nonlinearity, layer by layer.

    Parameters
    ----------
    model : torch.nn.Module or nnsight wrapper
        A Hugging Face model (or ``nnsight.NNsight`` / ``TransformersModel`` of one). It is
        wrapped with nnsight once; it still runs normally outside traces.
    batches : iterable
        Dicts with ``input_ids`` and ``attention_mask`` (tokenizer output), token-id tensors
        ``[batch, seq]``, or a list of strings together with ``tokenizer``.
    tokenizer : optional
        Needed when ``batches`` are strings. They are padded per batch and truncated to
        ``max_length`` tokens, ``batch_size`` texts at a time.
    layers : int, list of int or None
        Layers to capture (negative counts from the end); all by default.
    points : sequence of str, default ("pre", "post")
        Points per layer: ``pre``, ``post``, and for gated FFNs ``act``, ``up``.
    sites : list of FFNSite, optional
        Sites from :func:`find_ffn_sites` (e.g. passed by hand); found automatically if None.
    max_tokens : int, optional
        Stop after this many real (non-padding) tokens; the last batch is cut row-major.
    skip_first : int, default 0
        Leave out the first ``skip_first`` real tokens of every sequence; the same as
        ``exclude_positions=range(skip_first)`` (the two are combined).
    exclude_positions : sequence of int, default ()
        Positions left out of every spectrum, counted among the *real* tokens of each
        sequence (0 = its first real token, with left or right padding). The first token is
        often an attention sink with *massive activations* (SmolLM2-135M: FFN post norms
        ~570× the median in layer 11), which alone can hold >95% of a layer's variance and
        drive its participation ratio to ~1. The papers keep every position (the default);
        ``exclude_positions=(0,)`` gives the spectrum of the other tokens.
    exclude_token_ids : sequence of int, default ()
        Token ids left out wherever they occur (e.g. ``tokenizer.all_special_ids``).
    exclude_norm_above : float, optional
        Leave out, per point, tokens whose activation norm exceeds this multiple (> 1) of
        the point's median norm. The median is measured on the first batch (after the
        position and id rules) and then fixed for the whole capture; the metadata records
        each point's threshold and how many tokens it left out.
    eigenvectors : bool, default False
        Keep eigenvectors (8·D² bytes per point) for subspace ablations.
    gram_dtype : torch.dtype, default torch.float64
        Precision of each batch's centred scatter matrix (float32 is ~1.7× faster on CPU).
        Statistics are merged and eigendecomposed in float64 either way.
    progress : bool, default True
        Show a tqdm progress bar (tokens).
    checkpoint : path, optional
        Save the running statistics there every ``checkpoint_every`` batches and resume
        from it when it exists (the same batches must be passed again; the ones already
        counted are skipped).
    data_label : str
        What the text was (kept in the metadata, e.g. ``"python-docs/train"``).
    diagnostics : bool, default True
        Gather per-token statistics in the same pass (:mod:`nerve_interp.diagnostics`): norm
        quantiles, the ``max_outlier_tokens`` tokens of largest norm (position, batch, token
        id) and the share of the variance the top ``outlier_fraction`` of tokens hold.
        Points where that share exceeds ``outlier_threshold`` are flagged, reported in one
        ``OutlierTokenWarning``, in the ``outlier_share`` / ``outlier_flag`` columns of
        ``metrics()`` and ``reinjection()``, and get a second spectrum without those tokens
        (``result.without_outliers()``). Costs ~1% of the covariance update per batch (one
        norm per token), plus one eigendecomposition per flagged point; ``False`` skips it.
    outlier_fraction : float in (0, 1), default 0.01
        Size of the top group: ``k = min(max_outlier_tokens, max(1, ⌈outlier_fraction·N⌉))``
        tokens by activation norm (``N`` the tokens of the spectrum). An attention sink is
        one token per sequence (0.4% of ``N`` at 256 tokens), so 1% covers them.
    outlier_threshold : float in (0, 1), default 0.25
        Flag a point when its top ``k`` tokens hold more than this share of the variance
        (``Σ_top ‖x_i − μ‖² / Σ_all ‖x_n − μ‖²``).
    max_outlier_tokens : int, default 256
        ``m``, the top tokens kept per point (``m × D`` floats each). When
        ``⌈outlier_fraction·N⌉ > m`` the share is that of the top ``m`` tokens, a lower bound.

    Returns
    -------
    SpectraResult
        ``.eigenvalues(layer, point)``, ``.metrics()``, ``.reinjection()``, ``.save(path)``.

    Raises
    ------
    CaptureError
        No tokens at all (empty or all-padding data, or every token excluded), or NaN/inf
        activations (the message names the site and batch).
    ValueError
        Exclusion or outlier parameters out of range (negative positions, token ids outside
        the vocabulary, ``exclude_norm_above <= 1``, fractions outside (0, 1)).
    SiteError
        A layer out of range, or a point the FFN does not have.
    """
    from .results import SpectraResult

    wrapper = as_nnsight(model)
    root = wrapper._module
    all_sites = list(sites) if sites is not None else find_ffn_sites(wrapper)
    chosen = select_sites(all_sites, layers)
    points = tuple(points) if not isinstance(points, str) else (points,)
    for p in points:
        if p not in POINTS:
            raise SiteError(
                f"unknown point {p!r}. Points are pre and post (every FFN), plus act and up "
                "(gated FFNs only)."
            )
        chosen[0].path(p)  # raises a clear error for act/up on a plain FFN
    order = [p for p in POINTS if p in points]
    as_strings = isinstance(batches, Sequence) and bool(batches) and all(
        isinstance(b, str) for b in batches)
    rule = exclusion_rule(exclude_positions, exclude_token_ids, exclude_norm_above,
                          skip_first=skip_first, vocab_size=_vocab_size(root, tokenizer),
                          max_length=max_length if as_strings else None)
    check_outlier_parameters(outlier_fraction, outlier_threshold, max_outlier_tokens)
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens == {max_tokens}, must be >= 2 (a covariance needs 2 rows).")
    accs = {(s.layer, p): CovarianceAccumulator(s.name(p), gram_dtype=gram_dtype)
            for s in chosen for p in order}
    stats = {key: TokenNormStats(acc.name, max_outlier_tokens=max_outlier_tokens,
                                 norm_above=rule.norm_above)
             for key, acc in accs.items()} if diagnostics or rule.norm_above is not None else {}
    reads = [(accs[(s.layer, p)], s.paths[p], stats.get((s.layer, p)))
             for s in chosen for p in order]
    meta = _model_metadata(root, chosen, len(all_sites))
    fingerprint = _fingerprint(meta, chosen, order)

    ckpt = Path(checkpoint) if checkpoint is not None else None
    done_batches, n_tokens, n_batches = 0, 0, 0
    # real tokens seen, left out by position / id, batches emptied by them, longest sequence
    excluded = {"real": 0, "positions": 0, "token_ids": 0, "empty_batches": 0, "longest": 0}
    if ckpt is not None and ckpt.exists():
        state = _load_checkpoint(ckpt, accs, fingerprint)
        done_batches, n_tokens = int(state["batches"]), int(state["tokens"])
        excluded = state.get("excluded", excluded)
        if stats and not _load_token_stats(ckpt, stats):
            diagnostics = False  # warned: the statistics of the counted batches are gone

    device = next(root.parameters()).device
    data_hash = hashlib.sha1()
    bar = tqdm(total=max_tokens, initial=n_tokens, unit="tok", disable=not progress,
               desc=f"spectra {meta['model']}", dynamic_ncols=True)
    try:
        for i, batch in enumerate(iter_batches(batches, tokenizer, batch_size=batch_size,
                                               max_length=max_length)):
            if max_tokens is not None and n_tokens >= max_tokens:
                break
            n_batches = i + 1
            _hash_batch(data_hash, batch)
            if i < done_batches:
                continue  # counted before the checkpoint
            remaining = None if max_tokens is None else max_tokens - n_tokens
            ids = batch.get("input_ids")
            idx = mask_shape = None
            if ids is not None:
                mask = batch.get("attention_mask")
                mask = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
                real = mask
                if rule.by_token:
                    mask, counts = rule.token_mask(ids, mask)
                    excluded["positions"] += counts["positions"]
                    excluded["token_ids"] += counts["token_ids"]
                    excluded["longest"] = max(excluded["longest"], int(real.sum(1).max()))
                keep = _budget_mask(mask, remaining)
                excluded["real"] += int(real.sum())
                if not bool(keep.any()):
                    excluded["empty_batches"] += bool(real.any())
                    continue  # an all-padding batch adds nothing; counted in the final check
                idx, mask_shape = keep.reshape(-1).nonzero().squeeze(1).to(device), keep.shape
                if stats:
                    meta_rows = _token_meta(i, ids, real, keep).to(device)
            elif rule.by_token:
                raise CaptureError(
                    f"batch {i} has no input_ids, so exclude_positions / exclude_token_ids "
                    "cannot apply; they need token inputs (exclude_norm_above works on any).")
            inputs = {k: _to(v, device) for k, v in batch.items()}
            try:
                n_keep = _trace_batch(wrapper, inputs, reads, idx, mask_shape, remaining,
                                      meta_rows if ids is not None and stats else None)
            except NerveInterpError as err:
                shape = tuple(ids.shape) if ids is not None else "non-token inputs"
                raise type(err)(
                    f"while capturing {meta['model']} (batch {i}, input {shape}):\n  {err}"
                ) from None
            n_tokens += n_keep
            bar.update(n_keep)
            if ckpt is not None and (i + 1) % checkpoint_every == 0:
                _save_checkpoint(ckpt, accs, {"batches": i + 1, "tokens": n_tokens,
                                              "fingerprint": fingerprint, "excluded": excluded})
                _save_token_stats(ckpt, stats)
    finally:
        bar.close()
    if n_tokens == 0 and excluded["real"] > 0:
        raise CaptureError(
            f"every one of the {excluded['real']} real tokens given to {meta['model']} was "
            f"excluded ({excluded['positions']} by exclude_positions="
            f"{list(rule.positions)}, {excluded['token_ids']} by exclude_token_ids="
            f"{list(rule.token_ids)}); nothing is left for a spectrum. Exclude fewer "
            "positions or ids, or pass longer texts."
        )
    if n_tokens == 0:
        raise CaptureError(
            f"no tokens reached {meta['model']}: the data were empty or every token was padding "
            "(attention_mask all 0). Pass non-empty texts or batches with real tokens."
        )
    if ckpt is not None:
        _save_checkpoint(ckpt, accs, {"batches": n_batches, "tokens": n_tokens,
                                      "fingerprint": fingerprint, "excluded": excluded})
        _save_token_stats(ckpt, stats)
    _warn_exclusion(rule, excluded)
    spectra = {}
    for key, acc in accs.items():
        if acc.n_samples_seen_ < 2:
            raise CaptureError(f"{acc.name} saw {acc.n_samples_seen_} token(s); need >= 2.")
        spectra[key] = spectrum_from_covariance(
            acc.covariance_, acc.mean_, acc.n_samples_seen_, eigenvectors=eigenvectors,
            name=acc.name, warn=False,
        )
    # round-off of the per-batch scatter sets how negative an eigenvalue may come out:
    # SPEC's -1e-8·λ_1 for float64, 64·eps ≈ 7.6e-6 for a float32 Gram
    _warn_once(list(spectra.values()),
               NEGATIVE_WARN_TOL if gram_dtype == torch.float64 else 64 * 2.0**-23)
    diags, free = {}, {}
    if diagnostics:
        diags, free = _finish_diagnostics(
            accs, stats, outlier_fraction=outlier_fraction, outlier_threshold=outlier_threshold,
            tokenizer=tokenizer if tokenizer is not None else getattr(wrapper, "tokenizer", None),
            eigenvectors=eigenvectors)
        from .diagnostics import warn_outliers

        warn_outliers(diags, meta["model"], stacklevel=3)
    meta.update({
        "n_tokens": n_tokens,
        "n_batches": n_batches,
        "max_tokens": max_tokens,
        "skip_first": skip_first,
        "exclusion": {**rule.to_dict(), "skip_first": skip_first},
        "n_excluded": {
            "real_tokens": excluded["real"], "positions": excluded["positions"],
            "token_ids": excluded["token_ids"], "empty_batches": excluded["empty_batches"],
            "norm": {acc.name: stats[key].n_excluded_norm_ for key, acc in accs.items()
                     if rule.norm_above is not None},
            "norm_thresholds": {acc.name: stats[key].norm_threshold_
                                for key, acc in accs.items() if rule.norm_above is not None}},
        "diagnostics": {"enabled": bool(diagnostics), "outlier_fraction": outlier_fraction,
                        "outlier_threshold": outlier_threshold,
                        "max_outlier_tokens": max_outlier_tokens,
                        "flagged": [d.name for d in diags.values() if d.outlier_flag]},
        "gram_dtype": str(gram_dtype).replace("torch.", ""),
        "data": data_label,
        "data_sha1": data_hash.hexdigest(),
        "points": list(order),
        "layers": [s.layer for s in chosen],
        "site_paths": {s.name(p): s.paths[p] for s in chosen for p in order},
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    })
    return SpectraResult(spectra, meta, diagnostics=diags or None, without_outliers=free or None)


def _vocab_size(root: torch.nn.Module, tokenizer: Any) -> int | None:
    """Rows of the input embedding (else config.vocab_size, else len(tokenizer))."""
    try:
        return int(root.get_input_embeddings().num_embeddings)
    except Exception:  # not a Hugging Face model, or no token embedding
        pass
    size = getattr(getattr(root, "config", None), "vocab_size", None)
    if size:
        return int(size)
    return len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None


def _token_meta(i: int, ids: torch.Tensor, real: torch.Tensor, keep: torch.Tensor
                ) -> torch.Tensor:
    """Batch, row, position (among real tokens) and token id of each kept token,
    row-major like ``keep.nonzero()``: LongTensor of shape (n_keep, 4)."""
    rows, _ = keep.nonzero(as_tuple=True)
    pos = (real.long().cumsum(1) - 1)[keep]
    return torch.stack([torch.full_like(rows, i), rows, pos, ids.to(rows.device)[keep]], 1)


def _warn_exclusion(rule: Any, excluded: dict) -> None:
    if excluded["empty_batches"]:
        warnings.warn(
            f"{excluded['empty_batches']} batch(es) had every real token excluded "
            f"(exclude_positions={list(rule.positions)}, exclude_token_ids="
            f"{list(rule.token_ids)}) and added nothing to the spectra.", stacklevel=3)
    longest = excluded["longest"]
    if rule.positions and longest and rule.positions[-1] >= longest:
        never = [p for p in rule.positions if p >= longest]
        warnings.warn(
            f"exclude_positions {never} never occurred: the longest sequence had {longest} "
            f"real tokens (positions 0..{longest - 1}). Positions count the real tokens of "
            "each sequence from 0.", stacklevel=3)


def _finish_diagnostics(accs: dict, stats: dict, *, outlier_fraction: float,
                        outlier_threshold: float, tokenizer: Any, eigenvectors: bool
                        ) -> tuple[dict, dict]:
    """Per point: TokenDiagnostics, and for flagged points the spectrum without their
    outlier tokens (``TokenDiagnostics.outlier_mask``)."""
    from .diagnostics import decode_tokens, remove_rows

    diags, free = {}, {}
    for key, acc in accs.items():
        st = stats[key]
        if st.n_samples_seen_ == 0:
            continue
        m2 = acc.scatter_
        d = st.finish(acc.mean_, float(torch.diagonal(m2).sum()),
                      outlier_fraction=outlier_fraction, outlier_threshold=outlier_threshold)
        d.top_tokens = decode_tokens(d.top_meta[:, TOKEN_META.index("token_id")], tokenizer)
        diags[key] = d
        if d.outlier_flag and acc.n_samples_seen_ - d.n_outliers >= 2:
            mask = torch.from_numpy(d.outlier_mask).to(st.top_vectors_.device)
            n_a, mean_a, m2_a = remove_rows(acc.n_samples_seen_, acc.mean_, m2,
                                            st.top_vectors_[mask])
            free[key] = spectrum_from_covariance(m2_a / (n_a - 1), mean_a, n_a,
                                                 eigenvectors=eigenvectors, name=acc.name,
                                                 warn=False)
    return diags, free


def _save_token_stats(ckpt: Path, stats: dict) -> None:
    """The diagnostics' state next to a capture checkpoint (``<ckpt>.tokens``)."""
    if not stats:
        return
    from safetensors.torch import save_file

    tensors = {f"{site_name(layer, point)}.{k}": v.contiguous()
               for (layer, point), st in stats.items() for k, v in st.state_dict().items()}
    with atomic_path(Path(f"{ckpt}.tokens")) as tmp:
        save_file(tensors, tmp, metadata={"format": "nerve_interp.token_stats"})


def _load_token_stats(ckpt: Path, stats: dict) -> bool:
    """Restore what :func:`_save_token_stats` wrote; False (and a warning) if it is absent."""
    path = Path(f"{ckpt}.tokens")
    if not path.exists():
        warnings.warn(f"{ckpt} has no token statistics ({path.name}); resuming without "
                      "token diagnostics (outlier shares would miss the counted batches).",
                      stacklevel=3)
        return False
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for (layer, point), st in stats.items():
        prefix = site_name(layer, point) + "."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if sub:
            st.load_state_dict(sub)
    return True


def _warn_once(spectra: list, neg_tol: float = NEGATIVE_WARN_TOL) -> None:
    """One warning per capture (not one per point) for rank deficiency and negatives."""
    short = [s for s in spectra if s.rank_deficient]
    if short:
        names = ", ".join(s.name for s in short[:3]) + (", ..." if len(short) > 3 else "")
        warnings.warn(
            f"N = {short[0].n_samples} tokens <= D = {short[0].dim} at {len(short)} of "
            f"{len(spectra)} points ({names}): those spectra are rank-deficient "
            f"(rank <= N - 1) and every metric depends on N/D. Raise max_tokens (the papers "
            "use ~65k tokens, N >> D) before comparing metrics.",
            RankDeficientWarning, stacklevel=3)
    bad = [s for s in spectra
           if s.min_eigenvalue < -neg_tol * max(float(s.eigenvalues[0]), 1e-300)]
    if bad:
        worst = min(bad, key=lambda s: s.min_eigenvalue / max(float(s.eigenvalues[0]), 1e-300))
        warnings.warn(
            f"{len(bad)} point(s) had eigenvalues below -{neg_tol:.1e}·λ_1 (worst {worst.name}: "
            f"{worst.min_eigenvalue:.3e}, λ_1 = {worst.eigenvalues[0]:.3e}); clipped to 0. "
            "This is more than round-off: report it with the model and dtype.",
            NegativeEigenvalueWarning, stacklevel=3)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def _trace_batch(wrapper: Any, inputs: dict, reads: list, idx: torch.Tensor | None,
                 mask_shape: tuple | None, remaining: int | None,
                 meta: torch.Tensor | None = None) -> int:
    """One nnsight trace: read every point in forward order, accumulate, stop early.

    ``reads`` holds ``(accumulator, path, TokenNormStats or None)``; the token statistics
    see the rows first and may drop some (``exclude_norm_above``). Returns the number of
    rows (tokens) each point received before that norm rule.
    """
    kwargs = dict(inputs)
    args = kwargs.pop("_args", ())
    counts = []
    with torch.no_grad(), wrapper.trace(*args, **kwargs) as tracer:
        for acc, path, token_stats in reads:
            x = wrapper.get(path)
            rows = _select_rows(x, idx, mask_shape, remaining, acc.name)
            counts.append(rows.shape[0])
            if token_stats is not None:
                rows = token_stats.observe(rows, meta)
            acc.update(rows)
        tracer.stop()
    return counts[0]


def _select_rows(x: torch.Tensor, idx: torch.Tensor | None, mask_shape: tuple | None,
                 remaining: int | None, name: str) -> torch.Tensor:
    """The rows of a point that are real tokens, within the token budget."""
    if idx is None:  # non-token model: every row is data
        rows = x.reshape(-1, x.shape[-1])
        return rows if remaining is None else rows[:remaining]
    if tuple(x.shape[:2]) == tuple(mask_shape):
        return x.reshape(-1, x.shape[-1]).index_select(0, idx)
    n = mask_shape[0] * mask_shape[1]
    if x.ndim == 2 and x.shape[0] == n:  # flattened [batch*seq, D] (OPT)
        return x.index_select(0, idx)
    raise CaptureError(
        f"{name}: activations of shape {tuple(x.shape)} cannot be aligned with the attention "
        f"mask {tuple(mask_shape)}; pass sites whose points are [batch, seq, D]."
    )


__all__ = ["collect_spectra", "iter_batches", "model_label", "token_hash"]
