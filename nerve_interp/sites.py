"""Where the FFN activations of a model live: sites, points and the site-name grammar.

A **site** is the FFN block of one layer; a **point** is a place inside it (see the glossary).
Everything above this module speaks one grammar, ``layers.{layer}.ffn.{point}``; only this
module knows native module paths.

| point | plain FFN (GPT-2, Pythia, BERT, OPT, Mixer) | gated FFN (LLaMA, SmolLM2, Qwen2, Gemma) |
|---|---|---|
| ``pre`` | ``W_up x + b``, input of the activation | ``W_gate x``, input of the activation |
| ``act`` | — | ``σ(W_gate x)``, output of the activation |
| ``up`` | — | ``W_up x`` |
| ``post`` | ``σ(W_up x + b)``, output of the activation | ``σ(W_gate x) ⊙ (W_up x)``, into W_down |

Every point has shape ``[batch, seq, D]``, D the FFN width. For TransformerLens users:
``pre`` / ``up`` / ``post`` of a gated FFN are ``hook_pre`` / ``hook_pre_linear`` /
``hook_post`` of ``blocks.{layer}.mlp``.

A point is addressed by an nnsight path relative to the model root ending in ``.input`` or
``.output`` (e.g. ``model.layers.3.mlp.act_fn.input``); activations that are plain function
calls rather than modules are reached through nnsight's ``.source``
(``transformer.h.3.mlp.source.F_gelu_0.output``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import SiteError, UnknownArchitectureError

#: Points in the order the forward pass produces them within one FFN.
POINTS: tuple[str, ...] = ("pre", "act", "up", "post")
GATED_ONLY: tuple[str, ...] = ("act", "up")

_SITE_RE = re.compile(r"^layers\.(-?\d+)\.ffn\.([A-Za-z_]\w*)$")


# --------------------------------------------------------------------------- grammar
def _check_point(point: str, name: str) -> str:
    if point not in POINTS:
        raise SiteError(
            f'"{name}": unknown point {point!r}.\n'
            "Points are pre and post (every FFN), plus act and up (gated FFNs only)."
        )
    return point


def site_name(layer: int | str, point: str | None = None, *, n_layers: int | None = None) -> str:
    """Full site name ``layers.{layer}.ffn.{point}``; a full name is returned unchanged.

    >>> site_name(3, "pre")
    'layers.3.ffn.pre'
    >>> site_name(-1, "post", n_layers=12)
    'layers.11.ffn.post'
    >>> site_name("layers.3.ffn.pre")
    'layers.3.ffn.pre'
    """
    if isinstance(layer, str) and point is None:
        parse_site(layer)
        return layer
    if point is None:
        raise SiteError(f"site_name({layer!r}) needs a point: one of {', '.join(POINTS)}.")
    layer = resolve_layer(int(layer), n_layers)
    return f"layers.{layer}.ffn.{_check_point(point, f'layers.{layer}.ffn.{point}')}"


def parse_site(name: str) -> tuple[int, str]:
    """``"layers.3.ffn.pre"`` -> ``(3, "pre")``. The only place site names are split.

    >>> parse_site("layers.3.ffn.pre")
    (3, 'pre')
    """
    m = _SITE_RE.match(name) if isinstance(name, str) else None
    if m is None:
        raise SiteError(
            f'"{name}" is not a site name; site names look like "layers.3.ffn.pre" '
            "(layers.{layer}.ffn.{point})."
        )
    return int(m.group(1)), _check_point(m.group(2), name)


def resolve_layer(layer: int, n_layers: int | None) -> int:
    """Turn a negative layer into ``n_layers + layer`` and check the range."""
    if n_layers is None:
        if layer < 0:
            raise SiteError(f"layer {layer} is negative; pass n_layers to count from the end.")
        return layer
    if not -n_layers <= layer < n_layers:
        raise SiteError(
            f"layer {layer} is out of range: this model has {n_layers} FFN layers "
            f"(0 .. {n_layers - 1}, or -{n_layers} .. -1 from the end)."
        )
    return layer % n_layers


# ----------------------------------------------------------------------------- sites
@dataclass(frozen=True)
class FFNSite:
    """The FFN of one layer and the nnsight paths of its points.

    Attributes
    ----------
    layer : int
        0-based, in forward order.
    kind : str
        ``"plain"`` or ``"gated"`` (see the glossary: pre, post); ``"custom"`` for sites passed
        by hand.
    paths : dict[str, str]
        point -> nnsight path from the model root ending in ``.input`` / ``.output``.
    family : str
        The registry entry that matched (``"gpt2"``, ``"llama"``, ...), or ``"manual"``.
    """

    layer: int
    kind: str
    paths: dict[str, str] = field(hash=False)
    family: str = "manual"

    @property
    def points(self) -> tuple[str, ...]:
        """Points this site has, in forward order."""
        return tuple(p for p in POINTS if p in self.paths)

    def name(self, point: str) -> str:
        """``layers.{layer}.ffn.{point}``."""
        return site_name(self.layer, point)

    def path(self, point: str) -> str:
        """nnsight path of ``point`` at this site, or a ``SiteError`` listing what exists."""
        try:
            return self.paths[point]
        except KeyError:
            _check_point(point, self.name(point) if point in POINTS else point)
            raise SiteError(
                f'"{site_name(self.layer, point)}": this {self.kind} FFN has no {point!r} point '
                f"(it has {', '.join(self.points)}). act and up exist only for gated FFNs."
            ) from None


@dataclass(frozen=True)
class Family:
    """Block-relative point paths of one architecture family."""

    name: str
    kind: str
    points: dict[str, str]
    model_types: tuple[str, ...]

    @property
    def anchor(self) -> str:
        """A module path (block-relative) every block of this family has."""
        return self.points["pre"].rsplit(".", 1)[0]


_GATED = {
    "pre": "mlp.act_fn.input",
    "act": "mlp.act_fn.output",
    "up": "mlp.up_proj.output",
    "post": "mlp.down_proj.input",
}

#: The registry: the only code that knows native module paths.
FAMILIES: tuple[Family, ...] = (
    Family("gpt2", "plain", {"pre": "mlp.act.input", "post": "mlp.act.output"},
           ("gpt2", "gpt_neox", "gptj", "gpt_bigcode", "falcon", "nerve_gpt")),
    Family("llama", "gated", _GATED,
           ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text",
            "olmo", "olmo2", "smollm3", "granite", "nerve_llama")),
    Family("bert", "plain",
           {"pre": "intermediate.intermediate_act_fn.input",
            "post": "intermediate.intermediate_act_fn.output"},
           ("bert", "roberta", "xlm-roberta", "electra")),
    Family("opt", "plain", {"pre": "activation_fn.input", "post": "activation_fn.output"},
           ("opt",)),
    Family("mixer", "plain", {"pre": "ffn.act.input", "post": "ffn.act.output"},
           ("nerve_mixer",)),
)

_FFN_NAMES = ("mlp", "ffn", "feed_forward", "feedforward", "intermediate", "mlp_block", "fc")
_ACT_HINT = re.compile(r"gelu|relu|silu|swish|tanh|sigmoid|mish|softplus|act", re.IGNORECASE)


def _model_type(model: Any) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", "") or "")


def _unwrap(model: Any) -> torch.nn.Module:
    """The torch module behind an nnsight wrapper (or the module itself)."""
    inner = getattr(model, "_module", None)
    if isinstance(inner, torch.nn.Module) and not isinstance(model, torch.nn.Module):
        return inner
    if isinstance(model, torch.nn.Module):
        return model
    raise TypeError(
        f"expected a torch.nn.Module or an nnsight wrapper; got {type(model).__name__}."
    )


def as_nnsight(model: Any) -> Any:
    """An nnsight wrapper of ``model``: the model itself if already wrapped, else one
    ``nnsight.NNsight`` per module, made once and reused (wrapping is permanent, see nnsight)."""
    import nnsight

    if not isinstance(model, torch.nn.Module):
        _unwrap(model)  # type check
        return model
    wrapper = model.__dict__.get("_nerve_interp_nnsight")
    if wrapper is None:
        with warnings.catch_warnings():  # BERT's `output` submodules become `E_output`: noise
            warnings.filterwarnings("ignore", message=".*has a submodule named 'output'")
            wrapper = nnsight.NNsight(model)
        model.__dict__["_nerve_interp_nnsight"] = wrapper
    return wrapper


def _get_module(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _layer_lists(root: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """Every ModuleList of >= 1 modules of one class, in definition order."""
    out = []
    for name, mod in root.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            if len({type(m) for m in mod}) == 1:
                out.append((name, mod))
    return out


def _strip_io(path: str) -> tuple[str, str]:
    mod, _, io = path.rpartition(".")
    if io not in ("input", "output"):
        raise SiteError(
            f"point path {path!r} must end in .input or .output (the nnsight value to read)."
        )
    return mod, io


def _sites_from_family(root: torch.nn.Module, fam: Family, prefix: str, n: int) -> list[FFNSite]:
    return [
        FFNSite(i, fam.kind, {p: f"{prefix}.{i}.{rel}" for p, rel in fam.points.items()},
                fam.name)
        for i in range(n)
    ]


def _match_family(root: torch.nn.Module) -> list[FFNSite] | None:
    mtype = _model_type(root)
    fams = sorted(FAMILIES, key=lambda f: mtype not in f.model_types)  # declared family first
    for prefix, mlist in _layer_lists(root):
        for fam in fams:
            block = mlist[0]
            if all(_get_module(block, _strip_io(rel)[0]) is not None
                   for rel in fam.points.values()):
                return _sites_from_family(root, fam, prefix, len(mlist))
    return None


def _is_activation(mod: torch.nn.Module) -> bool:
    modname = type(mod).__module__
    return (
        modname.startswith("torch.nn.modules.activation")
        or modname.startswith("transformers.activations")
        or type(mod).__name__.lower().endswith(("activation", "gelu", "relu", "silu"))
    )


def _generic_sites(root: torch.nn.Module, envoy_root: Any | None) -> list[FFNSite] | None:
    """One activation module (or function call, via .source) in each block's FFN."""
    for prefix, mlist in _layer_lists(root):
        block = mlist[0]
        acts = [n for n, m in block.named_modules() if n and _is_activation(m)]
        ffn_acts = [n for n in acts if any(part in _FFN_NAMES for part in n.split("."))]
        cands = ffn_acts or acts
        if len(cands) == 1:
            rel = cands[0]
            fam = Family("generic", "plain", {"pre": f"{rel}.input", "post": f"{rel}.output"}, ())
            return _sites_from_family(root, fam, prefix, len(mlist))
        if acts or envoy_root is None:
            continue
        for child_name, _ in block.named_children():
            if child_name not in _FFN_NAMES:
                continue
            try:
                src = envoy_root.get(f"{prefix}.0.{child_name}").source
                names = [o for o in src.names if _ACT_HINT.search(o)]
            except Exception:  # module without Python source (e.g. compiled): no source route
                continue
            if len(names) == 1:
                rel = f"{child_name}.source.{names[0]}"
                fam = Family("generic-source", "plain",
                             {"pre": f"{rel}.input", "post": f"{rel}.output"}, ())
                return _sites_from_family(root, fam, prefix, len(mlist))
    return None


