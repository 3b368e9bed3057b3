"""Eigendecomposition of a covariance matrix in float64: the :class:`Spectrum` of one point.

Eigenvalues come from LAPACK in float64 (:mod:`nerve_interp._lapack`; ``torch.linalg.eigh`` with
eigenvectors) and are stored in descending order.
Round-off negatives are clipped to 0; how many there were and the most negative value are
kept (``n_negative``, ``min_eigenvalue``) and a ``NegativeEigenvalueWarning`` is raised when
one is below ``-1e-8 · λ_1`` (a sign of a broken covariance, not of round-off).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from . import _lapack
from . import metrics as _metrics
from .errors import NegativeEigenvalueWarning, NotFittedError
from .groups import GroupSpectra
from .jackknife import jackknife
from .marchenko_pastur import finite_sample_warning

NEGATIVE_WARN_TOL = 1e-8


@dataclass
class Spectrum:
    """Eigenvalues (and optionally eigenvectors) of one point's activation covariance.

    Attributes
    ----------
    eigenvalues : ndarray of shape (D,), float64
        Descending, >= 0 (round-off negatives clipped), in squared activation units.
    mean : ndarray of shape (D,), float64
        Mean activation μ over the tokens.
    n_samples : int
        Number of tokens N the covariance was estimated from.
    eigenvectors : ndarray of shape (D, D), float64, or None
        Column ``i`` belongs to ``eigenvalues[i]``. Kept only when asked for
        (``collect_spectra(..., eigenvectors=True)``): 8·D² bytes each.
    n_negative : int
        How many eigenvalues came out of ``eigh`` below 0 before clipping.
    min_eigenvalue : float
        The smallest eigenvalue before clipping.
    name : str
        The site name, e.g. ``"layers.3.ffn.pre"``.
    fourth_moment : float or None
        ``Σ_i ‖x_i − μ‖⁴`` over the tokens, when the capture streamed it (local captures):
        it gives ``participation_ratio_corrected`` in :meth:`metrics`.
    groups : GroupSpectra or None
        The leave-one-group-out and convergence spectra of a capture with ``n_groups=K``
        (:mod:`nerve_interp.groups`): they give :meth:`intervals` and convergence curves.
    variances : ndarray of shape (D,), float64, or None
        The covariance's diagonal (each unit's variance): the population of the
        independent-features null (:func:`nerve_interp.nulls.independent`). None in files
        written before it was kept.
    """

    eigenvalues: np.ndarray
    mean: np.ndarray
    n_samples: int
    eigenvectors: np.ndarray | None = None
    n_negative: int = 0
    min_eigenvalue: float = 0.0
    name: str = "spectrum"
    fourth_moment: float | None = None
    groups: GroupSpectra | None = None
    variances: np.ndarray | None = None
    _metric_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def dim(self) -> int:
        """Width D of the point."""
        return int(self.eigenvalues.shape[0])

    @property
    def rank_deficient(self) -> bool:
        """True when N <= D, so the covariance has rank <= N - 1 < D."""
        return self.n_samples <= self.dim

    def require_eigenvectors(self) -> np.ndarray:
        """The eigenvectors, or an error saying how to keep them."""
        if self.eigenvectors is None:
            raise NotFittedError(
                f"the spectrum of {self.name} was computed without eigenvectors; rerun "
                "collect_spectra(..., eigenvectors=True) to keep them (8·D² bytes per point)."
            )
        return self.eigenvectors

    def metrics(self, *, concentration_k: int | None = None) -> dict[str, float]:
        """Every per-spectrum metric (see the glossary and ``metrics.compute_metrics``)."""
        key = concentration_k
        if key not in self._metric_cache:
            self._metric_cache[key] = point_metrics(self.eigenvalues, self.n_samples,
                                                    self.fourth_moment, concentration_k)
        return dict(self._metric_cache[key])

    def loo_metrics(self, *, concentration_k: int | None = None) -> list[dict[str, float]]:
        """The metrics of every leave-one-group-out sample (K dicts), or an error saying how
        to get groups."""
        g = self.require_groups()
        fourth = g.loo_fourth if g.loo_fourth is not None else [None] * g.k
        return [point_metrics(lam, int(n), None if a is None else float(a), concentration_k)
                for lam, n, a in zip(g.loo_eigenvalues, g.loo_n, fourth, strict=True)]

    def intervals(self, *, ci: float = 0.95, concentration_k: int | None = None
                  ) -> dict[str, dict[str, float]]:
        """Jackknife ``se``, ``ci_low``, ``ci_high`` of every metric
        (:func:`nerve_interp.jackknife.jackknife`), keyed by metric name."""
        full = self.metrics(concentration_k=concentration_k)
        loo = self.loo_metrics(concentration_k=concentration_k)
        out = {}
        for name, value in full.items():
            j = jackknife(value, [m[name] for m in loo], ci=ci)
            out[name] = {k: float(v) for k, v in j.items()}
        return out

    def require_groups(self) -> GroupSpectra:
        """The group spectra, or an error saying how to keep them."""
        if self.groups is None:
            raise NotFittedError(
                f"the spectrum of {self.name} has no per-group statistics; capture with "
                "collect_spectra(..., n_groups=16) for intervals and convergence curves.")
        return self.groups

    def __repr__(self) -> str:
        vec = "with" if self.eigenvectors is not None else "without"
        return (
            f"Spectrum({self.name!r}, D={self.dim}, N={self.n_samples}, "
            f"λ_1={self.eigenvalues[0]:.4g}, {vec} eigenvectors)"
        )


def point_metrics(eigenvalues: np.ndarray, n_samples: int, fourth_moment: float | None,
                  concentration_k: int | None = None) -> dict[str, float]:
    """Every metric of one spectrum: ``compute_metrics`` plus
    ``participation_ratio_corrected`` when the fourth moment is known (N >= 4)."""
    values = _metrics.compute_metrics(eigenvalues, concentration_k=concentration_k)
    if fourth_moment is not None and n_samples >= 4:
        values["participation_ratio_corrected"] = _metrics.participation_ratio_corrected(
            eigenvalues, n_samples, fourth_moment)
    return values


def spectrum_from_covariance(
    covariance: torch.Tensor | np.ndarray,
    mean: torch.Tensor | np.ndarray,
    n_samples: int,
    *,
    eigenvectors: bool = False,
    name: str = "spectrum",
    warn: bool = True,
) -> Spectrum:
    """Eigendecompose a covariance in float64 and return its :class:`Spectrum`.

    Parameters
    ----------
    covariance : tensor or ndarray of shape (D, D)
        Symmetric positive semi-definite (up to round-off). Only its lower triangle is
        read (LAPACK's ``UPLO="L"``); the accumulators' covariances are exactly symmetric,
        and averaging the two triangles first cost 20% of the decomposition at D = 1536.
    mean : tensor or ndarray of shape (D,)
    n_samples : int
        Tokens the covariance came from; ``n_samples < 10·D`` raises a ``FiniteSampleWarning``
        (``RankDeficientWarning``, its subclass, when ``n_samples <= D``).
    eigenvectors : bool, default False
        Keep the eigenvectors (needed for subspace ablations).
    name : str
        Site name for messages.
    warn : bool, default True
        Emit ``FiniteSampleWarning`` / ``NegativeEigenvalueWarning``.

    Raises
    ------
    ValueError
        ``covariance`` is not square, or has NaN/inf entries (LAPACK would return finite
        eigenvalues for them that mean nothing).
    """
    cov = torch.as_tensor(covariance).detach().to("cpu", torch.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"covariance of {name} must be square (D, D); got {tuple(cov.shape)}.")
    finite = torch.isfinite(cov)
    if not bool(finite.all()):  # LAPACK returns finite nonsense here (±1.41 for one NaN)
        raise ValueError(
            f"covariance of {name} has {int((~finite).sum())} NaN/inf entries of "
            f"{finite.numel()}; its eigenvalues are undefined. Find where it became "
            "non-finite (the accumulators refuse NaN/inf activations with a CaptureError).")
    if eigenvectors:
        vals, vecs = torch.linalg.eigh(cov)
        vecs = vecs.flip(-1).numpy()
    else:
        vals, vecs = _lapack.eigvalsh(cov), None
    vals = vals.flip(-1).numpy()
    lam1 = float(vals[0]) if vals.size else 0.0
    n_neg = int((vals < 0).sum())
    min_val = float(vals.min()) if vals.size else 0.0
    if warn and n_neg and min_val < -NEGATIVE_WARN_TOL * max(abs(lam1), np.finfo(float).tiny):
        warnings.warn(
            f"{name}: {n_neg} negative eigenvalue(s), the most negative {min_val:.3e} "
            f"(λ_1 = {lam1:.3e}); clipped to 0. The covariance is not positive semi-definite "
            "beyond round-off: check it was accumulated centred and in float64/float32.",
            NegativeEigenvalueWarning,
            stacklevel=2,
        )
    d = vals.size
    few = finite_sample_warning(int(n_samples), d, f"at {name}", "Raise max_tokens (N/D >= "
                                "10; the papers use ~65k tokens, N >> D) before comparing "
                                "metrics.") if warn and n_samples >= 1 and d else None
    if few is not None:
        warnings.warn(few[1], few[0], stacklevel=2)
    return Spectrum(
        eigenvalues=np.clip(vals, 0.0, None),
        mean=torch.as_tensor(mean).detach().to("cpu", torch.float64).numpy().copy(),
        n_samples=int(n_samples),
        eigenvectors=vecs,
        n_negative=n_neg,
        min_eigenvalue=min_val,
        name=name,
        variances=torch.diagonal(cov).clamp_min(0.0).numpy().copy(),
    )


__all__ = ["Spectrum", "point_metrics", "spectrum_from_covariance"]
