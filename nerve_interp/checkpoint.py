"""Capture checkpoints: accumulator state plus a manifest that says what it is a state *of*.

A checkpoint is one safetensors file, written atomically (temporary file + ``os.replace``,
see :func:`nerve_interp._io.atomic_path`), so a run killed at any instant (even with
``SIGKILL``) leaves either the previous checkpoint or the new one, never half a file. It holds

* per point, the float64 state of its :class:`~nerve_interp.covariance.CovarianceAccumulator`
  (``n``, ``mean``, ``scatter``), bit for bit;
* a JSON **manifest** of everything that must match for a resume to give the statistics of an
  uninterrupted run: the model (name and class), the sites (point name → nnsight path), the
  capture options that change the statistics (``points``, ``max_tokens``, ``skip_first``,
  ``precision``) and the data shard (``rank`` of ``world_size`` for multi-process runs);
* the **data position**: batches and tokens consumed and the SHA-1 of the consumed batches
  (real token ids, or the raw bytes of non-token inputs), so that resuming on other data
  is refused rather than silently mixing two corpora;
* the nerve_interp version and file-format version that wrote it, and a SHA-256 checksum
  over every tensor and the state (format version 3), verified on load: a damaged file is
  refused, never resumed from.

Layout of the JSON kept in the safetensors metadata under ``"state"``::

    {"format_version": 3, "nerve_interp": "0.1.0", "written": "...",
     "manifest": {"model": ..., "model_class": ..., "sites": {...}, "options": {...},
                  "shard": {"rank": 0, "world_size": 1}},
     "position": {"batches": 12, "tokens": 3456, "data_sha1": "..."}}
"""

from __future__ import annotations

import datetime
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import __version__
from ._io import open_safetensors, save_safetensors
from .errors import ResultsFileError
from .sites import site_name

FORMAT = "nerve_interp.capture_checkpoint"
FORMAT_VERSION = 3  # 3: SHA-256 checksum; 2 (no checksum) is still read


def shard_path(path: Path, rank: int, world_size: int) -> Path:
    """The checkpoint file of one process: ``path`` itself for a single process, else
    ``<stem>.rank<r>-of-<w><suffix>`` next to it (each rank keeps its own statistics)."""
    if world_size <= 1:
        return path
    return path.with_name(f"{path.stem}.rank{rank}-of-{world_size}{path.suffix}")


TOKEN_STATS_PREFIX = "token_stats."
"""Key prefix of the token diagnostics' state inside a checkpoint."""
MOMENTS_PREFIX = "moments."
"""Key prefix of the fourth-moment statistics' state inside a checkpoint."""


