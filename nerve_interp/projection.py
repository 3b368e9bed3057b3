r"""Subspace projectors of one FFN point (pure maths; see Concepts: subspace ablations).

From a point's mean ``μ`` and eigenvectors ``U`` (columns, eigenvalues descending) pick an
index set S and let ``U_S`` be those columns, ``P = U_S U_Sᵀ``:

* ``top``: the first k eigenvectors (dominant variance);
* ``tail``: the last k eigenvectors *with non-zero variance* (``λ > 1e-12·λ_1``), so a point
  of rank r < D (e.g. a gate projection from d_model < D dims) is not "ablated" in directions
  that carry nothing;
* a ``slice`` of eigen-indices;
* ``random``: a Haar-random orthonormal k-basis (seeded), the control of the same size;
* ``random_matched``: the control of the same *variance*: the first m columns of a
  Haar-random orthonormal basis ``Q`` of all of R^D (seeded), with m the smallest number
  whose span holds at least the variance fraction of the top-k subspace,
  ``m = min{m : tr(Q_mᵀ Σ Q_m) / tr Σ >= Σ_{i<k} λ_i / Σ λ}`` (:func:`matched_random_basis`).
  A random direction holds about ``1/D`` of the variance, so m is about ``D`` times the
  top-k's fraction: many more directions than k. ``k`` names the top-k it is matched to.

Modes (mean-preserving by default; ``center=False`` drops μ):

* **keep**:   ``x ↦ μ + P (x − μ)``   (k = 0 is mean ablation, k = D the identity)
* **remove**: ``x ↦ x − P (x − μ)``   (k = 0 the identity, k = D mean ablation)

``P`` is never formed: ``(x − μ) U_S U_Sᵀ`` costs ``4·N·D·k`` flops instead of ``2·N·D²``.
This module needs numpy and torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._validation import check_eigenvalues

SUBSPACES = ("top", "tail", "random", "random_matched")
MODES = ("keep", "remove")
#: Eigenvalues below this share of λ_1 count as zero variance for ``tail``.
TAIL_RTOL = 1e-12


def effective_rank_count(eigenvalues: Any, rtol: float = TAIL_RTOL) -> int:
    """Number of eigenvalues above ``rtol · λ_1`` (the directions that carry variance)."""
    lam = check_eigenvalues(eigenvalues)
    return int((lam > rtol * lam[0]).sum())


def subspace_indices(eigenvalues: Any, subspace: str | slice, k: int | None = None,
                     *, context: str = "") -> np.ndarray:
    """Eigen-indices (into the descending order) of a ``top`` / ``tail`` / slice subspace.

    Parameters
    ----------
    eigenvalues : array-like of shape (D,)
        Descending eigenvalues of the point.
    subspace : {"top", "tail"} or slice
    k : int
        Size, ``0 <= k <= D`` for top, ``0 <= k <= r`` for tail (r = directions with variance).
    context : str
        Appended to error messages (e.g. the site name).

    Examples
    --------
    >>> subspace_indices([4, 3, 2, 1e-20], "tail", 2).tolist()
    [1, 2]
    >>> subspace_indices([4, 3, 2, 1], slice(1, 3)).tolist()
    [1, 2]
    """
    lam = check_eigenvalues(eigenvalues)
    d = lam.size
    if isinstance(subspace, slice):
        return np.arange(d)[subspace]
    if subspace not in ("top", "tail"):
        raise ValueError(f"subspace={subspace!r}{context}; use 'top', 'tail', 'random', "
                         "'random_matched' or a slice of eigen-indices.")
    limit = d if subspace == "top" else effective_rank_count(lam)
    k = check_k(k, limit, context=context + (" (tail: directions with variance)"
                                             if subspace == "tail" else ""))
    return np.arange(k) if subspace == "top" else np.arange(limit - k, limit)


def check_k(k: Any, limit: int, *, context: str = "") -> int:
    """``k`` as an int in [0, limit], or a ValueError that says the bound and where."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int; got {k!r}{context}.")
    if not 0 <= k <= limit:
        raise ValueError(f"k == {k}, must be in [0, {limit}] (size of the ablation subspace"
                         f"{context}).")
    return int(k)


def random_basis(d: int, k: int, seed: int = 0) -> np.ndarray:
    """A Haar-random orthonormal basis of a k-dimensional subspace of R^d, shape (d, k).

    QR of a Gaussian matrix with the signs of R's diagonal folded in (Mezzadri 2007), so
    the distribution is exactly uniform. Deterministic in ``seed``.
    """
    k = check_k(k, d)
    if k == 0:
        return np.zeros((d, 0))
    g = np.random.default_rng(seed).standard_normal((d, k))
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))


