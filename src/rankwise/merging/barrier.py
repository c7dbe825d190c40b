"""The loss barrier on the linear path between two models (linear mode connectivity).

``theta(alpha) = (1 - alpha) theta_a + alpha theta_b``; with ``L`` the loss on the data, the barrier is

    B = max_alpha [ L(theta(alpha)) - ((1 - alpha) L(theta_a) + alpha L(theta_b)) ]

(Frankle et al. 2020; git re-basin's "loss barrier"), and for classifiers the accuracy barrier is the
same with the accuracy's deficit. Interpolating BatchNorm running statistics does not give the
statistics of the interpolated network (the variance collapses), which is the failure users of the
PyTorch ports of git re-basin report; with ``repair=True`` each interpolated model's BatchNorm
statistics are recomputed on the data before it is evaluated (REPAIR-lite: the statistics reset, not
REPAIR's full per-channel rescaling).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .data import batches, forward, loss_and_accuracy

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class BarrierResult:
    alphas: list[float]
    losses: list[float]
    accuracies: list[float] | None = None
    barrier: float = 0.0
    accuracy_barrier: float | None = None
    repaired: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def interpolate(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """A copy of ``model_a`` with every floating tensor ``(1 - alpha) a + alpha b`` (integer buffers, e.g.
    BatchNorm's batch counter, from ``a``)."""
    out = copy.deepcopy(model_a)
    sb = model_b.state_dict()
    with torch.no_grad():
        for key, t in out.state_dict().items():
            if key not in sb or sb[key].shape != t.shape:
                raise ConfigError(f"tensor {key} differs between the two models; interpolate two models of one "
                                  "architecture and size")
            if t.is_floating_point():
                t.copy_(torch.lerp(t, sb[key].to(t.dtype), float(alpha)))
    return out


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) for m in model.modules())


@torch.no_grad()
def reset_batchnorm_(model: nn.Module, data, batch_size: int = 64) -> nn.Module:
    """Recompute every BatchNorm's running mean and variance on ``data`` (cumulative average over the
    batches, the model in train mode for that pass only); returns ``model``."""
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    if not bns:
        return model
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for batch in batches(data, batch_size):
            forward(model, batch)
    finally:
        for m, mo in zip(bns, momenta):
            m.momentum = mo
        model.train(was_training)
    return model


def barrier(model_a: nn.Module, model_b: nn.Module, data, alphas: int | Sequence[float] = 11, *,
            repair: bool = True, batch_size: int = 64) -> BarrierResult:
    """Loss (and accuracy) along the linear path and the barrier height (module docstring)."""
    if isinstance(alphas, int):
        if alphas < 2:
            raise ConfigError(f"alphas must be >= 2 points, got {alphas}")
        alphas = torch.linspace(0, 1, alphas).tolist()
    alphas = [float(a) for a in alphas]
    if not alphas or min(alphas) < 0 or max(alphas) > 1:
        raise ConfigError("alphas must lie in [0, 1]")
    if 0.0 not in alphas or 1.0 not in alphas:
        alphas = sorted(set(alphas) | {0.0, 1.0})
    repaired = bool(repair and has_batchnorm(model_a))
    losses, accs = [], []
    for a in alphas:
        m = interpolate(model_a, model_b, a)
        if repaired and 0.0 < a < 1.0:
            reset_batchnorm_(m, data, batch_size)
        m.eval()
        loss, acc = loss_and_accuracy(m, data, batch_size)
        losses.append(loss)
        accs.append(acc)
    l0, l1 = losses[alphas.index(0.0)], losses[alphas.index(1.0)]
    bar = max(l - ((1 - a) * l0 + a * l1) for a, l in zip(alphas, losses))
    res = BarrierResult(alphas, losses, None, float(bar), None, repaired)
    if accs[0] is not None:
        a0, a1 = accs[alphas.index(0.0)], accs[alphas.index(1.0)]
        res.accuracies = [float(x) for x in accs]
        res.accuracy_barrier = float(max(((1 - a) * a0 + a * a1) - x for a, x in zip(alphas, accs)))
    return res


__all__ = ["BarrierResult", "barrier", "has_batchnorm", "interpolate", "reset_batchnorm_"]
