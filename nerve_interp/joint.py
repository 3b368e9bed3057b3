"""What a layer's nonlinearity is fed, kept for the Gaussian-equivalent null.

:class:`JointInputs` is the mean and covariance of the inputs of one FFN's nonlinearity:
``pre`` for a plain FFN, ``pre ‖ up`` (gate and up, jointly: their cross-covariance is what
the product ``σ(gate) ⊙ up`` depends on) for a gated one. ``collect_spectra(..., joint=True)``
keeps it per layer. :func:`activation_name` says which pointwise function the FFN applies
(recorded in the result's metadata) and :func:`activation_function` gives it back as a torch
function, so :func:`nerve_interp.nulls.gaussian_equivalent` can push Gaussian samples through
the FFN's own nonlinearity from a saved file alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

#: Name -> torch function of the pointwise nonlinearities nerve_interp recognises.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu2": lambda x: F.relu(x) ** 2,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}

_BY_CLASS = {
    "ReLU": "relu", "SiLU": "silu", "SiLUActivation": "silu", "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh", "QuickGELUActivation": "quick_gelu",
    "ReLUSquaredActivation": "relu2", "Tanh": "tanh", "Sigmoid": "sigmoid",
}


def activation_name(module: torch.nn.Module | None) -> str | None:
    """The :data:`ACTIVATIONS` name of an activation module, or None when unknown.

    Examples
    --------
    >>> activation_name(torch.nn.GELU(approximate="tanh")), activation_name(torch.nn.SiLU())
    ('gelu_tanh', 'silu')
    """
    if module is None:
        return None
    cls = type(module).__name__
    if cls == "GELU":
        return "gelu_tanh" if getattr(module, "approximate", "none") == "tanh" else "gelu"
    return _BY_CLASS.get(cls)


def activation_function(name: str | Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """The torch function of an activation ``name`` (or ``name`` itself when callable)."""
    if callable(name):
        return name
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}. Pass the function "
            "itself, e.g. activation=torch.nn.functional.mish.") from None


@dataclasses.dataclass
class JointInputs:
    """Mean and covariance of one layer's nonlinearity inputs.

    Attributes
    ----------
    mean : ndarray of shape (P,), float64
    covariance : ndarray of shape (P, P), float64
        Unbiased (N − 1), symmetric.
    n_samples : int
        Tokens N.
    parts : tuple of str
        ``("pre",)`` (plain FFN, P = D) or ``("pre", "up")`` (gated FFN, P = 2D: gate
        first, then up).
    """

    mean: np.ndarray
    covariance: np.ndarray
    n_samples: int
    parts: tuple[str, ...]

    @property
    def dim(self) -> int:
        """Width D of each part."""
        return self.mean.shape[0] // len(self.parts)

    def sampler(self) -> Callable[[int, torch.Generator], dict[str, torch.Tensor]]:
        """A function ``(n, generator) -> {part: rows [n, D]}`` drawing Gaussian inputs with
        this mean and covariance (float64; the covariance's square root by ``eigh``, over
        its directions with variance)."""
        vals, vecs = torch.linalg.eigh(torch.from_numpy(self.covariance))
        # Σ = root rootᵀ over the directions with variance: pre and up of a gated FFN are
        # images of the d_model-wide residual stream, so P = 2D has rank <= d_model and the
        # draw costs N·P·rank instead of N·P² (dropped: eigenvalues < 1e-12·λ_1, round-off)
        keep = vals > 1e-12 * vals.max().clamp_min(0.0)
        root = vecs[:, keep] * vals[keep].sqrt()
        mean, d = torch.from_numpy(self.mean), self.dim

        def draw(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
            z = torch.randn(n, root.shape[1], generator=gen, dtype=torch.float64)
            x = mean + z @ root.T
            return {p: x[:, i * d:(i + 1) * d] for i, p in enumerate(self.parts)}

        return draw


def joint_from_accumulator(acc, parts: tuple[str, ...]) -> JointInputs:
    """A :class:`JointInputs` from a finished ``CovarianceAccumulator`` (float64 copies)."""
    cov = acc.covariance_.detach().to("cpu", torch.float64)
    return JointInputs(mean=acc.mean_.detach().to("cpu", torch.float64).numpy().copy(),
                       covariance=(0.5 * (cov + cov.T)).numpy(),
                       n_samples=int(acc.n_samples_seen_), parts=tuple(parts))


__all__ = ["ACTIVATIONS", "JointInputs", "activation_function", "activation_name",
           "joint_from_accumulator"]
