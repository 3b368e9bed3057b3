"""Capture: nnsight traces over batches, every FFN point into its own statistics.

Only D×D statistics leave the forward pass: activations are read inside the trace, padding
tokens are dropped (see the glossary), the rows go into a per-point sink on the activations' own
device, and ``tracer.stop()`` ends the forward after the last point needed.

The pipeline, one module per job (read `nerve_interp/capture/run.py` for the loop):

- `options`: `CaptureOptions`, the keywords checked once; the manifest and the metadata;
- `source`: batches from what users pass; `Batch`; the data hash;
- `selection`: which tokens count (positions, ids, subsampling, budget); `Tally`;
- `backends`: one trace body per backend, local or remote (NDIF);
- `sinks`: per-point statistics (covariance, token norms);
- `run`: the loop, with the checkpointer;
- `shard`: torchrun, this rank's batches and budget, the exact reductions;
- `passes`: the memory plan, several passes over the same data;
- `finish`: eigendecomposition, warnings, token diagnostics, metadata;
- `collect`: `collect_spectra`, which builds the pieces and runs them.
"""

from __future__ import annotations

from .collect import collect_spectra
from .finish import model_label
from .options import CaptureOptions, OutlierOptions, check_token_fraction
from .selection import subsample_generator, subsample_mask
from .source import iter_batches, token_hash

__all__ = ["CaptureOptions", "OutlierOptions", "check_token_fraction", "collect_spectra",
           "iter_batches", "model_label", "subsample_generator", "subsample_mask",
           "token_hash"]
