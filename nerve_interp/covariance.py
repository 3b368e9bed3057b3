r"""Streaming, mergeable covariance of activations: count, mean, centred second moment.

The state of a :class:`CovarianceAccumulator` is ``(n, μ, M2)`` in **float64**, with
``M2 = Σ_n (x_n − μ)(x_n − μ)ᵀ``, so that ``Σ = M2 / (n − 1)`` (centred, unbiased, as
[NerVE] Eq. 1). Each batch is first centred on its own mean (a per-batch shift), its
scatter matrix is formed in ``gram_dtype`` (float64 by default), and it is folded into the
state with the exact parallel update of Chan, Golub & LeVeque (1979)::

    n   = n_a + n_b
    δ   = μ_b − μ_a
    μ   = μ_a + δ · n_b / n
    M2  = M2_a + M2_b + δ δᵀ · n_a n_b / n

The same update merges two accumulators (other processes, other data shards), so results do
not depend on how the data were split or in which order they were merged (up to float64
round-off). Never form an *uncentred* Gram matrix in low precision: with a mean offset the
cancellation in ``E[xxᵀ] − μμᵀ`` destroys the tail of the spectrum (DESIGN.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import CaptureError, NotFittedError, ResultsFileError


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.as_tensor(np.asarray(x))


class CovarianceAccumulator:
    """Streaming covariance of ``[N, D]`` activations with an exact, order-free merge.

    Parameters
    ----------
    name : str, optional
        What the statistics are of (e.g. ``"layers.3.ffn.pre"``); used in error messages.
    gram_dtype : torch.dtype, default torch.float64
        Precision of each batch's centred scatter matrix ``(x − x̄)ᵀ(x − x̄)``. ``float32``
        is about 1.7× faster on CPU (more on GPUs) and still centred; never use a 16-bit
        type. The running state is float64 either way.

    Attributes
    ----------
    n_samples_seen_ : int
        Number of rows (tokens) folded in so far.
    mean_ : torch.Tensor of shape (D,), float64
        Column mean of every row seen.
    scatter_ : torch.Tensor of shape (D, D), float64
        ``M2 = Σ (x − μ)(x − μ)ᵀ``.
    covariance_ : torch.Tensor of shape (D, D), float64
        ``M2 / (n − 1)``, equal to ``numpy.cov(X, rowvar=False)``.

    Examples
    --------
    >>> import torch
    >>> acc = CovarianceAccumulator(name="demo")
    >>> x = torch.randn(100, 8, dtype=torch.float64) + 1e3
    >>> _ = acc.update(x[:30]).update(x[30:])
    >>> acc.covariance_.shape
    torch.Size([8, 8])
    >>> bool(torch.allclose(acc.covariance_, torch.cov(x.T)))
    True
    """

    def __init__(self, name: str = "activations", *, gram_dtype: torch.dtype = torch.float64):
        if gram_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"gram_dtype={gram_dtype} for {name}: use torch.float64 (exact) or torch.float32 "
                "(faster, still centred). 16-bit Gram matrices lose the spectrum's tail."
            )
        self.name = name
        self.gram_dtype = gram_dtype
        self._n = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    # ------------------------------------------------------------------ state
    @property
    def dim(self) -> int | None:
        """Width D of the rows, or None before the first batch."""
        return None if self._mean is None else int(self._mean.shape[0])

    def _fitted(self, attr: str) -> None:
        if self._n == 0:
            raise NotFittedError(
                f"CovarianceAccumulator for {self.name} has seen 0 tokens, so {attr} is not "
                "defined; call update(batch) or collect_spectra(...) first."
            )

    @property
    def n_samples_seen_(self) -> int:
        return self._n

    @property
    def mean_(self) -> torch.Tensor:
        self._fitted("mean_")
        return self._mean

    @property
    def scatter_(self) -> torch.Tensor:
        self._fitted("scatter_")
        return self._m2

    @property
    def covariance_(self) -> torch.Tensor:
        self._fitted("covariance_")
        if self._n < 2:
            raise NotFittedError(
                f"CovarianceAccumulator for {self.name} has seen 1 token; an unbiased "
                "covariance needs at least 2."
            )
        return self._m2 / (self._n - 1)

    # ---------------------------------------------------------------- updates
    def _combine(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if self._n == 0:
            self._n, self._mean, self._m2 = n_b, mean_b.clone(), m2_b.clone()
            return
        if mean_b.shape != self._mean.shape:
            raise CaptureError(
                f"{self.name}: got rows of width {mean_b.shape[0]} after rows of width "
                f"{self._mean.shape[0]}; every batch of one point must have the same D."
            )
        mean_b = mean_b.to(self._mean.device)
        m2_b = m2_b.to(self._m2.device)
        n_a, n = self._n, self._n + n_b
        delta = mean_b - self._mean
        self._mean += delta * (n_b / n)
        self._m2 += m2_b
        self._m2.addr_(delta, delta, alpha=n_a * n_b / n)
        self._n = n

    def update(self, x: Any) -> CovarianceAccumulator:
        """Fold a batch of rows into the statistics.

        Parameters
        ----------
        x : torch.Tensor or array-like of shape (N, D)
            Activations of one point, tokens as rows (padding already removed). Any float
            dtype and device; it is centred on its own mean and its scatter matrix is
            formed in ``gram_dtype`` on the same device. ``N = 0`` is a no-op.

        Returns
        -------
        self
        """
        x = _as_tensor(x)
        if x.ndim != 2:
            raise ValueError(
                f"x for {self.name} must be 2-D [N, D] (tokens × FFN width); got shape "
                f"{tuple(x.shape)}. Flatten batch and sequence first: "
                "x.reshape(-1, x.shape[-1]), dropping padding."
            )
        n_b = int(x.shape[0])
        if n_b == 0:
            return self
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).any(dim=1).sum())
            raise CaptureError(
                f"{self.name}: {bad} of {n_b} tokens have NaN/inf activations. Check the "
                "model's dtype (fp16 overflows easily; load in float32 or bfloat16) and inputs."
            )
        mean_b = x.sum(dim=0, dtype=torch.float64) / n_b  # exact mean, whatever gram_dtype
        xc = x.to(self.gram_dtype) - mean_b.to(self.gram_dtype)
        resid = xc.sum(dim=0, dtype=torch.float64)  # ≈ 0; exact correction for the rounding
        m2_b = (xc.T @ xc).to(torch.float64)
        m2_b.addr_(resid, resid, alpha=-1.0 / n_b)
        self._combine(n_b, mean_b, m2_b)
        return self

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Fold another accumulator's statistics into this one (exact, in float64).

        ``a.merge(b)`` equals an accumulator that saw ``a``'s rows and then ``b``'s.
        Returns ``self``; ``other`` is not modified.
        """
        if not isinstance(other, CovarianceAccumulator):
            raise TypeError(f"merge() takes a CovarianceAccumulator; got {type(other).__name__}.")
        if other._n:
            self._combine(other._n, other._mean, other._m2)
        return self

    # ----------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that fully describe the state: ``n`` (int64), ``mean`` and ``scatter``."""
        self._fitted("state_dict()")
        return {
            "n": torch.tensor(self._n, dtype=torch.int64),
            "mean": self._mean.detach().cpu().clone(),
            "scatter": self._m2.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> CovarianceAccumulator:
        """Restore a state written by :meth:`state_dict` (checked for shape and type)."""
        missing = {"n", "mean", "scatter"} - set(state)
        if missing:
            raise ResultsFileError(
                f"state for {self.name} lacks {sorted(missing)}; expected the keys of "
                "CovarianceAccumulator.state_dict() (n, mean, scatter)."
            )
        n = int(state["n"])
        mean = _as_tensor(state["mean"]).to(torch.float64)
        m2 = _as_tensor(state["scatter"]).to(torch.float64)
        d = mean.shape[0] if mean.ndim == 1 else -1
        if n < 1 or mean.ndim != 1 or tuple(m2.shape) != (d, d):
            raise ResultsFileError(
                f"state for {self.name} is inconsistent: n={n}, mean {tuple(mean.shape)}, "
                f"scatter {tuple(m2.shape)}; expected n >= 1, (D,) and (D, D)."
            )
        self._n, self._mean, self._m2 = n, mean.clone(), m2.clone()
        return self

    def to(self, device: torch.device | str) -> CovarianceAccumulator:
        """Move the state to ``device`` (in place); returns self."""
        if self._mean is not None:
            self._mean, self._m2 = self._mean.to(device), self._m2.to(device)
        return self

    def __repr__(self) -> str:
        return f"CovarianceAccumulator({self.name!r}, n={self._n}, D={self.dim})"


__all__ = ["CovarianceAccumulator"]
