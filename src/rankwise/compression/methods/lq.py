"""``--structure lq``: alternating quantized + low-rank fit (LQ-LoRA / CALDERA style).

``W' = (Q + L R) Q_rot^T`` fitted to ``T = stats.target(W)`` under ``C = stats.covariance()`` by
:func:`rankwise.linalg.lowrank_quant.lq`: the better of LoRC's and LQ-LoRA's initializations, then
up to ``iters`` rounds of (Q-step: quantize ``T - L R``; LR-step: whitened rank-k fit of ``T - Q``),
each kept only if ``||(T - Q - L R) X||_F`` decreases. The objective is therefore non-increasing
(``layer.fit_info["history"]``) and never above LoRC's with the same options (``init`` "best" or
"lorc"). Budget split as in :mod:`.lorc`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ...errors import ConfigError
from ...linalg.lowrank_quant import INITS
from ...structures.lowrank_quant import LowRankQuantLinear
from .base import COV, STRUCTURES, Candidate, CandidateGrid, LayerStats, Method
from .candidates import candidate_specs
from .lorc import (LowRankQuantOptions, fit_lowrank_quant, lowrank_quant_candidates, plan_lowrank_quant,
                   uniform_lowrank_quant_plan)


@dataclass
class LQOptions(LowRankQuantOptions):
    """:class:`LowRankQuantOptions` plus ``iters`` (rounds after the initialization) and ``init``
    ("best", "lorc" = quantize first, "svd" = low-rank first as in LQ-LoRA)."""

    iters: int = 5
    init: str = "best"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ConfigError(f"iters must be an integer >= 0, got {self.iters!r}")
        if self.init not in INITS:
            raise ConfigError(f"unknown init {self.init!r}; valid: {', '.join(INITS)}")


@STRUCTURES.register("lq")
class LQ(Method):
    """Alternating quantized + low-rank fit; see the module docstring."""

    name = "lq"
    budget = "bytes"
    Options = LQOptions

    def needs(self) -> set[str]:
        return {COV}

    def plan_layer(self, shape: tuple[int, int], target: float) -> dict[str, Any]:
        return plan_lowrank_quant(shape, target, self.options)

    def candidates(self, W: torch.Tensor, stats: LayerStats, grid: CandidateGrid | None = None) -> list[Candidate]:
        """LoRC's candidates: their errors bound this method's from above (see :mod:`.lorc`)."""
        return lowrank_quant_candidates(W, stats, self.options, grid)

    def uniform_plan(self, shapes, bits_per_weight: float | None, grid: CandidateGrid | None = None):
        return uniform_lowrank_quant_plan(shapes, bits_per_weight, self.options)

    def candidate_specs(self, shape: tuple[int, int], grid: CandidateGrid) -> list[dict[str, Any]]:
        return candidate_specs(shape, self.options, grid, [self.options.rank or 1])

    def fit(self, W: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats,
            spec: Mapping[str, Any]) -> LowRankQuantLinear:
        return fit_lowrank_quant(W, bias, stats, spec, self.options, iters=self.options.iters,
                                 init=self.options.init)
