"""Small, configurable models for controlled spectral experiments (the papers' architecture axes).

Two model families, written so that :func:`nerve_interp.find_ffn_sites` finds their FFNs by
the registry (``nerve_interp.sites.FAMILIES``) without any configuration:

``TinyLM``
    A decoder-only causal language model. One :class:`LMConfig` spans the axes of [NerVE] and
    [SSL]: norm placement (Pre-LN, Post-LN, Mix-LN, none), norm type (LayerNorm, RMSNorm),
    activation (GELU, ReLU, SiLU, SwiGLU, GeGLU), FFN width, position encoding (learned, RoPE,
    none = NoPE) and a simplified nGPT. Blocks live in ``model.layers``; plain FFNs are
    ``mlp.fc_in -> mlp.act -> mlp.fc_out`` (``model_type == "nerve_gpt"``), gated FFNs are
    ``mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))``
    (``model_type == "nerve_llama"``).
``MLPMixer``
    An MLP-Mixer for small images (8x8 digits by default). Each block has a token-mixing MLP
    ``token_mlp`` ([NerVE]'s FFN1) and a channel-mixing MLP ``ffn`` ([NerVE]'s FFN2, the one
    the paper plots and the one the ``nerve_mixer`` family reads).

Every model is randomly initialised (GPT-2 style: normal(0, 0.02), residual output
projections scaled by ``1/sqrt(2 * n_layers)``); nothing is downloaded.

Examples
--------
>>> import nerve_interp as ni
>>> model = make_lm("tiny", activation="swiglu", norm="mix_ln", n_layers=4)
>>> model.config.model_type, [blk.norm_position for blk in model.layers]
('nerve_llama', ['post_ln', 'pre_ln', 'pre_ln', 'pre_ln'])
>>> [s.kind for s in ni.find_ffn_sites(model)]
['gated', 'gated', 'gated', 'gated']
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._warnings import user_stacklevel

#: Norm placements: Pre-LN, Post-LN, Mix-LN, no norm layers. Deliberately not ``pre`` /
#: ``post``, which name FFN points (before / after the nonlinearity) everywhere else.
NORMS: tuple[str, ...] = ("pre_ln", "post_ln", "mix_ln", "none")
#: Old spellings of :data:`NORMS`, still accepted with a DeprecationWarning.
DEPRECATED_NORMS: dict[str, str] = {"pre": "pre_ln", "post": "post_ln", "mix": "mix_ln"}
NORM_TYPES: tuple[str, ...] = ("layernorm", "rmsnorm")
PLAIN_ACTIVATIONS: tuple[str, ...] = ("gelu", "relu", "silu")
GATED_ACTIVATIONS: tuple[str, ...] = ("swiglu", "geglu")
ACTIVATIONS: tuple[str, ...] = PLAIN_ACTIVATIONS + GATED_ACTIVATIONS
POSITIONS: tuple[str, ...] = ("learned", "rope", "none")
INIT_STD = 0.02
ROPE_THETA = 10_000.0


# ------------------------------------------------------------------------------ checks
def _fail(cls: str, name: str, value: Any, expected: str) -> None:
    raise ValueError(f"{cls}.{name}={value!r} is invalid: expected {expected}.")


def _check_choice(cls: str, name: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        _fail(cls, name, value, "one of " + ", ".join(repr(a) for a in allowed))


def _check_int(cls: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(cls, name, value, f"an int >= {minimum}")


def _check_bool(cls: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(cls, name, value, "True or False")


def _check_dropout(cls: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        _fail(cls, "dropout", value, "a float in [0, 1)")


def _activation_module(name: str) -> nn.Module:
    """The activation module of a (plain or gated) activation name."""
    return {"gelu": nn.GELU, "geglu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU,
            "swiglu": nn.SiLU}[name]()


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Initialise under ``seed`` without touching the global RNG (no-op for None)."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def norm_placement(norm: Any, *, warn: bool = True) -> Any:
    """The current spelling of a norm placement: ``"pre"`` -> ``"pre_ln"``, ``"post"`` ->
    ``"post_ln"``, ``"mix"`` -> ``"mix_ln"``; any other value is returned unchanged (and
    validated by the config).

    The one place old spellings are mapped. With ``warn`` an old spelling raises a
    :class:`DeprecationWarning` naming the new one, at the user's line; loaders of saved
    results map silently.

    >>> norm_placement("pre_ln"), norm_placement("post", warn=False)
    ('pre_ln', 'post_ln')
    """
    if not isinstance(norm, str) or norm not in DEPRECATED_NORMS:
        return norm
    new = DEPRECATED_NORMS[norm]
    if warn:
        warnings.warn(f"norm={norm!r} is deprecated: norm placements are spelled "
                      f"{', '.join(map(repr, NORMS))} ('pre' / 'post' name FFN points); "
                      f"use norm={new!r}.", DeprecationWarning, stacklevel=user_stacklevel())
    return new


# ------------------------------------------------------------------------------ configs
class _HFAliases:
    """Hugging Face config names for the fields generic code reads (both configs)."""

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def hidden_size(self) -> int:
        return self.d_model


@dataclass
class LMConfig(_HFAliases):
    """Architecture of a :class:`TinyLM`; validated at construction.

    Parameters
    ----------
    vocab_size : int
        Number of token ids (>= 2).
    d_model : int
        Residual-stream width.
    n_layers : int
        Number of transformer blocks.
    n_heads : int
        Attention heads; must divide ``d_model`` (and ``d_model / n_heads`` must be even for
        RoPE).
    d_ff : int, optional
        FFN hidden width D (the width of every capture point). If None it is
        ``round(ffn_mult * d_model)``.
    ffn_mult : float, optional
        FFN width as a multiple of ``d_model`` ([NerVE]'s ``mlp_width_mult``); 4.0 when neither
        ``d_ff`` nor ``ffn_mult`` is given. If both are given they must agree.
    max_seq_len : int
        Longest sequence (size of the learned position table; a bound for RoPE / NoPE too).
    norm : {"pre_ln", "post_ln", "mix_ln", "none"}
        Norm placement. ``"pre_ln"``: ``x + f(norm(x))``; ``"post_ln"``: ``norm(x + f(x))``;
        ``"mix_ln"`` (Mix-LN, Li et al. 2024): Post-LN in the first ``mix_post_layers``
        blocks, Pre-LN after; ``"none"``: no norm layers at all ([NerVE]'s "free").
        A final norm before the LM head exists when the last block is Pre-LN. The old
        spellings ``"pre"``, ``"post"``, ``"mix"`` still work with a DeprecationWarning.
    norm_type : {"layernorm", "rmsnorm"}
        ``nn.LayerNorm`` (eps 1e-5, with a bias when ``bias``) or ``nn.RMSNorm`` (eps 1e-6).
    activation : {"gelu", "relu", "silu", "swiglu", "geglu"}
        ``swiglu`` / ``geglu`` give a gated FFN (SiLU / GELU gate), the others a plain one.
    pos : {"learned", "rope", "none"}
        Learned absolute position embeddings (GPT-2), rotary embeddings on q and k (LLaMA,
        theta 10000, rotate-half convention) or no position information (NoPE; the causal
        mask alone carries order).
    ngpt : bool
        A simplified nGPT (Loshchilov et al. 2024): see :class:`TinyLM`. Needs ``norm="none"``
        (the hypersphere normalisation replaces the norm layers).
    bias : bool
        Biases in every Linear (and LayerNorm).
    tie_embeddings : bool
        Share the token embedding and LM-head weights.
    dropout : float
        Dropout on attention weights and on each residual branch (training only).
    mix_post_layers : int, optional
        Only for ``norm="mix_ln"``: how many leading blocks are Post-LN; default
        ``max(1, n_layers // 4)``.

    Attributes
    ----------
    model_type : str
        ``"nerve_llama"`` for gated activations, else ``"nerve_gpt"`` (selects the
        :mod:`nerve_interp.sites` family).
    gated : bool
        Whether the FFN is gated.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int | None = None
    ffn_mult: float | None = None
    max_seq_len: int = 64
    norm: str = "pre_ln"
    norm_type: str = "layernorm"
    activation: str = "gelu"
    pos: str = "learned"
    ngpt: bool = False
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    mix_post_layers: int | None = None

    def __post_init__(self) -> None:
        c = "LMConfig"
        # user -> __init__ -> __post_init__: the warning points at the user's line
        self.norm = norm_placement(self.norm)
        _check_int(c, "vocab_size", self.vocab_size, 2)
        _check_int(c, "d_model", self.d_model, 1)
        _check_int(c, "n_layers", self.n_layers, 1)
        _check_int(c, "n_heads", self.n_heads, 1)
        _check_int(c, "max_seq_len", self.max_seq_len, 1)
        _check_choice(c, "norm", self.norm, NORMS)
        _check_choice(c, "norm_type", self.norm_type, NORM_TYPES)
        _check_choice(c, "activation", self.activation, ACTIVATIONS)
        _check_choice(c, "pos", self.pos, POSITIONS)
        for name in ("ngpt", "bias", "tie_embeddings"):
            _check_bool(c, name, getattr(self, name))
        _check_dropout(c, self.dropout)
        if self.d_model % self.n_heads:
            _fail(c, "n_heads", self.n_heads, f"a divisor of d_model={self.d_model}")
        if self.pos == "rope" and (self.d_model // self.n_heads) % 2:
            _fail(c, "n_heads", self.n_heads,
                  f"a value giving an even head dim for pos='rope' (d_model={self.d_model} / "
                  f"n_heads={self.n_heads} = {self.d_model // self.n_heads} is odd)")
        if self.ffn_mult is not None:
            if (isinstance(self.ffn_mult, bool) or not isinstance(self.ffn_mult, int | float)
                    or not self.ffn_mult > 0):
                _fail(c, "ffn_mult", self.ffn_mult, "a float > 0")
        if self.d_ff is None:
            mult = 4.0 if self.ffn_mult is None else float(self.ffn_mult)
            self.d_ff = max(1, round(mult * self.d_model))
        else:
            _check_int(c, "d_ff", self.d_ff, 1)
            if self.ffn_mult is not None and self.d_ff != round(self.ffn_mult * self.d_model):
                _fail(c, "d_ff", self.d_ff,
                      f"round(ffn_mult * d_model) = round({self.ffn_mult} * {self.d_model}) = "
                      f"{round(self.ffn_mult * self.d_model)}, or pass only one of d_ff and "
                      "ffn_mult")
        if self.mix_post_layers is not None:
            if self.norm != "mix_ln":
                _fail(c, "mix_post_layers", self.mix_post_layers,
                      f"None when norm={self.norm!r} (it only applies to norm='mix_ln')")
            _check_int(c, "mix_post_layers", self.mix_post_layers, 0)
            if self.mix_post_layers > self.n_layers:
                _fail(c, "mix_post_layers", self.mix_post_layers,
                      f"an int in [0, n_layers={self.n_layers}]")
        if self.ngpt and self.norm != "none":
            _fail(c, "norm", self.norm,
                  "'none' when ngpt=True (nGPT's hypersphere normalisation replaces the norm "
                  "layers); make_lm(..., ngpt=True) sets it for you")

    # -- derived ---------------------------------------------------------------------
    @property
    def gated(self) -> bool:
        """Whether the FFN is gated (SwiGLU / GeGLU)."""
        return self.activation in GATED_ACTIVATIONS

    @property
    def model_type(self) -> str:
        """``"nerve_llama"`` (gated FFN) or ``"nerve_gpt"`` (plain FFN)."""
        return "nerve_llama" if self.gated else "nerve_gpt"

    @property
    def head_dim(self) -> int:
        """``d_model // n_heads``."""
        return self.d_model // self.n_heads

    @property
    def n_post_layers(self) -> int:
        """Number of leading Post-LN blocks (all for ``"post_ln"``, none for ``"pre_ln"`` /
        ``"none"``)."""
        if self.norm == "post_ln":
            return self.n_layers
        if self.norm == "mix_ln":
            if self.mix_post_layers is None:
                return max(1, self.n_layers // 4)
            return self.mix_post_layers
        return 0

    def block_norm(self, layer: int) -> str:
        """Norm placement of block ``layer``: ``"pre_ln"``, ``"post_ln"`` or ``"none"``."""
        if self.norm == "none":
            return "none"
        return "post_ln" if layer < self.n_post_layers else "pre_ln"

    # Hugging Face-style aliases, read by generic code (e.g. ablations read vocab_size).
    is_decoder = True

    @property
    def intermediate_size(self) -> int:
        return int(self.d_ff)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields plus ``model_type`` (JSON-serialisable)."""
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LMConfig:
        """Inverse of :meth:`to_dict` (``model_type`` is derived, so it is ignored). A dict
        saved with an old norm spelling (``"pre"``, ...) loads as the new one, silently."""
        return cls(**_load_fields(d))


@dataclass
class MixerConfig(_HFAliases):
    """Architecture of an :class:`MLPMixer`; validated at construction.

    Parameters
    ----------
    image_size : int
        Height = width of the input images (8 for scikit-learn's digits).
    patch_size : int
        Side of the square patches; must divide ``image_size``. Patches are the "tokens":
        ``n_patches = (image_size / patch_size)**2``.
    channels : int
        Image channels.
    n_classes : int
        Output classes.
    d_model : int
        Channel (hidden) width of the patch embeddings.
    n_layers : int
        Mixer blocks.
    token_mlp_dim : int
        Hidden width of the token-mixing MLP (FFN1).
    channel_mlp_dim : int
        Hidden width of the channel-mixing MLP (FFN2, the ``ffn`` site).
    activation : {"gelu", "relu", "silu"}
        Activation of both MLPs.
    norm : {"pre_ln", "post_ln", "none"}
        Norm placement in each block (Mixer uses ``"pre_ln"``). The old spellings ``"pre"``,
        ``"post"`` still work with a DeprecationWarning.
    norm_type : {"layernorm", "rmsnorm"}
        Norm type.
    dropout : float
        Dropout on each residual branch (training only).
    """

    image_size: int = 8
    patch_size: int = 2
    channels: int = 1
    n_classes: int = 10
    d_model: int = 64
    n_layers: int = 4
    token_mlp_dim: int = 32
    channel_mlp_dim: int = 256
    activation: str = "gelu"
    norm: str = "pre_ln"
    norm_type: str = "layernorm"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        c = "MixerConfig"
        self.norm = norm_placement(self.norm)
        for name in ("image_size", "patch_size", "channels", "d_model", "n_layers",
                     "token_mlp_dim", "channel_mlp_dim"):
            _check_int(c, name, getattr(self, name), 1)
        _check_int(c, "n_classes", self.n_classes, 2)
        _check_choice(c, "activation", self.activation, PLAIN_ACTIVATIONS)
        _check_choice(c, "norm", self.norm, ("pre_ln", "post_ln", "none"))
        _check_choice(c, "norm_type", self.norm_type, NORM_TYPES)
        _check_dropout(c, self.dropout)
        if self.image_size % self.patch_size:
            _fail(c, "patch_size", self.patch_size, f"a divisor of image_size={self.image_size}")

    model_type = "nerve_mixer"
    is_decoder = False

    @property
    def n_patches(self) -> int:
        """Number of patches (tokens) per image."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        """Values per patch: ``channels * patch_size**2``."""
        return self.channels * self.patch_size ** 2

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields plus ``model_type``."""
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MixerConfig:
        """Inverse of :meth:`to_dict` (old norm spellings load as the new ones)."""
        return cls(**_load_fields(d))


def _load_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    """Config fields of a saved dict: without ``model_type``, old norm spellings mapped."""
    fields = {k: v for k, v in d.items() if k != "model_type"}
    if "norm" in fields:
        fields["norm"] = norm_placement(fields["norm"], warn=False)
    return fields


# ------------------------------------------------------------------------------ layers
class NormLinear(nn.Linear):
    """A Linear whose weight vectors are unit-normalised in every forward pass (nGPT).

    ``norm_dim=1`` normalises each output unit's weight row (matrices that read the
    ``d_model``-dimensional hidden state); ``norm_dim=0`` each column (matrices that write
    into it), so every vector along the embedding dimension lies on the unit sphere.
    """

    def __init__(self, d_in: int, d_out: int, bias: bool, norm_dim: int) -> None:
        super().__init__(d_in, d_out, bias=bias)
        self.norm_dim = norm_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=self.norm_dim), self.bias)


def _linear(cfg: LMConfig, d_in: int, d_out: int, side: str) -> nn.Linear:
    """``side="in"``: reads the hidden state; ``"out"``: writes it (matters for nGPT only)."""
    if cfg.ngpt:
        return NormLinear(d_in, d_out, cfg.bias, norm_dim=1 if side == "in" else 0)
    return nn.Linear(d_in, d_out, bias=cfg.bias)


def _norm(kind: str, d: int, bias: bool) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(d, eps=1e-6)
    return nn.LayerNorm(d, eps=1e-5, bias=bias)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = ROPE_THETA,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for ``positions`` ``[B, T]``: cos and sin, each ``[B, 1, T, head_dim]``."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                       dtype=torch.float32) / head_dim)
    freqs = positions.to(torch.float32)[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention (``scaled_dot_product_attention``), optional RoPE."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.head_dim, cfg.dropout
        self.ngpt = cfg.ngpt
        self.qkv = _linear(cfg, cfg.d_model, 3 * cfg.d_model, "in")
        self.out_proj = _linear(cfg, cfg.d_model, cfg.d_model, "out")
        if cfg.ngpt:  # nGPT's s_qk, at its effective initial value 1
            self.qk_scale = nn.Parameter(torch.ones(cfg.n_heads, 1, cfg.head_dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """``x`` ``[B, T, d_model]``; ``mask`` ``[B, 1, T, T]`` bool (True = attend) or None
        for plain causal attention; ``rope`` the tables of :func:`rope_cos_sin`."""
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
                   for z in self.qkv(x).split(d, dim=-1))
        if rope is not None:
            cos, sin = rope
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        scale = None
        if self.ngpt:
            q = F.normalize(q, dim=-1) * self.qk_scale
            k = F.normalize(k, dim=-1) * self.qk_scale
            scale = math.sqrt(self.head_dim)
        p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """Plain FFN ``fc_out(act(fc_in(x)))``; ``act`` is a module so its input (``pre``) and
    output (``post``) are hookable.

    Under nGPT the activation input is ``s * sqrt(d_model) * fc_in(x)`` (nGPT's ``s_v``).
    """

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool = True,
                 cfg: LMConfig | None = None) -> None:
        super().__init__()
        if cfg is not None:
            self.fc_in = _linear(cfg, d_model, d_ff, "in")
            self.fc_out = _linear(cfg, d_ff, d_model, "out")
        else:
            self.fc_in = nn.Linear(d_model, d_ff, bias=bias)
            self.fc_out = nn.Linear(d_ff, d_model, bias=bias)
        self.act = _activation_module(activation)
        self.ngpt = cfg is not None and cfg.ngpt
        if self.ngpt:
            self.act_scale = nn.Parameter(torch.ones(d_ff))
            self.act_scale_factor = math.sqrt(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_model] -> [..., d_model]`` through the ``[..., d_ff]`` hidden layer."""
        h = self.fc_in(x)
        if self.ngpt:
            h = h * (self.act_scale * self.act_scale_factor)
        return self.fc_out(self.act(h))


class GatedFeedForward(nn.Module):
    """Gated FFN ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, computed in that order
    (gate, activation, up, product, down), as LLaMA does.

    Under nGPT the gate is scaled by ``s_v * sqrt(d_model)`` before ``act_fn`` and the up
    projection by ``s_u`` (both learnable, initial value 1).
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.gate_proj = _linear(cfg, cfg.d_model, cfg.d_ff, "in")
        self.up_proj = _linear(cfg, cfg.d_model, cfg.d_ff, "in")
        self.down_proj = _linear(cfg, cfg.d_ff, cfg.d_model, "out")
        self.act_fn = _activation_module(cfg.activation)
        self.ngpt = cfg.ngpt
        if self.ngpt:
            self.gate_scale = nn.Parameter(torch.ones(cfg.d_ff))
            self.up_scale = nn.Parameter(torch.ones(cfg.d_ff))
            self.gate_scale_factor = math.sqrt(cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_model] -> [..., d_model]`` through the ``[..., d_ff]`` hidden layer."""
        g = self.gate_proj(x)
        if self.ngpt:
            g = g * (self.gate_scale * self.gate_scale_factor)
        a = self.act_fn(g)
        u = self.up_proj(x)
        if self.ngpt:
            u = u * self.up_scale
        return self.down_proj(a * u)


class Block(nn.Module):
    """One transformer block: attention then FFN, each with its residual and norm.

    Attributes
    ----------
    norm_position : str
        ``"pre_ln"`` (``x + f(ln(x))``), ``"post_ln"`` (``ln(x + f(x))``) or ``"none"``; under
        nGPT ``"none"`` and the update is ``normalize(x + alpha * (normalize(f(x)) - x))``.
    post_ln : bool
        ``norm_position == "post_ln"``.
    """

    def __init__(self, cfg: LMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.norm_position = cfg.block_norm(layer)
        self.post_ln = self.norm_position == "post_ln"
        self.ngpt = cfg.ngpt
        make = (lambda: _norm(cfg.norm_type, cfg.d_model, cfg.bias)) \
            if self.norm_position != "none" else nn.Identity
        self.ln_1, self.ln_2 = make(), make()
        self.attn = Attention(cfg)
        self.mlp = GatedFeedForward(cfg) if cfg.gated else FeedForward(
            cfg.d_model, int(cfg.d_ff), cfg.activation, cfg=cfg)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.ngpt:  # nGPT's eigen learning rates alpha_A, alpha_M at their initial 0.05
            self.alpha_attn = nn.Parameter(torch.full((cfg.d_model,), 0.05))
            self.alpha_mlp = nn.Parameter(torch.full((cfg.d_model,), 0.05))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``[B, T, d_model] -> [B, T, d_model]``."""
        if self.ngpt:
            a = F.normalize(self.drop(self.attn(x, mask, rope)), dim=-1)
            x = F.normalize(x + self.alpha_attn * (a - x), dim=-1)
            m = F.normalize(self.drop(self.mlp(x)), dim=-1)
            return F.normalize(x + self.alpha_mlp * (m - x), dim=-1)
        if self.post_ln:
            x = self.ln_1(x + self.drop(self.attn(x, mask, rope)))
            return self.ln_2(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.ln_1(x), mask, rope))
        return x + self.drop(self.mlp(self.ln_2(x)))


def _output(cls_name: str, loss: torch.Tensor | None, logits: torch.Tensor) -> Any:
    from transformers import modeling_outputs as mo

    return getattr(mo, cls_name)(loss=loss, logits=logits)


def _init_weights(model: nn.Module, residual_out: tuple[str, ...], n_layers: int) -> None:
    """GPT-2 init: Linear / Embedding ~ N(0, 0.02), biases 0, residual outputs / sqrt(2L)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            std = INIT_STD
            if name.rsplit(".", 1)[-1] in residual_out:
                std = INIT_STD / math.sqrt(2 * n_layers)
            nn.init.normal_(mod.weight, 0.0, std)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Embedding):
            nn.init.normal_(mod.weight, 0.0, INIT_STD)


# ------------------------------------------------------------------------------ TinyLM
class TinyLM(nn.Module):
    """A decoder-only causal language model built from an :class:`LMConfig`.

    Parameters
    ----------
    config : LMConfig
        The architecture.
    seed : int, optional
        Seed for the initial weights; the global RNG is left untouched. If None the weights
        come from torch's global RNG.
    name : str, optional
        Label used in results (``nerve_interp_info["name"]``).

    Attributes
    ----------
    config : LMConfig
        Also answers ``model_type`` (``"nerve_gpt"`` / ``"nerve_llama"``) and ``to_dict()``.
    embed_tokens : nn.Embedding
    embed_positions : nn.Embedding or None
        Only for ``pos="learned"``.
    layers : nn.ModuleList of Block
        ``layers[i].mlp`` is the FFN site of layer i.
    norm : nn.Module
        Final norm (Identity unless the last block is Pre-LN).
    lm_head : nn.Linear
        ``d_model -> vocab_size``, no bias; tied to ``embed_tokens`` if ``tie_embeddings``.

    Notes
    -----
    Padding: position ids count real tokens, ``cumsum(attention_mask) - 1``, so a left- or
    right-padded row gives the same logits on its real tokens as the unpadded row. Padded keys
    are masked; every query may also attend to itself, which keeps fully padded query rows
    finite without touching real tokens.

    nGPT (``ngpt=True``) is a simplified version of Loshchilov et al. (2024), "nGPT: Normalized
    Transformer with Representation Learning on the Hypersphere": token embeddings, hidden
    states and every weight vector along the embedding dimension are unit-normalised; q and k
    are normalised per head and scaled by a learnable ``s_qk`` with softmax scale
    ``sqrt(head_dim)``; each residual update is ``h <- normalize(h + alpha * (normalize(f(h)) -
    h))``; the FFN pre-activations are scaled by ``s_v * sqrt(d_model)`` (and the up branch by
    ``s_u``); logits are scaled by a learnable ``s_z``. Simplifications: weights are normalised
    inside the forward pass (a reparametrisation) instead of being projected back to the sphere
    after each optimiser step, and the scale vectors are plain parameters at nGPT's effective
    initial values (1 and alpha = 0.05), without nGPT's init/scale split.

    Examples
    --------
    >>> model = TinyLM(LMConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2), seed=0)
    >>> ids = torch.randint(0, 50, (3, 10))
    >>> out = model(ids, labels=ids)
    >>> tuple(out.logits.shape), bool(out.loss > 3.5)
    ((3, 10, 50), True)
    """

    def __init__(self, config: LMConfig, *, seed: int | None = None,
                 name: str | None = None) -> None:
        if not isinstance(config, LMConfig):
            raise TypeError(f"config must be an LMConfig; got {type(config).__name__}.")
        super().__init__()
        self.config = config
        with _seeded(seed):
            self._build(config)
        self.nerve_interp_info = {"name": name or f"TinyLM-{config.model_type}",
                                  "source": "nerve_interp.models (random init)"}

    def _build(self, cfg: LMConfig) -> None:
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = (nn.Embedding(cfg.max_seq_len, cfg.d_model)
                                if cfg.pos == "learned" else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        final_pre = not cfg.ngpt and cfg.block_norm(cfg.n_layers - 1) == "pre_ln"
        self.norm = _norm(cfg.norm_type, cfg.d_model, cfg.bias) if final_pre else nn.Identity()
        self.lm_head = (NormLinear(cfg.d_model, cfg.vocab_size, False, norm_dim=1) if cfg.ngpt
                        else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False))
        if cfg.ngpt:  # nGPT's s_z at its effective initial value 1
            self.logit_scale = nn.Parameter(torch.ones(cfg.vocab_size))
        _init_weights(self, ("out_proj", "fc_out", "down_proj"), cfg.n_layers)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> Any:
        """Next-token logits and, with ``labels``, the mean cross-entropy.

        Parameters
        ----------
        input_ids : LongTensor, shape (B, T)
            Token ids, ``T <= max_seq_len``.
        attention_mask : Tensor, shape (B, T), optional
            1 for real tokens, 0 for padding (left or right).
        labels : LongTensor, shape (B, T), optional
            Usually ``input_ids``. Position t predicts ``labels[:, t + 1]``; pairs where either
            token is padding, or whose label is -100, are ignored.

        Returns
        -------
        transformers.modeling_outputs.CausalLMOutput
            ``.logits`` (B, T, vocab_size) and ``.loss`` (scalar, or None without labels).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}.")
        b, t = input_ids.shape
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} > max_seq_len={self.config.max_seq_len}.")
        dev = input_ids.device
        if attention_mask is None:
            mask = None
            positions = torch.arange(t, device=dev).expand(b, t)
        else:
            if tuple(attention_mask.shape) != (b, t):
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match "
                                 f"input_ids {(b, t)}.")
            keep = attention_mask.to(dev).bool()
            positions = (keep.long().cumsum(1) - 1).clamp(min=0)
            causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
            eye = torch.eye(t, dtype=torch.bool, device=dev)
            mask = ((causal & keep[:, None, :]) | eye)[:, None]
        x = self.embed_tokens(input_ids)
        if self.config.ngpt:
            x = F.normalize(x, dim=-1)  # = rows of the normalised embedding matrix
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
            if self.config.ngpt:
                x = F.normalize(x, dim=-1)
        x = self.drop(x)
        rope = (rope_cos_sin(positions, self.config.head_dim, dtype=x.dtype)
                if self.config.pos == "rope" else None)
        for block in self.layers:
            x = block(x, mask, rope)
        logits = self.lm_head(self.norm(x))
        if self.config.ngpt:
            logits = logits * self.logit_scale
        loss = None
        if labels is not None:
            target = labels[:, 1:].to(dev).clone()
            if attention_mask is not None:
                target[~(keep[:, :-1] & keep[:, 1:])] = -100
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   target.reshape(-1), ignore_index=-100)
        return _output("CausalLMOutput", loss, logits)


