r"""Streaming fourth moment of the centred token norms, for finite-sample-corrected
estimators.

The participation ratio ``(tr Σ)² / tr Σ²`` estimated from the sample covariance ``S`` is
biased low at finite N (white noise: ``1/PR̂ ≈ 1/PR + 1/N``). Unbiased estimators of
``(tr Σ)²`` and ``tr Σ²`` that do not assume Gaussian data (Himeno & Yamada 2014) need one
number beyond ``S``:

.. math:: A = \sum_i \lVert x_i - \bar x \rVert^4 .

:class:`NormMoments` streams it in one pass, merged exactly across batches and processes
like the covariance (a Chan-style update around the running mean). Merging needs the
third-order vector ``v = Σ ‖x_i − x̄‖² (x_i − x̄)`` and the scatter ``M2`` of each part; ``M2``
is the paired :class:`~nerve_interp.covariance.CovarianceAccumulator`'s, so the extra state
is one D-vector and one scalar per point. Moving the centre of a part from its mean to
``μ = μ_p − δ`` (``Σ_p (x − μ_p) = 0``):

.. math::
    A' = A + 4 δᵀv + 4 δᵀ M_2 δ + 2‖δ‖² \operatorname{tr} M_2 + n ‖δ‖⁴, \qquad
    v' = v + 2 M_2 δ + (\operatorname{tr} M_2 + n‖δ‖²) δ .

Everything is float64; the per-batch cost is O(N·D) (two matrix-vector products), against
the covariance's O(N·D²).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .errors import ResultsFileError


def shift(a: torch.Tensor, v: torch.Tensor, m2: torch.Tensor | None, tr_m2: torch.Tensor,
          n: int, delta: torch.Tensor, m2_delta: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A', v')`` of a part re-centred by ``delta`` = (its mean − the new centre).

    ``m2`` is the part's scatter (or pass ``m2_delta = M2 @ delta`` directly)."""
    md = m2 @ delta if m2_delta is None else m2_delta
    dd = delta @ delta
    a_new = a + 4 * (delta @ v) + 4 * (delta @ md) + 2 * dd * tr_m2 + n * dd * dd
    v_new = v + 2 * md + (tr_m2 + n * dd) * delta
    return a_new, v_new


def recentre_rest(a: torch.Tensor, v: torch.Tensor, m2_rest: torch.Tensor, n_rest: int,
                  e: torch.Tensor) -> float:
    """``Σ ‖x − μ'‖⁴`` of a set of rows given ``a = Σ ‖x − μ‖⁴`` and
    ``v = Σ ‖x − μ‖² (x − μ)`` around another centre ``μ = μ' − e`` (their rows need not sum
    to 0 around ``μ``), their scatter ``m2_rest`` around ``μ'`` and count ``n_rest``:
    ``A' = a − 4 eᵀ v + 4 eᵀ M2' e + 2 ‖e‖² tr M2' + 3 n' ‖e‖⁴``."""
    m2 = m2_rest.to(v.device, torch.float64)
    e = e.to(v.device, torch.float64)
    ee = e @ e
    return float(a - 4 * (e @ v) + 4 * (e @ (m2 @ e)) + 2 * ee * m2.diagonal().sum()
                 + 3 * n_rest * ee * ee)


@dataclasses.dataclass(frozen=True)
class BatchMoments:
    """One batch's moments around its own mean ``μ_b`` (all float64): ``a = Σ‖x − μ_b‖⁴``,
    ``tr = Σ‖x − μ_b‖²`` (its scatter's trace), ``v = Σ‖x − μ_b‖² (x − μ_b)`` (shape (D,)) and
    ``m2_delta = M2_b δ_b = Σ (x − μ_b)(x − μ_b)ᵀ δ_b`` (shape (D,)) for its offset ``δ_b``."""

    a: torch.Tensor
    tr: torch.Tensor
    v: torch.Tensor
    m2_delta: torch.Tensor


