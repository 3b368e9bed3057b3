r"""White noise as a yardstick: the eigenvalues and metrics that N samples of D independent
unit-variance coordinates give, by the Marchenko–Pastur law.

A sample covariance of white noise is not flat: with ``γ = D / N`` its eigenvalues spread
over ``[(1 - √γ)², (1 + √γ)²]`` (and ``D - N`` of them are 0 when ``N < D``), so every
metric of it sits away from its population value (PR = soft rank = D, EEE = 0). That
distance is the finite-sample floor of any spectrum measured from N tokens: a participation
ratio of ``0.89·D`` at ``N/D = 8`` says nothing about structure, because white noise gives it
too. The large-D limits used here are

* ``participation_ratio / D = 1 / (1 + γ)`` (``E tr S² = D (1 + γ)`` for ``tr S = D``);
* ``soft_rank / D = exp(−E[x ln x])`` and ``eee`` from the classical eigenvalue locations
  (the MP quantiles at ``(i − ½) / D``), through this package's own metric functions.

Pure numpy; no sampling.
"""

from __future__ import annotations

import math

import numpy as np

from . import metrics

_GRID = 20_001  # θ points of the cumulative integral (error < 1e-6 in the quantiles)

#: Tokens per dimension below which nerve_interp raises a
#: :class:`~nerve_interp.errors.FiniteSampleWarning`. At N/D = 10 white noise still gives
#: PR 0.91·D, soft rank 0.95·D and EEE 0.18 (at 32: 0.97·D, 0.98·D, 0.10).
FINITE_SAMPLE_N_OVER_D = 10.0


def _check(n_samples: int, dim: int) -> float:
    for name, v in (("n_samples", n_samples), ("dim", dim)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an int >= 1 (tokens N, dimension D); got {v!r}.")
    return dim / n_samples


def marchenko_pastur_eigenvalues(n_samples: int, dim: int) -> np.ndarray:
    """Typical eigenvalues of the sample covariance of white noise, descending.

    Parameters
    ----------
    n_samples : int
        Tokens N.
    dim : int
        Dimension D.

    Returns
    -------
    ndarray of shape (D,), float64
        The Marchenko–Pastur quantiles at upper-tail probabilities ``(i − ½) / D`` for
        unit-variance coordinates (ratio ``γ = D / N``); 0 for the ``≈ D − N`` null
        directions when ``N < D``. Their mean is 1 up to the discretisation.

    Examples
    --------
    >>> lam = marchenko_pastur_eigenvalues(8000, 1000)   # γ = 1/8
    >>> bool((1 - 8 ** -0.5) ** 2 < lam[-1] < lam[0] < (1 + 8 ** -0.5) ** 2)
    True
    """
    gamma = _check(n_samples, dim)
    a, b = (1 - math.sqrt(gamma)) ** 2, (1 + math.sqrt(gamma)) ** 2
    # x = a + (b − a)(1 − cos θ)/2 makes the density smooth in θ: f(x) dx =
    # ((b − a)/2)² sin²θ / (2π γ x) dθ; its integral over θ ∈ [0, π] is min(1, 1/γ)
    theta = np.linspace(0.0, math.pi, _GRID)
    x = a + (b - a) * (1 - np.cos(theta)) / 2
    dens = ((b - a) / 2) ** 2 * np.sin(theta) ** 2 / (2 * math.pi * gamma * np.maximum(x, 1e-300))
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(theta))])
    mass = min(1.0, 1.0 / gamma)
    cdf *= mass / cdf[-1]  # the continuous part's weight, exact
    upper = (np.arange(dim) + 0.5) / dim  # upper-tail probability of the i-th largest
    lam = np.interp(mass - upper, cdf, x, left=0.0)
    lam[upper > mass] = 0.0  # the atom at 0 when N < D
    return lam


def white_noise_metrics(n_samples: int, dim: int) -> dict[str, float]:
    """What N samples of D-dimensional white noise give for each metric (their floor).

    Returns
    -------
    dict
        ``participation_ratio`` (the large-D limit ``D / (1 + D/N)``), ``soft_rank``,
        ``spectral_entropy``, ``eee`` (of :func:`marchenko_pastur_eigenvalues`), and the same
        as fractions of their population values: ``participation_ratio_fraction`` and
        ``soft_rank_fraction`` (population: D; white noise has ``eee`` 0).

    Examples
    --------
    >>> m = white_noise_metrics(8 * 1536, 1536)       # SmolLM2's D at N/D = 8
    >>> round(m["participation_ratio_fraction"], 3), round(m["soft_rank_fraction"], 3)
    (0.889, 0.939)
    """
    gamma = _check(n_samples, dim)
    lam = marchenko_pastur_eigenvalues(n_samples, dim)
    pr = dim / (1 + gamma)
    sr = metrics.soft_rank(lam)
    return {"participation_ratio": pr, "soft_rank": sr,
            "spectral_entropy": metrics.spectral_entropy(lam), "eee": metrics.eee(lam),
            "participation_ratio_fraction": pr / dim, "soft_rank_fraction": sr / dim}


def floor_sentence(n_samples: int, dim: int) -> str:
    """What white noise gives at this N and D, in one sentence (the finite-sample warnings
    quote it).

    Examples
    --------
    >>> print(floor_sentence(8 * 1536, 1536).replace(" gives", "\\ngives"))
    At N/D = 8 white noise (true PR = soft rank = D, EEE = 0)
    gives PR 0.89·D, soft rank 0.94·D, EEE 0.20.
    """
    m = white_noise_metrics(n_samples, dim)
    return (f"At N/D = {n_samples / dim:.3g} white noise (true PR = soft rank = D, EEE = 0) "
            f"gives PR {m['participation_ratio_fraction']:.2f}·D, soft rank "
            f"{m['soft_rank_fraction']:.2f}·D, EEE {m['eee']:.2f}.")


def finite_sample_warning(n_samples: int, dim: int, where: str, advice: str
                          ) -> tuple[type[Warning], str] | None:
    """The warning class and message for a spectrum of ``n_samples`` tokens at width ``dim``,
    or None when ``N/D >= FINITE_SAMPLE_N_OVER_D``.

    Parameters
    ----------
    n_samples, dim : int
        Tokens N and width D of the worst point (the smallest N/D).
    where : str
        Which spectra, e.g. ``"at 2 of 4 points (layers.0.ffn.pre, ...)"``.
    advice : str
        What to do about it (the last sentence).

    Returns
    -------
    (RankDeficientWarning, str) when N <= D, (FiniteSampleWarning, str) when N/D < 10.
    """
    from .errors import FiniteSampleWarning, RankDeficientWarning

    if n_samples >= FINITE_SAMPLE_N_OVER_D * dim:
        return None
    if n_samples <= dim:
        head = (f"N = {n_samples} tokens <= D = {dim} {where}: those spectra are rank-deficient "
                "(rank <= N - 1) and every metric depends on N/D.")
        return RankDeficientWarning, f"{head} {floor_sentence(n_samples, dim)} {advice}"
    head = (f"N/D = {n_samples / dim:.3g} < {FINITE_SAMPLE_N_OVER_D:g} (N = {n_samples} tokens, "
            f"D = {dim}) {where}: every metric sits measurably away from its population "
            "value and depends on N/D.")
    return FiniteSampleWarning, f"{head} {floor_sentence(n_samples, dim)} {advice}"


__all__ = ["FINITE_SAMPLE_N_OVER_D", "finite_sample_warning", "floor_sentence",
           "marchenko_pastur_eigenvalues", "white_noise_metrics"]