# ------------------------------------------------------------------------------ presets
#: Named configurations. "tiny" / "small" run on a CPU; the others are the papers' shapes.
#: llama-70m / llama-130m: the LLaMA configs of GaLore / Mix-LN (``configs/llama_71m.json``,
#: ``llama_130m.json`` in jiaweizzhao/GaLore): 32k vocab, untied, SwiGLU, RMSNorm, RoPE.
#: gpt2-small: GPT-2 124M (NerVE's baseline; NerVE trains with context 128).
PRESETS: dict[str, LMConfig] = {
    "tiny": LMConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, ffn_mult=4.0,
                     max_seq_len=64),
    "small": LMConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, ffn_mult=4.0,
                      max_seq_len=128),
    "llama-70m": LMConfig(vocab_size=32000, d_model=512, n_layers=12, n_heads=8, d_ff=1368,
                          max_seq_len=1024, norm="pre_ln", norm_type="rmsnorm",
                          activation="swiglu", pos="rope", bias=False, tie_embeddings=False),
    "llama-130m": LMConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, d_ff=2048,
                           max_seq_len=1024, norm="pre_ln", norm_type="rmsnorm",
                           activation="swiglu", pos="rope", bias=False, tie_embeddings=False),
    "gpt2-small": LMConfig(vocab_size=50257, d_model=768, n_layers=12, n_heads=12,
                           ffn_mult=4.0, max_seq_len=1024, norm="pre_ln", norm_type="layernorm",
                           activation="gelu", pos="learned", bias=True, tie_embeddings=True),
}