class MomentSums:
    """:class:`BatchMoments` summed over chunks of one batch's rows, each given as
    ``w = x − s`` around any centre ``s`` (float64), with ``e = μ_b − s`` and the offset
    ``δ_b`` known in advance.

    Per row, ``‖x − μ_b‖² = ‖w‖² − 2 wᵀe + ‖e‖²`` and ``(x − μ_b)ᵀδ_b = wᵀδ_b − eᵀδ_b`` come
    from two matrix-vector products, and ``Σ s_i w_i``, ``Σ r_i w_i`` from two more, so no
    (rows × D) array is written; ``Σ s_i (x_i − μ_b) = Σ s_i w_i − e Σ s_i`` at the end.
    (Matrix-vector products, not one (rows × 2) and one (D × 2) matrix product: torch's
    skinny ``addmm`` took 10× as long on an 85 × 1536 chunk, 0.35 ms against 0.05 ms on one
    thread, which was a fifth of a capture's streaming overhead at D = 1536.)
    With ``s = 0`` this is the plain float64 update; with ``s`` the float32 shift of
    :func:`~nerve_interp.covariance.centre_rows` the sums share its pass over the rows.

    Parameters
    ----------
    e, delta : torch.Tensor of shape (D,), float64
    """

    def __init__(self, e: torch.Tensor, delta: torch.Tensor) -> None:
        self.e = e
        self.delta = delta
        self._e2 = -2 * e
        self._ee = e @ e
        self._ed = e @ delta
        self._sw = torch.zeros_like(e)  # Σ s_i w_i
        self._rw = torch.zeros_like(e)  # Σ r_i w_i
        self._s: list[torch.Tensor] = []
        self._r_sum = torch.zeros((), dtype=e.dtype, device=e.device)  # Σ r_i

    def add(self, w: torch.Tensor, norms2: torch.Tensor) -> None:
        """Add the rows ``w`` ``[k, D]`` (float64) whose squared norms are ``norms2`` ``[k]``."""
        s = torch.addmv(norms2, w, self._e2).add_(self._ee)  # ‖x − μ_b‖²
        r = torch.mv(w, self.delta).sub_(self._ed)            # (x − μ_b)ᵀδ_b
        self._sw.addmv_(w.T, s)
        self._rw.addmv_(w.T, r)
        self._s.append(s)
        self._r_sum += r.sum()

    def result(self) -> BatchMoments:
        s = torch.cat(self._s) if self._s else self.e[:0]
        tr = s.sum()
        return BatchMoments(s @ s, tr, self._sw - self.e * tr, self._rw - self.e * self._r_sum)


