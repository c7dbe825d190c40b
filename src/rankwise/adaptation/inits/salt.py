"""SALT: scale and shift the top singular values, plus a LoRA on the residual subspace."""
from __future__ import annotations

import torch

from ..layers import SaltAdapter
from .base import InitContext, kaiming_uniform, register
from .spectral import SVDOptions, svd


@register("salt", options=SVDOptions)
def init_salt(base, W: torch.Tensor, r: int, opts: SVDOptions, ctx: InitContext, name: str) -> SaltAdapter:
    """SALT: ``W = U S V^T``; train scale ``a`` and shift ``b`` of the top-r singular values,

    ``sigma_i -> sigma_i a_i + b_i`` (a = 1, b = 0), plus a rank-r LoRA restricted to the residual
    subspace ``s (I - U_r U_r^T) B A (I - V_r V_r^T)`` (A Kaiming, B = 0). ``Delta W_0 = 0``.
    Trainable ``2 r + r (out + in)``.
    """
    m, n = W.shape
    g = ctx.generator(name)
    U, S, Vh = svd(W, r, opts.svd, opts.svd_niter, g)
    return SaltAdapter(base, U, S, Vh, kaiming_uniform(r, n, g), torch.zeros(m, r), ctx.scaling(r))
