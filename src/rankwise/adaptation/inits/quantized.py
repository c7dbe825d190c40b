"""Adapters on a quantized base: LQ-LoRA and LoftQ (``--init lq-lora`` / ``--init loftq``).

Both fit every target layer as ``W ~ Q + L R`` and then

* replace the layer by a frozen :class:`~rankwise.structures.quant.QuantLinear` storing ``Q``
  (``bits``-bit codes, float16 scales and minimums in groups of ``group_size`` input columns);
* attach a LoRA adapter started at the low-rank part: ``Delta W_0 = s B A = L R`` with ``A = R``,
  ``B = L / s`` (float32 copies of the float16 factors).

So the model at step 0 computes ``(Q + L R) x``, the fit of ``W``, and training moves only ``A, B``.

* ``lq-lora`` (LQ-LoRA, Guo et al. 2024): :func:`rankwise.linalg.lowrank_quant.lq` under the input
  covariance ``C = X X^T`` of calibration activations: the better of the LoRC and SVD-first
  initializations, then up to ``iters`` rounds (GPTQ Q-step, whitened rank-r LR-step), each kept only
  if ``||(W - Q - L R) X||_F`` decreases. (LQ-LoRA weights the objective by a diagonal Fisher; here the
  full activation covariance weights it, as in :mod:`rankwise.compression.methods.lq`.)
* ``loftq`` (LoftQ, Li et al. 2024): in the plain Frobenius norm (``C = I``), ``Q_t = RTN(W - L_{t-1}
  R_{t-1})``, ``L_t R_t = SVD_r(W - Q_t)`` from ``L_0 R_0 = 0``, ``t = 1 .. iters`` (``lq`` with
  ``init="lorc"``, ``quantizer="rtn"``, identity covariance), a round kept only if
  ``||W - Q - L R||_F`` decreases (LoftQ's error, which the paper reports decreasing; the check
  makes it guaranteed).

Error guarantee: that of :func:`~rankwise.linalg.lowrank_quant.lq` -- the stored ``Q + L R`` is never
further from ``W`` in the method's norm than the first round's (LoRC's) fit.

Export: the base is not ``W - Delta W_0`` exactly, so PEFT's conversion to a LoRA on the original ``W``
does not apply; PEFT gets the rank-r adapter on the de-quantized base (``form="residual"``, see
:mod:`.saving`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import ConfigError
from ...linalg.lowrank_quant import lq
from ...linalg.quant import MAX_BITS, MIN_BITS
from ...models.surgery import linear_bias
from ...structures.quant import QuantLinear
from ..layers import LoraAdapter
from .base import InitContext, check_int, register


@dataclass
class QuantInitOptions:
    """The quantized base: ``bits``-bit codes in groups of ``group_size`` input columns; ``iters``:
    lq-lora's alternation rounds after the initialization (``>= 0``)."""

    bits: int = 4
    group_size: int = 64
    iters: int = 5

    min_iters = 0   # class attribute, not an option

    def __post_init__(self) -> None:
        if isinstance(self.bits, float) and self.bits.is_integer():
            self.bits = int(self.bits)
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"option bits must be an integer from {MIN_BITS} to {MAX_BITS} (the code width of the "
                              f"quantized base), got {self.bits!r}; pass e.g. bits=4 (--quant-bits 4)")
        self.group_size = check_int("group_size", self.group_size, 1, "pass e.g. group_size=64 (--quant-group-size 64)")
        self.iters = check_int("iters", self.iters, self.min_iters, "pass e.g. iters=5 (--quant-iters 5)")


@dataclass
class LoftQOptions(QuantInitOptions):
    """As :class:`QuantInitOptions`, with ``iters`` = LoftQ's number of alternations ``T >= 1``."""

    min_iters = 1


def _fit_adapter(base, W: torch.Tensor, r: int, opts: QuantInitOptions, ctx: InitContext, C: torch.Tensor,
                 init: str, quantizer: str, iters: int, name: str) -> LoraAdapter:
    if C.shape != (W.shape[1], W.shape[1]):
        raise ConfigError(f"covariance of {name} has shape {tuple(C.shape)}, the layer has {W.shape[1]} inputs")
    res = lq(W, C, opts.bits, opts.group_size, r, False, iters=iters, init=init, quantizer=quantizer)
    bias = linear_bias(base)
    qbase = QuantLinear.from_quantized(res.quant, None if bias is None else bias.detach().float(), None,
                                       dtype=torch.float32)
    qbase.fit_info = {**res.info, "history": list(res.history)}
    s = ctx.scaling(r)
    return LoraAdapter(qbase, res.right.float(), res.left.float() / s, s)


@register("lq-lora", options=QuantInitOptions, needs="covariance", residual=True, peft=True, quantized=True)
def init_lq_lora(base, W: torch.Tensor, r: int, opts: QuantInitOptions, ctx: InitContext, name: str) -> LoraAdapter:
    """LQ-LoRA: ``W ~ Q + L R`` by the alternating fit under the activation covariance; frozen ``Q``, LoRA from ``L R``.

    ``A = R``, ``B = L / s`` so ``Delta W_0 = s B A = L R``; the fit minimizes ``||(W - Q - L R) X||_F``
    (see the module docstring).
    """
    if name not in ctx.covs:
        raise ConfigError(f"lq-lora needs activation statistics for {name}; pass calibration data")
    return _fit_adapter(base, W, r, opts, ctx, ctx.covs[name], "best", "gptq", opts.iters, name)


@register("loftq", options=LoftQOptions, residual=True, peft=True, quantized=True)
def init_loftq(base, W: torch.Tensor, r: int, opts: LoftQOptions, ctx: InitContext, name: str) -> LoraAdapter:
    """LoftQ: ``iters`` alternations of RTN and rank-r SVD in the Frobenius norm; frozen ``Q``, LoRA from ``L R``.

    ``Q_t = RTN(W - L_{t-1} R_{t-1})``, ``L_t R_t = SVD_r(W - Q_t)``; ``A = R``, ``B = L / s`` so ``Delta W_0 = L R``.
    """
    eye = torch.eye(W.shape[1], dtype=torch.float64)
    return _fit_adapter(base, W, r, opts, ctx, eye, "lorc", "rtn", opts.iters - 1, name)
