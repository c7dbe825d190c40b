"""Adapter initializations: a registry of named functions, each with its formula.

Every init gets the frozen ``base`` module, its weight ``W`` (out, in, float32), the layer's rank ``r``
and an :class:`InitContext`; it returns an adapter layer. Conventions: ``s`` = scaling = alpha / r
(rslora: alpha / sqrt(r)). *Residual* inits change the frozen base to ``W_res = W - Delta W_0`` so that
``W_res + Delta W_0 = W`` exactly and the model's output at step 0 equals the base model's; the other
inits start from ``Delta W_0 = 0``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError, UnknownMethodError
from ..linalg.ldu import ldu
from ..linalg.nystrom import balanced_factors, nystrom
from ..linalg.svd import truncated_svd
from .layers import (
    AdapterLayer, BMAAdapter, LDUAdapter, LoraAdapter, SaltAdapter, SBAdapter, SingAdapter, add_to_base,
)


@dataclass
class InitContext:
    """Options shared by all layers of one ``adapt`` call."""

    alpha: float | None = None
    rslora: bool = False
    seed: int = 0
    svd: str = "exact"            # pissa / milora / salt: "exact" or "randomized"
    svd_niter: int = 4
    gamma: float = 16.0           # LoRA-GA's stable scale gamma
    sb_step: float = 1e-3         # LoRA-SB: size eta of the approximated first step -eta G
    ramp_steps: int = 10          # SingLoRA's ramp T
    bits: int = 4                 # lq-lora / loftq: code width of the quantized base
    group_size: int = 64          # lq-lora / loftq: input columns per quantization group
    iters: int = 5                # lq-lora: alternation rounds after the init; loftq: alternations T
    eigen: dict = field(default_factory=dict)     # name -> (ratios, top eigenvectors) (EVA)
    grads: dict = field(default_factory=dict)     # name -> mean gradient (out, in) (LoRA-GA, LoRA-SB)
    covs: dict = field(default_factory=dict)      # name -> input covariance X^T X (in, in) (LQ-LoRA)

    def scaling(self, r: int) -> float:
        alpha = float(self.alpha if self.alpha is not None else r)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def generator(self, name: str) -> torch.Generator:
        """A generator seeded from (seed, layer name): independent of layer order."""
        h = sum((i + 1) * ord(c) for i, c in enumerate(name)) % (2**31)
        return torch.Generator().manual_seed(self.seed * 1_000_003 + h)


@dataclass(frozen=True)
class InitSpec:
    name: str
    fn: Callable[..., AdapterLayer]
    needs: str = "none"            # "none" | "activations" | "covariance" | "gradients"
    residual: bool = False         # the base becomes W - Delta W_0 (or, quantized, Q ~ W - Delta W_0)
    peft: bool = False             # result is a plain LoRA (lora_A, lora_B) PEFT can load
    summary: str = ""
    quantized: bool = False        # the base becomes a frozen QuantLinear (lq-lora, loftq)


INITS: dict[str, InitSpec] = {}


def register(name: str, needs: str = "none", residual: bool = False, peft: bool = False, quantized: bool = False):
    def deco(fn):
        INITS[name] = InitSpec(name, fn, needs, residual, peft, (fn.__doc__ or "").strip().splitlines()[0],
                               quantized)
        return fn
    return deco


def get_init(name: str) -> InitSpec:
    if name not in INITS:
        raise UnknownMethodError(f"unknown init {name!r}; valid inits: {', '.join(INITS)}")
    return INITS[name]


# ---- helpers ----------------------------------------------------------------------------------

def kaiming_uniform(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """PEFT's LoRA A init: ``kaiming_uniform_(a=sqrt(5))`` = U(-1/sqrt(cols), 1/sqrt(cols))."""
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=g) * 2 - 1) * bound


def svd(W: torch.Tensor, k: int, method: str, niter: int, g: torch.Generator):
    """``(U_k, S_k, Vh_k)`` via :func:`rankwise.linalg.svd.truncated_svd`: exact, or randomized
    (Halko et al., ``niter`` power iterations, seed drawn from ``g``)."""
    if method not in ("exact", "randomized"):
        raise UnknownMethodError(f"unknown svd method {method!r}; use 'exact' or 'randomized'")
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    return truncated_svd(W, k, method=method, n_iter=niter, seed=seed)


def _residual(base: nn.Module, L: torch.Tensor, R: torch.Tensor) -> None:
    add_to_base(base, L @ R, -1.0)


# ---- weight-only inits ------------------------------------------------------------------------

@register("lora", peft=True)
def init_lora(base, W, r, ctx, name):
    """LoRA: ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (Kaiming-uniform, a=sqrt 5), ``B = 0``; ``Delta W_0 = 0``."""
    m, n = W.shape
    return LoraAdapter(base, kaiming_uniform(r, n, ctx.generator(name)), torch.zeros(m, r), ctx.scaling(r))


