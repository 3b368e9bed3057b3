"""Eigendecompositions two at a time, each on half the CPU threads.

LAPACK's symmetric eigensolver (``syevd``, what ``torch.linalg.eigvalsh`` calls) spends half
its flops in the memory-bound matrix-vector products of its tridiagonal reduction, which gain
little from a second thread. Two decompositions in flight, each on one OpenMP thread, use the
two cores better than one decomposition on two: on an AMD EPYC (Zen 5, 2 cores) 12 float64
covariances at D = 1536 took 93–96 ms each against 107–113 ms one after another on 2 threads
(``eigh`` with eigenvectors: 242–256 against 252–259 ms). The eigenvalues agree to 6e-15·λ₁,
round-off of a different thread count, not bitwise. Eigenvalues alone now go through numpy's
LAPACK (:mod:`nerve_interp._lapack`) where it is faster; it releases the GIL: 76-87 ms per
decomposition two at a time at D = 1536.

The thread count of torch is per calling thread (OpenMP's), so each worker sets its own
(``torch.set_num_threads`` inside the worker; calling it once in the main thread does not reach
the workers). The call also stores the count that *new* threads start with, so
:func:`map_in_flight` sets the caller's count again when it ends. numpy's BLAS has one
count for the whole process, so :func:`map_in_flight` holds it at the workers' share
(:func:`~nerve_interp._lapack.blas_threads`) while they run.

``NERVE_INTERP_EIGH_WORKERS`` in the environment sets the number of workers (``1``: one at a
time on every thread, as torch does by default); unset, it is 2 where torch has at least
2 threads. Measured on 2 cores only: on a machine with many, try 1, 2 and 4.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from ._lapack import blas_threads

ENV = "NERVE_INTERP_EIGH_WORKERS"
"""Number of eigendecompositions in flight (``1`` turns the workers off)."""

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["ENV", "default_workers", "env_workers", "map_in_flight"]


def env_workers() -> int | None:
    """``NERVE_INTERP_EIGH_WORKERS`` as an int, or None when unset.

    Raises
    ------
    ValueError
        The environment variable is not a positive integer.
    """
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV}={raw!r} must be a positive integer (1: one "
                         "eigendecomposition at a time); unset it for the default.")
    return n


def default_workers() -> int:
    """``NERVE_INTERP_EIGH_WORKERS`` when set, else 2 where torch has >= 2 threads, else 1."""
    n = env_workers()
    if n is not None:
        return n
    return 2 if torch.get_num_threads() >= 2 else 1


def map_in_flight(fn: Callable[[T], R], items: Iterable[T], *,
                  workers: int | None = None) -> Iterator[R]:
    """``map(fn, items)`` with up to ``workers`` calls in flight, results in input order.

    Each worker runs torch, and numpy's BLAS, on ``max(1, threads // workers)`` threads,
    where ``threads`` is the caller's ``torch.get_num_threads()``. Items are drawn lazily
    and at most ``workers`` calls are pending, so the memory of at most ``workers`` items'
    work is alive at once. An exception in ``fn`` is raised here, at its item. With one
    worker (or one thread) it is ``map`` in the calling thread.

    Parameters
    ----------
    fn : callable
        Must not touch state that another item's call changes (each call here gets its own
        point's matrices).
    items : iterable
    workers : int, optional
        Default :func:`default_workers`.
    """
    threads = torch.get_num_threads()
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}.")
    if workers == 1:
        yield from map(fn, items)
        return
    per = max(1, threads // workers)

    def run(item: T) -> R:
        torch.set_num_threads(per)  # this worker's own OpenMP count
        return fn(item)

    pending: collections.deque[Future[R]] = collections.deque()
    try:
        with blas_threads(per), ThreadPoolExecutor(
                workers, thread_name_prefix="nerve-interp-eigh") as pool:
            try:
                for item in items:
                    pending.append(pool.submit(run, item))
                    if len(pending) >= workers:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # an error or an abandoned iterator: start nothing more
                for f in pending:
                    f.cancel()
    finally:  # the workers set the count new threads start with; give it back
        torch.set_num_threads(threads)
