r"""Vocabulary readout of FFN directions: their direct effect on the logits.

The ``post`` point of an FFN is the input of its down projection (see the glossary), whose output
is added to the residual stream. A unit change ``s`` along a direction ``u`` of ``post``
adds ``s · W_down u`` to the residual stream, and its *direct* effect on the logits (the path
that skips every later block) is

.. math::  r(u) = W_U \,\big(\gamma \odot W_{down}\, u\big) \in \mathbb{R}^{V}

with ``W_U`` the unembedding ``[V, d_model]`` and ``γ`` the elementwise weight of the final
norm before the LM head (``1 + weight`` for Gemma's RMSNorm). The choice, as in
TransformerLens' weight folding: only ``γ`` is folded; the norm's data-dependent scale
(``1/rms``), LayerNorm's centring and every bias are left out, because they are either the
same for every direction (a positive factor per token, which does not change the ranking of
the logits) or do not depend on ``u`` at all. Values are logits per unit projection.

Only the ``post`` point of a model with an unembedding (``get_output_embeddings()`` or an
``lm_head``) has a readout; for other points and for encoders without an LM head (MiniLM,
BERT) :func:`readout_weights` returns the reason instead of guessing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .sites import FFNSite

#: Names of down projections, tried when several linear maps read D dimensions.
_DOWN_NAMES = ("down_proj", "c_proj", "fc_out", "fc2", "dense_4h_to_h", "dense", "wo")


@dataclasses.dataclass(frozen=True)
class ReadoutWeights:
    """The matrices of the readout (float64, CPU).

    Attributes
    ----------
    unembed : array of shape (V, d_model)
    down : array of shape (d_model, D)
        The down projection as a map from ``post`` to the residual stream.
    gain : array of shape (d_model,) or None
        The final norm's weight γ (None: no final norm found).
    names : dict
        Module paths of ``unembed``, ``down`` and ``norm`` (for the report).
    """

    unembed: np.ndarray
    down: np.ndarray
    gain: np.ndarray | None
    names: dict[str, str]

    def logits(self, basis: np.ndarray) -> np.ndarray:
        """``W_U (γ ⊙ W_down U)`` for the directions ``basis`` ``[D, d]`` → ``[V, d]``."""
        resid = self.down @ np.asarray(basis, dtype=np.float64)
        if self.gain is not None:
            resid = self.gain[:, None] * resid
        return self.unembed @ resid


def _weight(mod: torch.nn.Module) -> np.ndarray:
    """``[out, in]`` weight of a Linear, or of a transformers ``Conv1D`` (stored ``[in, out]``)."""
    w = mod.weight.detach().to("cpu", torch.float64).numpy()
    return w.T if type(mod).__name__ == "Conv1D" else w


def _in_out(mod: torch.nn.Module) -> tuple[int, int] | None:
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        return None
    if type(mod).__name__ == "Conv1D":
        return int(w.shape[0]), int(w.shape[1])
    if isinstance(mod, torch.nn.Linear):
        return int(w.shape[1]), int(w.shape[0])
    return None


def _down_module(root: torch.nn.Module, path: str, d: int, d_model: int
                 ) -> tuple[str, torch.nn.Module] | None:
    """The linear map from the ``post`` point (width ``d``) to the residual (``d_model``)."""
    module, _, io = path.rpartition(".")
    if io == "input":  # post read as the input of the down projection (gated FFNs)
        mod = root.get_submodule(module)
        return (module, mod) if _in_out(mod) == (d, d_model) else None
    parts = module.split(".")
    for up in (1, 2):  # siblings of the activation, then of its parent (OPT)
        parent = ".".join(parts[:-up])
        try:
            children = list(root.get_submodule(parent).named_children())
        except AttributeError:
            continue
        found = [(f"{parent}.{n}", m) for n, m in children if _in_out(m) == (d, d_model)]
        found.sort(key=lambda nm: nm[0].rsplit(".", 1)[-1] not in _DOWN_NAMES)
        if found:
            return found[0]
    return None


def _unembedding(root: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    get = getattr(root, "get_output_embeddings", None)
    mod = get() if callable(get) else getattr(root, "lm_head", None)
    if mod is None or _in_out(mod) is None:
        return None
    name = next((n for n, m in root.named_modules() if m is mod), "lm_head")
    return name, mod


def _final_norm(root: torch.nn.Module, layer_prefix: str) -> tuple[str, np.ndarray] | None:
    """The last norm module outside the layer list, and its gain γ."""
    found = None
    for name, mod in root.named_modules():
        if "norm" in type(mod).__name__.lower() and name and not name.startswith(layer_prefix):
            found = (name, mod)
    if found is None or not isinstance(getattr(found[1], "weight", None), torch.Tensor):
        return None
    gain = found[1].weight.detach().to("cpu", torch.float64).numpy()
    if "gemma" in type(found[1]).__name__.lower():  # Gemma's RMSNorm scales by (1 + weight)
        gain = 1.0 + gain
    return found[0], gain


def readout_weights(root: torch.nn.Module, site: FFNSite, point: str, d: int
                    ) -> ReadoutWeights | str:
    """The readout matrices of ``site``'s ``point`` (width ``d``), or why there are none.

    Returns
    -------
    ReadoutWeights or str
        A string is the reason (a ``pre`` point, no LM head, no down projection found).
    """
    if point != "post":
        return (f"no readout for the {point!r} point: only post feeds the residual stream "
                "directly (through the down projection).")
    unembed = _unembedding(root)
    if unembed is None:
        return (f"no readout: {type(root).__name__} has no LM head (an encoder such as MiniLM "
                "or BERT); its directions write into a residual stream that no unembedding "
                "reads.")
    d_model = _in_out(unembed[1])[0]
    down = _down_module(root, site.paths[point], d, d_model)
    if down is None:
        return (f"no readout: no linear map from width {d} to d_model={d_model} next to "
                f"{site.paths[point]!r} (the down projection).")
    prefix = site.paths[point].split(f".{site.layer}.")[0] + "."
    norm = _final_norm(root, prefix)
    names = {"unembed": unembed[0], "down": down[0], "norm": norm[0] if norm else ""}
    return ReadoutWeights(_weight(unembed[1]), _weight(down[1]),
                          None if norm is None else norm[1], names)


def top_tokens(logits: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``n`` largest and ``n`` smallest entries of each column of ``[V, d]``,
    as ``(promoted [n, d], suppressed [n, d])``, most extreme first."""
    order = np.argsort(logits, axis=0, kind="stable")
    n = min(n, logits.shape[0])
    return order[::-1][:n], order[:n]


__all__ = ["ReadoutWeights", "readout_weights", "top_tokens"]