def _svd_init(base, W, r, ctx, name, smallest: bool):
    s = ctx.scaling(r)
    if smallest:
        U, S, Vh = truncated_svd(W, min(W.shape))
        U, S, Vh = U[:, -r:], S[-r:], Vh[-r:]
    else:
        U, S, Vh = svd(W, r, ctx.svd, ctx.svd_niter, ctx.generator(name))
    sq = (S / s).sqrt()
    A, B = sq[:, None] * Vh, U * sq
    _residual(base, s * B, A)
    return LoraAdapter(base, A, B, s)


@register("pissa", residual=True, peft=True)
def init_pissa(base, W, r, ctx, name):
    """PiSSA: ``W = U S V^T``; ``A = diag(sqrt(S_r/s)) V_r^T``, ``B = U_r diag(sqrt(S_r/s))``, ``W_res = W - s B A``.

    Top-r singular triplets (``ctx.svd="randomized"``: randomized SVD, the fast path).
    """
    return _svd_init(base, W, r, ctx, name, smallest=False)


@register("milora", residual=True, peft=True)
def init_milora(base, W, r, ctx, name):
    """MiLoRA: as PiSSA with the r *smallest* singular triplets; ``W_res = W - U_min S_min V_min^T``."""
    return _svd_init(base, W, r, ctx, name, smallest=True)


@register("olora", residual=True, peft=True)
def init_olora(base, W, r, ctx, name):
    """OLoRA (PEFT): ``W = Q R`` (QR of (out, in)); ``B = Q[:, :r]``, ``A = R[:r]``, ``W_res = W - s B A``."""
    s = ctx.scaling(r)
    Q, R = torch.linalg.qr(W.double())
    A, B = R[:r].float(), Q[:, :r].float()
    _residual(base, s * B, A)
    return LoraAdapter(base, A, B, s)


def _nlora(base, W, r, ctx, name, train_outer: bool):
    s = ctx.scaling(r)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator(name)))
    B, A = balanced_factors(*nystrom(W, r, seed=seed))
    B, A = B.float(), A.float()
    M = torch.eye(r) / s
    _residual(base, B, A)
    return BMAAdapter(base, A, M, B, s, train_outer=train_outer)


@register("nlora", residual=True)
def init_nlora(base, W, r, ctx, name):
    """NLoRA: Nystrom ``W ~ C M R`` (``C = W Omega``, ``R = Psi^T W``, ``M = (Psi^T W Omega)^+``);

    ``Delta W = s B M A`` (SLoRA's three-matrix form, all three trained) started at ``B A = C M R`` with
    the core split evenly into B and A (:func:`~rankwise.linalg.nystrom.balanced_factors`) and
    ``M = I / s``; ``W_res = W - C M R``. Trainable ``r (out + in) + r^2``. (Starting from
    ``B = C, A = R`` unbalanced diverged under Adam in our benchmark.)
    """
    return _nlora(base, W, r, ctx, name, train_outer=True)


@register("nlora-inttune", residual=True)
def init_nlora_inttune(base, W, r, ctx, name):
    """IntTune: NLoRA's Nystrom init with only the r x r intermediate matrix M trained (``r^2`` per layer)."""
    return _nlora(base, W, r, ctx, name, train_outer=False)


@register("loldu", residual=True)
def init_loldu(base, W, r, ctx, name):
    """LoLDU: truncated LDU with complete pivoting ``W ~ L diag(d) U``; ``W_res = W - L diag(d) U``;

    only the diagonal ``d`` trains (``r`` parameters per layer), ``L``, ``U`` frozen.
    """
    L, d, U = ldu(W, r)
    L, d, U = L.float(), d.float(), U.float()
    _residual(base, L * d, U)
    return LDUAdapter(base, L, d, U)


@register("salt")
def init_salt(base, W, r, ctx, name):
    """SALT: ``W = U S V^T``; train scale ``a`` and shift ``b`` of the top-r singular values,

    ``sigma_i -> sigma_i a_i + b_i`` (a = 1, b = 0), plus a rank-r LoRA restricted to the residual
    subspace ``s (I - U_r U_r^T) B A (I - V_r V_r^T)`` (A Kaiming, B = 0). ``Delta W_0 = 0``.
    Trainable ``2 r + r (out + in)``.
    """
    m, n = W.shape
    g = ctx.generator(name)
    U, S, Vh = svd(W, r, ctx.svd, ctx.svd_niter, g)
    return SaltAdapter(base, U, S, Vh, kaiming_uniform(r, n, g), torch.zeros(m, r), ctx.scaling(r))


