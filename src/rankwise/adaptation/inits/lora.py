"""LoRA: the plain init, ``Delta W_0 = 0``."""
from __future__ import annotations

import torch

from ..layers import LoraAdapter
from .base import InitContext, NoOptions, kaiming_uniform, register


@register("lora", peft=True)
def init_lora(base, W: torch.Tensor, r: int, opts: NoOptions, ctx: InitContext, name: str) -> LoraAdapter:
    """LoRA: ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (Kaiming-uniform, a=sqrt 5), ``B = 0``; ``Delta W_0 = 0``."""
    m, n = W.shape
    return LoraAdapter(base, kaiming_uniform(r, n, ctx.generator(name)), torch.zeros(m, r), ctx.scaling(r))
