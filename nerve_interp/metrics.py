r"""Spectral metrics of one FFN point: pure functions of a covariance eigenvalue vector.

Definitions (see the glossary) follow [NerVE] (Jha & Reagen, ICLR 2026) and
[SSL] (*Spectral Scaling Laws in Language Models*, Jha & Reagen, EMNLP 2025). With
``p_i = λ_i / Σ_j λ_j`` and natural logarithms (``0 · ln 0 = 0``):

| name | formula | range |
|---|---|---|
| ``spectral_entropy`` | ``-Σ p_i ln p_i`` (nats, not divided by ln D) | [0, ln D] |
| ``participation_ratio`` | ``(Σ λ)² / Σ λ²`` | [1, D] |
| ``eee`` | ``(2/D) Σ_k (S_k - k/D)``, ``S_k`` = top-k share | [0, 1) |
| ``soft_rank`` | ``exp(spectral_entropy)`` | [1, D] |
| ``hard_rank`` | ``participation_ratio`` | [1, D] |
| ``spectral_concentration`` | ``S_k`` with ``k = ⌈D/100⌉`` (ours) | (0, 1] |
| ``sui`` | geometric mean of hard/D, soft/D, 1 - concentration | [0, 1] |
| ``js_divergence`` | Jensen-Shannon of two rank-ordered spectra | [0, ln 2] |

``participation_ratio_corrected`` (:func:`participation_ratio_corrected`) needs the number of
tokens and the streamed fourth moment besides the eigenvalues.

Every function takes eigenvalues in any order (they are sorted descending here), as a list,
numpy array or torch tensor, and returns a Python float. This module imports numpy only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._validation import check_eigenvalues, check_positive_int

ArrayLike = Any

#: Per-spectrum metrics, in the order tables list them.
METRIC_NAMES: tuple[str, ...] = (
    "spectral_entropy",
    "participation_ratio",
    "eee",
    "soft_rank",
    "hard_rank",
    "soft_rank_utilization",
    "hard_rank_utilization",
    "spectral_concentration",
    "sui",
)
CORRECTED_NAMES: tuple[str, ...] = ("participation_ratio_corrected",)
"""Finite-sample-corrected metrics: in a spectrum's metrics when the capture streamed the
fourth moment they need (:class:`nerve_interp.moments.NormMoments`; local captures)."""

#: Columns of the variance-reinjection table (see the glossary), pre -> post.
REINJECTION_NAMES: tuple[str, ...] = (
    "pr_gain",
    "delta_spectral_entropy",
    "delta_eee",
    "js_divergence",
    "soft_rank_gain",
    "hard_rank_gain",
)


def normalized_spectrum(eigenvalues: ArrayLike) -> np.ndarray:
    """Descending eigenvalues divided by their sum, ``p_i = λ_i / Σ λ``.

    Returns
    -------
    ndarray of shape (D,)
        Non-negative, sums to 1, descending.

    Examples
    --------
    >>> normalized_spectrum([1, 3]).tolist()
    [0.75, 0.25]
    """
    lam = check_eigenvalues(eigenvalues)
    return lam / lam.sum()


def _entropy(p: np.ndarray) -> float:
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def spectral_entropy(eigenvalues: ArrayLike) -> float:
    """Shannon entropy of the normalised spectrum, in nats ([NerVE] §2.2).

    ``SE = -Σ p_i ln p_i`` with ``p_i = λ_i / Σ λ`` and ``0 ln 0 = 0``. Not divided by ln D.

    Parameters
    ----------
    eigenvalues : array-like of shape (D,)
        Covariance eigenvalues of one point, any order, >= 0 with a positive sum.

    Returns
    -------
    float
        In [0, ln D]: 0 when one direction holds all the variance, ln D when flat.

    Examples
    --------
    >>> round(spectral_entropy([4, 3, 2, 1]), 6)
    1.279854
    """
    return _entropy(normalized_spectrum(eigenvalues))


def participation_ratio(eigenvalues: ArrayLike) -> float:
    """Effective number of directions the variance is spread over ([NerVE] Eq. 2).

    ``PR = (Σ λ_i)² / Σ λ_i²``. Dominated by the large eigenvalues.

    Parameters
    ----------
    eigenvalues : array-like of shape (D,)
        Covariance eigenvalues of one point, in any order, in squared activation units.

    Returns
    -------
    float
        Dimensionless, in [1, D]: 1 for a single spike, D for a flat spectrum.

    See Also
    --------
    soft_rank : exp(spectral_entropy), the Shannon effective rank.

    Examples
    --------
    >>> round(participation_ratio([4, 3, 2, 1]), 6)
    3.333333
    """
    p = normalized_spectrum(eigenvalues)  # scale-free form: 1 / Σ p²
    return float(1.0 / np.sum(p * p))


def eee(eigenvalues: ArrayLike) -> float:
    """Eigenvalue early enrichment: how top-heavy the spectrum is ([NerVE] Eq. 3).

    With ``S_k = Σ_{i<=k} λ_i / Σ λ`` (descending), ``EEE = (2/D) Σ_{k=1}^{D} (S_k - k/D)``,
    clipped to [0, 1]: the area between the cumulative-variance curve and the diagonal
    ``k/D``, normalised by ``D/2``. It is not a top-k share.

    Returns
    -------
    float
        In [0, 1): 0 for a flat spectrum, (D-1)/D for a single spike.

    Examples
    --------
    >>> round(eee([4, 3, 2, 1]), 6)
    0.25
    >>> eee([1, 0, 0, 0])
    0.75
    """
    p = normalized_spectrum(eigenvalues)
    d = p.size
    s = np.cumsum(p)
    k = np.arange(1, d + 1, dtype=np.float64) / d
    return float(np.clip((2.0 / d) * np.sum(s - k), 0.0, 1.0))


def soft_rank(eigenvalues: ArrayLike) -> float:
    """Shannon effective rank, ``exp(spectral_entropy)`` ([SSL]; tail-sensitive).

    Examples
    --------
    >>> round(soft_rank([4, 3, 2, 1]), 6)
    3.596115
    """
    return math.exp(spectral_entropy(eigenvalues))


def hard_rank(eigenvalues: ArrayLike) -> float:
    """Hard rank of [SSL], equal to :func:`participation_ratio` (dominant-mode sensitive).

    Examples
    --------
    >>> hard_rank([1, 1, 1, 1])
    4.0
    """
    return participation_ratio(eigenvalues)


def soft_rank_utilization(eigenvalues: ArrayLike) -> float:
    """``soft_rank / D``, in (0, 1]: the share of the width the tail-sensitive rank uses."""
    lam = check_eigenvalues(eigenvalues)
    return soft_rank(lam) / lam.size


def hard_rank_utilization(eigenvalues: ArrayLike) -> float:
    """``hard_rank / D``, in (0, 1] ([NerVE] compares widths with PR/D)."""
    lam = check_eigenvalues(eigenvalues)
    return hard_rank(lam) / lam.size


def default_concentration_k(d: int) -> int:
    """``⌈D / 100⌉``, the default number of top eigenvalues in ``spectral_concentration``."""
    return max(1, math.ceil(d / 100))


def spectral_concentration(eigenvalues: ArrayLike, k: int | None = None) -> float:
    """Share of the variance in the top ``k`` eigenvalues, ``S_k``.

    **Ours**: [SSL] names the metric but does not publish its formula (see the glossary).

    Parameters
    ----------
    eigenvalues : array-like of shape (D,)
    k : int, optional
        Number of top eigenvalues, 1 <= k <= D. Default ``⌈D/100⌉``.

    Returns
    -------
    float
        In (0, 1]; k/D for a flat spectrum, 1 for a single spike.

    Examples
    --------
    >>> spectral_concentration([4, 3, 2, 1], k=1)
    0.4
    """
    lam = check_eigenvalues(eigenvalues)
    d = lam.size
    k = default_concentration_k(d) if k is None else k
    check_positive_int(k, "k", context=f" (number of top eigenvalues, D = {d})")
    if k > d:
        raise ValueError(f"k == {k}, must be <= D = {d} (number of top eigenvalues).")
    return float(lam[:k].sum() / lam.sum())


def sui(eigenvalues: ArrayLike, k: int | None = None) -> float:
    """Spectral utilisation index: geometric mean of ``hard_rank/D``, ``soft_rank/D`` and
    ``1 - spectral_concentration(k)``.

    **Ours**: [SSL] describes SUI as a composite of these three without publishing the rule.

    Returns
    -------
    float
        In [0, 1]; 0 for a single spike (concentration 1), close to 1 for a flat spectrum.
    """
    lam = check_eigenvalues(eigenvalues)
    d = lam.size
    parts = (hard_rank(lam) / d, soft_rank(lam) / d, _outside_top(lam, k))
    return float(np.prod(parts) ** (1.0 / 3.0))


def _outside_top(lam: np.ndarray, k: int | None) -> float:
    """``1 - spectral_concentration``, summed from the tail (no cancellation when ~0)."""
    k = default_concentration_k(lam.size) if k is None else k
    spectral_concentration(lam, k)  # validates k
    return float(lam[k:].sum() / lam.sum())


def js_divergence(eigenvalues_p: ArrayLike, eigenvalues_q: ArrayLike) -> float:
    """Jensen-Shannon divergence between two rank-ordered normalised spectra ([NerVE] Eqs. 4-6).

    Both spectra are sorted descending and normalised; the shorter one is zero-padded at the
    tail. ``M = (p + q)/2`` and ``JS = ½ KL(p‖M) + ½ KL(q‖M)`` in nats. Eigenvectors are not
    matched: this compares the *shape* of the two spectra, index by rank.

    Returns
    -------
    float
        In [0, ln 2].

    Examples
    --------
    >>> round(js_divergence([4, 3, 2, 1], [1, 1, 1, 1]), 6)
    0.027866
    """
    p = normalized_spectrum(eigenvalues_p)
    q = normalized_spectrum(eigenvalues_q)
    d = max(p.size, q.size)
    p = np.pad(p, (0, d - p.size))
    q = np.pad(q, (0, d - q.size))
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return float(np.clip(0.5 * kl(p) + 0.5 * kl(q), 0.0, math.log(2.0)))


def trace_estimators(eigenvalues: ArrayLike, n_samples: int, fourth_moment: float
                     ) -> tuple[float, float]:
    """Unbiased estimators of ``(tr Σ)²`` and ``tr Σ²`` from a sample covariance.

    Himeno & Yamada (2014), which assume finite fourth moments but not Gaussian data; with
    ``S`` the sample covariance (eigenvalues ``λ``), ``N`` tokens and
    ``K = Σ_i ‖x_i − x̄‖⁴ / (N − 1)``, ``c = (N − 1) / (N (N − 2)(N − 3))``:

    - ``tr Σ²  ≈ c · ((N − 1)(N − 2) tr S² + (tr S)² − N K)``,
    - ``(tr Σ)² ≈ c · (2 tr S² + (N² − 3N + 1)(tr S)² − N K)``.

    Both equal the U-statistics ``E[((x₁ − x₂)ᵀ(x₃ − x₄))²] / 4`` and
    ``E[‖x₁ − x₂‖² ‖x₃ − x₄‖²] / 4`` over distinct samples (tested).

    Parameters
    ----------
    eigenvalues : array-like of shape (D,)
        Of the sample covariance ``S`` (denominator ``N − 1``).
    n_samples : int >= 4
    fourth_moment : float
        ``Σ_i ‖x_i − x̄‖⁴`` (streamed by :class:`nerve_interp.moments.NormMoments`).

    Returns
    -------
    (trace_squared, trace_of_square) : tuple of float
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    n = int(n_samples)
    if n < 4:
        raise ValueError(f"n_samples == {n}; the unbiased estimators need N >= 4.")
    tr, tr2 = float(lam.sum()), float(lam @ lam)
    k = float(fourth_moment) / (n - 1)
    c = (n - 1) / (n * (n - 2) * (n - 3))
    return (c * (2 * tr2 + (n * n - 3 * n + 1) * tr * tr - n * k),
            c * ((n - 1) * (n - 2) * tr2 + tr * tr - n * k))


