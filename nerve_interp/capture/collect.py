"""``collect_spectra``: build the capture's pieces from its keywords, run each pass, finish.

The pipeline (read top-down): :mod:`.options` (the checked keywords) → :mod:`.source`
(batches) → :mod:`.selection` (which tokens count) → :mod:`.backends` (one trace, local or
remote) → :mod:`.sinks` (per-point statistics), driven by :func:`.run.run` with
:mod:`.shard` (torchrun) and a checkpointer, and turned into a result by :mod:`.finish`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .._scratch import release as release_scratch
from ..data import corpus_metadata
from ..diagnostics import (
    DEFAULT_MAX_OUTLIER_TOKENS,
    DEFAULT_OUTLIER_FRACTION,
    DEFAULT_OUTLIER_THRESHOLD,
)
from ..sites import FFNSite, as_nnsight, find_ffn_sites, select_sites
from . import passes
from .backends import backend_for
from .finish import finish, model_label, model_metadata
from .options import CaptureOptions
from .run import Checkpointer, Pipeline, run
from .selection import TokenSelector
from .shard import Shard
from .sinks import Sinks
from .source import InputLimits, is_texts
from .source import batches as numbered


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
    checkpoint_seconds: float | None = 300.0,
    data_label: str = "",
    diagnostics: bool = True,
    outlier_fraction: float = DEFAULT_OUTLIER_FRACTION,
    outlier_threshold: float = DEFAULT_OUTLIER_THRESHOLD,
    max_outlier_tokens: int = DEFAULT_MAX_OUTLIER_TOKENS,
    distributed: bool | None = None,
    remote: Any = None,
    n_groups: int | None = None,
    joint: bool = False,
    convergence: bool = True,
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
        Deprecated: ``exclude_positions=range(skip_first)`` (the two are combined).
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
        with probability ``token_fraction`` (a draw seeded by ``(subsample_seed, batch
        index)`` alone, :func:`nerve_interp.capture.subsample_mask`), before ``max_tokens``
        counts it. A statistical trade, not a speed-up of the forward pass; see the how-to
        "Capture more points than fit in memory". Token inputs only.
    subsample_seed : int >= 0, default 0
        Seed of the token subsampling (recorded in ``metadata["subsample_seed"]``).
    eigenvectors : bool, default False
        Keep eigenvectors (8·D² bytes per point) for subspace ablations.
    gram_dtype : torch.float64 or torch.float32, optional
        Deprecated synonym of ``precision`` (``"fp64"`` / ``"fp32"``).
    precision : {"auto", "fp64", "fp32", "bf16-split"}, default "auto"
        How each batch's centred scatter matrix is formed (see
        :mod:`nerve_interp.covariance`): ``"auto"`` is ``"fp32"``: each batch's centred
        Gram in float32 (TF32 forbidden on CUDA), merged in float64. On a CPU it streams
        ~1.2× faster than ``"fp64"`` (SmolLM2-135M, 60 points, 1 thread: 1.30× a plain
        forward against 1.55×) and moved every metric by at most 5.4e-6 relative there
        (docs: how-to, "Precision on a CPU"); ``"fp64"`` is exact to float64 round-off;
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
        Save the running statistics there every ``checkpoint_every`` batches (atomically)
        and resume from it when it exists: pass the same batches again. A resume on other
        data, another model, other sites or other options is refused, and a resumed run
        gives the same eigenvalues as an uninterrupted one, bit for bit on the same machine
        (:mod:`nerve_interp.checkpoint`, how-to "Resume a long capture").
    checkpoint_every : int, default 20
        Batches (of this process) between checkpoints.
    checkpoint_seconds : float or None, default 300
        Also write a checkpoint when this many seconds have passed since the last one (the
        first one too), so a slow capture loses at most 5 minutes; None: batches only.
    data_label : str
        What the text was (kept in the metadata, e.g. ``"python-docs/train"``). When
        ``batches`` is what :func:`~nerve_interp.data.load_corpus` returned (or a slice of
        it), ``metadata["corpus"]`` records its ``name``, ``split``, ``seed`` and
        ``indices`` too (:class:`~nerve_interp.data.Corpus`); other data add no key.
    distributed : bool or None
        Data-parallel capture over ``torch.distributed`` processes (``torchrun``): batch
        ``i`` runs on rank ``i % world_size``, the statistics (token diagnostics and
        ``exclude_norm_above`` thresholds included) are merged exactly and every rank returns
        the same result; ``max_tokens`` stays the global budget. ``None`` (default): when a
        process group of more than one process is initialised. See the how-to "Capture on
        several GPUs or processes (torchrun)" and :mod:`nerve_interp.capture.shard`.
    remote : bool, "local" or None
        Run each trace through nnsight's remote machinery: ``True`` on NDIF (an
        ``nnsight.TransformersModel`` of a model NDIF hosts), ``"local"`` serialised exactly
        as for NDIF and run here. Only per-batch D×D statistics come back, so token
        diagnostics are off (:mod:`nerve_interp.remote`, how-to "Run on NDIF").

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

    n_groups : int >= 2, optional
        Keep per-group statistics for intervals (off by default): sequence ``s`` of the data
        goes to group ``s mod K``, each group has its own accumulators (K·D² float64 per
        point; the memory is planned, with ``memory_budget="auto"`` unless given, and split
        into passes or refused when it does not fit), the total is their exact merge, and
        every point keeps its K leave-one-group-out spectra and a convergence curve
        (:mod:`nerve_interp.groups`). Then ``metrics()`` and ``reinjection()`` carry
        jackknife ``se`` / ``ci_low`` / ``ci_high`` and ``convergence()`` extrapolates each
        metric to N → ∞. Costs K + 21 extra eigenvalue decompositions per point at the end.
        16 is a good choice; it needs at least K sequences. Not with ``remote=``.
    convergence : bool, default True
        With ``n_groups``: also keep the convergence curves (the 21 extra decompositions per
        point). ``False`` keeps the intervals (K + 1 decompositions per point) and makes
        ``convergence()`` refuse.
    joint : bool, default False
        Keep, per layer, the mean and covariance of the nonlinearity's inputs
        (:class:`nerve_interp.joint.JointInputs`, ``result.joint``): ``pre`` for plain FFNs
        (no extra cost), ``pre ‖ up`` jointly for gated FFNs (one more accumulator of width
        2D per layer: 4·D² float64 and a Gram of that width). They are what
        :func:`nerve_interp.nulls.gaussian_equivalent` samples. Needs ``pre`` (and ``up``
        for gated FFNs) among ``points``; not with ``exclude_norm_above`` or ``remote=``.

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

    See Also
    --------
    nerve_interp.capture.run : the capture loop, and the pipeline it runs.

    Examples
    --------
    >>> import nerve_interp as ni
    >>> model, tok = ni.load_model("smollm2-135m")  # doctest: +SKIP
    >>> texts = ni.load_corpus("python-docs", split="train")  # doctest: +SKIP
    >>> spectra = ni.collect_spectra(model, texts, tokenizer=tok, max_tokens=20_000,
    ...                              layers=[0, -1], exclude_positions=(0,))  # doctest: +SKIP
    >>> spectra.reinjection()  # doctest: +SKIP
    """
    wrapper = as_nnsight(model)
    all_sites = list(sites) if sites is not None else find_ffn_sites(wrapper)
    device = input_device(wrapper._module)
    opts = CaptureOptions.build(dict(
        layers=layers, points=points, max_tokens=max_tokens, skip_first=skip_first,
        exclude_positions=exclude_positions, exclude_token_ids=exclude_token_ids,
        exclude_norm_above=exclude_norm_above, token_fraction=token_fraction,
        subsample_seed=subsample_seed, batch_size=batch_size, max_length=max_length,
        eigenvectors=eigenvectors, gram_dtype=gram_dtype, precision=precision,
        memory_budget=memory_budget, progress=progress, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds,
        data_label=data_label, diagnostics=diagnostics,
        outlier_fraction=outlier_fraction, outlier_threshold=outlier_threshold,
        max_outlier_tokens=max_outlier_tokens, distributed=distributed, remote=remote,
        n_groups=n_groups, joint=joint, convergence=convergence),
        device=device, vocab_size=vocab_size(wrapper._module, tokenizer),
        as_strings=is_texts(batches))
    opts = dataclasses.replace(opts, corpus=corpus_metadata(batches))
    opts.check_sites(select_sites(all_sites, opts.layers))
    limits = input_limits(wrapper._module, tokenizer)
    if is_texts(batches) and limits.max_positions and opts.max_length > limits.max_positions:
        raise ValueError(f"max_length == {opts.max_length}, but the model has "
                         f"{limits.max_positions} positions; pass max_length <= "
                         f"{limits.max_positions}.")

    def capture(data: Any, opts: CaptureOptions) -> Any:
        return _one_pass(wrapper, all_sites, data, tokenizer, opts, device)

    if opts.n_groups is not None and opts.memory_budget is None:  # K·D² per point: plan
        opts = dataclasses.replace(opts, memory_budget="auto")
    if opts.memory_budget is not None:
        batches, the_plan = passes.plan(wrapper, batches, tokenizer,
                                        select_sites(all_sites, opts.layers), opts, device)
        if the_plan.n_passes > 1:
            return passes.in_passes(capture, batches, the_plan, opts)
    return capture(batches, opts)


