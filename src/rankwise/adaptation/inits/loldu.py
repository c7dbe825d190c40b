"""LoLDU: a truncated LDU factorization of ``W``; only the diagonal trains."""
from __future__ import annotations

import torch

from ...linalg.ldu import ldu
from ..layers import LDUAdapter
from .base import InitContext, NoOptions, register, subtract_from_base


@register("loldu", residual=True)
def init_loldu(base, W: torch.Tensor, r: int, opts: NoOptions, ctx: InitContext, name: str) -> LDUAdapter:
    """LoLDU: truncated LDU with complete pivoting ``W ~ L diag(d) U``; ``W_res = W - L diag(d) U``;

    only the diagonal ``d`` trains (``r`` parameters per layer), ``L``, ``U`` frozen.
    """
    L, d, U = ldu(W, r)
    L, d, U = L.float(), d.float(), U.float()
    subtract_from_base(base, L * d, U)
    return LDUAdapter(base, L, d, U)