def _describe(root: torch.nn.Module) -> str:
    lines = []
    lists = _layer_lists(root)
    if lists:
        lines.append("  Layer lists in this model: " + ", ".join(
            f"{p} ({len(m)} × {type(m[0]).__name__})" for p, m in lists))
        prefix, mlist = max(lists, key=lambda pm: len(pm[1]))
        block = mlist[0]
        for child_name, child in block.named_children():
            subs = ", ".join(f"{n} ({type(m).__name__})" for n, m in child.named_children())
            lines.append(f"  Modules in {prefix}.0.{child_name}: {subs or type(child).__name__}")
        example = f"{prefix}.{{layer}}"
    else:
        lines.append("  No nn.ModuleList of layers was found.")
        example = "PATH.TO.LAYERS.{layer}"
    lines.append("  Name the points yourself:")
    lines.append(
        f'    ni.find_ffn_sites(model, pre="{example}.mlp.act.input", '
        f'post="{example}.mlp.act.output")'
    )
    lines.append("  (use MODULE.source.OP_0.input/.output when the activation is a function call;"
                 " print(nnsight.NNsight(model).get('MODULE').source) lists the ops)")
    return "\n".join(lines)


def _manual_sites(
    root: torch.nn.Module, templates: dict[str, str], envoy_root: Any | None
) -> list[FFNSite]:
    for point, tpl in templates.items():
        _check_point(point, point)
        if "{layer}" not in tpl:
            raise SiteError(
                f"{point}={tpl!r} has no {{layer}} placeholder; write the path of layer i as a "
                'template, e.g. "transformer.h.{layer}.mlp.act.input".'
            )
        _strip_io(tpl)
    if "pre" not in templates or "post" not in templates:
        raise SiteError("pass at least pre= and post= path templates (act= and up= optional).")

    def exists(path: str) -> bool:
        mod_path = _strip_io(path)[0]
        if ".source." in mod_path:
            return _get_module(root, mod_path.split(".source.")[0]) is not None
        return _get_module(root, mod_path) is not None

    n = 0
    while all(exists(t.format(layer=n)) for t in templates.values()):
        n += 1
    if n == 0:
        bad = {p: t.format(layer=0) for p, t in templates.items() if not exists(t.format(layer=0))}
        raise SiteError(
            f"no module at {bad} in {type(root).__name__}; check the paths against "
            "[name for name, _ in model.named_modules()].\n" + _describe(root)
        )
    kind = "gated" if {"act", "up"} & set(templates) else "custom"
    return [FFNSite(i, kind, {p: t.format(layer=i) for p, t in templates.items()}, "manual")
            for i in range(n)]