def _one_pass(wrapper: Any, all_sites: list[FFNSite], data: Any, tokenizer: Any,
              opts: CaptureOptions, device: torch.device) -> Any:
    """Build the pipeline of one pass over ``data`` and run it."""
    chosen = select_sites(all_sites, opts.layers)
    backend = backend_for(wrapper, opts)
    if not backend.token_statistics:  # only D×D statistics come back
        opts = dataclasses.replace(opts, outliers=dataclasses.replace(opts.outliers,
                                                                      enabled=False))
    shard = Shard(opts.distributed, opts.max_tokens)
    sinks = Sinks(chosen, opts, moments=backend.moments)
    manifest = opts.manifest(model_metadata(wrapper._module, chosen, len(all_sites)), chosen,
                             shard.rank, shard.world_size)
    p = Pipeline(wrapper=wrapper, model=model_label(wrapper._module), opts=opts, sinks=sinks,
                 selector=TokenSelector(opts.rule, opts.token_fraction, opts.subsample_seed,
                                        device, with_meta=bool(sinks.token_stats)),
                 backend=backend, shard=shard,
                 checkpointer=Checkpointer(shard.checkpoint_path(opts.checkpoint),
                                           opts.checkpoint_every, manifest,
                                           seconds=opts.checkpoint_seconds,
                                           announce=opts.progress and shard.is_main),
                 device=device, limits=input_limits(wrapper._module, tokenizer))
    try:
        state = run(p, numbered(data, tokenizer, batch_size=opts.batch_size,
                                max_length=opts.max_length))
    finally:
        release_scratch()  # the updates' reused buffers are not needed past the stream
    return finish(p, state, chosen, len(all_sites), tokenizer)


