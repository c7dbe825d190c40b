"""EVA: ``A`` from the eigenvectors of the layer-input covariance, ranks redistributed by explained variance."""
from __future__ import annotations

import torch

from ...errors import ConfigError
from ..layers import LoraAdapter
from .base import InitContext, NoOptions, register


@register("eva", needs="activations", peft=True)
def init_eva(base, W: torch.Tensor, r: int, opts: NoOptions, ctx: InitContext, name: str) -> LoraAdapter:
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