@register("singlora")
def init_singlora(base, W, r, ctx, name):
    """SingLoRA: ``Delta W = s u(t) A[:out] A[:in]^T``, one ``A`` (d, r), d = max(out, in), entries
    ``U(-1/sqrt(d), 1/sqrt(d))`` (Kaiming-uniform with fan-in d, so ``A A^T`` starts small against W).

    Square layers: ``A A^T`` (symmetric). Non-square: the first out / in rows of the same A.
    ``u(t) = min(t/T, 1)`` so ``Delta W_0 = 0``. Trainable ``max(out, in) r``.
    """
    m, n = W.shape
    A = kaiming_uniform(r, max(m, n), ctx.generator(name)).T   # U(-1/sqrt(d), 1/sqrt(d)), d = max(out, in)
    return SingAdapter(base, A, ctx.scaling(r), ctx.ramp_steps)


# ---- data-driven inits ------------------------------------------------------------------------

@register("eva", needs="activations", peft=True)
def init_eva(base, W, r, ctx, name):
    """EVA: ``A = V_r^T``, the top-r right singular vectors of the layer inputs X (= eigenvectors of

    ``X^T X``, the float64 calibration covariance); ``B = 0``. Ranks are redistributed across layers by
    explained variance (:func:`eva_ranks`) before this runs.
    """
    if name not in ctx.eigen:
        raise ConfigError(f"eva needs activation statistics for {name}; pass calibration data")
    _, evecs = ctx.eigen[name]
    if r > evecs.shape[1]:
        raise ConfigError(f"eva rank {r} for {name} exceeds the {evecs.shape[1]} computed components")
    A = evecs[:, :r].T.float()
    return LoraAdapter(base, A, torch.zeros(W.shape[0], r), ctx.scaling(r))


def eva_eigen(stats: dict, keep: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (explained-variance ratios (all, descending), top-``keep`` eigenvectors (in, keep))}`` of each
    layer's input covariance ``X^T X`` (float64 ``eigh``): ratio_i = lambda_i / sum_j lambda_j."""
    out = {}
    for name, st in stats.items():
        ev, vec = torch.linalg.eigh(st.cov.double())
        ev, vec = ev.flip(0).clamp_min(0), vec.flip(1)
        out[name] = (ev / ev.sum().clamp_min(1e-300), vec[:, :keep].clone())
    return out


def eva_ranks(eigen: dict, rank: int, rho: float = 2.0) -> dict[str, int]:
    """EVA's rank redistribution: budget ``rank * L`` over the L layers; each layer offers its top
    ``rho * rank`` components with their explained-variance ratios (:func:`eva_eigen`); the budget goes to
    the globally largest ratios. A layer may get 0 (no adapter) or up to ``rho * rank``."""
    offers = []
    for name, (ratio, _) in eigen.items():
        k = min(int(round(rho * rank)), ratio.numel())
        offers += [(float(ratio[i]), name) for i in range(k)]
    offers.sort(key=lambda t: -t[0])
    ranks = {n: 0 for n in eigen}
    for _, n in offers[: rank * len(eigen)]:
        ranks[n] += 1
    return ranks


def _grad(ctx: InitContext, name: str) -> torch.Tensor:
    if name not in ctx.grads:
        raise ConfigError(f"this init needs the weight gradient of {name}; pass calibration data")
    return ctx.grads[name].double()


@register("lora-ga", needs="gradients", residual=True, peft=True)
def init_lora_ga(base, W, r, ctx, name):
    """LoRA-GA: mean gradient ``G = U S V^T``; ``B = c U[:, :r]``, ``A = c V[:, r:2r]^T`` with
    ``c = out^(1/4) / sqrt(gamma)`` (the stable scale); ``W_res = W - s B A``. Needs ``2r <= min(out, in)``."""
    m, n = W.shape
    if 2 * r > min(m, n):
        raise ConfigError(f"lora-ga needs 2*rank <= min(out, in) = {min(m, n)} for layer {name}; lower --rank")
    U, S, Vh = truncated_svd(_grad(ctx, name), 2 * r, dtype=torch.float64)
    c = m ** 0.25 / math.sqrt(ctx.gamma)
    B, A = (c * U[:, :r]).float(), (c * Vh[r: 2 * r]).float()
    s = ctx.scaling(r)
    _residual(base, s * B, A)
    return LoraAdapter(base, A, B, s)


@register("lora-sb", needs="gradients", residual=True)
def init_lora_sb(base, W, r, ctx, name):
    """LoRA-SB: truncated SVD of the approximated first update ``-eta G = U S V^T``; frozen ``B = U_r``,
    ``A = V_r^T``, trained ``R = diag(S_r) / s`` (r x r); ``W_res = W - s B R A``. Trainable ``r^2``."""
    U, S, Vh = truncated_svd(-ctx.sb_step * _grad(ctx, name), r, dtype=torch.float64)
    s = ctx.scaling(r)
    B, A, R = U[:, :r].float(), Vh[:r].float(), torch.diag(S[:r] / s).float()
    _residual(base, s * (B @ R), A)
    return SBAdapter(base, A, B, R, s)
