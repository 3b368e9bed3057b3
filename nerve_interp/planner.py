r"""Memory planner: will the covariance statistics of the chosen points fit, and in how many passes?

Before a capture starts, :func:`plan_capture` adds up what the accumulators of every chosen
point hold on the device and what one update needs on top, and splits the points into
*passes* over the same data when they do not fit a memory budget (or refuses, with the
numbers, when a single point does not fit). Pure arithmetic: no model, no torch state.

What is counted (bytes, ``D`` the width of a point, ``N`` rows per batch)::

    state       8·D + 8·D²                 float64 mean and scatter, per point, all pass long
    workspace   per update, one point at a time (the maximum over the pass's points):
      fp64        N·D·(a + 8) + 8·D²       rows (a bytes each) + float64 copy; Gram
      fp32        N·D·(a + 4) + 4·D²       rows + float32 copy; Gram
      bf16-split  N·D·(a + 8 [+ 8]) + 12·D²  rows + fp32 d + bf16 hi, lo [+ fp32 widening
                                             off CUDA]; Gram, cross term and one product
    finalize    W decompositions in flight (W = 2, or NERVE_INTERP_EIGH_WORKERS;
                :mod:`nerve_interp._inflight`), each 8·D² on CUDA (covariance handed to
                the host eigh) or 24·D² on CPU (covariance, torch's copy for LAPACK, its
                workspace; 19-21·D² measured, 40-45·D² for two in flight)
      groups      16·D² + W·32·D² (the merged total and a running merge; per decomposition
                  its leave-one-group-out or convergence scatter as well)

The model's weights and the forward's own activations are *not* counted: on CUDA the default
budget is the free memory after the model was loaded (``torch.cuda.mem_get_info``), times
:data:`AUTO_FRACTION` to leave room for the forward. Eigenvectors kept for ablations
(``eigenvectors=True``) live on the host, 8·D² per point, and are reported, not planned.

Examples
--------
64 points of width 14336 (LLaMA-3-8B's FFN) in float64 need ~105 GB of state:

>>> dims = {(layer, point): 14336 for layer in range(32) for point in ("pre", "post")}
>>> round(sum(state_bytes(d) for d in dims.values()) / 1e9, 1)
105.2
>>> plan = plan_capture(dims, budget=80e9, device="cuda", precision="fp64",
...                     tokens_per_batch=4096)
>>> plan.n_passes, [len(p) for p in plan.passes]
(2, [32, 32])
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .sites import POINTS, site_name

AUTO_FRACTION = {"cuda": 0.9, "cpu": 0.5}
"""Share of free CUDA memory / available host RAM that ``budget="auto"`` plans with."""

_ROW_WORK = {"fp64": 8, "fp32": 4, "bf16-split": 8}   # bytes per activation value, per update
_GRAM_WORK = {"fp64": 8, "fp32": 4, "bf16-split": 12}  # bytes per D² entry, per update
FINISH_BYTES = 24
"""Bytes per D² entry of one float64 eigendecomposition on the CPU (the covariance, torch's
copy for LAPACK, its workspace): 19-21 measured at D = 3072."""


def finish_workers() -> int:
    """Decompositions in flight that the plan leaves room for: ``NERVE_INTERP_EIGH_WORKERS``
    when set, else 2 (the most the default runs; :mod:`nerve_interp._inflight`)."""
    from ._inflight import env_workers

    n = env_workers()
    return 2 if n is None else n


def _concrete(precision: str, device_type: str) -> str:
    p = precision.lower()
    if p == "auto":
        from .covariance import default_precision

        return default_precision(device_type)
    if p not in _ROW_WORK:
        raise ValueError(f"unknown precision {precision!r}; choose one of "
                         f"('auto', 'fp64', 'fp32', 'bf16-split').")
    return p


def _device_type(device: str | object) -> str:
    kind = str(getattr(device, "type", device)).split(":")[0]
    return "cuda" if kind == "cuda" else "cpu"


def state_bytes(dim: int) -> int:
    """Bytes of one point's accumulator state: float64 mean (D) and scatter (D×D)."""
    return 8 * dim + 8 * dim * dim


