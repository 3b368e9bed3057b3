r"""Per-group statistics of one point: K accumulators of whole sequences.

``collect_spectra(..., n_groups=K)`` sends sequence ``s`` of the data (counted from 0 over
every batch, in data order) to group ``s mod K``, so each group holds whole sequences spread
over the whole data. A point then streams one
:class:`~nerve_interp.covariance.CovarianceAccumulator` (and one
:class:`~nerve_interp.moments.NormMoments`) per group instead of one: the same Gram work,
K·D² of float64 state. At the end

* the total is the exact merge of the groups (:meth:`GroupStats.merged`), equal to an
  ungrouped capture up to float64 round-off;
* every *leave-one-group-out* spectrum is formed by taking one group out of the total
  (reverse Chan update, float64) and eigendecomposed: the jackknife of any metric
  (:mod:`nerve_interp.jackknife`) needs only these K spectra;
* a *convergence curve* merges the groups one by one in a few random orders and keeps the
  spectrum at about 8 group counts (:func:`nerve_interp.jackknife.convergence_grid`), so a
  metric can be read at N·k/K tokens and extrapolated to N → ∞.

Only these spectra (K + 3·7 eigenvalue vectors per point at K = 16) are kept in
:class:`GroupSpectra` and saved with the result; the K·D² group matrices are dropped once
they are formed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from . import _lapack
from ._inflight import map_in_flight
from .covariance import CovarianceAccumulator
from .errors import CaptureError
from .jackknife import convergence_grid
from .moments import NormMoments, recentre_rest

CONVERGENCE_ORDERS = 3
"""Random orders in which the groups are merged for a convergence curve."""


@dataclasses.dataclass
class GroupSpectra:
    """What a point keeps of its K groups (see the module docstring).

    Attributes
    ----------
    n : ndarray of shape (K,), int
        Tokens per group.
    loo_eigenvalues : ndarray of shape (K, D), float64
        Descending eigenvalues of the covariance without group ``g`` (row ``g``).
    loo_fourth : ndarray of shape (K,) or None
        ``Σ ‖x − μ‖⁴`` without group ``g`` (for ``participation_ratio_corrected``).
    conv_groups : ndarray of shape (P,), int
        Groups merged at each point of the convergence curve (1 ≤ k < K).
    conv_n : ndarray of shape (R, P), int
        Tokens at each point, for each of the R random merge orders.
    conv_eigenvalues : ndarray of shape (R, P, D), float64
    conv_fourth : ndarray of shape (R, P) or None
    """

    n: np.ndarray
    loo_eigenvalues: np.ndarray
    loo_fourth: np.ndarray | None
    conv_groups: np.ndarray
    conv_n: np.ndarray
    conv_eigenvalues: np.ndarray
    conv_fourth: np.ndarray | None = None

    @property
    def k(self) -> int:
        """The number of groups K."""
        return int(self.n.shape[0])

    @property
    def loo_n(self) -> np.ndarray:
        """Tokens of each leave-one-group-out sample, shape (K,)."""
        return int(self.n.sum()) - self.n

    def arrays(self) -> dict[str, np.ndarray]:
        """The fields as arrays (for saving); ``None`` fields are left out."""
        return {f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> GroupSpectra:
        return cls(**{f.name: arrays.get(f.name) for f in dataclasses.fields(cls)})


class GroupStats:
    """K streaming accumulators of one point (``name``), one per group of sequences."""

    def __init__(self, name: str, k: int, precision: str = "fp64", *,
                 moments: bool = True) -> None:
        self.name, self.k = name, int(k)
        self.accs = [CovarianceAccumulator(f"{name} (group {g})", precision=precision)
                     for g in range(self.k)]
        self.moments = ([NormMoments(f"{name} (group {g})") for g in range(self.k)]
                        if moments else None)

    def update(self, rows: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold rows ``[n, D]`` in; ``labels`` ``[n]`` is each row's group. Each group's rows
        are folded once per call, in data order: a batch of more sequences than there are
        groups (sequence ``s`` goes to group ``s mod K``, so its runs of equal labels
        interleave) is gathered per group, one fold of each group's rows rather than one per
        sequence (each fold adds to a D × D float64 accumulator); a batch whose runs are
        the groups themselves is folded as views, without a copy."""
        if rows.shape[0] == 0:
            return
        values, counts = torch.unique_consecutive(labels, return_counts=True)
        groups = torch.unique(values)
        if values.numel() > groups.numel():  # interleaved runs: one gather per group
            for g in groups.tolist():
                idx = (labels == g).nonzero().squeeze(1).to(rows.device)
                self._fold(g, rows.index_select(0, idx))
            return
        start = 0
        for g, c in zip(values.tolist(), counts.tolist(), strict=True):
            self._fold(g, rows[start:start + c])
            start += c

    def _fold(self, g: int, part: torch.Tensor) -> None:
        self.accs[g].update(part, moments=None if self.moments is None else self.moments[g])

    def pairs(self) -> list[tuple[NormMoments | None, CovarianceAccumulator]]:
        moments = self.moments or [None] * self.k
        return list(zip(moments, self.accs, strict=True))

    def check(self) -> None:
        """Every group must hold >= 2 tokens (and the rest of the data >= 2)."""
        n = [a.n_samples_seen_ for a in self.accs]
        if min(n) < 2:
            empty = [g for g, v in enumerate(n) if v < 2]
            raise CaptureError(
                f"{self.name}: group(s) {empty[:8]} of n_groups={self.k} hold fewer than 2 "
                f"tokens (tokens per group: {n}). Groups are whole sequences, sequence s in "
                f"group s mod {self.k}: pass fewer groups or more data (at least "
                f"{self.k} sequences).")

    def merged(self) -> tuple[CovarianceAccumulator, NormMoments | None]:
        """The total statistics: the exact merge of the groups."""
        self.check()
        return merge_pairs(self.pairs(), self.name)

    def spectra(self, total: CovarianceAccumulator, total_moments: NormMoments | None, *,
                seed: int = 0, orders: int = CONVERGENCE_ORDERS) -> GroupSpectra:
        """The leave-one-group-out and convergence spectra (eigenvalues only)."""
        # the total's (A, v) around its own mean, formed once for all K groups; its M2
        # completed here, so the workers below only read the total
        av = (total_moments.recentred(total.mean_, total.scatter_)
              if total_moments is not None else None)
        total.scatter_  # noqa: B018

        def leave_out(g: int) -> tuple[np.ndarray, float | None]:  # runs in a worker
            n_r, mean_r, m2_r = remove_group(total, self.accs[g])
            fourth = (None if total_moments is None else _fourth_without(
                total, av, self.accs[g], self.moments[g], mean_r, m2_r, n_r))
            return _eigenvalues(m2_r, n_r), fourth

        loo, loo_a = [], []
        for vals, fourth in map_in_flight(leave_out, range(self.k)):
            loo.append(vals)
            if fourth is not None:
                loo_a.append(fourth)
        grid = [k for k in convergence_grid(self.k) if k < self.k]
        rng = np.random.default_rng(seed)
        conv_n = np.zeros((orders, len(grid)), dtype=np.int64)
        conv = np.zeros((orders, len(grid), total.dim), dtype=np.float64)
        conv_a = np.zeros((orders, len(grid))) if total_moments is not None else None

        def snapshots() -> Iterator[tuple[tuple[int, int], torch.Tensor, int]]:
            for r in range(orders):
                perm = rng.permutation(self.k)
                cum = CovarianceAccumulator(self.name)
                for j, g in enumerate(perm, start=1):
                    cum.merge(self.accs[g])
                    if j in grid:
                        p = grid.index(j)
                        conv_n[r, p] = cum.n_samples_seen_
                        if conv_a is not None:
                            pairs = [self.pairs()[h] for h in perm[:j]]
                            conv_a[r, p] = merge_pairs(pairs, self.name)[1].fourth_
                        # a copy: the next merge changes cum's M2 while a worker reads this
                        yield (r, p), cum.scatter_.clone(), cum.n_samples_seen_

        for (r, p), vals in map_in_flight(lambda s: (s[0], _eigenvalues(s[1], s[2])),
                                          snapshots()):
            conv[r, p] = vals
        return GroupSpectra(
            n=np.array([a.n_samples_seen_ for a in self.accs], dtype=np.int64),
            loo_eigenvalues=np.stack(loo), loo_fourth=np.array(loo_a) if loo_a else None,
            conv_groups=np.array(grid, dtype=np.int64), conv_n=conv_n, conv_eigenvalues=conv,
            conv_fourth=conv_a)


