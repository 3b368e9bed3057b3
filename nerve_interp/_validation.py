"""Input checks shared by the public entry points (scikit-learn's ``check_array`` habit).

Every message names the argument, says what it got and what to do instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

# Round-off tolerance for eigenvalues handed to the metrics: anything above
# -NEG_TOL * max(|lambda|) is treated as a zero that came out slightly negative.
NEG_TOL = 1e-8


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def check_eigenvalues(eigenvalues: Any, name: str = "eigenvalues") -> np.ndarray:
    """Return ``eigenvalues`` as a 1-D float64 array sorted in descending order.

    Accepts any array-like (list, numpy, torch). Round-off negatives down to
    ``-1e-8 * max|λ|`` are set to 0; anything more negative, non-finite values, an empty
    vector or a zero sum raise a ``ValueError`` that says so.
    """
    lam = _to_numpy(eigenvalues)
    if lam.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D of shape (D,); got shape {lam.shape}. "
            "Pass the eigenvalues of one point (one layer, pre or post) at a time."
        )
    if lam.size == 0:
        raise ValueError(f"{name} is empty; a spectrum needs at least one eigenvalue.")
    if not np.all(np.isfinite(lam)):
        bad = int(np.sum(~np.isfinite(lam)))
        raise ValueError(
            f"{name} holds {bad} non-finite value(s) (NaN or inf) out of {lam.size}; a spectrum "
            "with non-finite values has no metrics. Check the activations for overflow."
        )
    scale = float(np.max(np.abs(lam)))
    if lam.min() < -NEG_TOL * scale:
        raise ValueError(
            f"{name} has a negative value {lam.min():.3e} (largest |λ| = {scale:.3e}); "
            "covariance eigenvalues are >= 0. Pass eigenvalues of a covariance matrix, "
            "e.g. Spectrum.eigenvalues, which clips round-off negatives."
        )
    lam = np.clip(lam, 0.0, None)
    if lam.sum() <= 0:
        raise ValueError(
            f"{name} sums to 0 (all {lam.size} eigenvalues are zero): the activations did not "
            "vary, so no metric is defined. Did every token get masked out?"
        )
    return np.sort(lam)[::-1].copy()


def check_positive_int(value: Any, name: str, *, context: str = "", minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` or a ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        hint = (f"; pass the number itself, {name}={int(value)}" if isinstance(value, str)
                and value.strip().lstrip("-").isdigit() else "")
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}{context}"
                        f"{hint}.")
    if value < minimum:
        raise ValueError(f"{name} == {value}, must be >= {minimum}{context}.")
    return int(value)


def check_seeds(seeds: Any, name: str = "seeds", *, context: str = "") -> tuple[int, ...]:
    """``seeds`` (a sequence of distinct ints, at least one) as a tuple, or an error naming it.

    ``seeds`` means the same everywhere: which seeds to run, never how many. A count is a
    ``TypeError`` that shows the sequence to pass; an empty sequence or a repeated seed is a
    ``ValueError`` (no run, or one run counted twice as if it were independent).
    """
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        raise TypeError(f"{name}={seeds!r} is a count; {name} is a sequence of seeds, e.g. "
                        f"{name}=range({seeds}){context}.")
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        raise TypeError(f"{name} must be a sequence of int seeds, e.g. (0, 1, 2); got "
                        f"{type(seeds).__name__} {seeds!r}{context}.")
    out = tuple(seeds)
    for s in out:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"{name} must hold ints; got {type(s).__name__} {s!r} in "
                            f"{name}={list(out)!r}{context}.")
    if not out:
        raise ValueError(f"{name} is empty; pass at least one seed, e.g. {name}=(0,){context}.")
    if len(set(out)) < len(out):
        raise ValueError(f"{name}={list(out)!r} repeats a seed; each seed is one independent "
                         f"run, so a repeat would count one run twice{context}.")
    return tuple(int(s) for s in out)


def check_tidy(df: Any, columns: Iterable[str] = ("layer", "point", "metric", "value")) -> None:
    """Raise a ``KeyError`` listing which of the tidy columns ``df`` lacks."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(
            f"table lacks the column(s) {missing}; a tidy nerve_interp table has "
            f"{list(columns)} (got {list(df.columns)})."
        )


def check_device(device: Any, name: str = "device") -> Any:
    """``device`` (None, a string or a ``torch.device``) if this machine has it, else an error
    that names what is missing and what to pass instead."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}={device!r} is not a device; pass 'cpu', 'cuda', 'cuda:1' "
                         "or 'mps' (or None for the default).") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no GPU visible"
            raise ValueError(f"{name}={device!r}, but this torch ({torch.__version__}) has no "
                             f"CUDA ({build}); pass {name}='cpu', or install a CUDA build of "
                             "torch on a machine with a GPU.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={device!r}, but only {torch.cuda.device_count()} CUDA "
                             f"device(s) are visible (cuda:0 to "
                             f"cuda:{torch.cuda.device_count() - 1}).")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={device!r}, but MPS (Apple GPUs) is not available here; "
                         f"pass {name}='cpu'.")
    return device
