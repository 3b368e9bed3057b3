"""`SpectraResult`: the spectra of every captured FFN point, their tables, and their file.

Files are a single ``.safetensors`` (no pickle): per point ``layers.{layer}.ffn.{point}``
``.eigenvalues``, ``.mean`` and optionally ``.eigenvectors`` (float64), with the metadata
(model, tokens, dtype, versions, per-point N and clipped negatives) as JSON in the header.
Token diagnostics (:mod:`nerve_interp.diagnostics`) add per point ``.top_norms``,
``.top_meta``, ``.top_share`` and a JSON summary, and flagged points the spectrum without
their outlier tokens under ``{point}.without_outliers.eigenvalues`` / ``.mean``. A capture with
``n_groups`` adds per point ``{point}.groups.*`` (:class:`nerve_interp.groups.GroupSpectra`:
tokens per group, leave-one-group-out and convergence eigenvalues).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import __version__
from . import metrics as _metrics
from ._io import open_safetensors, save_safetensors
from .diagnostics import TokenDiagnostics
from .errors import ResultsFileError, SiteError
from .groups import GroupSpectra
from .joint import JointInputs
from .sites import parse_site, site_name
from .spectrum import Spectrum

FORMAT = "nerve_interp.spectra"
FORMAT_VERSION = "2"  # 2: a SHA-256 over every tensor; version 1 files are read unchecked


class SpectraResult:
    """Spectra of FFN points of one model over one set of tokens.

    Usually made by :func:`nerve_interp.collect_spectra` or :meth:`load`.

    Parameters
    ----------
    spectra : dict mapping (layer, point) -> Spectrum
    metadata : dict
        ``model``, ``n_tokens``, ``dtype``, ``versions``, ``exclusion``, ... (JSON-serialisable).
    diagnostics : dict mapping (layer, point) -> TokenDiagnostics, optional
        Token statistics of each point (outlier share and flag, top tokens).
    without_outliers : dict mapping (layer, point) -> Spectrum, optional
        For flagged points, the spectrum with their outlier tokens left out.
    joint : dict mapping layer -> JointInputs, optional
        Mean and covariance of each layer's nonlinearity inputs (``collect_spectra(...,
        joint=True)``), for :func:`nerve_interp.nulls.gaussian_equivalent`.
    """

    def __init__(self, spectra: dict[tuple[int, str], Spectrum], metadata: dict | None = None,
                 *, diagnostics: dict[tuple[int, str], TokenDiagnostics] | None = None,
                 without_outliers: dict[tuple[int, str], Spectrum] | None = None,
                 joint: dict[int, JointInputs] | None = None):
        if not spectra:
            raise ValueError("a SpectraResult needs at least one spectrum.")
        from .sites import POINTS

        order = {p: i for i, p in enumerate(POINTS)}
        self._spectra = dict(sorted(spectra.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])))
        self.metadata = dict(metadata or {})
        self.diagnostics = dict(diagnostics or {})
        self._without_outliers = dict(without_outliers or {})
        self.joint = dict(joint or {})

    # ---------------------------------------------------------------- access
    @property
    def model(self) -> str:
        return str(self.metadata.get("model", "model"))

    @property
    def layers(self) -> list[int]:
        """Captured layers, ascending."""
        return sorted({layer for layer, _ in self._spectra})

    @property
    def points(self) -> list[str]:
        """Captured points, in forward order."""
        from .sites import POINTS

        have = {p for _, p in self._spectra}
        return [p for p in POINTS if p in have]

    def _key(self, layer: int | str, point: str | None) -> tuple[int, str]:
        if isinstance(layer, str) and point is None:
            layer, point = parse_site(layer)
        if point is None:
            raise SiteError(f"name a point too: spectrum({layer}, 'pre' | 'post').")
        layer = int(layer)
        n = self.metadata.get("n_layers")
        if layer < 0 and n:
            layer += int(n)
        key = (layer, point)
        if key not in self._spectra:
            raise SiteError(
                f'"{site_name(layer, point) if layer >= 0 else (layer, point)}" was not '
                f"captured; this result has layers {self.layers} and points {self.points}."
            )
        return key

    def spectrum(self, layer: int | str, point: str | None = None) -> Spectrum:
        """The :class:`Spectrum` of one point: ``spectrum(3, "pre")`` or
        ``spectrum("layers.3.ffn.pre")``."""
        return self._spectra[self._key(layer, point)]

    __getitem__ = spectrum

    def eigenvalues(self, layer: int | str, point: str | None = None) -> np.ndarray:
        """Descending float64 eigenvalues of the unbiased covariance, shape (D,)."""
        return self.spectrum(layer, point).eigenvalues

    def eigenvectors(self, layer: int | str, point: str | None = None) -> np.ndarray:
        """Eigenvectors as columns, shape (D, D), same order as :meth:`eigenvalues`."""
        return self.spectrum(layer, point).require_eigenvectors()

    def mean(self, layer: int | str, point: str | None = None) -> np.ndarray:
        """Mean activation μ, shape (D,)."""
        return self.spectrum(layer, point).mean

    def items(self):
        """``((layer, point), Spectrum)`` pairs, layer-major."""
        return self._spectra.items()

    def _outlier(self, key: tuple[int, str]) -> tuple[float, Any]:
        d = self.diagnostics.get(key)
        return (np.nan, pd.NA) if d is None else (float(d.outlier_share), bool(d.outlier_flag))

    # ---------------------------------------------------------------- tables
    def metrics(self, *, concentration_k: int | None = None, ci: float = 0.95
                ) -> pd.DataFrame:
        """Every per-spectrum metric (see the glossary) per layer and point, tidy.

        Parameters
        ----------
        concentration_k : int, optional
            ``k`` of ``spectral_concentration`` (default: per D, see ``metrics``).
        ci : float, default 0.95
            Coverage of the intervals (captures with ``n_groups``).

        Returns
        -------
        DataFrame
            Columns ``model, layer, point, metric, value``, then ``se``,
            ``ci_low``, ``ci_high`` (delete-one-group jackknife with a t quantile on K − 1
            degrees of freedom, :mod:`nerve_interp.jackknife`; NaN unless the capture kept
            ``n_groups``; the interval is centred on the measured value, so it is the sampling
            spread at this N, not the finite-sample bias: see :meth:`convergence`) and
            ``n_groups``, plus for context
            ``n_tokens``, ``dim``, ``n_over_d`` (tokens per dimension: every metric depends on it,
            see :func:`nerve_interp.marchenko_pastur.white_noise_metrics`), ``outlier_share``
            (share of the variance held by the point's top tokens by norm, see
            :mod:`nerve_interp.diagnostics`; NaN without diagnostics)
            and ``outlier_flag`` (that share is above the threshold: the spectrum is dominated
            by a few tokens; NA without diagnostics). Pivot it for a wide view::

                df.pivot_table(index="layer", columns=["metric", "point"], values="value")
        """
        rows = []
        for (layer, point), spec in self._spectra.items():
            share, flag = self._outlier((layer, point))
            iv = (spec.intervals(ci=ci, concentration_k=concentration_k)
                  if spec.groups is not None else {})
            k = spec.groups.k if spec.groups is not None else 0
            for name, value in spec.metrics(concentration_k=concentration_k).items():
                j = iv.get(name, _NO_INTERVAL)
                rows.append((self.model, layer, point, name, value, j["se"], j["ci_low"],
                             j["ci_high"], k, spec.n_samples, spec.dim,
                             spec.n_samples / spec.dim, share, flag))
        df = pd.DataFrame(rows, columns=["model", "layer", "point", "metric", "value", "se",
                                         "ci_low", "ci_high", "n_groups", "n_tokens", "dim",
                                         "n_over_d", "outlier_share", "outlier_flag"])
        df["outlier_flag"] = df["outlier_flag"].astype("boolean")
        return df

    def reinjection(self, pre: str = "pre", post: str = "post", *, tidy: bool = False,
                    ci: float = 0.95) -> pd.DataFrame:
        """Variance reinjection by the nonlinearity, per layer (see the glossary).

        Parameters
        ----------
        pre, post : str
            The two points compared (``post="act"`` isolates the activation of a gated FFN).
        tidy : bool, default False
            Long form ``model, layer, metric, value, se, ci_low, ci_high, n_tokens,
            n_over_d`` instead of one row per layer.
        ci : float, default 0.95
            Coverage of the intervals (captures with ``n_groups``).

        Returns
        -------
        DataFrame
            One row per layer: ``model, layer, pr_gain, delta_spectral_entropy, delta_eee,
            js_divergence, soft_rank_gain, hard_rank_gain``, plus the four inputs
            ``participation_ratio_pre/_post`` and ``soft_rank_pre/_post``, and
            ``outlier_share_pre/_post``, ``outlier_flag_pre/_post`` (see :meth:`metrics`), and
            ``n_tokens`` / ``n_over_d``: the tokens of the two spectra (the smaller count when
            ``exclude_norm_above`` left them different) and that per dimension (the larger D).
            With groups, every quantity ``q`` of the six also has ``q_se``, ``q_ci_low`` and
            ``q_ci_high`` (jackknife over the same groups of sequences at both points).
        """
        rows = []
        for layer in self.layers:
            a, b = self.spectrum(layer, pre), self.spectrum(layer, post)
            r = _metrics.reinjection(a.eigenvalues, b.eigenvalues)
            ma, mb = a.metrics(), b.metrics()
            rows.append({
                "model": self.model, "layer": layer, **r,
                f"participation_ratio_{pre}": ma["participation_ratio"],
                f"participation_ratio_{post}": mb["participation_ratio"],
                f"soft_rank_{pre}": ma["soft_rank"],
                f"soft_rank_{post}": mb["soft_rank"],
                f"outlier_share_{pre}": self._outlier((layer, pre))[0],
                f"outlier_share_{post}": self._outlier((layer, post))[0],
                f"outlier_flag_{pre}": self._outlier((layer, pre))[1],
                f"outlier_flag_{post}": self._outlier((layer, post))[1],
                "n_tokens": min(a.n_samples, b.n_samples),
                "n_over_d": min(a.n_samples, b.n_samples) / max(a.dim, b.dim),
                **_interval_columns(a, b, ci),
            })
        df = pd.DataFrame(rows)
        for p in (pre, post):
            df[f"outlier_flag_{p}"] = df[f"outlier_flag_{p}"].astype("boolean")
        return _tidy_reinjection(df) if tidy else df

    def convergence(self, metrics: Sequence[str] | None = None, *, pre: str = "pre",
                    post: str = "post", ci: float = 0.95) -> Any:
        """Each metric at N·k/K tokens and its extrapolation to N → ∞ (captures with
        ``n_groups``).

        The groups are merged in 3 random orders (the same at every point), and the metric
        is read at about 8 group counts k (evenly spaced in log N) and at all K; then
        ``m(N) = m∞ + a/N`` is fitted by least squares to the samples with N_k ≥ D (below,
        the 1/N form fails). Soft rank, spectral entropy, EEE
        and the plain participation ratio are biased at finite N (white noise at N/D = 8 has
        soft rank 0.94·D): ``m_inf`` is their finite-sample-corrected value, as far as the
        1/N form holds (``r2``; look at :func:`nerve_interp.plotting.plot_convergence`).

        Parameters
        ----------
        metrics : sequence of str, optional
            Metric names of :meth:`metrics` and of :meth:`reinjection` (default:
            :data:`nerve_interp.uncertainty.CONVERGENCE_METRICS` and
            :data:`~nerve_interp.uncertainty.CONVERGENCE_REINJECTION`).
        pre, post : str
            The points of the pre → post quantities.
        ci : float, default 0.95
            Coverage of the interval of ``m_inf``.

        Returns
        -------
        nerve_interp.uncertainty.Convergence
            ``.curves`` and ``.fits`` DataFrames.

        Raises
        ------
        NotFittedError
            The capture kept no groups.
        """
        from .uncertainty import convergence

        return convergence(self, metrics, pre=pre, post=post, ci=ci)

    # ---------------------------------------------------------------- outliers
    def without_outliers(self) -> SpectraResult:
        """The same result with every flagged point's outlier tokens left out.

        A flagged point (``outlier_flag``) gets the spectrum of its tokens minus its outlier
        tokens (``TokenDiagnostics.outlier_mask``: the top ``k`` by norm and any other kept
        top token with ``‖x − μ‖²`` over 20× the mean of the tokens not yet marked, iterated
        (:func:`nerve_interp.diagnostics.outlier_tokens_mask`); computed exactly in the capture
        pass, no second forward);
        other points are unchanged. ``metadata["exclusion"]["outliers_removed"]`` lists
        ``{site: k}``. The result has no diagnostics of its own; to measure (and diagnose)
        without given positions or ids, capture again with ``exclude_positions=...``.
        """
        if not self.diagnostics:
            raise ValueError(
                "this result has no token diagnostics; capture with diagnostics=True (the "
                "default) to get spectra without the outlier tokens.")
        spectra = dict(self._spectra)
        removed = {}
        for key, spec in self._without_outliers.items():
            spectra[key] = spec
            removed[site_name(*key)] = self.diagnostics[key].n_outliers
        meta = dict(self.metadata)
        meta["exclusion"] = {**dict(meta.get("exclusion") or {}), "outliers_removed": removed}
        return SpectraResult(spectra, meta)

    def outlier_tokens(self, *, flagged_only: bool = False) -> pd.DataFrame:
        """The tokens of largest activation norm of every point, tidy.

        Returns
        -------
        DataFrame
            Columns ``model, layer, point, rank`` (1 = largest norm), ``norm``,
            ``norm_ratio`` (norm / the point's median norm), ``share`` (that token's share of the
            point's variance, ``‖x − μ‖² / trace(M2)``), ``batch, row, position, token_id,
            token`` and ``outlier`` (an outlier token: among the top ``k`` whose shares sum to
            ``outlier_share``, or over the iterated variance test, see
            ``TokenDiagnostics.outlier_mask``).
            ``flagged_only=True`` keeps only the outlier tokens of flagged points.
        """
        from .diagnostics import TOKEN_META

        cols = ["model", "layer", "point", "rank", "norm", "norm_ratio", "share", *TOKEN_META,
                "token", "outlier"]
        parts = []
        for (layer, point), d in self.diagnostics.items():
            m = len(d.top_norms)
            part = pd.DataFrame({"model": self.model, "layer": layer, "point": point,
                                 "rank": np.arange(1, m + 1), "norm": d.top_norms,
                                 "norm_ratio": d.top_norms / d.median_norm,
                                 "share": d.top_share,
                                 **{c: d.top_meta[:, j] for j, c in enumerate(TOKEN_META)},
                                 "token": d.top_tokens or [""] * m,
                                 "outlier": d.outlier_mask})
            if flagged_only:
                part = part[part["outlier"]] if d.outlier_flag else part.iloc[:0]
            parts.append(part)
        if not parts:
            return pd.DataFrame(columns=cols)
        return pd.concat(parts, ignore_index=True)[cols]

    def outlier_comparison(self, metrics: Sequence[str] = ("participation_ratio", "soft_rank")
                           ) -> pd.DataFrame:
        """Metrics with all tokens and with the flagged tokens left out, tidy.

        Returns
        -------
        DataFrame
            Columns ``model, layer, point, metric, value, tokens`` where
            ``tokens`` is ``"all"`` or ``"without outliers"`` (see :meth:`without_outliers`),
            and ``outlier_flag``.
        """
        a = self.metrics().assign(tokens="all")
        b = self.without_outliers().metrics().assign(tokens="without outliers")
        # the two may list different metrics (a spectrum without the fourth moment has no
        # participation_ratio_corrected): carry the flags over by point, not by row
        flags = a.drop_duplicates(["layer", "point"]).set_index(["layer", "point"])
        b["outlier_flag"] = pd.Series(
            flags["outlier_flag"].reindex(pd.MultiIndex.from_frame(b[["layer", "point"]]))
            .to_numpy(), index=b.index, dtype="boolean")
        df = pd.concat([a, b], ignore_index=True)
        df = df[df["metric"].isin(list(metrics))]
        return df[["model", "layer", "point", "metric", "value", "tokens", "outlier_flag"]
                  ].reset_index(drop=True)

    def summary(self) -> pd.DataFrame:
        """Means over layers: one row per point and metric (``model, point, metric, value``)."""
        df = self.metrics()
        return (df.groupby(["model", "point", "metric"], sort=False)["value"].mean()
                .reset_index())

    def eigenvalue_frame(self, *, normalize: bool = False) -> pd.DataFrame:
        """Tidy eigenvalues for plots: ``model, layer, point, rank, eigenvalue``.

        ``rank`` starts at 1; ``normalize=True`` divides each spectrum by its sum.
        """
        parts = []
        for (layer, point), spec in self._spectra.items():
            lam = spec.eigenvalues / spec.eigenvalues.sum() if normalize else spec.eigenvalues
            parts.append(pd.DataFrame({"model": self.model, "layer": layer, "point": point,
                                       "rank": np.arange(1, lam.size + 1), "eigenvalue": lam}))
        return pd.concat(parts, ignore_index=True)

    # ---------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write every spectrum and the metadata to one ``.safetensors`` file (atomic, with a
        SHA-256 checksum over its tensors that :meth:`load` verifies)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else \
                path.with_suffix(".safetensors")
        tensors, per_site = {}, {}
        for (layer, point), spec in self._spectra.items():
            name = site_name(layer, point)
            tensors[f"{name}.eigenvalues"] = torch.from_numpy(np.ascontiguousarray(
                spec.eigenvalues))
            tensors[f"{name}.mean"] = torch.from_numpy(np.ascontiguousarray(spec.mean))
            if spec.eigenvectors is not None:
                tensors[f"{name}.eigenvectors"] = torch.from_numpy(
                    np.ascontiguousarray(spec.eigenvectors))
            if spec.variances is not None:
                tensors[f"{name}.variances"] = torch.from_numpy(
                    np.ascontiguousarray(spec.variances))
            per_site[name] = {"n_samples": spec.n_samples, "n_negative": spec.n_negative,
                              "min_eigenvalue": spec.min_eigenvalue,
                              "fourth_moment": spec.fourth_moment}
            if spec.groups is not None:
                per_site[name]["n_groups"] = spec.groups.k
                for key, value in spec.groups.arrays().items():
                    tensors[f"{name}.groups.{key}"] = torch.from_numpy(
                        np.ascontiguousarray(value))
            diag = self.diagnostics.get((layer, point))
            if diag is not None:
                per_site[name]["diagnostics"] = {**diag.summary(), "top_tokens": diag.top_tokens}
                for key in ("top_norms", "top_meta", "top_share"):
                    tensors[f"{name}.{key}"] = torch.from_numpy(np.ascontiguousarray(
                        getattr(diag, key)))
                tensors[f"{name}.top_outlier"] = torch.from_numpy(
                    np.ascontiguousarray(diag.outlier_mask))
            free = self._without_outliers.get((layer, point))
            if free is not None:
                per_site[name]["without_outliers"] = {
                    "n_samples": free.n_samples, "n_negative": free.n_negative,
                    "min_eigenvalue": free.min_eigenvalue}
                for key in ("eigenvalues", "mean", "eigenvectors", "variances"):
                    value = getattr(free, key)
                    if value is not None:
                        tensors[f"{name}.without_outliers.{key}"] = torch.from_numpy(
                            np.ascontiguousarray(value))
        for layer, j in self.joint.items():
            tensors[f"layers.{layer}.ffn.joint.mean"] = torch.from_numpy(j.mean)
            tensors[f"layers.{layer}.ffn.joint.covariance"] = torch.from_numpy(j.covariance)
        header = {"format": FORMAT, "format_version": FORMAT_VERSION,
                  "nerve_interp_version": __version__,
                  "metadata": json.dumps(self.metadata, default=str),
                  "sites": json.dumps(per_site),
                  "joint": json.dumps({str(layer): {"n_samples": j.n_samples,
                                                    "parts": list(j.parts)}
                                       for layer, j in self.joint.items()})}
        return save_safetensors(tensors, path, header)

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: str | None = None) -> SpectraResult:
        """Read a file written by :meth:`save`.

        Parameters
        ----------
        path : path
        model : str, optional
            Expected model name; a file from another model raises ``ResultsFileError``.
        """
        path = Path(path)
        if not path.exists():
            raise ResultsFileError(f"no results file at {path}.")
        with open_safetensors(
                path, FORMAT, kind="a nerve_interp spectra file",
                other_format="write one with SpectraResult.save().",
                unreadable=f"{path} cannot be read as a nerve_interp spectra file",
                remedy="Re-run the capture to recreate it.", supported=int(FORMAT_VERSION),
                version_of=lambda h: (h.get("format_version"), h.get("nerve_interp_version"))
        ) as (f, header):
            metadata = json.loads(header["metadata"])
            per_site = json.loads(header["sites"])
            spectra, diags, free = {}, {}, {}
            keys = set(f.keys())
            for name, info in per_site.items():
                layer, point = parse_site(name)
                spectra[(layer, point)] = _read_spectrum(f, keys, name, name, info)
                if "diagnostics" in info:
                    d = dict(info["diagnostics"])
                    diags[(layer, point)] = TokenDiagnostics.from_parts(
                        name, d, *(f.get_tensor(f"{name}.{k}").numpy()
                                   for k in ("top_norms", "top_meta", "top_share")),
                        top_tokens=d.get("top_tokens"),
                        top_outlier=f.get_tensor(f"{name}.top_outlier").numpy()
                        if f"{name}.top_outlier" in keys else None)
                if "without_outliers" in info:
                    free[(layer, point)] = _read_spectrum(
                        f, keys, f"{name}.without_outliers", name, info["without_outliers"])
            joint = {int(layer): JointInputs(
                f.get_tensor(f"layers.{layer}.ffn.joint.mean").numpy(),
                f.get_tensor(f"layers.{layer}.ffn.joint.covariance").numpy(),
                int(j["n_samples"]), tuple(j["parts"]))
                for layer, j in json.loads(header.get("joint", "{}")).items()}
        if model is not None and metadata.get("model") != model:
            raise ResultsFileError(
                f"{path} holds spectra of {metadata.get('model')!r}, not {model!r}; load the "
                "file of the right model or capture this one."
            )
        return cls(spectra, metadata, diagnostics=diags, without_outliers=free, joint=joint)

    def __repr__(self) -> str:
        d = sorted({s.dim for s in self._spectra.values()})
        return (f"SpectraResult(model={self.model!r}, layers={len(self.layers)}, "
                f"points={self.points}, D={d[0] if len(d) == 1 else d}, "
                f"tokens={self.metadata.get('n_tokens')})")

    def __eq__(self, other: Any) -> bool:  # for round-trip tests
        if not isinstance(other, SpectraResult) or self._spectra.keys() != other._spectra.keys():
            return False
        return all(np.array_equal(a.eigenvalues, other._spectra[k].eigenvalues)
                   and np.array_equal(a.mean, other._spectra[k].mean)
                   for k, a in self._spectra.items())


_NO_INTERVAL = {"se": np.nan, "ci_low": np.nan, "ci_high": np.nan}


def _interval_columns(a: Spectrum, b: Spectrum, ci: float) -> dict[str, float]:
    """``{q}_se``, ``{q}_ci_low``, ``{q}_ci_high`` of the pre → post quantities (empty
    without groups)."""
    if a.groups is None or b.groups is None:
        return {}
    from .uncertainty import reinjection_intervals

    iv = reinjection_intervals(a, b, ci=ci)
    return {f"{q}_{k}": iv[q][k] for q in _metrics.REINJECTION_NAMES
            for k in ("se", "ci_low", "ci_high")}


def _tidy_reinjection(df: pd.DataFrame) -> pd.DataFrame:
    ids = ["model", "layer", "n_tokens", "n_over_d"]
    long = df[ids + list(_metrics.REINJECTION_NAMES)].melt(
        id_vars=ids, var_name="metric", value_name="value")
    for k in ("se", "ci_low", "ci_high"):
        cols = {f"{q}_{k}": q for q in _metrics.REINJECTION_NAMES}
        if all(c in df for c in cols):
            part = df[["layer", *cols]].rename(columns=cols).melt(
                id_vars=["layer"], var_name="metric", value_name=k)
            long = long.merge(part, on=["layer", "metric"], how="left")
        else:
            long[k] = np.nan
    return long[["model", "layer", "metric", "value", "se", "ci_low", "ci_high",
                 "n_tokens", "n_over_d"]]


def _read_spectrum(f: Any, keys: set, prefix: str, name: str, info: dict) -> Spectrum:
    vec, var = (f.get_tensor(f"{prefix}.{k}").numpy() if f"{prefix}.{k}" in keys else None
                for k in ("eigenvectors", "variances"))
    head = f"{prefix}.groups."
    groups = (GroupSpectra.from_arrays({k[len(head):]: f.get_tensor(k).numpy()
                                        for k in keys if k.startswith(head)})
              if "n_groups" in info else None)
    return Spectrum(eigenvalues=f.get_tensor(f"{prefix}.eigenvalues").numpy(),
                    mean=f.get_tensor(f"{prefix}.mean").numpy(),
                    n_samples=int(info["n_samples"]), eigenvectors=vec,
                    n_negative=int(info["n_negative"]),
                    min_eigenvalue=float(info["min_eigenvalue"]), name=name,
                    fourth_moment=info.get("fourth_moment"), groups=groups, variances=var)


__all__ = ["SpectraResult"]