def matched_random_basis(eigenvalues: Any, eigenvectors: np.ndarray, fraction: float,
                         seed: int = 0) -> np.ndarray:
    """The smallest prefix of a Haar-random orthonormal basis of R^D that holds ``fraction``
    of the variance: the ``random_matched`` subspace.

    Parameters
    ----------
    eigenvalues : array-like of shape (D,)
        Descending eigenvalues of the point (variance, squared activation units).
    eigenvectors : ndarray of shape (D, D)
        Their eigenvectors, as columns.
    fraction : float
        Target share of the variance, in [0, 1] (e.g. the top-k's).
    seed : int
        Seed of the random basis (:func:`random_basis` of size D: the same seed gives nested
        subspaces for growing ``fraction``).

    Returns
    -------
    ndarray of shape (D, m)
        ``Q[:, :m]`` with ``m`` the smallest count whose span holds at least ``fraction``
        of the variance (``m = 0`` for ``fraction = 0``; at most D). Its variance fraction
        overshoots ``fraction`` by less than one direction's share.

    Examples
    --------
    >>> lam = np.array([8.0, 4.0, 2.0, 1.0, 1.0])
    >>> b = matched_random_basis(lam, np.eye(5), 0.5, seed=0)
    >>> round(variance_fraction(lam, np.eye(5), b), 3) >= 0.5
    True
    """
    lam = check_eigenvalues(eigenvalues)
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction == {fraction}, must be in [0, 1] (share of variance).")
    d = lam.size
    q = random_basis(d, d, seed)
    share = ((q.T @ np.asarray(eigenvectors)) ** 2) @ lam / lam.sum()  # per random direction
    m = 0 if fraction <= 0 else int(np.searchsorted(np.cumsum(share), fraction - 1e-12) + 1)
    return q[:, : min(m, d)]


def energy_k(eigenvalues: Any, fraction: float, subspace: str = "top") -> int:
    """Smallest k whose top (or tail) eigenvalues hold at least ``fraction`` of the variance.

    Examples
    --------
    >>> energy_k([4, 3, 2, 1], 0.7)
    2
    >>> energy_k([4, 3, 2, 1], 0.3, "tail")
    2
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction == {fraction}, must be in (0, 1] (share of variance).")
    lam = check_eigenvalues(eigenvalues)
    if subspace == "tail":
        lam = lam[: effective_rank_count(lam)][::-1]
    elif subspace != "top":
        raise ValueError(f"subspace={subspace!r}; energy matching uses 'top' or 'tail'.")
    share = np.cumsum(lam) / lam.sum()
    return int(np.searchsorted(share, fraction - 1e-12) + 1)


def variance_fraction(eigenvalues: Any, eigenvectors: np.ndarray | None,
                      basis_or_indices: np.ndarray) -> float:
    """Share of the point's variance inside the subspace: ``tr(U_Sᵀ Σ U_S) / tr Σ``.

    ``basis_or_indices``: eigen-indices (1-D ints) or an orthonormal basis (D, k), for which
    ``eigenvectors`` are needed.
    """
    lam = check_eigenvalues(eigenvalues)
    b = np.asarray(basis_or_indices)
    if b.ndim == 1:
        return float(lam[b.astype(int)].sum() / lam.sum())
    if eigenvectors is None:
        raise ValueError("variance_fraction of a basis needs the eigenvectors.")
    w = np.sum((b.T @ eigenvectors) ** 2, axis=0)  # |U_Sᵀ u_i|² per eigenvector
    return float(np.dot(w, lam) / lam.sum())


@dataclass
class Projection:
    """A projector ready to apply to activations of one point.

    Attributes
    ----------
    basis : torch.Tensor of shape (D, k)
        Orthonormal columns spanning the subspace.
    mean : torch.Tensor of shape (D,)
        μ (zeros when ``center=False``).
    mode : {"keep", "remove"}
    """

    basis: torch.Tensor
    mean: torch.Tensor
    mode: str

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; use 'keep' or 'remove'.")

    @property
    def k(self) -> int:
        return int(self.basis.shape[1])

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Projection:
        return Projection(self.basis.to(device=device, dtype=dtype),
                          self.mean.to(device=device, dtype=dtype), self.mode)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to ``x`` of shape (..., D); returns the same shape and dtype."""
        u = self.basis.to(x.dtype)
        mu = self.mean.to(x.dtype)
        coef = (x - mu) @ u
        inside = coef @ u.T
        return mu + inside if self.mode == "keep" else x - inside


def make_projection(eigenvalues: Any, eigenvectors: np.ndarray, mean: np.ndarray, *,
                    subspace: str | slice = "top", k: int | None = None, mode: str = "keep",
                    center: bool = True, seed: int = 0, context: str = ""
                    ) -> tuple[Projection, float]:
    """Build the :class:`Projection` of a subspace ablation and its variance fraction.

    Returns
    -------
    (Projection, float)
        The projector (float64 tensors) and the share of the point's variance in the subspace.
    """
    u_all = np.asarray(eigenvectors)
    d = u_all.shape[0]
    if u_all.shape != (d, d) or np.asarray(mean).shape != (d,):
        raise ValueError(f"eigenvectors {u_all.shape} and mean {np.asarray(mean).shape} must be "
                         f"(D, D) and (D,){context}.")
    if subspace == "random":
        basis = random_basis(d, check_k(k, d, context=context), seed)
        frac = variance_fraction(eigenvalues, u_all, basis)
    elif subspace == "random_matched":  # as much variance as the top-k, in random directions
        target = variance_fraction(eigenvalues, None,
                                   subspace_indices(eigenvalues, "top", k, context=context))
        basis = matched_random_basis(eigenvalues, u_all, target, seed)
        frac = variance_fraction(eigenvalues, u_all, basis)
    else:
        idx = subspace_indices(eigenvalues, subspace, k, context=context)
        basis = u_all[:, idx]
        frac = variance_fraction(eigenvalues, None, idx)
    mu = np.asarray(mean, dtype=np.float64) if center else np.zeros(d)
    return Projection(torch.from_numpy(np.ascontiguousarray(basis, dtype=np.float64)),
                      torch.from_numpy(mu.copy()), mode), frac


__all__ = [
    "MODES",
    "SUBSPACES",
    "Projection",
    "check_k",
    "effective_rank_count",
    "energy_k",
    "make_projection",
    "matched_random_basis",
    "random_basis",
    "subspace_indices",
    "variance_fraction",
]
