"""Healing: a short training of low-rank corrections after compression, merged back (same size).

What trains: in a model with low-rank layers, LoRA corrections of their two factor matrices
(``A <- A + b_A a_A``, ``B <- B + b_B a_B``, rank ``rank`` each); in a plain model (a pruned one: fewer
blocks, heads, channels or hidden dimensions), LoRA corrections of every linear layer inside the
blocks. They start at zero, train on calibration windows only (never on evaluation text) with the
adapters' loop (:func:`rankwise.adaptation.train.train`: AdamW, warmup + cosine) and are merged back:
the healed model has exactly the shapes and saved format of the unhealed one.

What it minimizes: next-token cross-entropy, or, with the dense ``teacher`` (pruned models: ``rankwise
compress --structure depth|width|slice --heal-steps N``), knowledge distillation on the logits,

    KL(p_teacher || p_student) = mean_t sum_v p_T(v | t) (log p_T(v | t) - log p_S(v | t)),

over every position of the calibration windows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError
from .structures.lowrank import LowRankLinear


@dataclass
class HealOptions:
    steps: int = 0           # 0 = no healing
    rank: int = 8
    lr: float = 5e-4
    batch_size: int = 2
    seed: int = 0


def factor_targets(model: nn.Module) -> list[str]:
    """Qualified names of the factor matrices (``<layer>.A``, ``<layer>.B``) of every low-rank layer."""
    names = [f"{n}.{f}" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for f in ("A", "B")]
    if not names:
        raise ConfigError("healing trains the factors of low-rank layers and this model has none; use "
                          "--structure lowrank (or drop --heal-steps)")
    return names


def heal_targets(model: nn.Module) -> list[str] | None:
    """The adapters' targets: the low-rank factors (regexes) when the model has low-rank layers, else
    ``None`` (every linear layer inside the blocks: a plain model, e.g. a pruned one)."""
    import re

    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        return [re.escape(n) + "$" for n in factor_targets(model)]
    from .structures.base import StructuredLinear

    if any(isinstance(m, StructuredLinear) for m in model.modules()):
        raise ConfigError("healing trains low-rank factors or the linear layers of a plain (pruned) model; this "
                          "model has other structured layers: use --structure lowrank or a pruning structure "
                          "(or drop --heal-steps)")
    return None


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    kw = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
    out = model(input_ids=ids, **kw)
    logits = out.logits if hasattr(out, "logits") else out
    return logits.float()


def distillation_loss(teacher: nn.Module):
    """``loss(model, ids)``: the mean per-token ``KL(p_teacher || p_model)`` of the logits on ``ids``."""
    def loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = F.log_softmax(_logits(teacher, ids), dim=-1).flatten(0, 1)
        s = F.log_softmax(_logits(model, ids), dim=-1).flatten(0, 1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean")
    return loss


def heal(model: nn.Module, windows: torch.Tensor, options: HealOptions, progress: bool = False,
         teacher: nn.Module | None = None) -> dict:
    """Heal ``model`` in place on token ``windows`` (n, L), distilling from ``teacher`` when given;
    returns ``{options, loss, losses (first, last), seconds_per_step}``."""
    from .adaptation.attach import adapt, merge_and_unload
    from .adaptation.train import TrainConfig, train

    if options.steps < 1 or options.rank < 1 or not options.lr > 0:
        raise ConfigError(f"healing needs steps >= 1, rank >= 1 and lr > 0, got {options}")
    targets = heal_targets(model)
    was_training = model.training
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    adapt(model, init="lora", rank=options.rank, targets=targets, seed=options.seed)
    res = train(model, windows, TrainConfig(steps=options.steps, lr=options.lr, batch_size=options.batch_size,
                                            warmup=max(1, options.steps // 10), seed=options.seed),
                progress=progress, loss_fn=None if teacher is None else distillation_loss(teacher))
    merge_and_unload(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.train(was_training)
    if res.stopped_on_nan:
        raise ConfigError(f"healing hit a non-finite loss at step {res.nan_step}; lower --heal-lr")
    return {"options": asdict(options), "loss": "kl-to-dense" if teacher is not None else "cross-entropy",
            "loss_first": res.losses[0], "loss_last": res.losses[-1], "seconds_per_step": res.seconds_per_step}
