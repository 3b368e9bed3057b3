"""Per-thread scratch buffers that a capture's updates reuse instead of allocating.

Every update of a :class:`~nerve_interp.covariance.CovarianceAccumulator` on the CPU writes
its centred rows in float32 (``N × D``) and their transposed blocks for oneDNN (as many
again): 12 MB per update at D = 1536 and 973 rows. Fresh from the allocator, those pages
were often new to the process: glibc gives large freed blocks back to the system, so an
update could touch new pages (~3,000 per update in one run, none in another, counted with
``getrusage``), and the blocks were zero-filled;
writing the transposed blocks into a buffer already in use took 0.96 ms against 2.4 ms with
``new_zeros`` (2 threads, D = 1536, 973 rows, medians of 40). Buffers up to
:data:`MAX_BYTES` are therefore kept, one per name and thread, and handed out again.

A buffer is only valid until the next call for the same name on the same thread: callers
use it within one update and never return it (a view of it) to the user.
"""

from __future__ import annotations

import math
import threading

import torch

MAX_BYTES = 64 * 2**20
"""Largest buffer kept per name and thread (bytes); a larger request gets a fresh tensor
(per row an update multiplies D² and allocates D, so the allocation's share shrinks as D
grows: 9× smaller at D = 14336 than at D = 1536)."""

_LOCAL = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device | str) -> torch.Tensor:
    """An uninitialised tensor of ``shape``, reused across calls with the same ``name`` on
    this thread (CPU only, up to :data:`MAX_BYTES`; otherwise a fresh ``torch.empty``).

    Parameters
    ----------
    name : str
        What the buffer is for (e.g. ``"centred"``): two live buffers need two names.
    shape : tuple of int
    dtype : torch.dtype
    device : torch.device or str

    Returns
    -------
    torch.Tensor of ``shape``, contiguous; its contents are whatever the last user left.
    """
    device = torch.device(device)
    numel = math.prod(int(s) for s in shape)
    if device.type != "cpu" or numel * dtype.itemsize > MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    pool = getattr(_LOCAL, "pool", None)
    if pool is None:
        pool = _LOCAL.pool = {}
    buf = pool.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        buf = pool[name] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def release() -> None:
    """Drop this thread's buffers (their memory goes back to the allocator)."""
    _LOCAL.pool = {}


__all__ = ["MAX_BYTES", "release", "scratch"]
