"""Eigenvalues of symmetric float64 matrices on the host, through numpy's LAPACK or torch's.

Both call LAPACK's ``dsyevd`` (a tridiagonal reduction, then divide and conquer). torch's CPU
build links MKL; numpy's wheels bundle OpenBLAS, and ``numpy.linalg`` releases the GIL while
LAPACK runs, so two decompositions on two Python threads (:mod:`nerve_interp._inflight`) run
at once. Which is faster depends on the size. On an AMD EPYC (Zen 5, AVX-512, 2 cores,
32 MiB L3), float64 heavy-tailed covariances, two in flight on one thread each, ms per
decomposition, numpy's / torch's:

======  =========  ===========  =========  ===========  ===========  ===========
D       1024       1536         1792       2048         3072         4096
======  =========  ===========  =========  ===========  ===========  ===========
ms      28 / 57    84 / 116     120 / 157  258 / 238    1068 / 696   2500 / 1500
======  =========  ===========  =========  ===========  ===========  ===========

numpy's is faster while the matrix fits in the last-level cache (8·D² bytes: 18.9 MB at
D = 1536, 33.5 MB at 2048) and MKL's beyond. So ``"auto"``, the default, takes numpy's where
8·D² fits in the last-level cache the OS reports (``/sys/devices/system/cpu``; unknown: torch's)
and torch's elsewhere. In a capture of 4,866 SmolLM2-135M tokens (D = 1536) the 66
decompositions of the finish took 6.1-6.2 s against 6.5-7.3 s on 2 threads and 11.7 s
against 13.2-15.8 s on one. The eigenvalues of the two agree to 3e-15·λ₁ (two
implementations). This was measured on one machine only: ``python benchmarks/bench.py
--parts eigh`` times both side by side on yours, and ``NERVE_INTERP_LAPACK=numpy`` or
``=torch`` in the environment fixes the choice. Eigenvectors stay with torch
(``torch.linalg.eigh``: as fast at 2 threads, 322 against 326 ms at D = 1536, and numpy's
took 4.1·8D² bytes of peak memory against 3.2·8D²).

Threads: numpy's BLAS has its own thread pool, one count for the whole process, set here with
``threadpoolctl``. :func:`eigvalsh` holds it at the calling thread's torch thread count for
the call, unless :func:`blas_threads` already holds it (what
:func:`~nerve_interp._inflight.map_in_flight` does around its workers, so that two workers do
not set the one process-wide count under each other).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

ENV = "NERVE_INTERP_LAPACK"
"""``auto`` (the default), ``numpy`` or ``torch``: whose LAPACK computes eigenvalues alone."""

BACKENDS = ("numpy", "torch")
CHOICES = ("auto", *BACKENDS)

_STATE: dict[str, Any] = {"controller": None, "held": None}

__all__ = ["BACKENDS", "CHOICES", "ENV", "backend", "blas_threads", "eigvalsh",
           "last_level_cache_bytes"]


def backend(d: int | None = None) -> str:
    """Whose LAPACK decomposes a D × D matrix: ``NERVE_INTERP_LAPACK`` when it names one,
    else (``auto``, or unset) numpy's where ``8·d²`` bytes fit in the last-level cache and
    torch's elsewhere (and when ``d`` or the cache is unknown).

    Raises
    ------
    ValueError
        The environment variable is not ``auto``, ``numpy`` or ``torch``.
    """
    raw = os.environ.get(ENV, "").strip().lower() or "auto"
    if raw not in CHOICES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r} must be 'auto', 'numpy' or 'torch' (whose "
                         "LAPACK computes eigenvalues); unset it for the default, auto.")
    if raw != "auto":
        return raw
    cache = last_level_cache_bytes()
    return "numpy" if d is not None and cache and 8 * d * d <= cache else "torch"


def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache the OS reports for CPU 0 (Linux sysfs), or None."""
    if "llc" not in _STATE:
        sizes = []
        for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
            try:  # e.g. "32768K"; an unreadable or odd entry is skipped
                raw = f.read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(raw[-1:], 1)
                sizes.append(int(raw.rstrip("KMG")) * scale)
            except (OSError, ValueError):
                continue
        _STATE["llc"] = max(sizes, default=None)
    return _STATE["llc"]


def _controller() -> Any:
    """``threadpoolctl``'s controller of the BLAS libraries loaded (numpy's among them),
    made once (finding them walks the process's shared libraries)."""
    if _STATE["controller"] is None:
        from threadpoolctl import ThreadpoolController

        _STATE["controller"] = ThreadpoolController().select(user_api="blas")
    return _STATE["controller"]


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Hold numpy's BLAS (process-wide) at ``n`` threads for the block, and :func:`eigvalsh`
    calls inside it at that count; the previous count comes back after.

    Parameters
    ----------
    n : int
        Threads, >= 1.
    """
    if n < 1:
        raise ValueError(f"blas_threads needs n >= 1; got {n}.")
    held = _STATE["held"]
    with _controller().limit(limits=int(n), user_api="blas"):
        _STATE["held"] = int(n)
        try:
            yield
        finally:
            _STATE["held"] = held


def eigvalsh(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric matrix, ascending, through the LAPACK :func:`backend` picks
    for its size.

    Parameters
    ----------
    cov : torch.Tensor of shape (D, D), float64, on the CPU
        Only its lower triangle is read (``UPLO="L"``, as ``torch.linalg.eigvalsh``).

    Returns
    -------
    torch.Tensor of shape (D,), float64
        Ascending.

    Examples
    --------
    >>> eigvalsh(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)).tolist()
    [1.0, 3.0]
    """
    if cov.dtype != torch.float64 or cov.device.type != "cpu":
        raise ValueError(f"eigvalsh needs a float64 CPU matrix; got {cov.dtype} on "
                         f"{cov.device}. Pass cov.to('cpu', torch.float64).")
    if backend(int(cov.shape[-1])) == "torch":
        return torch.linalg.eigvalsh(cov)
    held = _STATE["held"] is not None  # by blas_threads: leave the count as it is
    with nullcontext() if held else _controller().limit(limits=torch.get_num_threads(),
                                                         user_api="blas"):
        return torch.from_numpy(np.linalg.eigvalsh(cov.detach().numpy(), UPLO="L"))
