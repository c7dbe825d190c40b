"""Gradient-driven inits: LoRA-GA and LoRA-SB, from the mean weight gradient ``G`` on calibration data."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import ConfigError
from ...linalg.svd import truncated_svd
from ..layers import LoraAdapter, SBAdapter
from .base import InitContext, check_positive, register, subtract_from_base


@dataclass
class LoraGAOptions:
    """``gamma``: LoRA-GA's stable scale (the factors are scaled by ``out^(1/4) / sqrt(gamma)``)."""

    gamma: float = 16.0

    def __post_init__(self) -> None:
        self.gamma = check_positive("gamma", self.gamma, "use e.g. gamma=16")


@dataclass
class LoraSBOptions:
    """``sb_step``: the size ``eta`` of the approximated first step ``-eta G``."""

    sb_step: float = 1e-3

    def __post_init__(self) -> None:
        self.sb_step = check_positive("sb_step", self.sb_step, "use e.g. sb_step=1e-3 (the first step's learning rate)")


def mean_gradient(ctx: InitContext, name: str) -> torch.Tensor:
    """The mean weight gradient of layer ``name`` (float64) that ``adapt`` gathered."""
    if name not in ctx.grads:
        raise ConfigError(f"this init needs the weight gradient of {name}; pass calibration data")
    return ctx.grads[name].double()


@register("lora-ga", options=LoraGAOptions, needs="gradients", residual=True, peft=True)
def init_lora_ga(base, W: torch.Tensor, r: int, opts: LoraGAOptions, ctx: InitContext, name: str) -> LoraAdapter:
    """LoRA-GA: mean gradient ``G = U S V^T``; ``B = c U[:, :r]``, ``A = c V[:, r:2r]^T`` with
    ``c = out^(1/4) / sqrt(gamma)`` (the stable scale); ``W_res = W - s B A``. Needs ``2r <= min(out, in)``."""
    m, n = W.shape
    if 2 * r > min(m, n):
        raise ConfigError(f"lora-ga needs 2*rank <= min(out, in) = {min(m, n)} for layer {name}; lower --rank")
    U, S, Vh = truncated_svd(mean_gradient(ctx, name), 2 * r, dtype=torch.float64)
    c = m ** 0.25 / math.sqrt(opts.gamma)
    B, A = (c * U[:, :r]).float(), (c * Vh[r: 2 * r]).float()
    s = ctx.scaling(r)
    subtract_from_base(base, s * B, A)
    return LoraAdapter(base, A, B, s)


@register("lora-sb", options=LoraSBOptions, needs="gradients", residual=True)
def init_lora_sb(base, W: torch.Tensor, r: int, opts: LoraSBOptions, ctx: InitContext, name: str) -> SBAdapter:
    """LoRA-SB: truncated SVD of the approximated first update ``-eta G = U S V^T``; frozen ``B = U_r``,
    ``A = V_r^T``, trained ``R = diag(S_r) / s`` (r x r); ``W_res = W - s B R A``. Trainable ``r^2``."""
    U, S, Vh = truncated_svd(-opts.sb_step * mean_gradient(ctx, name), r, dtype=torch.float64)
    s = ctx.scaling(r)
    B, A, R = U[:, :r].float(), Vh[:r].float(), torch.diag(S[:r] / s).float()
    subtract_from_base(base, s * (B @ R), A)
    return SBAdapter(base, A, B, R, s)