def merge_pairs(pairs: Sequence[tuple[NormMoments | None, CovarianceAccumulator]],
                name: str) -> tuple[CovarianceAccumulator, NormMoments | None]:
    """Merge ``(moments, accumulator)`` parts exactly: the accumulators by Chan's update, the
    fourth moments re-centred on the common mean and added."""
    total = CovarianceAccumulator(name)
    for _, acc in pairs:
        total.merge(acc)
    if any(m is None for m, _ in pairs):
        return total, None
    mean = total.mean_
    a = torch.zeros((), dtype=torch.float64, device=mean.device)
    v = torch.zeros_like(mean)
    for mom, acc in pairs:
        if acc.n_samples_seen_:
            a_g, v_g = mom.recentred(mean, acc.scatter_)
            a, v = a + a_g.to(mean.device), v + v_g.to(mean.device)
    return total, NormMoments(name).set_state(total.n_samples_seen_, mean.clone(), a, v)


def remove_group(total: CovarianceAccumulator, group: CovarianceAccumulator
                 ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(n, μ, M2)`` of ``total`` without the rows of ``group`` (reverse Chan update in
    float64: ``M2_r = M2 − M2_g − δδᵀ·n_r n_g / n`` with ``δ = μ_g − μ_r``)."""
    n, n_g = total.n_samples_seen_, group.n_samples_seen_
    n_r = n - n_g
    mean = total.mean_
    mean_g = group.mean_.to(mean.device)
    mean_r = (n * mean - n_g * mean_g) / n_r
    delta = mean_g - mean_r
    m2 = total.scatter_ - group.scatter_.to(mean.device)
    m2.addr_(delta, delta, alpha=-n_r * n_g / n)
    return n_r, mean_r, m2


def _fourth_without(total: CovarianceAccumulator, av: tuple[torch.Tensor, torch.Tensor],
                    group: CovarianceAccumulator, group_moments: NormMoments,
                    mean_r: torch.Tensor, m2_r: torch.Tensor, n_r: int) -> float:
    """``Σ ‖x − μ_r‖⁴`` over the rows not in ``group``; ``av`` is the total's ``(A, v)``
    around its mean."""
    a_g, v_g = group_moments.recentred(total.mean_, group.scatter_)
    a, v = av
    return recentre_rest(a - a_g, v - v_g, m2_r, n_r, mean_r - total.mean_)


def _eigenvalues(m2: torch.Tensor, n: int) -> np.ndarray:
    """Descending eigenvalues of ``M2 / (n − 1)`` in float64, round-off negatives clipped
    (the lower triangle of ``m2`` is read: it is exactly symmetric)."""
    cov = m2.detach().to("cpu", torch.float64) / (n - 1)
    vals = _lapack.eigvalsh(cov).flip(-1).numpy()
    return np.clip(vals, 0.0, None)


__all__ = ["CONVERGENCE_ORDERS", "GroupSpectra", "GroupStats", "merge_pairs", "remove_group"]