class NormMoments:
    """``A = Σ ‖x_i − x̄‖⁴`` (``fourth_``) of one point's rows, streamed.

    Call :meth:`update` with each batch *before* the paired covariance accumulator sees it,
    passing that accumulator (its scatter is the ``M2`` of the rows seen so far).
    """

    def __init__(self, name: str = "activations") -> None:
        self.name = name
        self._n = 0
        self._mean: torch.Tensor | None = None
        self._a: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    @property
    def n_samples_seen_(self) -> int:
        return self._n

    @property
    def fourth_(self) -> float:
        """``Σ ‖x_i − x̄‖⁴`` over the rows seen (float64)."""
        return float(self._a) if self._a is not None else 0.0

    @property
    def mean_(self) -> torch.Tensor | None:
        return self._mean

    def update(self, x: torch.Tensor, acc: Any) -> NormMoments:
        """Fold the rows ``x`` ``[n, D]`` in; ``acc`` is the paired CovarianceAccumulator
        *before* its own update with the same rows.

        ``acc.update(x, moments=self)`` does both in one pass over the rows (the float32
        and bf16-split paths centre them once for both); this is the standalone path."""
        n_b = int(x.shape[0])
        if n_b == 0:
            return self
        x64 = x.detach().to(torch.float64)
        mean_b = x64.sum(0) / n_b
        sums = MomentSums(mean_b, self.offset(mean_b, n_b))
        sums.add(x64, torch.linalg.vector_norm(x64, dim=1) ** 2)
        return self.fold(n_b, mean_b, sums.result(), acc)

    def offset(self, mean_b: torch.Tensor, n_b: int) -> torch.Tensor:
        """``δ_b = μ_b − μ``: a batch's offset from the mean after it is folded in (0 for the
        first batch), float64 of shape (D,)."""
        if self._n == 0:
            return torch.zeros_like(mean_b, dtype=torch.float64)
        return (mean_b - self._mean.to(mean_b.device)) * (self._n / (self._n + n_b))

    def recentring(self, mean_b: torch.Tensor, n_b: int) -> torch.Tensor | None:
        """``d_a = μ − μ'``: how far the rows seen so far move their centre when a batch of
        ``n_b`` rows with mean ``mean_b`` is folded in (None before the first batch). What
        :meth:`fold` multiplies the accumulator's scatter with."""
        if self._n == 0 or n_b == 0:
            return None
        return self._mean - self._merged_mean(mean_b, n_b)

    def _merged_mean(self, mean_b: torch.Tensor, n_b: int) -> torch.Tensor:
        return self._mean + (mean_b - self._mean) * (n_b / (self._n + n_b))

    def fold(self, n_b: int, mean_b: torch.Tensor, batch: BatchMoments, acc: Any, *,
             before: tuple[torch.Tensor, torch.Tensor] | None = None) -> NormMoments:
        """Fold one batch's :class:`BatchMoments` (around its mean ``mean_b``, with the
        offset of :meth:`offset`) in; ``acc`` is the paired accumulator before the batch, or
        ``before = (tr M2, M2 d_a)`` of it (``d_a`` of :meth:`recentring`), taken while the
        accumulator's own update passed over its scatter."""
        if n_b == 0:
            return self
        n_a, n = self._n, self._n + n_b
        if n_a == 0:
            self._n, self._mean, self._a, self._v = n_b, mean_b.clone(), batch.a, batch.v
            return self
        mean = self._merged_mean(mean_b, n_b)
        d_a = self._mean - mean
        tr_a, md_a = before if before is not None else (acc.scatter_trace(),
                                                         acc.scatter_matvec(d_a))
        a1, v1 = shift(self._a, self._v, None, tr_a.to(mean.device), n_a, d_a,
                       m2_delta=md_a.to(mean.device))
        a2, v2 = shift(batch.a, batch.v, None, batch.tr, n_b, mean_b - mean,
                       m2_delta=batch.m2_delta)
        self._n, self._mean, self._a, self._v = n, mean, a1 + a2, v1 + v2
        return self

    def recentred(self, mean: torch.Tensor, m2: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, v)`` around ``mean`` instead of this part's own mean (``m2``: its scatter);
        parts re-centred on one common mean add up (the cross-process merge)."""
        if self._n == 0:
            d = int(mean.shape[0])
            return (torch.zeros((), dtype=torch.float64, device=mean.device),
                    torch.zeros(d, dtype=torch.float64, device=mean.device))
        m2 = m2.to(self._mean.device)
        return shift(self._a, self._v, m2, m2.diagonal().sum(), self._n,
                     self._mean - mean.to(self._mean.device))

    def without(self, rows: torch.Tensor, mean_rest: torch.Tensor, m2_rest: torch.Tensor
                ) -> float:
        """``Σ ‖x − μ'‖⁴`` over the rows seen *minus* ``rows`` (``[k, D]``, rows that were
        part of them), around their mean ``mean_rest`` with scatter ``m2_rest`` (from
        :func:`nerve_interp.diagnostics.remove_rows`): the fourth moment of a spectrum
        without its outlier tokens.

        Around this part's mean ``μ``, the rest holds ``A − Σ_R ‖x_r − μ‖⁴`` and
        ``v − Σ_R ‖x_r − μ‖² (x_r − μ)``; moving its centre by ``e = μ' − μ`` (its rows sum
        to ``n' e`` around ``μ``, not 0):
        ``A' = A_R − 4 eᵀ v_R + 4 eᵀ M2' e + 2 ‖e‖² tr M2' + 3 n' ‖e‖⁴``.
        """
        rows = rows.to(self._mean.device, torch.float64)
        yr = rows - self._mean
        sr = (yr * yr).sum(1)
        a_r, v_r = self._a - (sr * sr).sum(), self._v - yr.T @ sr
        m2 = m2_rest.to(self._mean.device, torch.float64)
        e = mean_rest.to(self._mean.device, torch.float64) - self._mean
        return recentre_rest(a_r, v_r, m2, self._n - int(rows.shape[0]), e)

    def set_state(self, n: int, mean: torch.Tensor, a: torch.Tensor, v: torch.Tensor
                  ) -> NormMoments:
        self._n, self._mean, self._a, self._v = int(n), mean, a, v
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"n": torch.tensor(self._n, dtype=torch.int64),
                "mean": self._mean.detach().cpu().clone(),
                "fourth": self._a.detach().cpu().reshape(1).clone(),
                "third": self._v.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> NormMoments:
        missing = {"n", "mean", "fourth", "third"} - set(state)
        if missing:
            raise ResultsFileError(f"moment state for {self.name} lacks {sorted(missing)}.")
        self._n = int(state["n"])
        self._mean = torch.as_tensor(state["mean"]).to(torch.float64).clone()
        self._a = torch.as_tensor(state["fourth"]).to(torch.float64).reshape(())
        self._v = torch.as_tensor(state["third"]).to(torch.float64).clone()
        return self


__all__ = ["BatchMoments", "MomentSums", "NormMoments", "recentre_rest", "shift"]
