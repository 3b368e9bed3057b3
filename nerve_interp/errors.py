"""Every error and warning nerve_interp raises, in one place.

Each error also subclasses the built-in error callers already catch, so ``except ValueError``
keeps working (``SiteError`` is a ``ValueError``, ``UnknownArchitectureError`` a ``LookupError``).
Warnings have their own classes so they can be filtered::

    import warnings, nerve_interp as ni
    warnings.simplefilter("ignore", ni.errors.FiniteSampleWarning)

``RankDeficientWarning`` (N <= D) is a subclass of ``FiniteSampleWarning`` (N/D < 10): a filter
or ``pytest.warns`` on ``RankDeficientWarning`` matches exactly what it matched before, and one
on ``FiniteSampleWarning`` matches both.
"""

from __future__ import annotations


class NerveInterpError(Exception):
    """Base class of every nerve_interp error."""


class SiteError(NerveInterpError, ValueError):
    """A site name, layer index or point that does not exist in the model."""


class UnknownArchitectureError(NerveInterpError, LookupError):
    """No FFN sites could be found automatically; pass them by hand."""


class CaptureError(NerveInterpError, RuntimeError):
    """The data or the activations cannot produce a spectrum (no tokens, NaN/inf, ...)."""


class MemoryPlanError(NerveInterpError, MemoryError):
    """The statistics of even one point do not fit the memory budget of a capture."""


class NotFittedError(NerveInterpError, AttributeError):
    """A statistic was read before any data reached the accumulator."""


class ResultsFileError(NerveInterpError, OSError):
    """A results or checkpoint file that is corrupt, of the wrong kind, or from another model."""


class OutputFolderError(NerveInterpError, OSError):
    """An output folder that cannot be used: a file in its place, not writable, or in use by
    another run (its lock names the holder)."""


class FiniteSampleWarning(UserWarning):
    """Fewer than 10 tokens per dimension (N/D < 10): every metric sits measurably away from its
    population value. The message gives that distance for white noise at the same N/D (the
    Marchenko–Pastur floor, :func:`nerve_interp.marchenko_pastur.white_noise_metrics`)."""


class RankDeficientWarning(FiniteSampleWarning):
    """Fewer tokens than dimensions (N <= D): the covariance has rank <= N - 1. The extreme case
    of :class:`FiniteSampleWarning`, and its subclass: ignoring ``FiniteSampleWarning`` ignores
    this too, while ignoring ``RankDeficientWarning`` still lets N/D in (1, 10) warn."""


class NegativeEigenvalueWarning(UserWarning):
    """Round-off produced eigenvalues below -1e-8 * lambda_1 (they were clipped to 0)."""


class OutlierTokenWarning(UserWarning):
    """A few outlier tokens (e.g. attention sinks) hold most of a point's variance."""


__all__ = [
    "CaptureError",
    "FiniteSampleWarning",
    "MemoryPlanError",
    "NegativeEigenvalueWarning",
    "NerveInterpError",
    "NotFittedError",
    "OutlierTokenWarning",
    "OutputFolderError",
    "RankDeficientWarning",
    "ResultsFileError",
    "SiteError",
    "UnknownArchitectureError",
]
