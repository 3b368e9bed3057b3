"""The options of one capture, validated once and kept in one frozen object.

:class:`CaptureOptions` is built from ``collect_spectra``'s keywords by
:meth:`CaptureOptions.build` (the only place they are checked, like scikit-learn's
``_parameter_constraints``) and is then the single source for

* the checkpoint manifest (:meth:`CaptureOptions.manifest`): what a resume must agree on;
* the result metadata (:meth:`CaptureOptions.metadata`): what the capture was asked to do
  (and, for a :class:`~nerve_interp.data.Corpus`, which corpus, split and seed it read);
* a multi-pass plan, which replays the capture with ``dataclasses.replace(opts, layers=...)``.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._validation import check_positive_int
from .._warnings import user_stacklevel
from ..covariance import resolve_precision
from ..diagnostics import (
    DEFAULT_MAX_OUTLIER_TOKENS,
    DEFAULT_OUTLIER_FRACTION,
    DEFAULT_OUTLIER_THRESHOLD,
    ExclusionRule,
    check_outlier_parameters,
    exclusion_rule,
)
from ..errors import SiteError
from ..sites import POINTS, FFNSite, site_name

KEYWORDS: dict[str, Any] = {
    "layers": None, "points": ("pre", "post"), "max_tokens": None, "skip_first": 0,
    "exclude_positions": (), "exclude_token_ids": (), "exclude_norm_above": None,
    "token_fraction": None, "subsample_seed": 0, "batch_size": 8, "max_length": 256,
    "eigenvectors": False, "gram_dtype": None, "precision": "auto", "memory_budget": None,
    "progress": True, "checkpoint": None, "checkpoint_every": 20, "checkpoint_seconds": 300.0,
    "data_label": "",
    "diagnostics": True, "outlier_fraction": DEFAULT_OUTLIER_FRACTION,
    "outlier_threshold": DEFAULT_OUTLIER_THRESHOLD,
    "max_outlier_tokens": DEFAULT_MAX_OUTLIER_TOKENS, "distributed": None, "remote": None,
    "n_groups": None, "joint": False, "convergence": True,
}
"""The capture options of ``collect_spectra`` (every keyword but ``tokenizer`` and
``sites``) and their defaults."""


@dataclasses.dataclass(frozen=True)
class OutlierOptions:
    """Token diagnostics (outlier tokens), see ``collect_spectra(diagnostics=...)``.

    Parameters
    ----------
    enabled : bool
        Gather per-token norm statistics in the capture pass.
    fraction : float in (0, 1)
        Size of the top group, as a share of the tokens (``outlier_fraction``).
    threshold : float in (0, 1)
        Variance share of the top group above which a point is flagged.
    max_tokens : int >= 1
        Top tokens kept per point (``max_outlier_tokens``).
    """

    enabled: bool = True
    fraction: float = DEFAULT_OUTLIER_FRACTION
    threshold: float = DEFAULT_OUTLIER_THRESHOLD
    max_tokens: int = DEFAULT_MAX_OUTLIER_TOKENS

    def __post_init__(self) -> None:
        check_outlier_parameters(self.fraction, self.threshold, self.max_tokens)

    def to_dict(self, flagged: Sequence[str] = ()) -> dict[str, Any]:
        """``metadata["diagnostics"]``."""
        return {"enabled": bool(self.enabled), "outlier_fraction": self.fraction,
                "outlier_threshold": self.threshold, "max_outlier_tokens": self.max_tokens,
                "flagged": list(flagged)}


@dataclasses.dataclass(frozen=True)
class CaptureOptions:
    """Everything ``collect_spectra`` was asked to do, checked (see its docstring).

    ``precision`` is the concrete mode (``"auto"`` resolved for the model's device),
    ``points`` are in forward order (:data:`nerve_interp.sites.POINTS`), ``rule`` is the
    token exclusion rule with ``skip_first`` folded into its positions.
    """

    layers: Any = None  # None, a tuple of ints, or a predicate on FFNSite
    points: tuple[str, ...] = ("pre", "post")
    max_tokens: int | None = None
    skip_first: int = 0
    rule: ExclusionRule = ExclusionRule()
    token_fraction: float | None = None
    subsample_seed: int = 0
    batch_size: int = 8
    max_length: int = 256
    eigenvectors: bool = False
    precision: str = "fp64"
    memory_budget: int | float | str | None = None
    progress: bool = True
    checkpoint: Path | None = None
    checkpoint_every: int = 20
    checkpoint_seconds: float | None = 300.0
    data_label: str = ""
    outliers: OutlierOptions = OutlierOptions()
    distributed: bool | None = None
    remote: Any = None
    n_groups: int | None = None
    joint: bool = False
    convergence: bool = True
    corpus: dict[str, Any] | None = None  # load_corpus provenance (nerve_interp.data.Corpus)

    # -------------------------------------------------------------- building
    @classmethod
    def build(cls, keywords: Mapping[str, Any], *, device: torch.device | str = "cpu",
              vocab_size: int | None = None, as_strings: bool = False) -> CaptureOptions:
        """Check ``collect_spectra``'s keywords (those of :data:`KEYWORDS`; the rest take
        their defaults) and build the options.

        ``device`` is where the model's inputs go (it resolves ``precision="auto"``),
        ``vocab_size`` bounds ``exclude_token_ids``, ``as_strings`` says whether the data are
        texts tokenised here (then positions beyond ``max_length`` are refused).

        Raises
        ------
        TypeError, ValueError
            An unknown keyword, or an argument of the wrong type or out of range; the
            message names it.

        Examples
        --------
        >>> CaptureOptions.build({"max_tokens": 4096, "exclude_positions": (0,)}).rule
        ExclusionRule(positions=(0,), token_ids=(), norm_above=None)
        """
        unknown = sorted(set(keywords) - set(KEYWORDS))
        if unknown:
            raise TypeError(f"unknown capture option(s) {unknown}; the options are "
                            f"{sorted(KEYWORDS)} (see collect_spectra).")
        k = {**KEYWORDS, **keywords}
        _deprecated(skip_first=k["skip_first"], gram_dtype=k["gram_dtype"])
        for name in ("batch_size", "max_length", "checkpoint_every"):
            check_positive_int(k[name], name)
        if k["max_tokens"] is not None:
            check_positive_int(k["max_tokens"], "max_tokens", minimum=2,
                               context=" (a covariance needs 2 rows)")
        return cls(
            layers=_layers(k["layers"]), points=_points(k["points"]),
            max_tokens=None if k["max_tokens"] is None else int(k["max_tokens"]),
            skip_first=int(k["skip_first"]),
            rule=exclusion_rule(k["exclude_positions"], k["exclude_token_ids"],
                                k["exclude_norm_above"], skip_first=k["skip_first"],
                                vocab_size=vocab_size,
                                max_length=k["max_length"] if as_strings else None),
            token_fraction=check_token_fraction(k["token_fraction"], k["subsample_seed"]),
            subsample_seed=int(k["subsample_seed"]), batch_size=int(k["batch_size"]),
            max_length=int(k["max_length"]), eigenvectors=_flag(k["eigenvectors"], "eigenvectors"),
            precision=resolve_precision(k["precision"], device, gram_dtype=k["gram_dtype"]),
            memory_budget=k["memory_budget"], progress=_flag(k["progress"], "progress"),
            checkpoint=None if k["checkpoint"] is None else Path(os.fspath(k["checkpoint"])),
            checkpoint_every=int(k["checkpoint_every"]),
            checkpoint_seconds=_seconds(k["checkpoint_seconds"], "checkpoint_seconds"),
            data_label=str(k["data_label"]),
            outliers=OutlierOptions(_flag(k["diagnostics"], "diagnostics"),
                                    k["outlier_fraction"], k["outlier_threshold"],
                                    k["max_outlier_tokens"]),
            distributed=k["distributed"], remote=k["remote"],
            n_groups=_n_groups(k["n_groups"]), joint=_flag(k["joint"], "joint"),
            convergence=_flag(k["convergence"], "convergence"))

    def check_sites(self, sites: Sequence[FFNSite]) -> None:
        """Every point exists at the chosen sites (``act`` / ``up`` need a gated FFN)."""
        for p in self.points:
            sites[0].path(p)  # raises a clear SiteError for act/up on a plain FFN
        if self.joint:
            self._check_joint(sites[0])

    def _check_joint(self, site: FFNSite) -> None:
        need = ("pre", "up") if site.kind == "gated" else ("pre",)
        missing = [p for p in need if p not in self.points]
        if missing:
            raise SiteError(
                "joint=True keeps the covariance of the nonlinearity's inputs "
                f"({' and '.join(need)} of a {site.kind} FFN), so points must include "
                f"{list(need)}; they are {list(self.points)}. Pass "
                f"points={tuple(dict.fromkeys((*need, *self.points)))}.")
        if self.rule.norm_above is not None or self.remote is not None:
            raise ValueError(
                "joint=True needs the same token rows at pre and up in this process: it cannot "
                "be combined with exclude_norm_above (which drops different rows per point) or "
                "remote=... (which returns no rows). Drop one of them.")

    # -------------------------------------------------------------- what it records
    def manifest(self, meta: dict, sites: Sequence[FFNSite], rank: int = 0,
                 world_size: int = 1) -> dict[str, Any]:
        """What a checkpoint must agree on with the run that resumes from it
        (see :mod:`nerve_interp.checkpoint`): model, sites, the options that change the
        statistics, and the data shard. JSON-serialisable."""
        options: dict[str, Any] = {"points": list(self.points), "max_tokens": self.max_tokens,
                                   "skip_first": self.skip_first, "precision": self.precision}
        if self.rule.active:
            options["exclusion"] = self.rule.to_dict()
        if self.token_fraction is not None:
            options.update(token_fraction=self.token_fraction,
                           subsample_seed=self.subsample_seed)
        if self.n_groups is not None:
            options["n_groups"] = self.n_groups
        if self.joint:
            options["joint"] = True
        return {"model": str(meta["model"]), "model_class": str(meta["model_class"]),
                "sites": {site_name(s.layer, p): s.paths[p] for s in sites for p in self.points},
                "options": options,
                "shard": {"rank": int(rank), "world_size": int(world_size)}}

    def metadata(self) -> dict[str, Any]:
        """The options as they go into ``SpectraResult.metadata`` (the run adds counts)."""
        return {"max_tokens": self.max_tokens, "skip_first": self.skip_first,
                "token_fraction": self.token_fraction, "subsample_seed": self.subsample_seed,
                "exclusion": {**self.rule.to_dict(), "skip_first": self.skip_first},
                "precision": self.precision, "data": self.data_label,
                "remote": self.remote, "points": list(self.points), "n_groups": self.n_groups,
                "joint": self.joint, "convergence": self.convergence,
                **({"corpus": dict(self.corpus)} if self.corpus is not None else {})}


# ------------------------------------------------------------------ checks
def check_token_fraction(token_fraction: Any, subsample_seed: Any) -> float | None:
    """``token_fraction`` as a float in (0, 1] (or None); a TypeError (not a number) or a
    ValueError (out of range) naming it otherwise, and the same for ``subsample_seed``."""
    check_positive_int(subsample_seed, "subsample_seed", minimum=0)
    if token_fraction is None:
        return None
    if isinstance(token_fraction, bool) or not isinstance(token_fraction, numbers.Real):
        raise TypeError(
            f"token_fraction must be a number in (0, 1] or None; got "
            f"{type(token_fraction).__name__} {token_fraction!r}.")
    p = float(token_fraction)
    if not 0.0 < p <= 1.0:  # NaN fails too
        raise ValueError(
            f"token_fraction == {token_fraction!r}, must be in (0, 1]: the probability of "
            "keeping each token. Pass e.g. 0.25 to keep about a quarter of the tokens, or None "
            "(the default) to keep them all.")
    return p


def _deprecated(**given: Any) -> None:
    """Synonym keywords: still accepted, with a DeprecationWarning naming the new spelling."""
    new = {"skip_first": "exclude_positions=range(k)", "gram_dtype": "precision='fp64' / 'fp32'"}
    for name, value in given.items():
        if value not in (None, 0):
            warnings.warn(f"collect_spectra({name}=...) is deprecated; pass {new[name]}.",
                          DeprecationWarning, stacklevel=user_stacklevel())


def _flag(value: Any, name: str) -> bool:
    """A yes/no option: a bool (or 0 / 1), never a string such as ``"no"``."""
    if isinstance(value, (bool, numbers.Integral)) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}.")


def _seconds(value: Any, name: str) -> float | None:
    """A positive number of seconds, or None (off)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise (ValueError if isinstance(value, numbers.Real) else TypeError)(
            f"{name} must be a number of seconds > 0 (e.g. 300: every 5 minutes) or None "
            f"(batches only); got {type(value).__name__} {value!r}.")
    return float(value)


