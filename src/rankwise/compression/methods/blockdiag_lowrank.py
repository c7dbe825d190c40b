"""``blockdiag-lowrank``: ``W' = blockdiag(D_1..D_b) + L R`` fitted alternately on the activation error.

Fit (:func:`rankwise.linalg.blockdiag.blockdiag_lowrank_fit`): start from the whitened rank-k fit
of ``W``, then alternate the closed-form block-diagonal least squares under ``C`` and the whitened
rank-k truncation of ``W - BD``; both are exact minimizers, so ``||(W - W') X||_F`` never increases.
Sequential refit targets are used. Both steps use the damped covariance ``C + delta mean(diag C) I``
(``damping`` = delta, default 0.01; :func:`rankwise.linalg.whitening.damp`): undamped, the blocks'
exact solves (``C_ii^-1``) put large weights on input directions the calibration windows barely excite
(on SmolLM2, 16 x 512 windows, 40 % removed: gate/up layers of blocks 21 and 24 at 21-31x the dense
weight's Frobenius norm).

Budget: ``m n / b`` block values plus ``k (m + n)``. ``nblocks`` fixes ``b`` (it must divide both
sides); ``nblocks=None`` picks the smallest ``b`` dividing both sides whose blocks take at most
``1 - lowrank_fraction`` of the layer's budget; the rank takes the rest. Default
``lowrank_fraction=0.75``: on SmolLM2 layers at 40% removed, 8-16 blocks (75-90% of the budget on
the low-rank part) fitted best; 2 blocks (most of the budget on the blocks) was clearly worse.

Fallback (listed per layer in the report's ``note``): when no common divisor makes the blocks small
enough for their share, the largest common divisor is used and the blocks take more of the budget.
Sizes without a common divisor > 1 (one of them prime) raise :class:`ConfigError` naming the layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ...calibration.stats import COV, LayerStats
from ...errors import ConfigError
from ...linalg.blockdiag import blockdiag_lowrank_fit, check_blocks
from ...linalg.whitening import damp
from ...structures.blockdiag import BlockDiagLowRankLinear
from .base import STRUCTURES, Method
from .prune import keep_fraction_text


@dataclass
class BlockDiagLowRankOptions:
    """``nblocks`` (None: from ``lowrank_fraction``), ``lowrank_fraction`` of the budget for ``L R``,
    ``iters`` alternation rounds, ``damping`` the relative ridge of the fit's covariance."""

    nblocks: int | None = None
    lowrank_fraction: float = 0.75
    iters: int = 20
    damping: float = 0.01

    def __post_init__(self) -> None:
        if self.nblocks is not None and (isinstance(self.nblocks, bool) or not isinstance(self.nblocks, int)
                                         or self.nblocks < 1):
            raise ValueError(f"nblocks must be a positive integer or None, got {self.nblocks!r}")
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not self.damping >= 0:
            raise ValueError(f"damping must be a number >= 0, got {self.damping!r}")
        if not 0.0 < float(self.lowrank_fraction) < 1.0:
            raise ValueError(f"lowrank_fraction must be in (0, 1), got {self.lowrank_fraction}")
        if int(self.iters) < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")


@STRUCTURES.register("blockdiag-lowrank")
class BlockDiagLowRank(Method):
    """Block-diagonal plus low rank (module docstring)."""

    name = "blockdiag-lowrank"
    budget = "params"
    Options = BlockDiagLowRankOptions

    def needs(self) -> set[str]:
        return {COV}

    def plan_layer(self, shape: tuple[int, int], target: float) -> dict[str, Any] | None:
        m, n = (int(s) for s in shape)
        if target >= m * n:
            return None
        where = f"blockdiag-lowrank on a {m}x{n} layer"
        common = [d for d in range(2, min(m, n) + 1) if m % d == 0 and n % d == 0]
        if self.options.nblocks is not None:
            b = self.options.nblocks
            check_blocks(m, n, b)
        else:
            if not common:
                raise ConfigError(f"{where}: {m} and {n} have no common divisor > 1, so no block-diagonal part "
                                  "fits; leave this layer out (--targets) or use --structure lowrank")
            share = (1.0 - self.options.lowrank_fraction) * target
            fits = [d for d in common if m * n / d <= share]
            b = fits[0] if fits else common[-1]
        rank = min(int((target - m * n // b) // (m + n)), m, n)
        if rank < 1:
            raise ConfigError(f"{where}: {b} diagonal blocks store {m * n // b} values and a rank-1 part {m + n} more; "
                              f"{keep_fraction_text(target, m, n)}: use more blocks (nblocks) or a lower ratio")
        spec: dict[str, Any] = {"nblocks": b, "rank": rank}
        if self.options.nblocks is None and m * n / b > (1.0 - self.options.lowrank_fraction) * target:
            spec["note"] = (f"blocks take {100.0 * (m * n // b) / target:.0f}% of the budget (wanted <= "
                            f"{100.0 * (1.0 - self.options.lowrank_fraction):.0f}%): {b} = the largest common "
                            f"divisor of {m} and {n}")
        return spec

    def fit(self, W: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats,
            spec: Mapping[str, Any]) -> BlockDiagLowRankLinear:
        target = stats.target(W).to(torch.float64)
        C = damp(stats.covariance(self.name), self.options.damping)
        res = blockdiag_lowrank_fit(target, int(spec["nblocks"]), int(spec["rank"]), C, iters=self.options.iters)
        return BlockDiagLowRankLinear.from_parts(res.blocks, res.L, res.R, bias=bias, dtype=torch.float32)
