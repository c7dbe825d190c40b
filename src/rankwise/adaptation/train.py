"""Train the adapters: a plain PyTorch loop.

AdamW on the adapter parameters only, learning rate ``lr * f(t)`` with linear warmup then cosine decay
to 0 (``f(t) = t / w`` for ``t < w``, else ``(1 + cos(pi (t - w) / (T - w))) / 2``), gradient
accumulation over ``grad_accum`` micro-batches of ``batch_size`` windows, global-norm gradient clipping,
float32 or bfloat16 autocast, seeded batch order. A non-finite loss stops training and restores the
last adapter state that gave a finite loss.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.gradients import lm_loss
from ..errors import ConfigError
from .attach import set_train_step, trainable_parameters
from .layers import adapter_layers


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 2e-4
    batch_size: int = 2
    grad_accum: int = 1
    warmup: int = 10
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    eval_every: int = 0          # 0 = only at the end (when eval ids are given)
    eval_windows: int = 4
    eval_seqlen: int = 256
    bf16: bool = False
    seed: int = 0


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)          # per optimizer step
    evals: list[dict] = field(default_factory=list)            # {"step", "ppl"}
    stopped_on_nan: bool = False
    nan_step: int | None = None
    seconds_per_step: float = 0.0
    trainable_params: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Warmup-then-cosine multiplier for optimizer step ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def _snapshot(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.clone() for k, v in a.adapter_state().items()} for n, a in adapter_layers(model).items()}


@torch.no_grad()
def _restore(model: nn.Module, snap: dict) -> None:
    for n, a in adapter_layers(model).items():
        for k, v in snap[n].items():
            a.get_parameter(k).copy_(v) if k in dict(a.named_parameters()) else a.get_buffer(k).copy_(v)


def train(model: nn.Module, windows: torch.Tensor, cfg: TrainConfig, eval_ids: torch.Tensor | None = None,
          progress: bool = True, params: list | None = None,
          loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> TrainResult:
    """Train ``model``'s adapters on token ``windows`` (n, L); returns the loss curve and evaluations.

    ``params``: the tensors to train instead of the adapters' (a list of tensors, or of AdamW parameter
    groups ``{"params": [...], "lr_scale": c}`` whose learning rate is ``c * cfg.lr``); a non-finite loss
    then restores them. ``loss_fn(model, ids)``: the training loss of a batch (default: next-token
    cross-entropy)."""
    groups = None
    if params is not None:
        groups = [g if isinstance(g, dict) else {"params": [g]} for g in params]
        groups = [{"params": list(g["params"]), "lr": cfg.lr * float(g.get("lr_scale", 1.0))} for g in groups]
        params = [p for g in groups for p in g["params"]]
    else:
        params = trainable_parameters(model)
    if not params:
        raise ConfigError("the model has no trainable adapter parameters; call rankwise.adapt(model, ...) first")
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ConfigError(f"training windows must be (n, L) with n >= 1, L >= 2; got {tuple(windows.shape)}")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ConfigError("steps, batch_size and grad_accum must be >= 1")
    if not cfg.lr > 0:
        raise ConfigError(f"learning rate must be positive, got {cfg.lr}")
    device = params[0].device
    opt = torch.optim.AdamW(groups or params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    snapshot = (lambda: [p.detach().clone() for p in params]) if groups is not None else (lambda: _snapshot(model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, cfg.steps, cfg.warmup))
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(windows.shape[0], generator=g)
    pos = 0
    res = TrainResult(trainable_params=sum(p.numel() for p in params))

    def next_batch() -> torch.Tensor:
        nonlocal order, pos
        idx = []
        while len(idx) < cfg.batch_size:
            if pos >= order.numel():
                order, pos = torch.randperm(windows.shape[0], generator=g), 0
            idx.append(int(order[pos]))
            pos += 1
        return windows[idx].to(device)

    def evaluate(step: int) -> None:
        from ..evaluation.perplexity import perplexity

        r = perplexity(model, ids=eval_ids, seqlen=cfg.eval_seqlen, windows=cfg.eval_windows)
        res.evals.append({"step": step, "ppl": r.ppl})

    was_training = model.training
    model.train()
    last_good = None
    bar = tqdm(range(cfg.steps), desc="adapt", disable=not progress)
    t0 = time.perf_counter()
    done = 0
    try:
        for step in bar:
            set_train_step(model, step)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            finite = True
            for _ in range(cfg.grad_accum):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss = (loss_fn or lm_loss)(model, next_batch())
                if not bool(torch.isfinite(loss)):
                    finite = False
                    break
                (loss / cfg.grad_accum).backward()
                total += float(loss.detach()) / cfg.grad_accum
            if not finite:
                res.stopped_on_nan, res.nan_step = True, step
                if last_good is not None:
                    if groups is not None:
                        with torch.no_grad():
                            for p, v in zip(params, last_good):
                                p.copy_(v)
                    else:
                        _restore(model, last_good)
                bar.write(f"non-finite loss at step {step}: training stopped, adapters restored to the last "
                          "state with a finite loss (step {}); lower --lr or use float32".format(max(step - 1, 0)))
                break
            last_good = snapshot()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            res.losses.append(total)
            done += 1
            bar.set_postfix(loss=f"{total:.4f}")
            if eval_ids is not None and cfg.eval_every > 0 and (step + 1) % cfg.eval_every == 0:
                model.eval()
                evaluate(step + 1)
                model.train()
    finally:
        model.train(was_training)
        bar.close()
    res.seconds_per_step = (time.perf_counter() - t0) / max(done, 1)
    set_train_step(model, done)
    if eval_ids is not None and (not res.evals or res.evals[-1]["step"] != done):
        model.eval()
        evaluate(done)
        model.train(was_training)
    return res


def plot_losses(curves: dict[str, list[float]], path, title: str = "adapter training loss") -> None:
    """One PNG with a loss curve per label (written atomically)."""
    from ..figures import colormap, new_figure, save_png

    fig = new_figure((7, 4.5))
    ax = fig.subplots()
    colors = colormap("tab20").colors
    for i, (label, ys) in enumerate(curves.items()):
        ax.plot(range(1, len(ys) + 1), ys, label=label, lw=1.6 if i < 2 else 1.1,
                color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], ls="-" if i < 10 else "--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=120)
