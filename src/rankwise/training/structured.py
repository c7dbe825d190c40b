"""Structure-aware initialization and per-factor learning rates ("Compute Better Spent", Qiu et al. 2024).

Every factor of a structured layer is a dense map ``d_in -> d_out`` (:meth:`StructuredLinear.factor_dims`).
Following the spectral condition for feature learning (Yang, Simon & Bernstein 2023), each factor gets

    std = gain * sqrt(1 / d_in) * min(1, sqrt(d_out / d_in))

so that its spectral norm is ``~ sqrt(d_out / d_in)`` (a Gaussian ``d_out x d_in`` matrix of std
``sigma`` has norm ``~ sigma (sqrt(d_in) + sqrt(d_out))``) and the product of the factors has the
spectral scale ``sqrt(m / n)`` of a dense layer; a layer that sums parts (block diagonal + low rank,
low rank + sparse) gives each part a gain ``1/sqrt 2``. With Adam an update of a ``d_out x d_in``
matrix has spectral norm ``~ lr sqrt(d_in d_out)``, so keeping it ``~ sqrt(d_out / d_in)`` needs
``lr ~ 1 / d_in``: a factor's learning rate is the dense layer's times ``n / d_in`` (:func:`lr_multipliers`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..structures.base import StructuredLinear


def factor_std(d_in: int, d_out: int, gain: float = 1.0) -> float:
    """``gain * sqrt(1/d_in) * min(1, sqrt(d_out/d_in))``."""
    return float(gain) * math.sqrt(1.0 / d_in) * min(1.0, math.sqrt(d_out / d_in))


def _dims(spec) -> tuple[int, int, float]:
    d_in, d_out, *g = spec
    return int(d_in), int(d_out), float(g[0]) if g else 1.0


@torch.no_grad()
def structured_init_(layer: StructuredLinear, generator: torch.Generator | None = None) -> StructuredLinear:
    """Draw every factor of ``layer`` from ``N(0, factor_std(d_in, d_out, gain)^2)``; zero the bias."""
    for name, spec in layer.factor_dims().items():
        p = layer.get_parameter(name)
        if isinstance(spec, (int, float)):
            p.fill_(float(spec))
            continue
        d_in, d_out, gain = _dims(spec)
        p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * factor_std(d_in, d_out, gain))
    bias = getattr(layer, "bias", None)
    if bias is not None:
        bias.zero_()
    return layer


def lr_multipliers(model: nn.Module) -> dict[str, float]:
    """``{parameter name: n / d_in}`` for every factor of every structured layer of ``model`` (others: 1)."""
    out: dict[str, float] = {}
    for lname, layer in model.named_modules():
        if not isinstance(layer, StructuredLinear):
            continue
        for pname, spec in layer.factor_dims().items():
            if isinstance(spec, (int, float)):
                continue
            d_in, _, _ = _dims(spec)
            out[f"{lname}.{pname}" if lname else pname] = layer.in_features / d_in
    return out


def structured_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                            scale_lr: bool = True) -> list[dict[str, Any]]:
    """Param groups with each structured factor's learning rate ``lr * n / d_in`` (``scale_lr``), the
    rest at ``lr``; for any ``torch.optim`` optimizer (``AdamW(groups)``)."""
    mult = lr_multipliers(model) if scale_lr else {}
    by_lr: dict[float, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_lr.setdefault(mult.get(name, 1.0), []).append(p)
    return [{"params": ps, "lr": lr * m, "lr_multiplier": m, "weight_decay": weight_decay}
            for m, ps in sorted(by_lr.items())]
