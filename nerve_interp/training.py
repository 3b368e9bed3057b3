"""A plain, readable training loop for the package's small models, with callbacks.

Deterministic for a seed (on CPU), resumable exactly from a checkpoint, and instrumented by
callbacks such as :class:`nerve_interp.tracking.SpectralTracker`::

    model = ni.models.make_lm("small", activation="gelu", norm="pre_ln")
    tok = ni.data.train_tokenizer()
    train_blocks = ni.data.token_blocks(ni.load_corpus(split="train"), tok, 128)
    val_blocks = ni.data.token_blocks(ni.load_corpus(split="heldout"), tok, 128)
    run = ni.training.train(model, train_blocks, val_blocks,
                            ni.training.TrainConfig(steps=300, optimizer="adamw"))
    run.history          # tidy: step, split, loss

Optimizers: ``adamw``, ``sgd`` (momentum), ``muon`` (torch.optim.Muon on the 2-D hidden
weight matrices, AdamW on embeddings, head, norms and biases, as Muon is meant to be used),
``lion`` (Chen et al. 2023, implemented here in a few lines).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ._io import atomic_path, check_format_version, object_digest
from ._progress import tqdm
from .errors import ResultsFileError

# 2: format_version and the writing nerve_interp recorded; 1 (none recorded) is still read
CHECKPOINT_VERSION = 2

OPTIMIZERS = ("adamw", "sgd", "muon", "lion")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train` (all plain values, saved in checkpoints).

    Attributes
    ----------
    steps : int
        Optimizer steps.
    batch_size : int
        Blocks (sequences) per step, sampled with replacement from a seeded generator.
    lr : float
        Peak learning rate (after ``warmup`` linear steps, cosine decay to ``min_lr_ratio``).
    optimizer : {"adamw", "sgd", "muon", "lion"}
    eval_every : int
        Validation loss every this many steps (and at the last step).
    """

    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    optimizer: str = "adamw"
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}.")
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} == {getattr(self, name)}, must be >= 1.")
        if not self.lr > 0:
            raise ValueError(f"lr == {self.lr}, must be > 0.")
        self.betas = tuple(self.betas)


class Lion(torch.optim.Optimizer):
    """Lion (EvoLved Sign Momentum, Chen et al. 2023): sign of an interpolated momentum.

    ``update = sign(β1·m + (1−β1)·g)``; ``p -= lr·(update + wd·p)``; ``m = β2·m + (1−β2)·g``.
    """

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                update = (m * b1 + p.grad * (1 - b1)).sign_()
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss


class _Optimizers:
    """Several optimizers stepped together (Muon + AdamW), behaving like one."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        return {str(i): o.state_dict() for i, o in enumerate(self.optimizers)}

    def load_state_dict(self, state: dict) -> None:
        for i, o in enumerate(self.optimizers):
            o.load_state_dict(state[str(i)])


def _split_params(model: torch.nn.Module) -> tuple[list, list, list]:
    """(hidden 2-D matrices, other decayed params, no-decay params: norms, biases, gains)."""
    matrices, embeds, no_decay = [], [], []
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = getattr(model, "lm_head", None) or getattr(model, "head", None)
    if isinstance(head, torch.nn.Linear):
        embed_ids.add(id(head.weight))
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2:
            no_decay.append(p)
        elif id(p) in embed_ids:
            embeds.append(p)
        else:
            matrices.append(p)
    return matrices, embeds, no_decay


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> Any:
    """The optimizer named in ``cfg``; weight decay only on matrices and embeddings."""
    matrices, embeds, no_decay = _split_params(model)
    groups = [{"params": matrices + embeds, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "lion":
        return Lion(groups, lr=cfg.lr, betas=cfg.betas)
    muon = getattr(torch.optim, "Muon", None)
    if muon is None:
        raise ValueError(f"optimizer='muon' needs torch.optim.Muon (torch >= 2.9); this is "
                         f"torch {torch.__version__}.")
    return _Optimizers([
        muon(matrices, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.95,
             adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW([{"params": embeds, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, betas=cfg.betas),
    ])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from ``lr`` to ``lr·min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(
        math.pi * min(frac, 1.0))))


@dataclass
class TrainState:
    """What callbacks see: the step just finished and the latest losses."""

    step: int = 0
    train_loss: float = math.nan
    val_loss: float = math.nan
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


class Callback:
    """Base class of training callbacks; override what you need."""

    def on_train_begin(self, model: torch.nn.Module, state: TrainState) -> None: ...

    def on_step_end(self, model: torch.nn.Module, state: TrainState) -> None: ...

    def on_train_end(self, model: torch.nn.Module, state: TrainState) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainResult:
    """The outcome of :func:`train`."""

    model: torch.nn.Module
    history: pd.DataFrame
    config: TrainConfig
    seconds: float
    callback_seconds: float


Data = Any  # LongTensor (n_blocks, seq_len) of token ids, or a tuple (inputs, labels)


def _n(data: Data) -> int:
    return int(data[0].shape[0] if isinstance(data, tuple) else data.shape[0])


def _take(data: Data, idx: Any, device: torch.device) -> Data:
    if isinstance(data, tuple):
        return tuple(d[idx].to(device) for d in data)
    return data[idx].to(device)


def _loss(model: torch.nn.Module, batch: Data) -> torch.Tensor:
    """Next-token loss for token blocks; cross-entropy for ``(inputs, labels)`` pairs."""
    if isinstance(batch, tuple):
        return model(batch[0], labels=batch[1]).loss
    return model(input_ids=batch, labels=batch).loss


def _check_data(data: Data, name: str) -> None:
    ok = (isinstance(data, tuple) and len(data) == 2 and data[0].shape[0] == data[1].shape[0]
          and data[0].shape[0] > 0) or (isinstance(data, torch.Tensor) and data.ndim == 2
                                         and data.shape[0] > 0 and not data.is_floating_point())
    if not ok:
        shape = (tuple(tuple(d.shape) for d in data) if isinstance(data, tuple)
                 else tuple(getattr(data, "shape", ())))
        raise ValueError(f"{name} must be token blocks (LongTensor (n_blocks, seq_len)) or a "
                         f"pair (inputs, labels) with the same first dimension; got {shape}.")


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Data, *, batch_size: int = 16,
             max_batches: int | None = None) -> float:
    """Mean loss over ``data`` (its first ``max_batches·batch_size`` items)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    device = next(model.parameters()).device
    for i, start in enumerate(range(0, _n(data), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        b = _take(data, slice(start, start + batch_size), device)
        size = _n(b)
        total += float(_loss(model, b)) * size
        n += size
    model.train(was_training)
    return total / max(n, 1)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: tuple, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier on ``(inputs, labels)``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, _n(data), batch_size):
        x, y = _take(data, slice(start, start + batch_size), device)
        correct += int((model(x).logits.argmax(-1) == y).sum())
    model.train(was_training)
    return correct / _n(data)


class _CallbackList:
    """The callbacks of a run, called hook by hook; their time is summed in ``seconds``."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)
        self.seconds = 0.0

    def __call__(self, hook: str, model: torch.nn.Module, state: TrainState) -> None:
        t = time.perf_counter()
        for cb in self.callbacks:
            getattr(cb, hook)(model, state)
        self.seconds += time.perf_counter() - t

    def state_dict(self) -> list[dict]:
        return [cb.state_dict() for cb in self.callbacks]

    def load_state_dict(self, states: list[dict]) -> None:
        for cb, cb_state in zip(self.callbacks, states, strict=False):
            cb.load_state_dict(cb_state)


@dataclass
class _Run:
    """What one training run updates, and what its checkpoint holds."""

    model: torch.nn.Module
    cfg: TrainConfig
    optimizer: Any
    generator: torch.Generator  # the data order
    callbacks: _CallbackList
    checkpoint: Path | None
    state: TrainState = field(default_factory=TrainState)
    data_sha1: str = ""  # of the training and validation data (a resume must see the same)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg) | {"betas": list(cfg.betas)}


def _data_sha1(*datasets: Data | None) -> str:
    """SHA-1 of the data's tensors (shape, dtype and values), in order."""
    import hashlib

    h = hashlib.sha1()
    for data in datasets:
        for t in (() if data is None else data if isinstance(data, tuple) else (data,)):
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(b"/")
    return h.hexdigest()


def _config_diff(saved: dict, current: dict) -> list[str]:
    return [f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def _resume(run: _Run) -> None:
    """Load ``run.checkpoint``: model, optimizer, data order, RNG, step, history, callbacks."""
    ckpt = run.checkpoint
    try:
        saved = torch.load(ckpt, weights_only=True)
    except Exception as err:
        raise ResultsFileError(f"checkpoint {ckpt} cannot be read ({err}); delete it to "
                               "start afresh.") from None
    # checkpoints written before versions have none: version 1 (read as before)
    check_format_version(ckpt, saved.pop("format_version", 1), CHECKPOINT_VERSION,
                         kind="a training checkpoint", writer=saved.pop("nerve_interp", None))
    want = saved.pop("sha256", None)  # checkpoints written before checksums have none
    if want is not None and object_digest(saved) != want:
        raise ResultsFileError(f"checkpoint {ckpt} is damaged: its contents do not match the "
                               "SHA-256 checksum written with it. Delete it to start afresh.")
    diffs = _config_diff(saved.get("config") or {}, _config_dict(run.cfg))
    if diffs:
        raise ResultsFileError(f"checkpoint {ckpt} was written with another TrainConfig:\n  "
                               + "\n  ".join(diffs) + "\nDelete it or pass the same config.")
    if saved.get("data_sha1", run.data_sha1) != run.data_sha1:
        raise ResultsFileError(f"checkpoint {ckpt} was written while training on other data "
                               "(train_blocks / val_blocks hash differently); resuming would mix "
                               "two runs. Pass the same data, or delete it to start afresh.")
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    run.state.step, run.state.history = int(saved["step"]), list(saved["history"])
    run.callbacks.load_state_dict(saved.get("callbacks", []))


def _save_checkpoint(run: _Run) -> None:
    payload = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
               "generator": run.generator.get_state(), "torch_rng": torch.get_rng_state(),
               "step": run.state.step, "history": run.state.history,
               "config": _config_dict(run.cfg), "callbacks": run.callbacks.state_dict(),
               "data_sha1": run.data_sha1}
    from . import __version__

    with atomic_path(run.checkpoint) as tmp:
        torch.save({**payload, "sha256": object_digest(payload),
                    "format_version": CHECKPOINT_VERSION, "nerve_interp": __version__}, tmp)


def _start(model: torch.nn.Module, cfg: TrainConfig, callbacks: Sequence[Callback],
           checkpoint: str | os.PathLike | None, data_sha1: str = "") -> _Run:
    """Seed, build the optimizer and resume from ``checkpoint`` when it exists."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    run = _Run(model, cfg, make_optimizer(model, cfg), gen, _CallbackList(callbacks), ckpt,
               data_sha1=data_sha1)
    if ckpt is not None and ckpt.exists():
        _resume(run)
    return run


def _due(step: int, every: int, steps: int) -> bool:
    """Every ``every`` steps, and at the last step."""
    return step % every == 0 or step == steps


def _step(run: _Run, train_blocks: Data, val_blocks: Data | None) -> None:
    """One optimizer step at the scheduled learning rate, then the validation loss if due."""
    cfg, state = run.cfg, run.state
    lr = lr_at(state.step, cfg)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    idx = torch.randint(0, _n(train_blocks), (cfg.batch_size,), generator=run.generator)
    loss = _loss(run.model, _take(train_blocks, idx, run.device))
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss became {float(loss)} at step "
                                 f"{state.step}; lower lr (now {lr:.3g}) or clip harder.")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    state.step += 1
    state.train_loss = float(loss.detach())
    state.history.append({"step": state.step, "split": "train", "loss": state.train_loss,
                          "lr": lr})
    if val_blocks is not None and _due(state.step, cfg.eval_every, cfg.steps):
        state.val_loss = evaluate(run.model, val_blocks, batch_size=cfg.batch_size,
                                  max_batches=cfg.eval_batches)
        state.history.append({"step": state.step, "split": "val", "loss": state.val_loss,
                              "lr": lr})


def train(
    model: torch.nn.Module,
    train_blocks: torch.Tensor,
    val_blocks: torch.Tensor | None = None,
    config: TrainConfig | None = None,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a causal LM on token blocks (or a classifier on ``(inputs, labels)``).

    Parameters
    ----------
    model : torch.nn.Module
        Called as ``model(input_ids=..., labels=...)`` returning an object with ``.loss``
        (nerve_interp's ``TinyLM`` or a Hugging Face causal LM).
    train_blocks, val_blocks : LongTensor of shape (n_blocks, seq_len), or (inputs, labels)
        Token blocks from :func:`nerve_interp.data.token_blocks`; or, for a classifier such
        as the MLP-Mixer, a pair of tensors (called as ``model(inputs, labels=labels)``).
    config : TrainConfig
    callbacks : sequence of Callback
        E.g. ``SpectralTracker``; their time is measured separately (``callback_seconds``).
    checkpoint : path, optional
        Saved every ``config.checkpoint_every`` steps and at the end; when it exists the run
        resumes from it exactly (same model, optimizer, data order and RNG state). A
        checkpoint of another config (the message lists the fields that differ) or of other
        data (a hash of ``train_blocks`` and ``val_blocks``) is refused.

    Returns
    -------
    TrainResult
        ``history``: tidy DataFrame ``step, split, loss`` (+ ``lr``).
    """
    cfg = config or TrainConfig()
    _check_data(train_blocks, "train_blocks")
    if val_blocks is not None:
        _check_data(val_blocks, "val_blocks")
    run = _start(model, cfg, callbacks, checkpoint,
                 _data_sha1(train_blocks, val_blocks) if checkpoint is not None else "")
    model.train()
    t0 = time.perf_counter()
    run.callbacks("on_train_begin", model, run.state)
    bar = tqdm(total=cfg.steps, initial=run.state.step, disable=not progress, unit="step",
               desc=f"train {cfg.optimizer}", dynamic_ncols=True)
    try:
        while run.state.step < cfg.steps:
            _step(run, train_blocks, val_blocks)
            run.callbacks("on_step_end", model, run.state)
            bar.update(1)
            bar.set_postfix(loss=f"{run.state.train_loss:.3f}")
            if run.checkpoint is not None and _due(run.state.step, cfg.checkpoint_every,
                                                   cfg.steps):
                _save_checkpoint(run)
    finally:
        bar.close()
    run.callbacks("on_train_end", model, run.state)
    model.eval()
    return TrainResult(model, pd.DataFrame(run.state.history), cfg, time.perf_counter() - t0,
                       run.callbacks.seconds)


__all__ = ["OPTIMIZERS", "Callback", "Lion", "TrainConfig", "TrainResult", "TrainState",
           "accuracy", "evaluate", "lr_at", "make_optimizer", "train"]
