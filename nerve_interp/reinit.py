"""The same architecture with fresh weights: the *init* null of every spectral claim.

A number measured on a trained model means something about training only when the same
architecture at initialisation gives a different number on the same tokens. PR gain > 1, for
instance, holds for untrained models too (SmolLM2-shaped or ``tiny``), because a pointwise
nonlinearity of correlated Gaussian-like inputs already spreads variance.
:func:`reinitialized` builds that control: the model's own initialisation, seeded.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from ._validation import check_positive_int


def _label(model: torch.nn.Module, seed: int) -> str:
    from .capture.finish import model_label

    return f"{model_label(model)} (init, seed {seed})"


def _ours(model: torch.nn.Module, seed: int) -> torch.nn.Module | None:
    from .models import MLPMixer, TinyLM

    if not isinstance(model, (TinyLM, MLPMixer)):
        return None
    return type(model)(dataclasses.replace(model.config), seed=seed, name=_label(model, seed))


def _huggingface(model: torch.nn.Module, seed: int) -> torch.nn.Module | None:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    dtype = next(model.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # from_config runs the model's own _init_weights (HF's post_init), tied weights kept
        fresh = type(model)._from_config(copy.deepcopy(model.config), dtype=dtype)
    fresh.nerve_interp_info = {"name": _label(model, seed),
                               "source": f"{type(model).__name__}._from_config (random init)"}
    return fresh


def _generic(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    fresh = copy.deepcopy(model)
    resettable = [m for m in fresh.modules() if callable(getattr(m, "reset_parameters", None))]
    if not resettable:
        raise TypeError(
            f"reinitialized() does not know how to initialise a {type(model).__name__}: it is "
            "not a Hugging Face PreTrainedModel, a nerve_interp model (TinyLM, MLPMixer), and "
            "none of its modules has reset_parameters(). Build the untrained model yourself "
            "(the same constructor, a new seed) and pass it to collect_spectra.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in resettable:
            m.reset_parameters()
    fresh.nerve_interp_info = {"name": _label(model, seed), "source": "reset_parameters()"}
    return fresh


def reinitialized(model: Any, seed: int = 0) -> torch.nn.Module:
    """The same architecture with freshly initialised weights (the *init* null).

    Parameters
    ----------
    model : torch.nn.Module or nnsight wrapper
        A Hugging Face ``PreTrainedModel`` (re-initialised by its own ``_init_weights`` via
        ``type(model)._from_config(model.config)``), a nerve_interp :class:`~.models.TinyLM` /
        :class:`~.models.MLPMixer` (rebuilt from its config with ``seed``), or any module
        whose submodules have ``reset_parameters()`` (PyTorch's default init).
    seed : int, default 0
        Seed of the new weights; the global RNG is left as it was.

    Returns
    -------
    torch.nn.Module
        A new model of identical structure (same parameter names and shapes), on the
        original's device and dtype, in the original's train/eval mode. Two calls with one
        seed give identical weights. ``nerve_interp_info["name"]`` ends in
        ``"(init, seed <seed>)"``, so tables and plots say which model they show.

    Examples
    --------
    >>> import nerve_interp as ni
    >>> from nerve_interp.models import make_lm
    >>> trained = make_lm("tiny", seed=0)
    >>> init = ni.reinitialized(trained, seed=1)
    >>> init.nerve_interp_info["name"]
    'tiny (init, seed 1)'
    """
    check_positive_int(seed, "seed", minimum=0)
    root = getattr(model, "_module", model)  # an nnsight wrapper: its torch module
    if not isinstance(root, torch.nn.Module):
        raise TypeError(f"reinitialized() needs a torch module or an nnsight wrapper of one; "
                        f"got {type(model).__name__}.")
    fresh = _ours(root, seed) or _huggingface(root, seed) or _generic(root, seed)
    try:
        param = next(root.parameters())
        fresh = fresh.to(device=param.device, dtype=param.dtype)
    except StopIteration:
        pass
    return fresh.train(root.training)


__all__ = ["reinitialized"]
