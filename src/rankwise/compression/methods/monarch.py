"""``monarch``: ``W' = P2 B2 P1 B1`` with rank-r blocks (:mod:`rankwise.linalg.monarch`).

Fit: the closed-form projection under the block-diagonal part of the covariance (each input block
whitened by its own ``C_ii``; exact minimizer of that objective, and Frobenius-optimal when ``C`` is
a multiple of I), then ``iters`` rounds of alternating least squares on the full activation error
``tr((W - W') C (W - W')^T)``, which never increases it. Sequential refit targets are used.

Damping: both steps use ``C + delta mean(diag C) I`` (``damping`` = delta, default 0.01, as GPTQ
damps its Hessian), i.e. they minimize ``||(W - W') X||_F^2 + delta mean(diag C) ||W - W'||_F^2``.
Undamped, the ALS's exact block solves (``C_ii^-1``, ``(F C F^T)^-1``) fit the calibration windows
with large weights along their low-variance input directions: on SmolLM2 at 40 % / 60 % removed (16 x
512 calibration windows) some fitted layers had 20-190x the Frobenius norm of the dense weight and the
model's perplexity was 1,316 / 33.9 million (BENCHMARKS.md, issue 13). ``damping=0`` is the undamped
objective.

Shape: ``nblocks`` input blocks (dividing ``in``) and ``out_blocks`` output blocks (dividing ``out``;
default ``nblocks``). Default ``nblocks=None``: the divisor of each side closest to 4. On SmolLM2
layers at 40% removed, 2-4 blocks gave the lowest activation error (close to low rank's) and the
fastest forward; sqrt(n) blocks (the paper's square Monarch) were worse on both. The rank per block
is the largest whose ``r (l n + b m)`` values fit the layer's budget.

Fallbacks (listed per layer in the report's ``note``): a side whose size has no divisor near 4 (a
prime) gets 1 block -- that side is not split and the layer is a product of one full factor and one
block-diagonal one. (The rank cap ``min(p, s)`` never binds below the dense size.) Block counts
given as options that do not divide the sizes raise :class:`ConfigError` naming the divisors that
would work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ...calibration.stats import COV, LayerStats
from ...errors import ConfigError
from ...linalg.monarch import check_monarch_shape, divisors, monarch_als, monarch_num_values, monarch_project
from ...linalg.whitening import damp
from ...structures.monarch import MonarchLinear
from .base import STRUCTURES, Method
from .prune import keep_fraction_text

DEFAULT_BLOCKS = 4


@dataclass
class MonarchOptions:
    """``nblocks``/``out_blocks``: block counts (None = divisor closest to 4); ``iters``: ALS rounds;
    ``damping``: relative ridge of the fit's covariance (module docstring)."""

    nblocks: int | None = None
    out_blocks: int | None = None
    iters: int = 10
    damping: float = 0.01

    def __post_init__(self) -> None:
        for name in ("nblocks", "out_blocks"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if int(self.iters) < 0:
            raise ValueError(f"iters must be >= 0, got {self.iters}")
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not self.damping >= 0:
            raise ValueError(f"damping must be a number >= 0, got {self.damping!r}")


def default_blocks(size: int, want: int = DEFAULT_BLOCKS) -> int:
    """The divisor of ``size`` closest to ``want`` in ratio (ties: the smaller). A prime size far from
    ``want`` gets 1 block on that side (that side is then not split; the other side still is)."""
    return min(divisors(size), key=lambda d: (abs(math.log(d / want)), d))


@STRUCTURES.register("monarch")
class Monarch(Method):
    """Monarch projection + ALS (module docstring)."""

    name = "monarch"
    budget = "params"
    Options = MonarchOptions

    def needs(self) -> set[str]:
        return {COV}

    def blocks(self, shape: tuple[int, int]) -> tuple[int, int]:
        """``(in_blocks, out_blocks)`` for an (out, in) layer, validated."""
        m, n = shape
        b = self.options.nblocks or default_blocks(n)
        ob = self.options.out_blocks or (self.options.nblocks or default_blocks(m))
        check_monarch_shape(m, n, b, ob, 1)
        return b, ob

    def plan_layer(self, shape: tuple[int, int], target: float) -> dict[str, Any] | None:
        m, n = (int(s) for s in shape)
        if target >= m * n:
            return None
        b, ob = self.blocks((m, n))
        per_rank = monarch_num_values(m, n, b, ob, 1)
        rank = min(int(target // per_rank), m // ob, n // b)
        while rank >= 1 and monarch_num_values(m, n, b, ob, rank) >= m * n:
            rank -= 1
        if rank < 1:
            fits = [d for d in divisors(math.gcd(m, n)) if monarch_num_values(m, n, d, d, 1) <= target]
            hint = f"nblocks={max(fits)}" if fits else "a lower ratio"
            raise ConfigError(f"monarch on a {m}x{n} layer with {b} input and {ob} output blocks: rank-1 blocks "
                              f"already store {per_rank} values (l*in + b*out); {keep_fraction_text(target, m, n)}: "
                              f"use fewer blocks ({hint}) or a lower ratio")
        spec: dict[str, Any] = {"in_blocks": b, "out_blocks": ob, "rank": rank}
        notes = []
        for size, blocks, side, given in ((n, b, "input", self.options.nblocks),
                                          (m, ob, "output", self.options.out_blocks or self.options.nblocks)):
            if blocks == 1 and given is None and size > 1:
                notes.append(f"{side} size {size} has no divisor near {DEFAULT_BLOCKS}: 1 {side} block (not split)")
        if notes:
            spec["note"] = "; ".join(notes)
        return spec

    def fit(self, W: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats,
            spec: Mapping[str, Any]) -> MonarchLinear:
        target = stats.target(W).to(torch.float64)
        C = damp(stats.covariance(self.name), self.options.damping)
        b, ob, r = int(spec["in_blocks"]), int(spec["out_blocks"]), int(spec["rank"])
        B1, B2 = monarch_project(target, b, ob, r, C)
        if self.options.iters > 0:
            fit = monarch_als(target, C, B1, B2, iters=self.options.iters)
            B1, B2 = fit.B1, fit.B2
        return MonarchLinear.from_factors(B1, B2, bias=bias, dtype=torch.float32)
