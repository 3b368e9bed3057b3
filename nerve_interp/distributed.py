r"""Data-parallel capture with ``torch.distributed``: shard the batches, merge exactly.

Launched with ``torchrun --nproc_per_node N`` (one process per GPU, or several CPU processes
with the gloo backend), every process reads the same batches but feeds only its shard to the
model: batch ``i`` goes to rank ``i % world_size``. Each rank accumulates ``(n_r, μ_r, M2_r)``
locally; :func:`all_reduce_accumulators` then merges them with three all-reduces per point,
the ``k``-way form of Chan et al.'s parallel update::

    n   = Σ_r n_r
    μ   = Σ_r n_r μ_r / n                                  (all-reduce of n·μ)
    M2  = Σ_r [ M2_r + n_r (μ_r − μ)(μ_r − μ)ᵀ ]           (fp64 all-reduce)

This equals a single process's result up to float64 round-off (sums are order-free up to
round-off), and every rank ends with the same state.

The per-token diagnostics (:class:`nerve_interp.diagnostics.TokenNormStats`: count,
histogram of norms, maximum, the ``m`` tokens of largest norm with their vectors) are merged
once at the end by :func:`all_gather_token_stats`: every rank gathers every rank's record and
folds them in with :meth:`TokenNormStats.merge`, which is exact and independent of the order
(integer histogram, ties between equal norms broken by batch, row, position), so every rank
holds the record a single process would have built from all batches.

``exclude_norm_above`` fixes each point's threshold on the calibration batch (the first with
kept tokens), which one rank runs. :func:`all_reduce_norm_thresholds` shares it: every rank
calls it exactly once, the owner right after tracing that batch, the others before their
first trace (or after their loop when they trace nothing: no batch, or all of them restored
from their checkpoint, which stores the threshold). Simpler alternatives lose something: a
calibration trace of that batch on every rank costs each rank a forward pass and is only as
equal as the ranks' kernels are deterministic; a broadcast from rank 0 needs rank 0 to own
the batch, which it does not when batch 0 is all padding or all excluded. The all-reduce is
a maximum, so the owner's float64 values arrive bit for bit and no rank must know the owner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .covariance import CovarianceAccumulator
from .diagnostics import NORM_HISTOGRAM_SIZE, TOKEN_META, TokenNormStats
from .errors import CaptureError


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def world(distributed: bool | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process for a capture.

    Parameters
    ----------
    distributed : bool or None
        ``None`` (default): data-parallel when ``torch.distributed`` is initialised with more
        than one process, single-process otherwise. ``True``: require an initialised process
        group. ``False``: capture everything in this process even under ``torchrun``.

    Raises
    ------
    CaptureError
        ``distributed=True`` but no process group is initialised.
    """
    dist = _dist()
    active = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = active and dist.get_world_size() > 1
    elif distributed and not active:
        raise CaptureError(
            "distributed=True but torch.distributed is not initialised. Launch with "
            "`torchrun --nproc_per_node N your_script.py` and call "
            "torch.distributed.init_process_group('gloo')  (CPU) or ('nccl') (GPUs) before "
            "collect_spectra, or leave distributed=None."
        )
    if not distributed:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def init_from_env() -> tuple[int, int, int]:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1 set in the environment) the
    default process group is initialised once: ``nccl`` when CUDA GPUs are present (and GPU
    ``LOCAL_RANK`` is selected), ``gloo`` otherwise. Without torchrun nothing happens.

    Returns
    -------
    tuple of int
        ``(rank, world_size, local_rank)``; ``(0, 1, 0)`` outside torchrun.
    """
    import os

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    dist = _dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def rank_budget(max_tokens: int | None, rank: int, world_size: int) -> int | None:
    """This rank's share of a global token budget.

    ``max_tokens // world_size``, plus one for the first ``max_tokens % world_size`` ranks,
    so the shares add up to ``max_tokens``. Each rank keeps the first tokens of *its*
    shard, so when the budget binds, the token set differs from a single process's (which
    keeps the first ``max_tokens`` tokens of the data); without a binding budget it is the same.
    """
    if max_tokens is None:
        return None
    return max_tokens // world_size + (1 if rank < max_tokens % world_size else 0)


def _comm_device(group: Any) -> torch.device:
    """NCCL moves CUDA tensors only; gloo and the others take CPU tensors."""
    dist = _dist()
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_count(n: int, group: Any = None) -> int:
    """Sum of an integer over all ranks (e.g. tokens captured)."""
    dist = _dist()
    t = torch.tensor([n], dtype=torch.int64, device=_comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return int(t.item())


def furthest_position(n_batches: int, data_sha1: str, group: Any = None) -> tuple[int, str]:
    """The data position of the rank that read furthest: ``(batches, hash of those batches)``.

    Without a binding token budget every rank reads every batch and all agree; with one,
    ranks stop at different batches and the result records the furthest.
    """
    dist = _dist()
    got: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(got, (int(n_batches), str(data_sha1)), group=group)
    return max(got)


def all_reduce_accumulators(accs: Sequence[CovarianceAccumulator], group: Any = None) -> None:
    """Merge every rank's accumulators into the global statistics, in place, on every rank.

    Parameters
    ----------
    accs : sequence of CovarianceAccumulator
        The same points in the same order on every rank (a rank whose shard held no token
        passes empty accumulators). After the call each holds the statistics of the rows of
        all ranks, identical on every rank, on its own device (the communication device for
        a rank that saw no rows).
    group : torch.distributed.ProcessGroup, optional
        Default: the world.

    Raises
    ------
    CaptureError
        Ranks saw rows of different widths D for one point.

    Notes
    -----
    Three collectives per point plus two for all points: counts (sum), widths (max and min),
    ``n_r μ_r`` (sum, float64, D) and ``M2_r + n_r δ_r δ_rᵀ`` (sum, float64, D×D).
    """
    dist = _dist()
    dev = _comm_device(group)
    k = len(accs)
    if k == 0:
        return
    counts = torch.tensor([a.n_samples_seen_ for a in accs], dtype=torch.int64, device=dev)
    dims = torch.tensor([a.dim or 0 for a in accs], dtype=torch.int64, device=dev)
    big = torch.iinfo(torch.int64).max
    widths = torch.cat([dims, -torch.where(dims > 0, dims, torch.full_like(dims, big))])
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(widths, op=dist.ReduceOp.MAX, group=group)
    d_max, d_min = widths[:k].tolist(), (-widths[k:]).tolist()
    for j, acc in enumerate(accs):
        n, d = int(counts[j]), int(d_max[j])
        if n == 0:
            continue
        if d_min[j] != d:
            raise CaptureError(
                f"{acc.name}: ranks saw rows of width {d_min[j]} and {d}; every rank must "
                "capture the same sites of the same model."
            )
        n_r = acc.n_samples_seen_
        home = acc.mean_.device if n_r else dev
        if n_r:
            mean_r = acc.mean_.to(dev, torch.float64)
            m2 = acc.scatter_.to(dev, torch.float64, copy=True)
        else:
            mean_r = torch.zeros(d, dtype=torch.float64, device=dev)
            m2 = torch.zeros(d, d, dtype=torch.float64, device=dev)
        total = mean_r * n_r
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        mean = total / n
        if n_r:
            delta = mean_r - mean
            m2.addr_(delta, delta, alpha=float(n_r))
        dist.all_reduce(m2, op=dist.ReduceOp.SUM, group=group)
        acc.load_state_dict({"n": n, "mean": mean, "scatter": m2}).to(home)


def all_reduce_moments(pairs: Sequence[tuple[Any, CovarianceAccumulator]],
                       group: Any = None) -> None:
    """Merge every rank's fourth-moment statistics (:class:`nerve_interp.moments.NormMoments`)
    exactly, in place, on every rank; call it *before* :func:`all_reduce_accumulators`
    (each rank re-centres its part with its own scatter).

    Three all-reduces for all points: the widths, the token counts and sums (the common
    mean), then the re-centred ``(Σ‖x − μ‖⁴, Σ‖x − μ‖²(x − μ))``, which add up.
    """
    dist = _dist()
    dev = _comm_device(group)
    dims_t = torch.tensor([int(acc.dim or 0) for _, acc in pairs], dtype=torch.int64).to(dev)
    dist.all_reduce(dims_t, op=dist.ReduceOp.MAX, group=group)  # a rank may have seen none
    dims = [int(v) for v in dims_t.cpu()]
    d = max(dims)
    sums = torch.zeros(len(pairs), 1 + d, dtype=torch.float64)
    for j, (mom, acc) in enumerate(pairs):
        if acc.n_samples_seen_:
            sums[j, 0] = acc.n_samples_seen_
            sums[j, 1:1 + dims[j]] = mom.mean_.cpu() * mom.n_samples_seen_
    sums = sums.to(dev)
    dist.all_reduce(sums, group=group)
    sums = sums.cpu()
    parts = torch.zeros(len(pairs), 1 + d, dtype=torch.float64)
    means = []
    for j, (mom, acc) in enumerate(pairs):
        n = float(sums[j, 0])
        mean = sums[j, 1:1 + dims[j]] / max(n, 1.0)
        means.append(mean)
        if acc.n_samples_seen_:
            a, v = mom.recentred(mean, acc.scatter_)
            parts[j, 0], parts[j, 1:1 + dims[j]] = a.cpu(), v.cpu()
    parts = parts.to(dev)
    dist.all_reduce(parts, group=group)
    parts = parts.cpu()
    for j, (mom, acc) in enumerate(pairs):
        home = acc.mean_.device if acc.n_samples_seen_ else torch.device("cpu")
        mom.set_state(int(sums[j, 0]), means[j].to(home), parts[j, 0].to(home),
                      parts[j, 1:1 + dims[j]].to(home))


def all_reduce_norm_thresholds(stats: Sequence[TokenNormStats], group: Any = None) -> None:
    """Give every rank the norm thresholds of ``exclude_norm_above``, in place.

    Parameters
    ----------
    stats : sequence of TokenNormStats
        The same points in the same order on every rank. A rank that has calibrated (or
        restored from its checkpoint) a point's ``norm_threshold_`` contributes it, the
        others contribute nothing; afterwards every rank holds that threshold (points no
        rank has calibrated stay ``None``).

    Raises
    ------
    CaptureError
        Two ranks hold different thresholds for one point (e.g. checkpoints of different
        runs).

    Notes
    -----
    One all-reduce (max) of ``2 × P`` float64 values: the largest and, negated, the smallest
    threshold held. A maximum is exact, so the threshold arrives bit for bit; unset points
    are sent as ``-1`` (thresholds are ``>= 0``).
    """
    dist = _dist()
    stats = list(stats)
    if not stats:
        return
    held = [st.norm_threshold_ for st in stats]
    hi = torch.tensor([-1.0 if v is None else v for v in held], dtype=torch.float64)
    lo = torch.tensor([-float("inf") if v is None else -v for v in held], dtype=torch.float64)
    both = torch.cat([hi, lo]).to(_comm_device(group))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    both = both.cpu()
    p = len(stats)
    for j, st in enumerate(stats):
        top, low = float(both[j]), -float(both[p + j])
        if top < 0:
            continue
        if low != top:
            raise CaptureError(
                f"{st.name}: ranks hold different exclude_norm_above thresholds ({low!r} and "
                f"{top!r}); their checkpoints come from different runs. Delete them to start "
                "afresh.")
        st.norm_threshold_ = top


def all_gather_token_stats(stats: Sequence[TokenNormStats], group: Any = None) -> None:
    """Merge every rank's per-token statistics into the global record, in place, on every rank.

    Parameters
    ----------
    stats : sequence of TokenNormStats
        The same points in the same order on every rank, each holding what this rank
        observed (a rank that saw no token of a point passes an empty record). After the
        call each holds the merge of all ranks' records, identical on every rank and equal
        to the record of one process observing every batch (:meth:`TokenNormStats.merge`
        is exact and order-free): same count, histogram and maximum, the same top tokens
        (norms, vectors, batch / row / position / token id) in the same order. Its top
        tensors sit on their former device (the communication device for a rank that saw
        no token).
    group : torch.distributed.ProcessGroup, optional
        Default: the world.

    Raises
    ------
    CaptureError
        Ranks kept top tokens of different widths D for one point.

    Notes
    -----
    Call it once, after the last batch (not per batch). Three all-gathers for all points
    together (counts and histograms, ``P × (5 + 802)`` int64; norms and scalars,
    ``P × (m + 2)`` float64; token metadata, ``P × m × 4`` int64), then one per point for
    the top vectors: each rank sends ``m × D`` and receives ``W × m × D`` floats (float32,
    or float64 when a rank kept float64 vectors), e.g. 8 ranks, ``m = 256``, ``D = 8192``:
    67 MB received per point, one point at a time (that is the extra peak memory, on the
    communication device: the GPU under NCCL).
    """
    dist = _dist()
    dev = _comm_device(group)
    w = dist.get_world_size(group)
    stats = list(stats)
    if not stats:
        return
    m = max(st.max_outlier_tokens for st in stats)
    packed = _pack_token_stats(stats, m)
    g_ints, g_floats, g_metas = (_all_gather_stacked(t, dev, w, group) for t in packed)
    for j, st in enumerate(stats):
        ks, ds, codes = g_ints[:, j, 2], g_ints[:, j, 3], g_ints[:, j, 4]
        vectors = _gather_top_vectors(st, ks, ds, codes, m, dev, w, group)
        home = st.top_norms_.device if st.top_norms_ is not None else dev
        merged = TokenNormStats(st.name, max_outlier_tokens=st.max_outlier_tokens,
                                norm_above=st.norm_above)
        for r in range(w):  # rank order; merge is order-free anyway
            k = int(ks[r])
            state = {"counts": g_ints[r, j, :2].clone(), "scalars": g_floats[r, j, :2].clone()}
            if k:
                state.update({
                    "histogram": g_ints[r, j, 5:], "top_norms": g_floats[r, j, 2:2 + k],
                    "top_meta": g_metas[r, j, :k],
                    "top_vectors": vectors[r][:k].to(
                        torch.float64 if int(codes[r]) == 2 else torch.float32)})
            merged.merge(TokenNormStats(st.name, max_outlier_tokens=st.max_outlier_tokens)
                         .load_state_dict(state))
        st.load_state_dict(merged.state_dict())
        if st.top_norms_ is not None:
            for attr in ("histogram_", "top_norms_", "top_vectors_", "top_meta_"):
                setattr(st, attr, getattr(st, attr).to(home))


def _pack_token_stats(stats: Sequence[TokenNormStats], m: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every point's record but its top vectors, in three tensors with one row per point:
    int64 ``(P, 5 + bins)`` (count, norm-excluded, k, D, dtype code; histogram), float64
    ``(P, 2 + m)`` (max norm, threshold or -1; top norms), int64 ``(P, m, 4)`` (top meta)."""
    p, nb, nm = len(stats), NORM_HISTOGRAM_SIZE, len(TOKEN_META)
    ints = torch.zeros(p, 5 + nb, dtype=torch.int64)
    floats = torch.zeros(p, 2 + m, dtype=torch.float64)
    metas = torch.full((p, m, nm), -1, dtype=torch.int64)
    for j, st in enumerate(stats):
        k = 0 if st.top_norms_ is None else int(st.top_norms_.shape[0])
        d = int(st.top_vectors_.shape[1]) if k else 0
        code = 0 if not k else 2 if st.top_vectors_.dtype == torch.float64 else 1
        ints[j, :5] = torch.tensor([st.n_samples_seen_, st.n_excluded_norm_, k, d, code])
        if st.histogram_ is not None:
            ints[j, 5:] = st.histogram_.cpu()
        nt = -1.0 if st.norm_threshold_ is None else st.norm_threshold_
        floats[j, :2] = torch.tensor([st.max_norm_, nt], dtype=torch.float64)
        if k:
            floats[j, 2:2 + k] = st.top_norms_.cpu()
            metas[j, :k] = st.top_meta_.cpu()
    return ints, floats, metas


