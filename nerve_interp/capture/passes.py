"""Memory planning: probe every point's width, plan the passes, run them and merge.

When the statistics of every point do not fit ``memory_budget``, the points are split into
passes over the same data (:func:`nerve_interp.planner.plan_capture`); each pass is the same
capture with other ``layers`` / ``points`` (``dataclasses.replace`` of the options).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..errors import CaptureError
from ..sites import POINTS, FFNSite, site_name
from .options import CaptureOptions
from .run import to_device
from .source import peek


def plan(wrapper: Any, data: Any, tokenizer: Any, sites: Sequence[FFNSite],
         opts: CaptureOptions, device: torch.device) -> tuple[Any, Any]:
    """Probe every point's width on one row of the first batch (inputs on ``device``), then
    plan the passes. Returns ``data`` (whole again if it was an iterator) and the plan."""
    from ..planner import plan_capture

    data, first = peek(data, tokenizer, batch_size=opts.batch_size, max_length=opts.max_length)
    probe = {k: (v[:1, :8] if k in ("input_ids", "attention_mask") else v)
             for k, v in first.items()}
    if "_args" in probe:
        probe["_args"] = tuple(a[:1] for a in probe["_args"])
    kwargs = {k: to_device(v, device) for k, v in probe.items()}
    args = kwargs.pop("_args", ())
    dims = _trace_widths(wrapper, sites, opts.points, args, kwargs)
    ids = first.get("input_ids")
    rows = int(ids.numel()) if ids is not None else int(
        next(v for v in first.get("_args", first.values()) if isinstance(v, torch.Tensor))
        .shape[:-1].numel())
    param = next(wrapper._module.parameters(), None)  # None: a model without parameters
    return data, plan_capture(dims, budget=opts.memory_budget, device=device,
                              precision=opts.precision, tokens_per_batch=rows,
                              activation_bytes=4 if param is None else param.element_size(),
                              eigenvectors=opts.eigenvectors, n_groups=opts.n_groups)


def in_passes(capture: Callable[[Any, CaptureOptions], Any], data: Any, the_plan: Any,
              opts: CaptureOptions) -> Any:
    """``capture(data, opts)`` once per pass of ``the_plan``; the spectra merged."""
    from ..results import SpectraResult

    if isinstance(data, Iterator):
        raise CaptureError(
            f"the memory plan needs {the_plan.n_passes} passes over the data, but batches is "
            "an iterator (e.g. a generator) that can be read only once. Pass a list (list(...) "
            "of the batches), fewer layers, or a larger memory_budget.\n" + the_plan.summary())
    if opts.checkpoint is not None:
        raise ValueError("checkpoint= cannot be combined with a multi-pass memory plan yet; "
                         "capture fewer layers per call, each with its own checkpoint.")
    results = [capture(data, dataclasses.replace(opts, layers=tuple(layers),
                                                 points=tuple(points), memory_budget=None))
               for layers, points in zip(the_plan.pass_layers, the_plan.pass_points,
                                         strict=True)]
    spectra, diags, free = {}, {}, {}
    for res in results:
        spectra.update(res.items())
        diags.update(res.diagnostics)
        free.update(res._without_outliers)
    meta = merged_metadata([r.metadata for r in results], the_plan)
    return SpectraResult(spectra, meta, diagnostics=diags or None, without_outliers=free or None)


def merged_metadata(metas: list[dict], the_plan: Any) -> dict:
    """The metadata of one capture from those of its passes (which must have seen the same
    tokens)."""
    for key in ("n_tokens", "data_sha1"):
        if len({m[key] for m in metas}) != 1:
            raise CaptureError(
                f"the {the_plan.n_passes} passes over the data saw different tokens ({key}: "
                f"{[m[key] for m in metas]}); batches must yield the same data every time "
                "they are iterated.")
    meta = dict(metas[0])
    meta["layers"] = sorted({lay for m in metas for lay in m["layers"]})
    meta["points"] = [p for p in POINTS if any(p in m["points"] for m in metas)]
    meta["site_paths"] = {k: v for m in metas for k, v in m["site_paths"].items()}
    meta["passes"] = [[site_name(lay, p) for lay, p in ps] for ps in the_plan.passes]
    meta["memory_plan"] = the_plan.summary()
    meta["diagnostics"] = {**meta["diagnostics"], "flagged": [
        f for m in metas for f in m["diagnostics"]["flagged"]]}
    if meta["n_excluded"].get("norm") is not None:
        for key in ("norm", "norm_thresholds"):
            meta["n_excluded"][key] = {k: v for m in metas
                                       for k, v in m["n_excluded"][key].items()}
    return meta


def probe_widths(model: Any, sites: Sequence[FFNSite], points: Sequence[str]
                 ) -> dict[tuple[int, str], int]:
    """The width D of every ``(layer, point)``, read in one trace of 4 token ids.

    For a Hugging Face-style model that takes ``input_ids`` (what the CLI loads), so sizes
    given on the command line can be checked against D before any capture.
    """
    from ..sites import as_nnsight

    wrapper = as_nnsight(model)
    param = next(wrapper._module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    ids = torch.arange(1, 5, device=device).unsqueeze(0)
    return _trace_widths(wrapper, sites, points, (), {"input_ids": ids})


def _trace_widths(wrapper: Any, sites: Sequence[FFNSite], points: Sequence[str],
                  args: tuple, kwargs: dict) -> dict[tuple[int, str], int]:
    """``{(layer, point): D}`` read in one trace of ``wrapper(*args, **kwargs)``, stopped
    after the reads (no full forward)."""
    dims: dict = {}
    with torch.no_grad(), wrapper.trace(*args, **kwargs) as tracer:
        for s in sites:
            for p in points:
                dims[(s.layer, p)] = int(wrapper.get(s.paths[p]).shape[-1])
        tracer.stop()
    return dims


__all__ = ["in_passes", "merged_metadata", "plan", "probe_widths"]
