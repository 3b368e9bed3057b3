r"""Capture through nnsight's remote execution (NDIF), so that only D×D statistics travel.

``collect_spectra(model, batches, remote=True)`` runs every batch as
``model.trace(..., remote=True)``. nnsight serialises the body of the trace, the server runs
it next to the model, and only values marked ``.save()`` come back. The body below computes,
per point and with torch operations only (nerve_interp is not installed on the server),

* ``n``: rows kept (real tokens within the budget),
* ``μ_b = Σ x / n`` in float64,
* ``M2_b = (x − μ_b)ᵀ(x − μ_b)`` in ``gram_dtype``, corrected in float64 for the rounding of
  the centring (as :meth:`CovarianceAccumulator.update` does),

and saves them. Here they are folded into the local accumulators with the exact Chan update
(``CovarianceAccumulator.merge``, in :class:`nerve_interp.capture.backends.RemoteBackend`),
so the result equals a local capture up to float64 round-off. Per batch and point
``8·D² + 8·D`` bytes come back (D = 3072: 75 MB; D = 14336:
1.6 GB), independent of the number of tokens: use large batches.

``remote="local"`` serialises the block exactly as for NDIF, hides every module that is not
installed in site-packages (as the server would not have them), and runs it here: the test
of this path.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import CaptureError


def check_remote_wrapper(wrapper: Any, remote: Any) -> None:
    """Refuse a model or ``remote`` value the remote path cannot run.

    Raises
    ------
    CaptureError
        ``remote`` is not ``True``, ``"local"`` or a host URL, or the model is not an nnsight
        wrapper with remote support (``nnsight.TransformersModel`` / ``LanguageModel``).
    """
    if not (remote is True or isinstance(remote, str)):
        raise CaptureError(
            f"remote={remote!r}: pass True (NDIF), 'local' (simulate NDIF here) or a host URL; "
            "None (the default) captures locally."
        )
    if not callable(getattr(wrapper, "_remote_backend", None)):
        raise CaptureError(
            f"remote={remote!r} needs an nnsight model with remote support, e.g. "
            "nnsight.TransformersModel('meta-llama/Llama-3.1-8B') (NDIF) or "
            "TransformersModel(hf_model, tokenizer=tok) (remote='local'); got "
            f"{type(wrapper).__name__}."
        )


def server_moments(wrapper: Any, inputs: dict, paths: list[str], sel: Any, *, remote: Any,
                   gram_dtype: torch.dtype = torch.float64) -> list[tuple]:
    """One remote trace: per point, ``(shape, n, μ_b, M2_b)`` formed on the server.

    ``paths`` are the points' nnsight paths in forward order, ``sel`` the batch's
    :class:`~nerve_interp.capture.selection.Selection` (flat indices of the kept tokens, or
    every row cut to ``remaining``). :class:`nerve_interp.capture.backends.RemoteBackend`
    checks the shapes and merges the moments into the local accumulators.
    """
    kwargs = dict(inputs)
    args = kwargs.pop("_args", ())
    idx, limit = sel.idx, sel.remaining
    # the body below is serialised and run where the model is: torch and builtins only
    with torch.no_grad(), wrapper.trace(*args, remote=remote, **kwargs) as tracer:
        stats = []
        for path in paths:
            x = wrapper.get(path).detach()
            rows = x.reshape(-1, x.shape[-1])
            if idx is not None:
                rows = rows.index_select(0, idx.to(rows.device))
            elif limit is not None:
                rows = rows[:limit]
            n = rows.shape[0]
            mean = rows.sum(dim=0, dtype=torch.float64) / n
            xc = rows.to(gram_dtype) - mean.to(gram_dtype)
            resid = xc.sum(dim=0, dtype=torch.float64)
            m2 = (xc.T @ xc).to(torch.float64) - torch.outer(resid, resid) / n
            if gram_dtype != torch.float64:  # the diagonal in float64, as covariance.py does
                sq = (xc.to(torch.float64) ** 2).sum(dim=0)
                m2 = m2 + torch.diag(sq - resid * resid / n - torch.diagonal(m2))
            stats.append((tuple(x.shape), n, mean.cpu(), m2.cpu()))
        stats.save()
        tracer.stop()
    return stats


__all__ = ["check_remote_wrapper", "server_moments"]