def _pack(states: Mapping[tuple[int, str], Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """``{prefix}{site}.{key}`` → tensor for every object with a non-empty state."""
    return {f"{prefix}{site_name(layer, point)}.{k}": v.contiguous()
            for (layer, point), obj in states.items()
            if getattr(obj, "n_samples_seen_", 0)
            for k, v in obj.state_dict().items()}


def _unpack(tensors: Mapping[str, torch.Tensor], layer: int, point: str,
            prefix: str = "") -> dict[str, torch.Tensor]:
    head = f"{prefix}{site_name(layer, point)}."
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


def save_checkpoint(path: str | os.PathLike, accs: Mapping[tuple[int, str], Any],
                    manifest: Mapping[str, Any], position: Mapping[str, Any], *,
                    token_stats: Mapping[tuple[int, str], Any] | None = None,
                    moments: Mapping[tuple[int, str], Any] | None = None,
                    extra: Mapping[str, Mapping[tuple[int, str], Any]] | None = None) -> Path:
    """Write the accumulators, manifest and data position to ``path`` atomically.

    Parameters
    ----------
    path : path-like
        Destination (a ``.ckpt`` safetensors file); its folder is created if needed.
    accs : mapping (layer, point) → CovarianceAccumulator
        Accumulators that have seen no token yet are stored as absent.
    manifest : mapping
        From :meth:`nerve_interp.capture.options.CaptureOptions.manifest`.
    position : mapping
        ``batches`` (batches consumed, int), ``tokens`` (real tokens counted, int) and
        ``data_sha1`` (hex digest of the consumed batches).
    token_stats : mapping (layer, point) → TokenNormStats, optional
        The token diagnostics' state, written into the same file (one atomic write, so a
        kill cannot leave statistics and diagnostics from different batches).
    moments : mapping (layer, point) → NormMoments, optional
        The fourth-moment statistics, in the same file.
    extra : mapping key prefix → mapping (layer, point) → state object, optional
        Further statistics with ``state_dict`` / ``load_state_dict`` (the per-group
        accumulators, ``"group3."``), in the same file.

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    tensors = {**_pack(accs), **_pack(token_stats or {}, TOKEN_STATS_PREFIX),
               **_pack(moments or {}, MOMENTS_PREFIX)}
    for prefix, objs in (extra or {}).items():
        tensors.update(_pack(objs, prefix))
    state = {"format_version": FORMAT_VERSION, "nerve_interp": __version__,
             "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
             "manifest": dict(manifest), "position": dict(position)}
    return save_safetensors(tensors, path, {"format": FORMAT, "state": json.dumps(state)})


def _version_of(header: dict[str, str]) -> tuple[Any, Any]:
    state = json.loads(header["state"])
    return state.get("format_version"), state.get("nerve_interp")


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with open_safetensors(
            path, FORMAT, kind="a nerve_interp capture checkpoint",
            other_format="pass another checkpoint path.",
            unreadable=f"checkpoint {path} cannot be read",
            remedy="Delete it to start the capture afresh (CLI: --fresh).",
            supported=FORMAT_VERSION, version_of=_version_of) as (f, meta):
        state = json.loads(meta["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    version = int(state["format_version"])
    if version < 2:
        raise ResultsFileError(
            f"checkpoint {path} has format version {version}; this nerve_interp ({__version__}) "
            f"reads versions 2 to {FORMAT_VERSION}. Delete it and run the capture again "
            "(CLI: --fresh).")
    return state, tensors


def read_checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest and data position of a checkpoint, without loading its tensors' values.

    Returns
    -------
    dict
        ``{"format_version", "nerve_interp", "written", "manifest", "position"}``.

    Raises
    ------
    ResultsFileError
        The file is not a capture checkpoint, or is corrupt / truncated.
    """
    return _read(Path(path))[0]


def _diff(want: Any, got: Any, prefix: str = "") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        for k in sorted(set(want) | set(got)):
            out += _diff(want.get(k), got.get(k), f"{prefix}{k}.")
        return out
    return [] if want == got else [f"{prefix[:-1]}: checkpoint {got!r}, this run {want!r}"]


def load_checkpoint(path: str | os.PathLike, accs: Mapping[tuple[int, str], Any],
                    manifest: Mapping[str, Any], *,
                    token_stats: Mapping[tuple[int, str], Any] | None = None,
                    moments: Mapping[tuple[int, str], Any] | None = None,
                    extra: Mapping[str, Mapping[tuple[int, str], Any]] | None = None
                    ) -> dict[str, Any]:
    """Restore accumulators from ``path`` after checking it belongs to this run.

    Parameters
    ----------
    path : path-like
        A file written by :func:`save_checkpoint`.
    accs : mapping (layer, point) → CovarianceAccumulator
        Empty accumulators of this run; filled in place.
    manifest : mapping
        This run's manifest (``CaptureOptions.manifest``); every entry must equal the checkpoint's.
    token_stats : mapping (layer, point) → TokenNormStats, optional
        Empty token diagnostics of this run; filled in place where the file holds them (a
        checkpoint written with ``diagnostics=False`` leaves them empty).
    moments : mapping (layer, point) → NormMoments, optional
        Empty fourth-moment statistics of this run; filled in place where the file holds
        them (a checkpoint of an older version leaves them empty).
    extra : mapping key prefix → mapping (layer, point) → state object, optional
        As in :func:`save_checkpoint`; filled in place where the file holds them.

    Returns
    -------
    dict
        The data position: ``batches``, ``tokens``, ``data_sha1``. The caller must check
        that the first ``batches`` batches it is given hash to ``data_sha1``
        (:func:`check_data_prefix`).

    Raises
    ------
    ResultsFileError
        Corrupt or truncated file, another format version, another model, other sites,
        other capture options or another data shard (the message lists every difference),
        or accumulator states that disagree with the recorded token count.
    """
    path = Path(path)
    state, tensors = _read(path)
    diffs = _diff(json.loads(json.dumps(dict(manifest))), state.get("manifest", {}))
    if diffs:
        what = ("another model" if any(d.startswith("model") for d in diffs)
                else "other sites" if any(d.startswith("sites") for d in diffs)
                else "other capture options" if any(d.startswith("options") for d in diffs)
                else "another data shard")
        raise ResultsFileError(
            f"checkpoint {path} belongs to {what}:\n  " + "\n  ".join(diffs)
            + "\nDelete it (CLI: --fresh), pass another checkpoint path (CLI: --checkpoint "
            "PATH), or call with the settings it was written with."
        )
    if state.get("nerve_interp") != __version__:
        warnings.warn(
            f"checkpoint {path} was written by nerve_interp {state.get('nerve_interp')}, this is "
            f"{__version__}; resuming (the file format is the same).", UserWarning, stacklevel=3)
    position = state["position"]
    tokens = int(position["tokens"])
    for (layer, point), acc in accs.items():
        prefix = site_name(layer, point)
        sub = _unpack(tensors, layer, point)
        n = int(sub["n"]) if "n" in sub else 0
        # no point can hold more rows than the run counted tokens
        if n > tokens or (tokens and not tensors):
            raise ResultsFileError(
                f"checkpoint {path} is inconsistent: {prefix} holds {n} tokens but the run "
                f"consumed {tokens}. It is corrupt; delete it to start afresh."
            )
        if sub:
            acc.load_state_dict(sub)
    for prefix, objs in ((TOKEN_STATS_PREFIX, token_stats), (MOMENTS_PREFIX, moments),
                         *(extra or {}).items()):
        for (layer, point), obj in (objs or {}).items():
            sub = _unpack(tensors, layer, point, prefix)
            if sub:
                obj.load_state_dict(sub)
    return position


def check_data_prefix(path: str | os.PathLike, position: Mapping[str, Any], digest: str,
                      n_batches: int) -> None:
    """Refuse to resume when the batches before the checkpoint are not the ones it counted.

    Parameters
    ----------
    path : path-like
        The checkpoint (for the message).
    position : mapping
        Its data position (from :func:`load_checkpoint`).
    digest : str
        SHA-1 hex digest of the first ``n_batches`` batches of this run.
    n_batches : int
        How many batches this run has hashed so far (fewer than ``position["batches"]`` when
        the data ran out before reaching the checkpoint).
    """
    want = int(position["batches"])
    if n_batches < want:
        raise ResultsFileError(
            f"checkpoint {path} consumed {want} batches but this run's data have only "
            f"{n_batches}; resume with the same batches (same texts, batch_size, max_length) "
            "or delete the checkpoint."
        )
    if digest != position["data_sha1"]:
        raise ResultsFileError(
            f"checkpoint {path} was written on other data: the first {want} batches of this "
            f"run hash to {digest[:12]}…, the checkpoint's to {str(position['data_sha1'])[:12]}…. "
            "Resume with the same batches (same texts, order, batch_size, max_length) or "
            "delete the checkpoint."
        )


__all__ = ["check_data_prefix", "load_checkpoint", "read_checkpoint_state",
           "save_checkpoint", "shard_path"]
