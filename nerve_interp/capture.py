"""Run nnsight traces over batches and feed each FFN point to its covariance accumulator.

Only D×D statistics leave the forward pass: activations are read inside the trace, padding
tokens are dropped (SPEC.md §1), the rows go into a :class:`CovarianceAccumulator` on the
activations' own device, and ``tracer.stop()`` ends the forward after the last point needed.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import numbers
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from . import checkpoint as _ckpt
from . import distributed as _dist
from ._validation import check_positive_int
from .covariance import CovarianceAccumulator, gram_dtype_of, resolve_precision
from .diagnostics import (
    DEFAULT_MAX_OUTLIER_TOKENS,
    DEFAULT_OUTLIER_FRACTION,
    DEFAULT_OUTLIER_THRESHOLD,
    TOKEN_META,
    ExclusionRule,
    TokenNormStats,
    check_outlier_parameters,
    exclusion_rule,
)
from .errors import (
    CaptureError,
    NegativeEigenvalueWarning,
    NerveInterpError,
    RankDeficientWarning,
    SiteError,
)
from .sites import POINTS, FFNSite, as_nnsight, find_ffn_sites, select_sites
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
        if batches.is_floating_point():  # model inputs (images, features): split along dim 0
            if batches.ndim < 2:
                raise CaptureError(
                    f"batches is a float tensor of shape {tuple(batches.shape)}; pass model "
                    "inputs with a leading batch dimension, e.g. [N, ...], or a list of them.")
            for j, start in enumerate(range(0, batches.shape[0], batch_size)):
                yield _as_batch(batches[start:start + batch_size], j)
            return
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
    if ids is None:  # non-token inputs: their raw values, in key order
        for key in sorted(batch):
            for v in batch[key] if isinstance(batch[key], tuple) else (batch[key],):
                if isinstance(v, torch.Tensor):
                    h.update(key.encode() + v.detach().cpu().contiguous().numpy().tobytes())
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


def subsample_generator(seed: int, batch_index: int) -> torch.Generator:
    """The CPU generator that decides which tokens of batch ``batch_index`` are kept.

    Seeded from ``(seed, batch_index)`` alone: the first 8 bytes (little-endian) of
    ``sha256(f"{seed}:{batch_index}")``, top bit cleared. A resumed run, a torchrun rank and
    a remote trace therefore draw the same numbers for batch ``i`` as one local run.
    """
    digest = hashlib.sha256(f"{int(seed)}:{int(batch_index)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def subsample_mask(real: torch.Tensor, fraction: float, seed: int, batch_index: int
                   ) -> torch.Tensor:
    """Bernoulli(``fraction``) token subsampling of one batch.

    One float64 uniform ``u`` is drawn per *real* token, row-major over the real tokens of
    the batch (padding draws nothing, so the padding side does not change the choice), from
    :func:`subsample_generator`; a token is kept when ``u < fraction``.

    Parameters
    ----------
    real : BoolTensor of shape (batch, seq)
        The batch's real (non-padding) tokens.
    fraction : float in (0, 1]
        Probability of keeping each token (1 keeps every one).
    seed, batch_index : int
        ``subsample_seed`` and the batch's index in the data (counted from 0).

    Returns
    -------
    BoolTensor of shape (batch, seq)
        True for the kept real tokens, False elsewhere (padding included).
    """
    device, real = real.device, real.bool().cpu()
    u = torch.rand(int(real.sum()), generator=subsample_generator(seed, batch_index),
                   dtype=torch.float64)
    keep = torch.zeros_like(real)
    keep[real] = u < fraction
    return keep.to(device)


def _check_token_fraction(token_fraction: Any, subsample_seed: Any) -> float | None:
    """``token_fraction`` as a float in (0, 1] (or None); a TypeError (not a number) or a
    ValueError (out of range) naming it otherwise, and the same for ``subsample_seed``."""
    check_positive_int(subsample_seed, "subsample_seed", minimum=0)
    if token_fraction is None:
        return None
    if isinstance(token_fraction, bool) or not isinstance(token_fraction, numbers.Real):
        raise TypeError(
            f"token_fraction must be a number in (0, 1] or None; got "
            f"{type(token_fraction).__name__} {token_fraction!r}.")
    p = float(token_fraction)
    if not 0.0 < p <= 1.0:  # NaN fails too
        raise ValueError(
            f"token_fraction == {token_fraction!r}, must be in (0, 1]: the probability of "
            "keeping each token. Pass e.g. 0.25 to keep about a quarter of the tokens, or None "
            "(the default) to keep them all.")
    return p


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
    token_fraction: float | None = None,
    subsample_seed: int = 0,
    batch_size: int = 8,
    max_length: int = 256,
    eigenvectors: bool = False,
    gram_dtype: torch.dtype | None = None,
    precision: str = "auto",
    memory_budget: int | float | str | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 20,
    data_label: str = "",
    diagnostics: bool = True,
    outlier_fraction: float = DEFAULT_OUTLIER_FRACTION,
    outlier_threshold: float = DEFAULT_OUTLIER_THRESHOLD,
    max_outlier_tokens: int = DEFAULT_MAX_OUTLIER_TOKENS,
    distributed: bool | None = None,
    remote: Any = None,
):
    """Eigenspectra of FFN activations before and after the nonlinearity, layer by layer.

    Parameters
    ----------
    model : torch.nn.Module or nnsight wrapper
        A Hugging Face model (or ``nnsight.NNsight`` / ``TransformersModel`` of one). It is
        wrapped with nnsight once; it still runs normally outside traces.
    batches : iterable
        Dicts with ``input_ids`` and ``attention_mask`` (tokenizer output), token-id tensors
        ``[batch, seq]``, a list of strings together with ``tokenizer``, or for models
        without token inputs (e.g. an MLP-Mixer) float input tensors, or one float tensor
        ``[N, ...]`` that is split into batches of ``batch_size`` along its first dimension.
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
        each point's threshold and how many tokens it left out. Under torchrun every rank
        gets that batch's thresholds (see ``distributed``); not available with ``remote=``
        (only D×D statistics come back, no token norms).
    token_fraction : float in (0, 1] or None, default None
        Token subsampling, off by default: keep each real token that the rules above kept
        independently with probability ``token_fraction``, before ``max_tokens`` counts it. The
        draw for batch ``i`` comes from a generator seeded with ``(subsample_seed, i)`` alone
        (:func:`nerve_interp.capture.subsample_mask`), so a resumed checkpoint, a torchrun rank
        and a remote trace keep the same tokens as one local run. A statistical trade, not a
        speed-up of the model: every token still runs through the forward pass; only the
        per-token accumulation (``D²`` multiply-adds per token and point) shrinks, and with
        ``max_tokens`` set the budget is filled from about ``1/token_fraction`` times as many
        batches, which costs that many more forward passes. The choice ignores the activations,
        so it adds no bias: the kept tokens are a random sample of the same token distribution
        and their covariance estimates the same covariance; its sampling error grows as
        ``1/sqrt(N_kept)``, and eigenvalues and metrics depend on ``N_kept / D`` as for any N,
        so compare spectra at equal ``N_kept``. It helps when there are many more tokens than
        the accumulation can afford: neighbouring tokens of one sequence are strongly
        correlated, so ``N`` tokens spread over ``1/token_fraction`` times as many documents
        hold more independent information than ``N`` consecutive ones. Token inputs only.
        ``metadata["n_excluded"]["subsampled"]`` counts the tokens it left out.
    subsample_seed : int >= 0, default 0
        Seed of the token subsampling (recorded in ``metadata["subsample_seed"]``).
    eigenvectors : bool, default False
        Keep eigenvectors (8·D² bytes per point) for subspace ablations.
    gram_dtype : torch.float64 or torch.float32, optional
        Older synonym of ``precision`` (``"fp64"`` / ``"fp32"``).
    precision : {"auto", "fp64", "fp32", "bf16-split"}, default "auto"
        How each batch's centred scatter matrix is formed (see
        :mod:`nerve_interp.covariance`): ``"auto"`` is ``"fp64"`` when the model is on a CPU
        and ``"fp32"`` (TF32 forbidden) on CUDA; ``"fp32"`` is ~1.7× faster than fp64 on CPU;
        ``"bf16-split"`` (opt-in) runs on bf16 tensor cores, with a tail accuracy that
        depends on the covariance. Statistics are merged and eigendecomposed in float64
        either way; ``metadata["precision"]`` records the mode used.
    memory_budget : bytes, "auto" or None, default None
        Plan device memory first (:func:`nerve_interp.planner.plan_capture`, widths read in a
        one-row probe trace): when the statistics of every point do not fit, the points are
        split into passes over the same data (``batches`` must then be re-iterable, e.g. a
        list) and the spectra merged; a point that alone does not fit raises
        ``MemoryPlanError``. ``"auto"``: 90% of free CUDA memory, or half the available RAM
        on CPU. None: no planning.
    progress : bool, default True
        Show a tqdm progress bar (tokens).
    checkpoint : path, optional
        Save the running statistics there every ``checkpoint_every`` batches (atomically:
        a run killed at any moment leaves the previous or the new checkpoint) and resume
        from it when it exists: pass the same batches again; the ones already counted are
        hashed, not run, and a resume on other data, another model, other sites or other
        options (``points``, ``max_tokens``, ``skip_first``, ``precision``, exclusions,
        ``token_fraction`` / ``subsample_seed``) is refused
        (see :mod:`nerve_interp.checkpoint`). A resumed run gives the same eigenvalues as an
        uninterrupted one, bit for bit on the same machine. Under ``torch.distributed`` each
        rank writes ``<stem>.rank<r>-of-<w><suffix>``.
    checkpoint_every : int, default 20
        Batches (of this process) between checkpoints.
    data_label : str
        What the text was (kept in the metadata, e.g. ``"python-docs/train"``).
    distributed : bool or None
        Data-parallel capture over ``torch.distributed`` processes (launch with ``torchrun``):
        batch ``i`` is run by rank ``i % world_size``, the statistics are merged exactly
        (:func:`nerve_interp.distributed.all_reduce_accumulators`) and every rank returns the
        same result. ``None`` (default): when a process group of more than one process is
        initialised. ``max_tokens`` stays the *global* budget: rank ``r`` keeps the first
        ``max_tokens // world_size`` (+1 for ``r < max_tokens % world_size``) tokens of its
        shard, so a binding budget selects other tokens than a single process would. Token
        diagnostics are gathered per rank and merged once at the end
        (:func:`nerve_interp.distributed.all_gather_token_stats`, exact: the same outlier
        shares, flags, top tokens and ``without_outliers()`` spectra as one process; each
        rank receives ``world_size × max_outlier_tokens × D`` floats per point, one point at
        a time). ``exclude_norm_above`` uses the thresholds of one process: the rank that
        runs the calibration batch (the first with kept tokens) hands every point's
        threshold to the others in one all-reduce right after its trace, and they wait
        for it before their own first trace; no batch runs twice and the thresholds, hence
        ``metadata["n_excluded"]``, match one process bit for bit (unless that rank's
        share of ``max_tokens`` cuts the calibration batch).
    remote : bool, "local" or None
        Run each trace through nnsight's remote machinery (``model.trace(..., remote=remote)``):
        ``True`` sends it to NDIF (needs an ``nnsight.TransformersModel`` of a model NDIF hosts
        and an API key), ``"local"`` serialises it exactly as for NDIF and runs it here. Only
        per-batch ``(count, mean, centred scatter)`` come back; they are merged here with the
        exact Chan update (:mod:`nerve_interp.remote`).

    diagnostics : bool, default True
        Gather per-token statistics in the same pass (:mod:`nerve_interp.diagnostics`): norm
        quantiles, the ``max_outlier_tokens`` tokens of largest norm (position, batch, token
        id) and the share of the variance the top ``outlier_fraction`` of tokens hold.
        Points where that share exceeds ``outlier_threshold`` are flagged, reported in one
        ``OutlierTokenWarning``, in the ``outlier_share`` / ``outlier_flag`` columns of
        ``metrics()`` and ``reinjection()``, and get a second spectrum without those tokens
        (``result.without_outliers()``). Costs ~1% of the covariance update per batch (one
        norm per token), plus one eigendecomposition per flagged point; ``False`` skips it.
        Under torchrun the ranks' statistics are merged exactly (see ``distributed``); with
        ``remote=...`` they are off (only D×D statistics come back from the server).
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
        the vocabulary, ``exclude_norm_above <= 1``, fractions outside (0, 1),
        ``token_fraction`` outside (0, 1]), or ``exclude_norm_above`` with ``remote=``.
    SiteError
        A layer out of range, or a point the FFN does not have.
    """
    call = dict(locals())  # the arguments, for a multi-pass plan
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
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every == {checkpoint_every}, must be >= 1 (batches).")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens == {max_tokens}, must be >= 2 (a covariance needs 2 rows).")
    token_fraction = _check_token_fraction(token_fraction, subsample_seed)
    subsample_seed = int(subsample_seed)
    rank, world_size = _dist.world(distributed)
    budget = _dist.rank_budget(max_tokens, rank, world_size)  # this rank's share
    device = _input_device(root)
    precision = resolve_precision(precision, device, gram_dtype=gram_dtype)
    if memory_budget is not None:
        batches, plan = _plan(wrapper, batches, chosen, order, precision, call, device)
        if plan.n_passes > 1:
            return _collect_in_passes(plan, {**call, "model": wrapper, "sites": all_sites},
                                      batches)
    trace_batch = _trace_batch
    if remote is not None and rule.norm_above is not None:
        raise ValueError(
            "exclude_norm_above is not available with remote=...: the rule drops single "
            "tokens by their activation norm, but a remote trace sends back only each batch's "
            "D×D statistics (count, mean, centred scatter), with the tokens already summed "
            "in, so no norm is left here to test or remove. Use exclude_positions / "
            "exclude_token_ids (applied before the trace), or capture locally (one process "
            "or torchrun).")
    if remote is not None and diagnostics:
        diagnostics = False  # a remote trace returns only D×D statistics, no token norms
    if remote is not None:
        from .remote import check_remote_wrapper, remote_trace_batch

        check_remote_wrapper(wrapper, remote)
        if precision == "bf16-split":
            raise ValueError(
                "precision='bf16-split' is not available with remote=...: the per-batch "
                "statistics are formed on the server with plain torch ops. Use precision='fp64' "
                "(default off CUDA) or 'fp32'."
            )
        trace_batch = functools.partial(remote_trace_batch, remote=remote,
                                        gram_dtype=gram_dtype_of(precision))
    accs = {(s.layer, p): CovarianceAccumulator(s.name(p), precision=precision)
            for s in chosen for p in order}
    stats = {key: TokenNormStats(acc.name, max_outlier_tokens=max_outlier_tokens,
                                 norm_above=rule.norm_above)
             for key, acc in accs.items()} if diagnostics or rule.norm_above is not None else {}
    reads = [(accs[(s.layer, p)], s.paths[p], stats.get((s.layer, p)))
             for s in chosen for p in order]
    meta = _model_metadata(root, chosen, len(all_sites))
    manifest = _ckpt.capture_manifest(meta, chosen, order, max_tokens=max_tokens,
                                      skip_first=skip_first, precision=precision,
                                      rank=rank, world_size=world_size,
                                      exclusion=rule.to_dict() if rule.active else None,
                                      token_fraction=token_fraction,
                                      subsample_seed=subsample_seed)

    ckpt = (_ckpt.shard_path(Path(checkpoint), rank, world_size)
            if checkpoint is not None else None)
    done_batches, n_tokens, position = 0, 0, None
    # real tokens seen, left out by position / id / subsampling, batches emptied by them,
    # longest sequence
    excluded = {"real": 0, "positions": 0, "token_ids": 0, "subsampled": 0, "empty_batches": 0,
                "longest": 0}
    if ckpt is not None and ckpt.exists():
        position = _ckpt.load_checkpoint(ckpt, accs, manifest, token_stats=stats)
        done_batches, n_tokens = int(position["batches"]), int(position["tokens"])
        excluded = {**excluded, **position.get("excluded", {})}
        if any(st.n_samples_seen_ == 0 and accs[key].n_samples_seen_
               for key, st in stats.items()):
            warnings.warn(f"{ckpt} has no token statistics (written with diagnostics=False); "
                          "resuming without token diagnostics (outlier shares would miss the "
                          "counted batches).", stacklevel=2)
            diagnostics = False
    n_batches, n_local, n_seen = done_batches, 0, 0
    # exclude_norm_above under torchrun: the thresholds of the calibration batch (the first
    # with kept tokens), found by its owner and shared once (see _share_norm_thresholds)
    share_thresholds = world_size > 1 and rule.norm_above is not None
    calibration = None  # that batch's index, once seen

    data_hash = hashlib.sha1()
    bar = tqdm(total=budget, initial=n_tokens, unit="tok", disable=not progress or rank > 0,
               desc=f"spectra {meta['model']}", dynamic_ncols=True)
    try:
        for i, batch in enumerate(iter_batches(batches, tokenizer, batch_size=batch_size,
                                               max_length=max_length)):
            n_seen = i + 1
            if share_thresholds and calibration is None and _calibrates(
                    batch, rule, token_fraction, subsample_seed, i,
                    _dist.rank_budget(max_tokens, i % world_size, world_size)):
                calibration = i
            if i < done_batches:  # counted before the checkpoint: only check it is the same
                _hash_batch(data_hash, batch)
                if i == done_batches - 1:
                    _ckpt.check_data_prefix(ckpt, position, data_hash.hexdigest(), i + 1)
                continue
            if budget is not None and n_tokens >= budget:
                break
            n_batches = i + 1
            _hash_batch(data_hash, batch)
            if i % world_size != rank:
                continue  # another rank's shard
            remaining = None if budget is None else budget - n_tokens
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
                if token_fraction is not None:  # before the budget: it fills with kept tokens
                    drawn = subsample_mask(real, token_fraction, subsample_seed, i)
                    excluded["subsampled"] += int((mask & ~drawn).sum())
                    mask = mask & drawn
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
            elif token_fraction is not None:
                raise CaptureError(
                    f"batch {i} has no input_ids, so token_fraction={token_fraction} cannot "
                    "apply: token subsampling needs token inputs. Pass token_fraction=None, or "
                    "subsample the inputs yourself (e.g. every k-th sample).")
            elif stats:  # no tokens: the batch index alone, for every row
                meta_rows = torch.tensor([[i] + [-1] * (len(TOKEN_META) - 1)], device=device)
            inputs = {k: _to(v, device) for k, v in batch.items()}
            if share_thresholds and i != calibration:  # wait for the owner's thresholds
                _dist.all_reduce_norm_thresholds([stats[key] for key in accs])
                share_thresholds = False
            try:
                if trace_batch is _trace_batch:
                    n_keep = _trace_batch(wrapper, inputs, reads, idx, mask_shape, remaining,
                                          meta_rows if stats else None)
                else:  # remote: no token statistics
                    n_keep = trace_batch(wrapper, inputs, [r[:2] for r in reads], idx,
                                         mask_shape, remaining)
            except NerveInterpError as err:
                shape = tuple(ids.shape) if ids is not None else "non-token inputs"
                raise type(err)(
                    f"while capturing {meta['model']} (batch {i}, input {shape}):\n  {err}"
                ) from None
            if share_thresholds:  # this rank ran the calibration batch: hand its thresholds on
                _dist.all_reduce_norm_thresholds([stats[key] for key in accs])
                share_thresholds = False
            n_tokens += n_keep
            n_local += 1
            bar.update(n_keep)
            if ckpt is not None and n_local % checkpoint_every == 0:
                _ckpt.save_checkpoint(ckpt, accs, manifest, {
                    "batches": i + 1, "tokens": n_tokens, "data_sha1": data_hash.hexdigest(),
                    "excluded": excluded}, token_stats=stats)
    finally:
        bar.close()
    if share_thresholds:  # this rank traced nothing (no batch, or all in its checkpoint)
        _dist.all_reduce_norm_thresholds([stats[key] for key in accs])
    if position is not None and n_seen < done_batches:  # the data ended before the checkpoint
        _ckpt.check_data_prefix(ckpt, position, data_hash.hexdigest(), n_seen)
    if ckpt is not None:
        _ckpt.save_checkpoint(ckpt, accs, manifest, {
            "batches": n_batches, "tokens": n_tokens, "data_sha1": data_hash.hexdigest(),
            "excluded": excluded}, token_stats=stats)
    data_sha1 = data_hash.hexdigest()
    if world_size > 1:
        _dist.all_reduce_accumulators(list(accs.values()))
        if stats:
            # every rank must agree: one that resumed from a checkpoint without token
            # statistics has switched them off
            agreed = _dist.all_reduce_count(int(not diagnostics)) == 0
            if diagnostics and not agreed and rank == 0:
                warnings.warn("another rank resumed from a checkpoint without token statistics "
                              "(written with diagnostics=False); resuming without token "
                              "diagnostics on every rank.", stacklevel=2)
            diagnostics = agreed
            if diagnostics or rule.norm_above is not None:  # the norm rule's counts too
                _dist.all_gather_token_stats([stats[key] for key in accs])
        n_tokens = _dist.all_reduce_count(n_tokens)
        n_batches, data_sha1 = _dist.furthest_position(n_batches, data_sha1)
        for key in ("real", "positions", "token_ids", "subsampled", "empty_batches"):
            excluded[key] = _dist.all_reduce_count(excluded[key])
    if n_tokens == 0 and excluded["real"] > 0:
        raise CaptureError(
            f"every one of the {excluded['real']} real tokens given to {meta['model']} was "
            f"excluded ({excluded['positions']} by exclude_positions="
            f"{list(rule.positions)}, {excluded['token_ids']} by exclude_token_ids="
            f"{list(rule.token_ids)}, {excluded['subsampled']} by token_fraction="
            f"{token_fraction}); nothing is left for a spectrum. Exclude fewer positions or "
            "ids, raise token_fraction, or pass longer texts."
        )
    if n_tokens == 0:
        raise CaptureError(
            f"no tokens reached {meta['model']}: the data were empty or every token was padding "
            "(attention_mask all 0). Pass non-empty texts or batches with real tokens."
        )
    if rank == 0:
        _warn_exclusion(rule, excluded, token_fraction)
    spectra = {}
    for key, acc in accs.items():
        if acc.n_samples_seen_ < 2:
            raise CaptureError(f"{acc.name} saw {acc.n_samples_seen_} token(s); need >= 2.")
        spectra[key] = spectrum_from_covariance(
            acc.covariance_, acc.mean_, acc.n_samples_seen_, eigenvectors=eigenvectors,
            name=acc.name, warn=False,
        )
    # round-off of the per-batch scatter sets how negative an eigenvalue may come out:
    # SPEC's -1e-8·λ_1 for float64, 64·eps ≈ 7.6e-6 for a float32 (or bf16-split) Gram
    _warn_once(list(spectra.values()),
               NEGATIVE_WARN_TOL if precision == "fp64" else 64 * 2.0**-23)
    diags, free = {}, {}
    if diagnostics:
        diags, free = _finish_diagnostics(
            accs, stats, outlier_fraction=outlier_fraction, outlier_threshold=outlier_threshold,
            tokenizer=tokenizer if tokenizer is not None else getattr(wrapper, "tokenizer", None),
            eigenvectors=eigenvectors)
        from .diagnostics import warn_outliers

        if rank == 0:  # the same on every rank: reported once
            warn_outliers(diags, meta["model"], stacklevel=3)
    meta.update({
        "n_tokens": n_tokens,
        "n_batches": n_batches,
        "max_tokens": max_tokens,
        "skip_first": skip_first,
        "token_fraction": token_fraction,
        "subsample_seed": subsample_seed,
        "exclusion": {**rule.to_dict(), "skip_first": skip_first},
        "n_excluded": {
            "real_tokens": excluded["real"], "positions": excluded["positions"],
            "token_ids": excluded["token_ids"], "subsampled": excluded["subsampled"],
            "empty_batches": excluded["empty_batches"],
            "norm": {acc.name: stats[key].n_excluded_norm_ for key, acc in accs.items()
                     if rule.norm_above is not None},
            "norm_thresholds": {acc.name: stats[key].norm_threshold_
                                for key, acc in accs.items() if rule.norm_above is not None}},
        "diagnostics": {"enabled": bool(diagnostics), "outlier_fraction": outlier_fraction,
                        "outlier_threshold": outlier_threshold,
                        "max_outlier_tokens": max_outlier_tokens,
                        "flagged": [d.name for d in diags.values() if d.outlier_flag]},
        "gram_dtype": str(accs[next(iter(accs))].gram_dtype).replace("torch.", ""),
        "precision": precision,
        "data": data_label,
        "data_sha1": data_sha1,
        "world_size": world_size,
        "remote": remote,
        "points": list(order),
        "layers": [s.layer for s in chosen],
        "site_paths": {s.name(p): s.paths[p] for s in chosen for p in order},
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    })
    return SpectraResult(spectra, meta, diagnostics=diags or None, without_outliers=free or None)


def _calibrates(batch: dict, rule: ExclusionRule, token_fraction: float | None, seed: int,
                i: int, owner_budget: int | None) -> bool:
    """Whether batch ``i`` can calibrate ``exclude_norm_above``: some token of it survives
    the position / id rules and the subsampling (any batch without token inputs) and its
    owner rank has a token budget. The first such batch is where one process measures its
    medians; every rank decides this alike, from the batch alone."""
    if owner_budget == 0:
        return False
    ids = batch.get("input_ids")
    if ids is None:
        return True
    mask = batch.get("attention_mask")
    real = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    mask = rule.token_mask(ids, real)[0] if rule.by_token else real
    if token_fraction is not None:
        mask = mask & subsample_mask(real, token_fraction, seed, i)
    return bool(mask.any())


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


def _warn_exclusion(rule: Any, excluded: dict, token_fraction: float | None = None) -> None:
    if excluded["empty_batches"]:
        warnings.warn(
            f"{excluded['empty_batches']} batch(es) had every real token excluded "
            f"(exclude_positions={list(rule.positions)}, exclude_token_ids="
            f"{list(rule.token_ids)}, token_fraction={token_fraction}) and added nothing to "
            "the spectra.", stacklevel=3)
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


def _plan(wrapper: Any, batches: Any, chosen: Sequence[FFNSite], order: Sequence[str],
          precision: str, call: dict, device: torch.device) -> tuple[Any, Any]:
    """Probe every point's width on one row of the first batch (inputs on ``device``, the
    capture's input device), then plan the passes.

    Returns ``batches`` (with the first item put back if it was an iterator) and the plan.
    """
    import itertools

    from .planner import plan_capture

    if iter(batches) is batches:  # an iterator: peek, then put the first item back
        try:
            first_raw = next(batches)
        except StopIteration:
            raise CaptureError("no batches: the iterator passed as batches is empty.") from None
        batches = itertools.chain([first_raw], batches)
        first = _as_batch(first_raw, 0)
    else:
        first = next(iter_batches(batches, call["tokenizer"], batch_size=call["batch_size"],
                                  max_length=call["max_length"]), None)
        if first is None:
            raise CaptureError("no batches: batches is empty.")
    probe = {k: (v[:1, :8] if k in ("input_ids", "attention_mask") else v)
             for k, v in first.items()}
    if "_args" in probe:
        probe["_args"] = tuple(a[:1] for a in probe["_args"])
    kwargs = {k: _to(v, device) for k, v in probe.items()}
    args = kwargs.pop("_args", ())
    reads = [(s.layer, p, s.paths[p]) for s in chosen for p in order]
    dims: dict = {}
    with torch.no_grad(), wrapper.trace(*args, **kwargs) as tracer:
        for layer, point, path in reads:
            dims[(layer, point)] = int(wrapper.get(path).shape[-1])
        tracer.stop()
    ids = first.get("input_ids")
    rows = int(ids.numel()) if ids is not None else int(
        next(v for v in first.get("_args", first.values()) if isinstance(v, torch.Tensor))
        .shape[:-1].numel())
    p = next(wrapper._module.parameters())
    plan = plan_capture(dims, budget=call["memory_budget"], device=device, precision=precision,
                        tokens_per_batch=rows, activation_bytes=p.element_size(),
                        eigenvectors=call["eigenvectors"])
    return batches, plan


def _collect_in_passes(plan: Any, call: dict, batches: Any):
    """Run collect_spectra once per pass of ``plan`` over the same data; merge the spectra."""
    from .results import SpectraResult

    if isinstance(batches, Iterator):
        raise CaptureError(
            f"the memory plan needs {plan.n_passes} passes over the data, but batches is an "
            "iterator (e.g. a generator) that can be read only once. Pass a list (list(...) "
            "of the batches), fewer layers, or a larger memory_budget.\n" + plan.summary())
    if call["checkpoint"] is not None:
        raise ValueError("checkpoint= cannot be combined with a multi-pass memory plan yet; "
                         "capture fewer layers per call, each with its own checkpoint.")
    spectra, metas, diags, free = {}, [], {}, {}
    for layers, points in zip(plan.pass_layers, plan.pass_points, strict=True):
        res = collect_spectra(**{**call, "batches": batches, "layers": list(layers),
                                 "points": points, "memory_budget": None})
        spectra.update(res.items())
        metas.append(res.metadata)
        diags.update(res.diagnostics)
        free.update(res._without_outliers)
    for key in ("n_tokens", "data_sha1"):
        if len({m[key] for m in metas}) != 1:
            raise CaptureError(
                f"the {plan.n_passes} passes over the data saw different tokens ({key}: "
                f"{[m[key] for m in metas]}); batches must yield the same data every time "
                "they are iterated.")
    meta = dict(metas[0])
    meta["layers"] = sorted({lay for m in metas for lay in m["layers"]})
    meta["points"] = [p for p in POINTS if any(p in m["points"] for m in metas)]
    meta["site_paths"] = {k: v for m in metas for k, v in m["site_paths"].items()}
    meta["passes"] = [[f"layers.{lay}.ffn.{p}" for lay, p in ps] for ps in plan.passes]
    meta["memory_plan"] = plan.summary()
    if "diagnostics" in meta:
        meta["diagnostics"] = {**meta["diagnostics"], "flagged": [
            f for m in metas for f in m.get("diagnostics", {}).get("flagged", [])]}
    if meta.get("n_excluded", {}).get("norm") is not None:
        for key in ("norm", "norm_thresholds"):
            meta["n_excluded"][key] = {k: v for m in metas
                                       for k, v in m["n_excluded"][key].items()}
    return SpectraResult(spectra, meta, diagnostics=diags or None, without_outliers=free or None)


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


def _input_device(root: torch.nn.Module) -> torch.device:
    """Where inputs go: the first parameter's device (the embedding's under a ``device_map``,
    whose hooks move activations on from there); CPU for a lazily loaded (meta) model."""
    try:
        device = next(root.parameters()).device
    except StopIteration:
        return torch.device("cpu")
    return torch.device("cpu") if device.type == "meta" else device


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
        return x.reshape(-1, x.shape[-1]).index_select(0, idx.to(x.device))
    n = mask_shape[0] * mask_shape[1]
    if x.ndim == 2 and x.shape[0] == n:  # flattened [batch*seq, D] (OPT)
        return x.index_select(0, idx.to(x.device))
    raise CaptureError(
        f"{name}: activations of shape {tuple(x.shape)} cannot be aligned with the attention "
        f"mask {tuple(mask_shape)}; pass sites whose points are [batch, seq, D]."
    )


__all__ = ["collect_spectra", "iter_batches", "model_label", "subsample_generator",
           "subsample_mask", "token_hash"]