def workspace_bytes(dim: int, tokens_per_batch: int, precision: str = "fp64", *,
                    activation_bytes: int = 4, device: str = "cpu") -> int:
    """Peak extra bytes while one point is updated (or finalised), on top of the state.

    Parameters
    ----------
    dim : int
        Width D of the point.
    tokens_per_batch : int
        Rows N one update receives (padded batch size × sequence length is a safe bound).
    precision : {"auto", "fp64", "fp32", "bf16-split"}
        Accumulation mode (see :mod:`nerve_interp.covariance`).
    activation_bytes : int, default 4
        Bytes per activation value (2 for bf16/fp16 models).
    device : str, default "cpu"
        ``"cuda..."`` or anything else (CPU).

    Returns
    -------
    int
        Bytes: the larger of the update's workspace and the finalisation's.
    """
    dev = _device_type(device)
    p = _concrete(precision, dev)
    row = activation_bytes + _ROW_WORK[p] + (8 if p == "bf16-split" and dev != "cuda" else 0)
    update = tokens_per_batch * dim * row + _GRAM_WORK[p] * dim * dim
    finalize = finish_workers() * (8 if dev == "cuda" else FINISH_BYTES) * dim * dim
    return max(update, finalize)


def memory_budget(device: str | object = "cpu", fraction: float | None = None) -> int:
    """Bytes ``budget="auto"`` plans with on ``device``.

    CUDA: ``fraction`` (default 0.9) of the free memory reported by
    ``torch.cuda.mem_get_info`` (what is left after the model was loaded). CPU: ``fraction``
    (default 0.5) of the available RAM (``psutil.virtual_memory().available`` when psutil is
    installed, else of the physical RAM from ``os.sysconf``).
    """
    dev = _device_type(device)
    frac = AUTO_FRACTION[dev] if fraction is None else float(fraction)
    if not 0 < frac <= 1:
        raise ValueError(f"fraction == {fraction}, must be in (0, 1].")
    if dev == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device if device != "cuda" else None)
        return int(frac * free)
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is usually there
        avail = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return int(frac * avail)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@dataclass
class CapturePlan:
    """How the chosen points are split into passes over the data.

    Attributes
    ----------
    passes : list of list of (layer, point)
        Points captured together in each pass, in forward order. Every pass is a product of
        a set of layers and a set of points (``pass_layers[i] × pass_points[i]``).
    pass_layers, pass_points : list of tuple
        The same passes as ``(layers, points)``, what ``collect_spectra`` is called with.
    dims : dict of (layer, point) -> int
        Width D of every point.
    bytes_per_pass : list of int
        State of every point of the pass plus the largest workspace among them.
    budget : int
        Bytes planned with. ``precision``, ``device``, ``tokens_per_batch``,
        ``activation_bytes`` as given (``precision`` resolved).
    eigenvector_bytes : int
        Host bytes of the eigenvectors if they are kept (0 if not).
    """

    passes: list[list[tuple[int, str]]]
    pass_layers: list[tuple[int, ...]]
    pass_points: list[tuple[str, ...]]
    dims: dict[tuple[int, str], int]
    bytes_per_pass: list[int]
    budget: int
    precision: str
    device: str
    tokens_per_batch: int
    activation_bytes: int
    eigenvector_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def n_passes(self) -> int:
        """How many times the data must be read."""
        return len(self.passes)

    @property
    def total_state_bytes(self) -> int:
        """State of every point, as if all were captured at once."""
        return sum(state_bytes(d) for d in self.dims.values())

    def summary(self) -> str:
        """A readable table: one row per pass (layers, points, D, bytes, share of budget)."""
        head = (f"CapturePlan: {len(self.dims)} points in {self.n_passes} pass(es); "
                f"precision {self.precision} on {self.device}, {self.tokens_per_batch} tokens "
                f"per batch; budget {_gb(self.budget)}; all state at once "
                f"{_gb(self.total_state_bytes)}")
        rows = [head, f"{'pass':>4}  {'layers':<18}{'points':<16}{'D':>12}{'bytes':>12}"
                      f"{'of budget':>11}"]
        for i, (layers, points, b) in enumerate(zip(self.pass_layers, self.pass_points,
                                                    self.bytes_per_pass, strict=True)):
            ds = sorted({self.dims[(lay, p)] for lay in layers for p in points})
            d_txt = str(ds[0]) if len(ds) == 1 else f"{ds[0]}..{ds[-1]}"
            lay = (f"{layers[0]}" if len(layers) == 1 else
                   f"{layers[0]}-{layers[-1]} ({len(layers)})"
                   if list(layers) == list(range(layers[0], layers[-1] + 1))
                   else ",".join(map(str, layers)))
            rows.append(f"{i:>4}  {lay:<18}{','.join(points):<16}{d_txt:>12}{_gb(b):>12}"
                        f"{b / self.budget:>10.0%} ")
        if self.eigenvector_bytes:
            rows.append(f"eigenvectors kept on the host: {_gb(self.eigenvector_bytes)} in all")
        rows.extend(self.notes)
        return "\n".join(rows)

    def __repr__(self) -> str:
        return self.summary()