def find_ffn_sites(
    model: Any,
    *,
    pre: str | None = None,
    post: str | None = None,
    act: str | None = None,
    up: str | None = None,
) -> list[FFNSite]:
    """Find the FFN site of every layer of ``model``.

    Parameters
    ----------
    model : torch.nn.Module or nnsight wrapper
        A Hugging Face model (GPT-2, GPT-NeoX/Pythia, LLaMA/Mistral/Qwen2/SmolLM2, Gemma-3,
        BERT/MiniLM, OPT, ...), one of nerve_interp's own models, or any module whose blocks
        hold exactly one activation module (or activation function call) in their FFN.
    pre, post, act, up : str, optional
        Pass sites by hand: nnsight path templates with a ``{layer}`` placeholder, ending in
        ``.input`` or ``.output``, e.g. ``pre="encoder.blocks.{layer}.mlp.act.input"``.
        Layers are counted until a path no longer exists.

    Returns
    -------
    list of FFNSite
        One per layer, in forward order.

    Raises
    ------
    UnknownArchitectureError
        When no FFN can be found; the message lists the layer lists and FFN modules it saw
        and the call that names the points by hand.

    Examples
    --------
    >>> import transformers as T
    >>> cfg = T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)
    >>> sites = find_ffn_sites(T.GPT2LMHeadModel(cfg))
    >>> sites[1].paths["pre"], sites[1].kind
    ('transformer.h.1.mlp.act.input', 'plain')
    """
    root = _unwrap(model)
    envoy_root = None if isinstance(model, torch.nn.Module) else model
    manual = {k: v for k, v in dict(pre=pre, post=post, act=act, up=up).items() if v is not None}
    if manual:
        return _manual_sites(root, manual, envoy_root)
    sites = _match_family(root)
    if sites is None:
        if envoy_root is None:  # the .source route of function-call activations needs nnsight
            envoy_root = as_nnsight(root)
        sites = _generic_sites(root, envoy_root)
    if sites is None:
        known = ", ".join(sorted({t for f in FAMILIES for t in f.model_types}))
        mtype = _model_type(root) or "none"
        raise UnknownArchitectureError(
            f"no FFN sites found in {type(root).__name__} (model_type {mtype!r}).\n"
            f"  Known families: {known}.\n" + _describe(root)
        )
    return sites


def select_sites(
    sites: Sequence[FFNSite], layers: int | Iterable[int] | Callable[[FFNSite], bool] | None
) -> list[FFNSite]:
    """Pick sites by layer index (negative counts from the end), a list, or a predicate."""
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return list(sites)
    if callable(layers):
        chosen = [s for s in sites if layers(s)]
    else:
        idx = [layers] if isinstance(layers, int) else list(layers)
        n = len(sites)
        resolved = sorted({resolve_layer(int(i), n) for i in idx})
        chosen = [sites[i] for i in resolved]
    if not chosen:
        raise SiteError(f"layers={layers!r} selects no layer (the model has {len(sites)}).")
    return chosen


__all__ = [
    "FAMILIES",
    "as_nnsight",
    "FFNSite",
    "POINTS",
    "find_ffn_sites",
    "parse_site",
    "resolve_layer",
    "select_sites",
    "site_name",
]