def participation_ratio_corrected(eigenvalues: ArrayLike, n_samples: int,
                                  fourth_moment: float) -> float:
    """Finite-sample-corrected participation ratio: the ratio of the unbiased estimators of
    ``(tr Σ)²`` and ``tr Σ²`` (:func:`trace_estimators`).

    The plain PR of N samples is biased low (white noise: ``1/PR̂ ≈ 1/PR + 1/N``, half of D
    at ``N = D``); this ratio is consistent and, measured on Gaussian and Student-t(8) data
    with D = 200, within 0.5 % of the population PR on average at ``N/D = 1`` for a flat
    spectrum (plain: 50 % low). NaN when the ``tr Σ²`` estimate is not positive (tiny N).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((400, 200))
    >>> xc = x - x.mean(0)
    >>> lam = np.linalg.eigvalsh(xc.T @ xc / 399)
    >>> a = float(((xc ** 2).sum(1) ** 2).sum())
    >>> plain, corrected = participation_ratio(lam), participation_ratio_corrected(lam, 400, a)
    >>> round(plain / 200, 2), round(corrected / 200, 1)   # true PR / D = 1
    (0.67, 1.0)
    """
    t11, t2 = trace_estimators(eigenvalues, n_samples, fourth_moment)
    return t11 / t2 if t2 > 0 else math.nan