def _resolve_config(preset_or_config: str | LMConfig, overrides: dict[str, Any]) -> LMConfig:
    if isinstance(preset_or_config, LMConfig):
        base = preset_or_config
    elif isinstance(preset_or_config, str) and preset_or_config in PRESETS:
        base = PRESETS[preset_or_config]
    else:
        raise ValueError(f"preset_or_config={preset_or_config!r} is neither an LMConfig nor a "
                         f"preset; presets are {', '.join(PRESETS)}.")
    names = {f.name for f in dataclasses.fields(LMConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"make_lm() got unknown config field(s) {', '.join(unknown)}; "
                        f"LMConfig fields are {', '.join(sorted(names))}.")
    if "norm" in overrides:
        # user -> make_lm -> _resolve_config: the warning points at the user's line
        overrides["norm"] = norm_placement(overrides["norm"])
    fields = dataclasses.asdict(base)
    if "d_ff" in overrides and "ffn_mult" not in overrides:
        fields["ffn_mult"] = None  # an explicit width replaces the preset's multiplier
    if ("d_model" in overrides or "ffn_mult" in overrides) and "d_ff" not in overrides \
            and (overrides.get("ffn_mult", fields["ffn_mult"]) is not None):
        fields["d_ff"] = None  # recompute from the multiplier
    if "norm" in overrides and overrides["norm"] != "mix_ln" and "mix_post_layers" not in overrides:
        fields["mix_post_layers"] = None
    if overrides.get("ngpt") and "norm" not in overrides:
        fields["norm"] = "none"
        fields["mix_post_layers"] = None
    fields.update(overrides)
    return LMConfig(**fields)


def make_lm(preset_or_config: str | LMConfig = "tiny", *, seed: int | None = 0,
            **overrides: Any) -> TinyLM:
    """Build a randomly initialised :class:`TinyLM` from a preset or config plus overrides.

    Parameters
    ----------
    preset_or_config : str or LMConfig, default "tiny"
        A key of :data:`PRESETS` (``"tiny"``, ``"small"``, ``"llama-70m"``, ``"llama-130m"``,
        ``"gpt2-small"``) or an :class:`LMConfig`.
    seed : int or None, default 0
        Seed of the initial weights (None: torch's global RNG).
    **overrides
        LMConfig fields to replace, e.g. ``activation="relu", norm="post_ln", d_ff=512``.
        Overriding ``d_model`` or ``ffn_mult`` recomputes ``d_ff`` when the base sets the
        width by a multiplier; ``d_ff`` alone drops the multiplier; ``ngpt=True`` without
        ``norm`` sets ``norm="none"``.

    Returns
    -------
    TinyLM
        In training mode (call ``.eval()`` for analysis). ``nerve_interp_info["name"]`` is
        e.g. ``"tiny(activation=relu)"``.

    Examples
    --------
    >>> model = make_lm("tiny", activation="relu", norm="post_ln", d_ff=512)
    >>> model.config.d_ff, model.config.model_type, model.nerve_interp_info["name"]
    (512, 'nerve_gpt', 'tiny(activation=relu,norm=post_ln,d_ff=512)')
    """
    cfg = _resolve_config(preset_or_config, overrides)
    base = preset_or_config if isinstance(preset_or_config, str) else "TinyLM"
    label = base + ("(" + ",".join(f"{k}={v}" for k, v in overrides.items()) + ")"
                    if overrides else "")
    return TinyLM(cfg, seed=seed, name=label)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters of ``model``; tied weights count once.

    >>> count_parameters(make_lm("tiny"))
    120576
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ------------------------------------------------------------------------------ Mixer
class MixerBlock(nn.Module):
    """One Mixer block: token mixing (across patches), then channel mixing (the ``ffn``).

    Attributes
    ----------
    token_mlp : FeedForward
        [NerVE]'s FFN1, applied to ``[B, d_model, n_patches]``.
    ffn : FeedForward
        [NerVE]'s FFN2 (channel mixing), applied to ``[B, n_patches, d_model]``.
    norm_position : str
        ``"pre_ln"``, ``"post_ln"`` or ``"none"``.
    """

    def __init__(self, cfg: MixerConfig) -> None:
        super().__init__()
        self.norm_position = cfg.norm
        make = (lambda: _norm(cfg.norm_type, cfg.d_model, True)) if cfg.norm != "none" \
            else nn.Identity
        self.norm_1, self.norm_2 = make(), make()
        self.token_mlp = FeedForward(cfg.n_patches, cfg.token_mlp_dim, cfg.activation)
        self.ffn = FeedForward(cfg.d_model, cfg.channel_mlp_dim, cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.token_mlp(x.transpose(1, 2)).transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, n_patches, d_model] -> [B, n_patches, d_model]``."""
        if self.norm_position == "post_ln":
            x = self.norm_1(x + self._tokens(x))
            return self.norm_2(x + self.drop(self.ffn(x)))
        x = x + self._tokens(self.norm_1(x))
        return x + self.drop(self.ffn(self.norm_2(x)))


class MLPMixer(nn.Module):
    """MLP-Mixer (Tolstikhin et al. 2021) for small images, e.g. 8x8 digits.

    Parameters
    ----------
    config : MixerConfig, optional
        The architecture (defaults: 8x8x1 images, 2x2 patches, 10 classes).
    seed : int, optional
        Seed of the initial weights (None: torch's global RNG).
    name : str, optional
        Label used in results.

    Attributes
    ----------
    config : MixerConfig
        ``model_type == "nerve_mixer"``: the sites are ``layers.{i}.ffn.act`` (FFN2).
    patch_embed : nn.Linear
        ``patch_dim -> d_model``.
    layers : nn.ModuleList of MixerBlock
    norm : nn.Module
        Final norm (Identity for ``norm="none"``).
    head : nn.Linear
        ``d_model -> n_classes`` on the mean over patches.

    Examples
    --------
    >>> mixer = MLPMixer(MixerConfig(d_model=16, n_layers=2, channel_mlp_dim=32), seed=0)
    >>> tuple(mixer(torch.rand(5, 1, 8, 8)).logits.shape)
    (5, 10)
    """

    def __init__(self, config: MixerConfig | None = None, *, seed: int | None = None,
                 name: str | None = None) -> None:
        config = MixerConfig() if config is None else config
        if not isinstance(config, MixerConfig):
            raise TypeError(f"config must be a MixerConfig; got {type(config).__name__}.")
        super().__init__()
        self.config = config
        with _seeded(seed):
            self.patch_embed = nn.Linear(config.patch_dim, config.d_model)
            self.layers = nn.ModuleList(MixerBlock(config) for _ in range(config.n_layers))
            self.norm = (_norm(config.norm_type, config.d_model, True)
                         if config.norm != "none" else nn.Identity())
            self.head = nn.Linear(config.d_model, config.n_classes)
            _init_weights(self, ("fc_out",), config.n_layers)
        self.nerve_interp_info = {"name": name or "MLPMixer",
                                  "source": "nerve_interp.models (random init)"}

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images -> patches ``[B, n_patches, patch_dim]`` (row-major patches, channel-first
        values inside a patch)."""
        c, s, p = self.config.channels, self.config.image_size, self.config.patch_size
        x = pixel_values
        if x.ndim == 2 and x.shape[1] == c * s * s:
            x = x.reshape(-1, c, s, s)
        elif x.ndim == 3 and c == 1 and tuple(x.shape[1:]) == (s, s):
            x = x[:, None]
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(
                f"pixel_values must be [B, {c}, {s}, {s}] or [B, {c * s * s}]; got shape "
                f"{tuple(pixel_values.shape)}.")
        n = s // p
        x = x.reshape(-1, c, n, p, n, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(x.shape[0], n * n, c * p * p)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        """Class logits and, with ``labels``, the mean cross-entropy.

        Parameters
        ----------
        pixel_values : FloatTensor, shape (B, C, H, W), (B, H, W) for C = 1, or (B, C*H*W)
        labels : LongTensor, shape (B,), optional

        Returns
        -------
        transformers.modeling_outputs.ImageClassifierOutputWithNoAttention
            ``.logits`` (B, n_classes) and ``.loss`` (scalar, or None without labels).
        """
        x = self.patch_embed(self.patchify(pixel_values.to(self.patch_embed.weight.dtype)))
        for block in self.layers:
            x = block(x)
        logits = self.head(self.norm(x).mean(dim=1))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.long())
        return _output("ImageClassifierOutputWithNoAttention", loss, logits)


def load_digits_tensors(split: str = "train", seed: int = 0,
                        test_size: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 handwritten digits (bundled, offline) as tensors.

    Parameters
    ----------
    split : {"train", "test"}
        A stratified, deterministic 80/20 split of the 1797 images.
    seed : int, default 0
        Seed of the split.
    test_size : float, default 0.2

    Returns
    -------
    images : FloatTensor, shape (N, 1, 8, 8)
        Pixel values scaled from 0..16 to [0, 1].
    labels : LongTensor, shape (N,)
        Digits 0..9.

    Examples
    --------
    >>> x, y = load_digits_tensors("test")
    >>> tuple(x.shape), tuple(y.shape), float(x.max())
    ((360, 1, 8, 8), (360,), 1.0)
    """
    _check_choice("load_digits_tensors", "split", split, ("train", "test"))
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_size,
                                           random_state=seed, stratify=data.target)
    idx = torch.as_tensor(idx_train if split == "train" else idx_test)
    return x[idx], y[idx]


__all__ = [
    "ACTIVATIONS",
    "LMConfig",
    "MixerConfig",
    "MLPMixer",
    "NORMS",
    "PRESETS",
    "TinyLM",
    "count_parameters",
    "load_digits_tensors",
    "make_lm",
    "norm_placement",
]
