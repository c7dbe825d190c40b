"""Healing: a short training of low-rank corrections to a compressed model's factors, merged back.

After compression, every :class:`LowRankLinear` ``W' = B A`` gets LoRA corrections on its two factor
matrices (``A <- A + b_A a_A``, ``B <- B + b_B a_B``, rank ``rank`` each, zero at step 0), trained on
calibration windows only (never on evaluation text) with the adapters' loop
(:func:`rankwise.adaptation.train.train`: AdamW, warmup + cosine), then merged into ``A`` and ``B``. The
healed model has exactly the factor shapes and saved format of the unhealed one: the same size.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

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


def heal(model: nn.Module, windows: torch.Tensor, options: HealOptions, progress: bool = False) -> dict:
    """Heal ``model`` in place on token ``windows`` (n, L); returns ``{options, losses (first, last)}``."""
    import re

    from .adaptation.attach import adapt, merge_and_unload
    from .adaptation.train import TrainConfig, train

    if options.steps < 1 or options.rank < 1 or not options.lr > 0:
        raise ConfigError(f"healing needs steps >= 1, rank >= 1 and lr > 0, got {options}")
    targets = [re.escape(n) + "$" for n in factor_targets(model)]
    was_training = model.training
    adapt(model, init="lora", rank=options.rank, targets=targets, seed=options.seed)
    res = train(model, windows, TrainConfig(steps=options.steps, lr=options.lr, batch_size=options.batch_size,
                                            warmup=max(1, options.steps // 10), seed=options.seed),
                progress=progress)
    merge_and_unload(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.train(was_training)
    if res.stopped_on_nan:
        raise ConfigError(f"healing hit a non-finite loss at step {res.nan_step}; lower --heal-lr")
    return {"options": asdict(options), "loss_first": res.losses[0], "loss_last": res.losses[-1],
            "seconds_per_step": res.seconds_per_step}