def compute_metrics(eigenvalues: ArrayLike, *, concentration_k: int | None = None) -> dict:
    """Every per-spectrum metric as ``{name: value}`` (names in ``METRIC_NAMES``; see the glossary).

    Examples
    --------
    >>> m = compute_metrics([1, 1, 1, 1])
    >>> m["participation_ratio"], m["eee"]
    (4.0, 0.0)
    """
    lam = check_eigenvalues(eigenvalues)
    d = lam.size
    se = spectral_entropy(lam)
    pr = participation_ratio(lam)
    conc = spectral_concentration(lam, concentration_k)
    out = {
        "spectral_entropy": se,
        "participation_ratio": pr,
        "eee": eee(lam),
        "soft_rank": math.exp(se),
        "hard_rank": pr,
        "soft_rank_utilization": math.exp(se) / d,
        "hard_rank_utilization": pr / d,
        "spectral_concentration": conc,
        "sui": float((pr / d * math.exp(se) / d * _outside_top(lam, concentration_k))
                     ** (1.0 / 3.0)),
    }
    return out


def reinjection(pre: ArrayLike, post: ArrayLike) -> dict:
    """Variance reinjection by the nonlinearity, pre -> post (see the glossary).

    Returns ``{"pr_gain", "delta_spectral_entropy", "delta_eee", "js_divergence",
    "soft_rank_gain", "hard_rank_gain"}``. ``pr_gain > 1``, ``delta_spectral_entropy > 0`` and
    ``delta_eee < 0`` all mean the nonlinearity spread variance over more directions.

    Examples
    --------
    >>> r = reinjection([4, 3, 2, 1], [1, 1, 1, 1])
    >>> round(r["pr_gain"], 4), round(r["delta_eee"], 4)
    (1.2, -0.25)
    """
    a, b = check_eigenvalues(pre, "pre"), check_eigenvalues(post, "post")
    pr_a, pr_b = participation_ratio(a), participation_ratio(b)
    se_a, se_b = spectral_entropy(a), spectral_entropy(b)
    return {
        "pr_gain": pr_b / pr_a,
        "delta_spectral_entropy": se_b - se_a,
        "delta_eee": eee(b) - eee(a),
        "js_divergence": js_divergence(a, b),
        "soft_rank_gain": math.exp(se_b - se_a),
        "hard_rank_gain": pr_b / pr_a,
    }


__all__ = [
    "CORRECTED_NAMES",
    "participation_ratio_corrected",
    "trace_estimators",
    "METRIC_NAMES",
    "REINJECTION_NAMES",
    "compute_metrics",
    "default_concentration_k",
    "eee",
    "hard_rank",
    "hard_rank_utilization",
    "js_divergence",
    "normalized_spectrum",
    "participation_ratio",
    "reinjection",
    "soft_rank",
    "soft_rank_utilization",
    "spectral_concentration",
    "spectral_entropy",
    "sui",
]
