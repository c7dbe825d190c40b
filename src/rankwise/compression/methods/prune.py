"""``prune``: Wanda-style pruning, the baseline row: keep, per output row, the weights of largest
``|W_ij| * ||x_j||`` (unstructured, the same count per row) or 2 of every 4 consecutive input
columns (2:4); kept values are not changed.

Objective: the mask minimizes ``||(W - W') D||_F``, ``D = diag(||x_j||)``, among masks of the
pattern -- the activation error ``||(W - W') X||_F`` under the diagonal approximation of ``C``
(:mod:`rankwise.linalg.sparse`). Budget (``params``): the nonzeros; indices are byte overhead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ...calibration.stats import ABS_MEAN, LayerStats
from ...errors import ConfigError
from ...linalg.sparse import PATTERNS, check_pattern, feature_scales, wanda_mask
from ...structures.sparse import SparseLinear
from .base import STRUCTURES, Method


@dataclass
class PruneOptions:
    """``pattern``: "unstructured" (the same number of weights kept in every row) or "2:4"."""

    pattern: str = "unstructured"

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {self.pattern!r}")


def input_scales(stats: LayerStats, name: str) -> torch.Tensor:
    """``||x_j|| = sqrt(sum_t x_tj^2)`` per input feature, floored (see ``feature_scales``)."""
    if stats.inputs is None:
        raise ConfigError(f"{name} needs the input statistics (sum of squared activations), which were not collected")
    return feature_scales(stats.inputs.sq_sum)


def keep_fraction_text(target: float, m: int, n: int) -> str:
    return f"the layer's budget of {int(target)} values keeps {100.0 * target / (m * n):.1f}% of its {m}x{n} weights"


@STRUCTURES.register("prune")
class Prune(Method):
    """Wanda pruning (module docstring)."""

    name = "prune"
    budget = "params"
    Options = PruneOptions

    def needs(self) -> set[str]:
        return {ABS_MEAN}  # the input sums (sq_sum gives ||x_j||); no covariance

    def plan_layer(self, shape: tuple[int, int], target: float) -> dict[str, Any] | None:
        m, n = (int(s) for s in shape)
        pattern = check_pattern(self.options.pattern, n)
        if target >= m * n:
            return None
        if pattern == "2:4":
            if target < m * n / 2:
                raise ConfigError(f"prune 2:4 on a {m}x{n} layer: 2:4 sparsity alone keeps 50% of the weights; "
                                  f"{keep_fraction_text(target, m, n)}: use pattern 'unstructured' or a lower ratio")
            return {"pattern": "2:4", "nnz_per_row": n // 2}
        k = int(target // m)
        if k < 1:
            raise ConfigError(f"prune on a {m}x{n} layer: {keep_fraction_text(target, m, n)}, less than one weight "
                              "per output row; use a lower ratio")
        return {"pattern": "unstructured", "nnz_per_row": k}

    def fit(self, W: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats,
            spec: Mapping[str, Any]) -> SparseLinear:
        target = stats.target(W).to(torch.float64)
        mask = wanda_mask(target, input_scales(stats, self.name), spec["pattern"], spec.get("nnz_per_row"))
        return SparseLinear.from_dense(target, mask, spec["pattern"], bias=bias, dtype=torch.float32)
