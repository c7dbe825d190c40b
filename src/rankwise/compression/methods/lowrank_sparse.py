"""``lowrank-sparse``: ``W' = L R + S`` fitted by OATS's alternation in the activation-scaled space.

Fit (:func:`rankwise.linalg.sparse.lowrank_sparse_fit`): with ``D = diag(||x_j||)``, alternate the
rank-k truncation of ``(W - S) D`` and the hard threshold of the residual to the pattern
(unstructured: the same number kept per row; or 2:4), ``iters`` times; the scaled objective
``||(W - L R - S) D||_F`` never increases. With ``refit`` (default) the low-rank part is then
replaced by the whitened rank-k fit of ``W - S`` under the full covariance (``SVD_k((W - S) S_C)
S_C^-1``), the exact minimizer of the true activation error ``||(W - L R - S) X||_F`` given ``S``,
so the refit never makes that error worse. Sequential refit targets (``stats.target``) are used.

Budget (``params``): ``rank (m + n)`` factor values plus the nonzeros of ``S``. Unstructured:
``sparse_fraction`` of the layer's budget goes to ``S`` (default 0.75: OATS spends 25-30% on the low
rank part; on SmolLM2 layers 0.7-0.85 gave activation errors within a few percent of each other),
the rest to the rank; leftover values go to ``S``. 2:4: ``S`` costs exactly half the weights, the
rank takes the rest (``sparse_fraction`` is not used).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ...calibration.stats import COV, LayerStats
from ...errors import ConfigError
from ...linalg.sparse import PATTERNS, check_pattern, lowrank_sparse_fit, refit_lowrank_under_cov
from ...structures.sparse import LowRankSparseLinear
from .base import STRUCTURES, Method
from .prune import input_scales, keep_fraction_text


@dataclass
class LowRankSparseOptions:
    """``pattern``: "unstructured" | "2:4"; ``sparse_fraction``: share of the budget spent on ``S``
    (unstructured only); ``iters``: alternations; ``refit``: whitened refit of the low-rank part."""

    pattern: str = "unstructured"
    sparse_fraction: float = 0.75
    iters: int = 40
    refit: bool = True

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {self.pattern!r}")
        if not 0.0 < float(self.sparse_fraction) < 1.0:
            raise ValueError(f"sparse_fraction must be in (0, 1), got {self.sparse_fraction}")
        if int(self.iters) < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")


@STRUCTURES.register("lowrank-sparse")
class LowRankSparse(Method):
    """OATS low-rank + sparse (module docstring)."""

    name = "lowrank-sparse"
    budget = "params"
    Options = LowRankSparseOptions

    def needs(self) -> set[str]:
        return {COV}

    def plan_layer(self, shape: tuple[int, int], target: float) -> dict[str, Any] | None:
        m, n = (int(s) for s in shape)
        pattern = check_pattern(self.options.pattern, n)
        if target >= m * n:
            return None
        where = f"lowrank-sparse ({pattern}) on a {m}x{n} layer"
        if pattern == "2:4":
            rest = target - m * n / 2
            if rest < m + n:
                raise ConfigError(f"{where}: 2:4 sparsity alone keeps 50% of the weights and a rank-1 part "
                                  f"{m + n} more values; {keep_fraction_text(target, m, n)}: use pattern "
                                  "'unstructured' or a lower ratio")
            return {"rank": min(int(rest // (m + n)), m, n), "pattern": "2:4", "nnz_per_row": n // 2}
        if target < (m + n) + m:
            raise ConfigError(f"{where}: {keep_fraction_text(target, m, n)}, less than a rank-1 part ({m + n} values) "
                              f"plus one nonzero per row ({m}); use prune or a lower ratio")
        rank = min(max(1, int((1.0 - self.options.sparse_fraction) * target // (m + n))), m, n)
        nnz = min(int((target - rank * (m + n)) // m), n)
        return {"rank": rank, "pattern": "unstructured", "nnz_per_row": max(nnz, 1)}

    def fit(self, W: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats,
            spec: Mapping[str, Any]) -> LowRankSparseLinear:
        target = stats.target(W).to(torch.float64)
        rank, pattern = int(spec["rank"]), spec["pattern"]
        res = lowrank_sparse_fit(target, input_scales(stats, self.name), rank, pattern, spec.get("nnz_per_row"),
                                 iters=self.options.iters)
        L, R = res.L, res.R
        if self.options.refit:
            L, R = refit_lowrank_under_cov(target, res.S, rank, stats.covariance(self.name))
        return LowRankSparseLinear.from_parts(L, R, res.S, res.mask, pattern, bias=bias, dtype=torch.float32)