def _n_groups(value: Any) -> int | None:
    """``n_groups``: None (no groups) or an int K >= 2."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"n_groups must be an int >= 2 (groups of whole sequences for "
                        f"intervals) or None; got {type(value).__name__} {value!r}.")
    if value < 2:
        raise ValueError(f"n_groups == {value}; a jackknife needs at least 2 groups (16 is a "
                         "good default), or pass None for no intervals.")
    return int(value)


def _layers(layers: Any) -> Any:
    """None / "all" (every layer), a predicate on FFNSite, or a tuple of ints."""
    if layers is None or callable(layers) or (isinstance(layers, str) and layers == "all"):
        return layers
    items = (layers,) if isinstance(layers, numbers.Integral) else layers
    if isinstance(items, str) or not isinstance(items, Iterable):
        raise TypeError(f"layers must be an int, a sequence of ints, 'all' or None; got "
                        f"{type(layers).__name__} {layers!r}.")
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"layers must be ints (negative counts from the end), e.g. "
                            f"[0, -1]; got {type(v).__name__} {v!r} in {layers!r}.")
        out.append(int(v))
    return tuple(out)


def _points(points: Any) -> tuple[str, ...]:
    given = (points,) if isinstance(points, str) else tuple(points)
    for p in given:
        if p not in POINTS:
            raise SiteError(
                f"unknown point {p!r}. Points are pre and post (every FFN), plus act and up "
                "(gated FFNs only).")
    if not given:
        raise SiteError("points is empty; pass e.g. points=('pre', 'post').")
    return tuple(p for p in POINTS if p in given)


__all__ = ["KEYWORDS", "CaptureOptions", "OutlierOptions", "check_token_fraction"]
