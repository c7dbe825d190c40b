"""SingLoRA: one factor ``A``, ``Delta W = s u(t) A A^T`` ramped in over ``ramp_steps`` steps."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers import SingAdapter
from .base import InitContext, check_int, kaiming_uniform, register


@dataclass
class SingLoRAOptions:
    """``ramp_steps``: SingLoRA's ramp ``T`` (optimizer steps until ``u(t) = 1``)."""

    ramp_steps: int = 10

    def __post_init__(self) -> None:
        self.ramp_steps = check_int("ramp_steps", self.ramp_steps, 1,
                                    "use e.g. 10 steps for the ramp u(t) = min(t/T, 1)")


@register("singlora", options=SingLoRAOptions)
def init_singlora(base, W: torch.Tensor, r: int, opts: SingLoRAOptions, ctx: InitContext, name: str) -> SingAdapter:
    """SingLoRA: ``Delta W = s u(t) A[:out] A[:in]^T``, one ``A`` (d, r), d = max(out, in), entries
    ``U(-1/sqrt(d), 1/sqrt(d))`` (Kaiming-uniform with fan-in d, so ``A A^T`` starts small against W).

    Square layers: ``A A^T`` (symmetric). Non-square: the first out / in rows of the same A.
    ``u(t) = min(t/T, 1)`` so ``Delta W_0 = 0``. Trainable ``max(out, in) r``.
    """
    m, n = W.shape
    A = kaiming_uniform(r, max(m, n), ctx.generator(name)).T   # U(-1/sqrt(d), 1/sqrt(d)), d = max(out, in)
    return SingAdapter(base, A, ctx.scaling(r), opts.ramp_steps)
