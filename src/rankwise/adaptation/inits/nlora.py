"""NLoRA and IntTune: a Nystrom sketch of ``W`` in SLoRA's three-matrix form ``s B M A``."""
from __future__ import annotations

import torch

from ...linalg.nystrom import balanced_factors, nystrom
from ..layers import BMAAdapter
from .base import InitContext, NoOptions, register, subtract_from_base


def _nlora(base, W: torch.Tensor, r: int, ctx: InitContext, name: str, train_outer: bool) -> BMAAdapter:
    s = ctx.scaling(r)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator(name)))
    B, A = balanced_factors(*nystrom(W, r, seed=seed))
    B, A = B.float(), A.float()
    M = torch.eye(r) / s
    subtract_from_base(base, B, A)
    return BMAAdapter(base, A, M, B, s, train_outer=train_outer)


@register("nlora", residual=True)
def init_nlora(base, W: torch.Tensor, r: int, opts: NoOptions, ctx: InitContext, name: str) -> BMAAdapter:
    """NLoRA: Nystrom ``W ~ C M R`` (``C = W Omega``, ``R = Psi^T W``, ``M = (Psi^T W Omega)^+``);

    ``Delta W = s B M A`` (SLoRA's three-matrix form, all three trained) started at ``B A = C M R`` with
    the core split evenly into B and A (:func:`~rankwise.linalg.nystrom.balanced_factors`) and
    ``M = I / s``; ``W_res = W - C M R``. Trainable ``r (out + in) + r^2``. (Starting from
    ``B = C, A = R`` unbalanced diverged under Adam in our benchmark.)
    """
    return _nlora(base, W, r, ctx, name, train_outer=True)


@register("nlora-inttune", residual=True)
def init_nlora_inttune(base, W: torch.Tensor, r: int, opts: NoOptions, ctx: InitContext, name: str) -> BMAAdapter:
    """IntTune: NLoRA's Nystrom init, ``Delta W = s B M A`` with ``B A = C M R``, only the r x r ``M`` trained.

    ``B``, ``A`` frozen; ``W_res = W - C M R``. Trainable ``r^2`` per layer.
    """
    return _nlora(base, W, r, ctx, name, train_outer=False)