def vocab_size(root: torch.nn.Module, tokenizer: Any) -> int | None:
    """Rows of the input embedding (else config.vocab_size, else len(tokenizer))."""
    try:
        return int(root.get_input_embeddings().num_embeddings)
    except Exception:  # not a Hugging Face model, or no token embedding
        pass
    size = getattr(getattr(root, "config", None), "vocab_size", None)
    if size:
        return int(size)
    return len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None


def max_positions(root: torch.nn.Module) -> int | None:
    """Longest sequence a model with learned absolute position embeddings (GPT-2, OPT,
    BERT) accepts; None for rotary or relative positions (no hard limit)."""
    learned = any(isinstance(m, torch.nn.Embedding)
                  and (name.rsplit(".", 1)[-1] == "wpe" or "position" in name)
                  for name, m in root.named_modules())
    cfg = getattr(root, "config", None)
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, attr, None)
        if learned and isinstance(value, int) and value > 0:
            return value
    return None


def input_limits(root: torch.nn.Module, tokenizer: Any) -> InputLimits:
    """The model's vocabulary and position limit (:class:`~.source.InputLimits`)."""
    return InputLimits(vocab_size(root, tokenizer), max_positions(root))


def input_device(root: torch.nn.Module) -> torch.device:
    """Where inputs go: the first parameter's device (the embedding's under a ``device_map``,
    whose hooks move activations on from there); CPU for a lazily loaded (meta) model."""
    try:
        device = next(root.parameters()).device
    except StopIteration:
        return torch.device("cpu")
    return torch.device("cpu") if device.type == "meta" else device


__all__ = ["collect_spectra", "input_device", "input_limits", "max_positions", "vocab_size"]
