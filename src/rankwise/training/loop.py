"""Train a causal LM (from scratch or fine-tuning) with a plain or projected-gradient optimizer.

Per optimizer step ``t``: ``grad_accum`` micro-batches of ``batch_size`` windows of ``seqlen``
tokens (:func:`.data.batch_at`, seeded by ``(seed, t)``), mean next-token cross-entropy, gradients
summed as ``loss / grad_accum``, global-norm clipping at ``max_grad_norm``, one optimizer step, the
learning rate ``lr * f(t)`` with linear warmup and cosine decay to ``min_lr_ratio``:
``f(t) = (t + 1) / w`` for ``t < w``, else ``r + (1 - r) (1 + cos(pi (t - w) / (T - w))) / 2``.
The held-out loss at the end is the mean token NLL over the first ``eval_windows`` non-overlapping
windows of ``eval_seqlen`` tokens of the evaluation ids.

Optimizers (``optim``): ``adamw`` (``torch.optim.AdamW``; on a structured model each factor's
learning rate is scaled by ``n / d_in`` with ``structure_lr``, :mod:`.structured`), ``galore``
(:class:`ProjectedAdamW` with the ``svd`` projector), ``dct``, ``randomized``, ``random`` (the other
projectors) on the attention and MLP linears (:func:`.groups.projected_param_groups`).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.gradients import lm_loss
from ..errors import ConfigError, NoTargetLayersError, NumericalError
from .checkpoint import load_checkpoint, save_checkpoint
from .data import batch_at
from .groups import projected_linears, projected_param_groups
from .optim import ProjectedAdamW, optimizer_state_bytes
from .projectors import build_options
from .structured import structured_param_groups

#: --optim name -> projector (None: plain AdamW)
OPTIMIZERS = {"adamw": None, "galore": "svd", "dct": "dct", "randomized": "randomized", "random": "random"}


@dataclass
class TrainConfig:
    optim: str = "adamw"
    rank: int | None = None
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    projector_options: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-3
    weight_decay: float = 0.0
    eps: float = 1e-8
    structure_lr: bool = True
    steps: int = 100
    batch_size: int = 8
    seqlen: int = 128
    grad_accum: int = 1
    warmup: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_windows: int = 16
    eval_seqlen: int | None = None
    checkpoint_every: int = 0

    def check(self) -> None:
        if self.optim not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optim!r}; use one of {', '.join(OPTIMIZERS)}")
        projector = OPTIMIZERS[self.optim]
        if projector is None:
            if self.projector_options:
                raise ConfigError(f"--optim adamw takes no projector option ({', '.join(self.projector_options)}); "
                                  "drop it or use --optim randomized")
        else:
            if self.rank is None:
                raise ConfigError(f"--optim {self.optim} projects gradients: pass --rank R")
            if isinstance(self.update_proj_gap, bool) or int(self.update_proj_gap) < 1:
                raise ConfigError(f"--update-proj-gap must be >= 1, got {self.update_proj_gap}")
            build_options(projector, self.projector_options)
        for name in ("steps", "batch_size", "seqlen", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seqlen < 2:
            raise ConfigError("seqlen must be >= 2")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def fingerprint(self) -> dict[str, Any]:
        """What fixes the trajectory (checkpoints of another fingerprint do not resume)."""
        d = dataclasses.asdict(self)
        for k in ("eval_windows", "eval_seqlen", "checkpoint_every"):
            d.pop(k)
        return d


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    eval_loss: float | None = None
    eval_tokens: int = 0
    seconds_per_step: float = 0.0
    tokens_per_second: float = 0.0
    optimizer_state_bytes: int = 0
    projected_state_bytes: int = 0        # optimizer state of the projected matrices (AdamW: of the same ones)
    projected_dense_adam_bytes: int = 0   # AdamW's 2 m n moments of those matrices
    trainable_params: int = 0
    resumed_from: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    """``(optimizer, projected parameters)`` for ``cfg.optim``."""
    projector = OPTIMIZERS[cfg.optim]
    if projector is None:
        groups = structured_param_groups(model, cfg.lr, cfg.weight_decay, scale_lr=cfg.structure_lr)
        return torch.optim.AdamW(groups, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay), []
    groups = projected_param_groups(model, int(cfg.rank), cfg.update_proj_gap, cfg.scale, cfg.proj_type, projector,
                                    cfg.projector_options, weight_decay=cfg.weight_decay)
    opt = ProjectedAdamW(groups, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay, seed=cfg.seed)
    return opt, list(groups[-1]["params"])


def held_out_loss(model: nn.Module, ids: torch.Tensor, seqlen: int, windows: int) -> tuple[float, int]:
    """Mean token NLL over the first ``windows`` non-overlapping ``seqlen`` windows of ``ids``."""
    from ..evaluation.perplexity import window_nll

    n = min(int(windows), ids.numel() // seqlen)
    if n < 1:
        raise ConfigError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            total, count = window_nll(model, ids[:n * seqlen].reshape(n, seqlen))
    finally:
        model.train(was)
    return total / count, count


def train(model: nn.Module, train_ids: torch.Tensor, cfg: TrainConfig, eval_ids: torch.Tensor | None = None,
          checkpoint_dir=None, resume: bool = False, fingerprint: dict[str, Any] | None = None,
          progress: bool = True, make_optimizer=None) -> TrainResult:
    """Train ``model`` in place on the token stream ``train_ids`` (module docstring). ``make_optimizer(model,
    cfg) -> (optimizer, projected parameters)`` replaces :func:`build_optimizer` (to compare another
    implementation on the same loop)."""
    cfg.check()
    opt, projected = (make_optimizer or build_optimizer)(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: lr_factor(t, cfg.steps, cfg.warmup, cfg.min_lr_ratio))
    fp = {**(fingerprint or {}), **cfg.fingerprint()}
    res = TrainResult(trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    start = 0
    if resume:
        if checkpoint_dir is None:
            raise ConfigError("resume needs a checkpoint directory")
        start, res.losses = load_checkpoint(checkpoint_dir, model, opt, sched, fp)
        res.resumed_from = start
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    model.train()
    tokens = cfg.batch_size * cfg.seqlen * cfg.grad_accum
    bar = tqdm(range(start, cfg.steps), desc="train", disable=not progress, initial=start, total=cfg.steps)
    t0, done = time.perf_counter(), 0
    for step in bar:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch = batch_at(train_ids, step, cfg.batch_size, cfg.seqlen, cfg.seed, micro).to(device)
            loss = lm_loss(model, batch)
            if not bool(torch.isfinite(loss)):
                raise NumericalError(f"non-finite loss at step {step}; lower --lr (the last checkpoint, if any, is "
                                     "intact)")
            (loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        res.losses.append(total)
        done += 1
        elapsed = time.perf_counter() - t0
        bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{done * tokens / max(elapsed, 1e-9):,.0f}")
        if cfg.checkpoint_every and checkpoint_dir is not None and (step + 1) % cfg.checkpoint_every == 0 \
                and step + 1 < cfg.steps:
            save_checkpoint(checkpoint_dir, model, opt, sched, step + 1, res.losses, fp)
    bar.close()
    elapsed = time.perf_counter() - t0
    res.seconds_per_step = elapsed / max(done, 1)
    res.tokens_per_second = done * tokens / max(elapsed, 1e-9)
    res.optimizer_state_bytes = optimizer_state_bytes(opt)
    if not projected:    # the matrices a projected optimizer would project, for comparison
        try:
            projected = [m.weight for m in projected_linears(model).values() if m.weight.requires_grad]
        except NoTargetLayersError:
            projected = []
    res.projected_state_bytes = optimizer_state_bytes(opt, projected)
    res.projected_dense_adam_bytes = sum(2 * p.numel() * p.element_size() for p in projected)
    if eval_ids is not None:
        res.eval_loss, res.eval_tokens = held_out_loss(model, eval_ids, cfg.eval_seqlen or cfg.seqlen,
                                                       cfg.eval_windows)
    model.eval()
    return res
