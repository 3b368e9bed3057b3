"""`SpectraResult`: the spectra of every captured FFN point, their tables, and their file.

Files are a single ``.safetensors`` (no pickle): per point ``layers.{layer}.ffn.{point}``
``.eigenvalues``, ``.mean`` and optionally ``.eigenvectors`` (float64), with the metadata
(model, tokens, dtype, versions, per-point N and clipped negatives) as JSON in the header.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import __version__
from . import metrics as _metrics
from ._io import atomic_path
from .errors import ResultsFileError, SiteError
from .sites import parse_site, site_name
from .spectrum import Spectrum

FORMAT = "nerve_interp.spectra"
FORMAT_VERSION = "1"


class SpectraResult:
    """Spectra of FFN points of one model over one set of tokens.

    Usually made by :func:`nerve_interp.collect_spectra` or :meth:`load`.

    Parameters
    ----------
    spectra : dict mapping (layer, point) -> Spectrum
    metadata : dict
        ``model``, ``n_tokens``, ``dtype``, ``versions``, ... (JSON-serialisable).
    """

    def __init__(self, spectra: dict[tuple[int, str], Spectrum], metadata: dict | None = None):
        if not spectra:
            raise ValueError("a SpectraResult needs at least one spectrum.")
        from .sites import POINTS

        order = {p: i for i, p in enumerate(POINTS)}
        self._spectra = dict(sorted(spectra.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])))
        self.metadata = dict(metadata or {})

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

    # ---------------------------------------------------------------- tables
    def metrics(self, *, concentration_k: int | None = None) -> pd.DataFrame:
        """Every metric of SPEC.md §3 per layer and point, tidy.

        Returns
        -------
        DataFrame with columns ``model, layer, point, metric, value`` (plus ``n_tokens``
        and ``dim`` for context). Pivot it for a wide view::

            df.pivot_table(index="layer", columns=["metric", "point"], values="value")
        """
        rows = []
        for (layer, point), spec in self._spectra.items():
            for name, value in spec.metrics(concentration_k=concentration_k).items():
                rows.append((self.model, layer, point, name, value, spec.n_samples, spec.dim))
        return pd.DataFrame(rows, columns=["model", "layer", "point", "metric", "value",
                                           "n_tokens", "dim"])

    def reinjection(self, pre: str = "pre", post: str = "post", *, tidy: bool = False
                    ) -> pd.DataFrame:
        """Variance reinjection by the nonlinearity, per layer (SPEC.md §4).

        Parameters
        ----------
        pre, post : str
            The two points compared (``post="act"`` isolates the activation of a gated FFN).
        tidy : bool, default False
            Long form ``model, layer, metric, value`` instead of one row per layer.

        Returns
        -------
        DataFrame
            One row per layer: ``model, layer, pr_gain, delta_spectral_entropy, delta_eee,
            js_divergence, soft_rank_gain, hard_rank_gain``, plus the four inputs
            ``participation_ratio_pre/_post`` and ``soft_rank_pre/_post``.
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
            })
        df = pd.DataFrame(rows)
        if tidy:
            keep = ["model", "layer", *_metrics.REINJECTION_NAMES]
            return df[keep].melt(id_vars=["model", "layer"], var_name="metric",
                                 value_name="value")
        return df

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
        """Write every spectrum and the metadata to one ``.safetensors`` file (atomic)."""
        from safetensors.torch import save_file

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
            per_site[name] = {"n_samples": spec.n_samples, "n_negative": spec.n_negative,
                              "min_eigenvalue": spec.min_eigenvalue}
        header = {"format": FORMAT, "format_version": FORMAT_VERSION,
                  "nerve_interp_version": __version__,
                  "metadata": json.dumps(self.metadata, default=str),
                  "sites": json.dumps(per_site)}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=header)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: str | None = None) -> SpectraResult:
        """Read a file written by :meth:`save`.

        Parameters
        ----------
        path : path
        model : str, optional
            Expected model name; a file from another model raises ``ResultsFileError``.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise ResultsFileError(f"no results file at {path}.")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if header.get("format") != FORMAT:
                    raise ResultsFileError(
                        f"{path} is not a nerve_interp spectra file (format "
                        f"{header.get('format')!r}); write one with SpectraResult.save()."
                    )
                metadata = json.loads(header["metadata"])
                per_site = json.loads(header["sites"])
                spectra = {}
                for name, info in per_site.items():
                    layer, point = parse_site(name)
                    keys = set(f.keys())
                    vec = (f.get_tensor(f"{name}.eigenvectors").numpy()
                           if f"{name}.eigenvectors" in keys else None)
                    spectra[(layer, point)] = Spectrum(
                        eigenvalues=f.get_tensor(f"{name}.eigenvalues").numpy(),
                        mean=f.get_tensor(f"{name}.mean").numpy(),
                        n_samples=int(info["n_samples"]), eigenvectors=vec,
                        n_negative=int(info["n_negative"]),
                        min_eigenvalue=float(info["min_eigenvalue"]), name=name)
        except ResultsFileError:
            raise
        except Exception as err:
            raise ResultsFileError(
                f"{path} cannot be read as a nerve_interp spectra file ({type(err).__name__}: "
                f"{err}); it is corrupt or truncated. Re-run the capture to recreate it."
            ) from None
        if model is not None and metadata.get("model") != model:
            raise ResultsFileError(
                f"{path} holds spectra of {metadata.get('model')!r}, not {model!r}; load the "
                "file of the right model or capture this one."
            )
        return cls(spectra, metadata)

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


__all__ = ["SpectraResult"]