def _as_dims(dims: Mapping[tuple[int, str], int] | Sequence[tuple[int, str, int]]
             ) -> dict[tuple[int, str], int]:
    items = dims.items() if isinstance(dims, Mapping) else (((a, b), c) for a, b, c in dims)
    out: dict[tuple[int, str], int] = {}
    for (layer, point), d in items:
        if int(d) < 1:
            raise ValueError(f"D == {d} for {site_name(layer, point)}, must be >= 1.")
        out[(int(layer), str(point))] = int(d)
    if not out:
        raise ValueError("plan_capture needs at least one (layer, point) with its width D.")
    return out


def plan_capture(
    dims: Mapping[tuple[int, str], int] | Sequence[tuple[int, str, int]],
    *,
    budget: int | float | str = "auto",
    device: str | object = "cpu",
    precision: str = "auto",
    tokens_per_batch: int = 2048,
    activation_bytes: int = 4,
    eigenvectors: bool = False,
    n_groups: int | None = None,
) -> CapturePlan:
    """Split the chosen points into passes that fit a device-memory budget.

    Whole layers (all their points) are grouped while every layer fits on its own; otherwise
    each point is planned separately (passes of one point kind over a range of layers). The
    number of passes is the fewest a greedy fill in forward order needs; the units are then
    spread evenly over that many passes when they still fit.

    Parameters
    ----------
    dims : mapping (layer, point) -> D, or sequence of (layer, point, D)
        Width of every point to capture.
    budget : bytes or "auto", default "auto"
        ``"auto"``: :func:`memory_budget` of ``device``.
    device : str or torch.device, default "cpu"
        Where the accumulators live (the model's device).
    precision : {"auto", "fp64", "fp32", "bf16-split"}, default "auto"
        Accumulation mode (sets the workspace); ``"auto"`` as the accumulator resolves it.
    tokens_per_batch : int, default 2048
        Rows per update (batch × sequence length, padding included, is a safe bound).
    activation_bytes : int, default 4
        Bytes per activation value (2 for bf16/fp16 models).
    eigenvectors : bool, default False
        Report the host memory of eigenvectors kept for ablations.
    n_groups : int, optional
        Per-group statistics (``collect_spectra(n_groups=K)``): K accumulators per point
        (K·(8·D + 8·D²) of state), and while a point is finished the merged total, a running
        merge and, per decomposition in flight, a leave-one-group-out or convergence scatter
        (see the module's table).

    Returns
    -------
    CapturePlan

    Raises
    ------
    MemoryPlanError
        One point alone (state + workspace) exceeds the budget; the message gives the numbers
        and what would help.
    """
    from .errors import MemoryPlanError
    dims = _as_dims(dims)
    dev = _device_type(device)
    prec = _concrete(precision, dev)
    if tokens_per_batch < 1:
        raise ValueError(f"tokens_per_batch == {tokens_per_batch}, must be >= 1.")
    total = memory_budget(device) if budget == "auto" else budget
    if isinstance(total, str) or not total > 0:
        raise ValueError(f"budget == {budget!r}; pass a number of bytes > 0 or 'auto'.")
    total = int(total)

    k_groups = 1 if n_groups is None else int(n_groups)

    def work(d: int) -> int:
        finish = (16 + finish_workers() * (8 + FINISH_BYTES)) * d * d if k_groups > 1 else 0
        return max(finish, workspace_bytes(d, tokens_per_batch, prec,
                                           activation_bytes=activation_bytes, device=dev))

    def state(d: int) -> int:
        return k_groups * state_bytes(d)

    def cost(keys: list[tuple[int, str]]) -> int:
        return sum(state(dims[k]) for k in keys) + max(work(dims[k]) for k in keys)

    worst = max(dims, key=lambda k: state(dims[k]) + work(dims[k]))
    if cost([worst]) > total:
        d = dims[worst]
        groups = (f" ({k_groups} groups × {_gb(state_bytes(d))}; fewer groups need less)"
                  if k_groups > 1 else "")
        raise MemoryPlanError(
            f"{site_name(*worst)} (D = {d}) alone needs {_gb(state(d))} of float64 "
            f"state{groups} + {_gb(work(d))} of workspace ({prec}, {tokens_per_batch} tokens "
            f"per batch) = {_gb(cost([worst]))}, more than the budget of {_gb(total)} on "
            f"{dev}. {_REMEDY}")
    layers = sorted({lay for lay, _ in dims})
    by_layer = {lay: [k for k in sorted(dims, key=_order) if k[0] == lay] for lay in layers}
    if all(cost(v) <= total for v in by_layer.values()):
        groups = [[by_layer[lay] for lay in layers]]  # one stream of whole-layer units
    else:  # each point kind on its own stream of single-point units
        points = sorted({p for _, p in dims}, key=lambda p: _order((0, p)))
        groups = [[[k] for k in sorted(dims, key=_order) if k[1] == p] for p in points]
    passes: list[list[tuple[int, str]]] = []
    for units in groups:
        passes.extend(_pack(units, cost, total))
    pass_layers = [tuple(sorted({lay for lay, _ in p})) for p in passes]
    pass_points = [tuple(sorted({pt for _, pt in p}, key=lambda q: _order((0, q))))
                   for p in passes]
    notes = []
    if len(passes) > 1:
        notes.append(f"{len(passes)} passes: the data are read {len(passes)} times "
                     "(pass a list, not a generator).")
    return CapturePlan(
        passes=passes, pass_layers=pass_layers, pass_points=pass_points, dims=dims,
        bytes_per_pass=[cost(p) for p in passes], budget=total, precision=prec,
        device=dev, tokens_per_batch=int(tokens_per_batch),
        activation_bytes=int(activation_bytes),
        eigenvector_bytes=sum(8 * d * d for d in dims.values()) if eigenvectors else 0,
        notes=notes,
    )


_REMEDY = ("Raise memory_budget, use smaller batches (workspace grows with tokens per batch), "
           "or accumulate on a device with more memory.")


def _order(key: tuple[int, str]) -> tuple[int, int, str]:
    """Forward order: layer, then the points in ``sites.POINTS`` order."""
    return key[0], POINTS.index(key[1]) if key[1] in POINTS else len(POINTS), key[1]


def _pack(units: list[list[tuple[int, str]]], cost, total: int) -> list[list[tuple[int, str]]]:
    """Fewest passes (greedy, in order), then the same count with evenly sized passes."""
    greedy: list[list[tuple[int, str]]] = [[]]
    for u in units:
        if greedy[-1] and cost(greedy[-1] + u) > total:
            greedy.append([])
        greedy[-1] = greedy[-1] + u
    n = len(greedy)
    size = math.ceil(len(units) / n)
    even = [sum(units[i:i + size], []) for i in range(0, len(units), size)]
    if len(even) == n and all(cost(p) <= total for p in even):
        return even
    return greedy


__all__ = ["AUTO_FRACTION", "CapturePlan", "memory_budget", "plan_capture", "state_bytes",
           "workspace_bytes"]
