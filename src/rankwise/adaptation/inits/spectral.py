"""Inits from a factorization of ``W`` itself: PiSSA, MiLoRA (SVD), OLoRA (QR); all residual and PEFT-exportable."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import ConfigError, UnknownMethodError
from ...linalg.svd import truncated_svd
from ..layers import LoraAdapter
from .base import InitContext, NoOptions, check_int, register, subtract_from_base

SVD_METHODS = ("exact", "randomized")


@dataclass
class SVDOptions:
    """``svd``: "exact" or "randomized" (Halko et al., ``svd_niter`` power iterations) for the top-r SVD."""

    svd: str = "exact"
    svd_niter: int = 4

    def __post_init__(self) -> None:
        if self.svd not in SVD_METHODS:
            raise ConfigError(f"unknown svd method {self.svd!r} (option svd); use 'exact' or 'randomized'")
        self.svd_niter = check_int("svd_niter", self.svd_niter, 0, "use e.g. 4 power iterations")


def svd(W: torch.Tensor, k: int, method: str, niter: int, g: torch.Generator):
    """``(U_k, S_k, Vh_k)`` via :func:`rankwise.linalg.svd.truncated_svd`: exact, or randomized
    (Halko et al., ``niter`` power iterations, seed drawn from ``g``)."""
    if method not in SVD_METHODS:
        raise UnknownMethodError(f"unknown svd method {method!r}; use 'exact' or 'randomized'")
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    return truncated_svd(W, k, method=method, n_iter=niter, seed=seed)


def _svd_lora(base, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, s: float) -> LoraAdapter:
    sq = (S / s).sqrt()
    A, B = sq[:, None] * Vh, U * sq
    subtract_from_base(base, s * B, A)
    return LoraAdapter(base, A, B, s)


@register("pissa", options=SVDOptions, residual=True, peft=True)
def init_pissa(base, W: torch.Tensor, r: int, opts: SVDOptions, ctx: InitContext, name: str) -> LoraAdapter:
    """PiSSA: ``W = U S V^T``; ``A = diag(sqrt(S_r/s)) V_r^T``, ``B = U_r diag(sqrt(S_r/s))``, ``W_res = W - s B A``.

    Top-r singular triplets (``svd="randomized"``: randomized SVD, the fast path).
    """
    U, S, Vh = svd(W, r, opts.svd, opts.svd_niter, ctx.generator(name))
    return _svd_lora(base, U, S, Vh, ctx.scaling(r))


@register("milora", residual=True, peft=True)
def init_milora(base, W: torch.Tensor, r: int, opts: NoOptions, ctx: InitContext, name: str) -> LoraAdapter:
    """MiLoRA: as PiSSA with the r *smallest* singular triplets; ``W_res = W - U_min S_min V_min^T``."""
    U, S, Vh = truncated_svd(W, min(W.shape))
    return _svd_lora(base, U[:, -r:], S[-r:], Vh[-r:], ctx.scaling(r))


@register("olora", residual=True, peft=True)
def init_olora(base, W: torch.Tensor, r: int, opts: NoOptions, ctx: InitContext, name: str) -> LoraAdapter:
    """OLoRA (PEFT): ``W = Q R`` (QR of (out, in)); ``B = Q[:, :r]``, ``A = R[:r]``, ``W_res = W - s B A``."""
    s = ctx.scaling(r)
    Q, R = torch.linalg.qr(W.double())
    A, B = R[:r].float(), Q[:, :r].float()
    subtract_from_base(base, s * B, A)
    return LoraAdapter(base, A, B, s)