def _all_gather_stacked(t: torch.Tensor, dev: torch.device, w: int, group: Any
                        ) -> torch.Tensor:
    """Every rank's ``t``, stacked on the host: shape ``(w, *t.shape)``."""
    t = t.to(dev)
    parts = [torch.empty_like(t) for _ in range(w)]
    _dist().all_gather(parts, t, group=group)
    return torch.stack(parts).cpu()


def _gather_top_vectors(st: TokenNormStats, ks: torch.Tensor, ds: torch.Tensor,
                        codes: torch.Tensor, m: int, dev: torch.device, w: int, group: Any
                        ) -> list[torch.Tensor] | None:
    """Every rank's top vectors of one point (padded to ``m`` rows), or None when no rank
    kept any."""
    widths = {int(d) for d, k in zip(ds, ks, strict=True) if k}
    if len(widths) > 1:
        raise CaptureError(
            f"{st.name}: ranks kept top tokens of widths {sorted(widths)}; every rank must "
            "capture the same sites of the same model.")
    if not widths:
        return None
    dtype = torch.float64 if int(codes.max()) == 2 else torch.float32
    own = torch.zeros(m, widths.pop(), dtype=dtype, device=dev)
    k = int(ks[_dist().get_rank(group)])
    if k:
        own[:k] = st.top_vectors_.to(dev, dtype)
    vectors = [torch.empty_like(own) for _ in range(w)]
    _dist().all_gather(vectors, own, group=group)
    return vectors


__all__ = ["all_gather_token_stats", "all_reduce_accumulators", "all_reduce_count",
           "all_reduce_moments",
           "all_reduce_norm_thresholds",
           "furthest_position", "init_from_env", "rank_budget", "world"]
