"""Where a trace runs: one trace body per backend, behind one small interface.

A backend runs one batch through the model with nnsight and feeds every point's kept rows to
its sink. :class:`LocalBackend` traces here and accumulates inside the trace (token
statistics included). :class:`RemoteBackend` sends the trace to NDIF (or simulates it with
``remote="local"``): the server returns only per-batch ``(count, mean, centred scatter)``
that are merged here (see :mod:`nerve_interp.remote`). Each backend declares what it supports,
so a refusal says which backend cannot do what, like nnsight's own ``remote=`` backends.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..covariance import CovarianceAccumulator, gram_dtype_of
from ..errors import CaptureError
from .options import CaptureOptions
from .selection import Selection
from .sinks import Sinks


class LocalBackend:
    """Trace in this process; statistics stay on the activations' device."""

    name: ClassVar[str] = "local"
    token_statistics: ClassVar[bool] = True
    moments: ClassVar[bool] = True
    groups: ClassVar[bool] = True

    def trace(self, wrapper: Any, inputs: dict, sinks: Sinks, sel: Selection) -> int:
        """Read every point in forward order, feed its sink, stop after the last one.

        Returns the rows (tokens) each point received before the norm rule.
        """
        kwargs = dict(inputs)
        args = kwargs.pop("_args", ())
        counts, pre = [], {}
        joint = any(sink.joint is not None for sink in sinks)  # keep pre rows only for it
        with torch.no_grad(), wrapper.trace(*args, **kwargs) as tracer:
            for sink in sinks:
                x = wrapper.get(sink.path)
                rows = align_rows(x, sel, sink.name)
                counts.append(rows.shape[0])
                labels = (None if sink.groups is None
                          else sel.groups(tuple(x.shape), rows.shape[0], sink.groups.k))
                sink.update(rows, sel.meta, labels)
                if joint and sink.key[1] == "pre":
                    pre[sink.key[0]] = rows
                if sink.joint is not None:  # the gate and up rows of the same tokens
                    sink.joint.update(torch.cat([pre.pop(sink.key[0]), rows], dim=-1))
            tracer.stop()
        return counts[0]


class RemoteBackend:
    """Trace through nnsight's remote machinery (``remote=True`` NDIF, ``"local"``)."""

    name: ClassVar[str] = "remote"
    token_statistics: ClassVar[bool] = False  # only D×D statistics come back
    moments: ClassVar[bool] = False
    groups: ClassVar[bool] = False

    def __init__(self, remote: Any, precision: str) -> None:
        self.remote, self.gram_dtype = remote, gram_dtype_of(precision)

    def trace(self, wrapper: Any, inputs: dict, sinks: Sinks, sel: Selection) -> int:
        """Per point, ``(n, μ_b, M2_b)`` formed on the server, merged here exactly."""
        from ..remote import server_moments

        stats = server_moments(wrapper, inputs, [s.path for s in sinks], sel,
                               remote=self.remote, gram_dtype=self.gram_dtype)
        n_rows = []
        for sink, (shape, n, mean, m2) in zip(sinks, stats, strict=True):
            check_alignment(shape, sel.mask_shape, sink.name)
            if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(m2).all())):
                raise CaptureError(
                    f"{sink.name}: NaN/inf activations. Check the model's dtype (fp16 overflows "
                    "easily; load in float32 or bfloat16) and inputs.")
            if n:
                sink.acc.merge(CovarianceAccumulator(sink.name).load_state_dict(
                    {"n": n, "mean": mean, "scatter": m2}))
            n_rows.append(n)
        return n_rows[0]


def backend_for(wrapper: Any, opts: CaptureOptions) -> LocalBackend | RemoteBackend:
    """The backend of ``opts.remote`` (None: local), after checking it can run ``opts``.

    Raises
    ------
    ValueError
        ``exclude_norm_above`` or ``precision="bf16-split"`` with the remote backend.
    CaptureError
        A ``remote`` value or model the remote backend cannot run.
    """
    if opts.remote is None:
        return LocalBackend()
    from ..remote import check_remote_wrapper

    if opts.rule.norm_above is not None:
        raise ValueError(
            "the remote backend cannot apply exclude_norm_above (not available with "
            "remote=...): the rule drops single tokens by their activation norm, but a remote "
            "trace sends back only each batch's D×D statistics (count, mean, centred scatter), "
            "with the tokens already summed in, so no norm is left here to test or remove. Use "
            "exclude_positions / exclude_token_ids (applied before the trace), or capture "
            "locally (one process or torchrun).")
    if opts.n_groups is not None:
        raise ValueError(
            "the remote backend cannot keep n_groups (not available with remote=...): a "
            "remote trace sends back one batch's statistics with every sequence summed in, so "
            "no sequence can go to its own group. Capture locally (one process or torchrun) "
            "for intervals, or pass n_groups=None.")
    check_remote_wrapper(wrapper, opts.remote)
    if opts.precision == "bf16-split":
        raise ValueError(
            "the remote backend cannot form precision='bf16-split' (not available with "
            "remote=...): the per-batch statistics are formed on the server with plain torch "
            "ops. Use precision='fp32' (the default) or 'fp64'.")
    return RemoteBackend(opts.remote, opts.precision)


# ------------------------------------------------------------------ row alignment
def check_alignment(shape: tuple, mask_shape: tuple | None, name: str) -> None:
    """Refuse activations that cannot be lined up with the batch's token mask: they must be
    ``[batch, seq, D]`` or flattened ``[batch*seq, D]`` (OPT)."""
    if mask_shape is None or tuple(shape[:2]) == tuple(mask_shape):
        return
    if len(shape) == 2 and shape[0] == mask_shape[0] * mask_shape[1]:
        return
    raise CaptureError(
        f"{name}: activations of shape {tuple(shape)} cannot be aligned with the attention "
        f"mask {tuple(mask_shape)}; pass sites whose points are [batch, seq, D].")


def align_rows(x: torch.Tensor, sel: Selection, name: str) -> torch.Tensor:
    """The rows ``[n, D]`` of a point's activations that ``sel`` keeps."""
    rows = x.reshape(-1, x.shape[-1])
    if sel.idx is None:  # non-token model: every row is data
        return rows if sel.remaining is None else rows[:sel.remaining]
    check_alignment(tuple(x.shape), sel.mask_shape, name)
    return rows.index_select(0, sel.idx.to(x.device))


__all__ = ["LocalBackend", "RemoteBackend", "align_rows", "backend_for", "check_alignment"]
