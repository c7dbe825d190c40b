"""Parameter budget: ``ratio R`` = fraction of the targeted linear-layer weight parameters REMOVED.

A layer of shape ``m x n`` (out x in) kept at rank ``k`` costs ``k (m + n)`` weight parameters
instead of ``m n``. Uniform allocation keeps ``k = floor(m n (1 - R) / (m + n))`` in every layer;
a layer whose factorization would not save parameters (``k (m + n) >= m n``) stays dense.

A *rank plan* is ``{layer_name: k | None}``; ``None`` means "keep the layer dense".
"""
from __future__ import annotations

import math
from typing import Mapping

from ...errors import ConfigError
from ...structures.lowrank import lowrank_saves


def check_ratio(ratio: float) -> float:
    """``ratio`` as a float strictly between 0 and 1, else :class:`ConfigError`."""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"--ratio must be a number in (0, 1), got {ratio!r}") from None
    if not math.isfinite(r) or not 0.0 < r < 1.0:
        raise ConfigError(
            f"--ratio is the fraction of targeted parameters removed and must be in (0, 1), got {ratio!r}; "
            "e.g. 0.4 removes 40%"
        )
    return r


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """The uniform rank ``k = max(1, floor(m n (1 - R) / (m + n)))``: the one copy of this formula."""
    return max(1, math.floor(m * n * (1.0 - ratio) / (m + n)))


def uniform_rank(m: int, n: int, ratio: float) -> int | None:
    """:func:`rank_for_ratio`, or ``None`` when that rank would not save parameters."""
    k = rank_for_ratio(m, n, ratio)
    return k if lowrank_saves(m, n, k) else None


def layer_params(shape: tuple[int, int], rank: int | None) -> int:
    """Weight parameters of an (out, in) layer kept dense (``rank=None``) or at ``rank``."""
    m, n = shape
    return m * n if rank is None else rank * (m + n)


def plan_params(shapes: Mapping[str, tuple[int, int]], plan: Mapping[str, int | None]) -> tuple[int, int]:
    """``(before, after)`` weight parameter counts of the targeted layers under ``plan``."""
    before = sum(m * n for m, n in shapes.values())
    after = sum(layer_params(shapes[name], plan.get(name)) for name in shapes)
    return before, after


def check_plan(shapes: Mapping[str, tuple[int, int]], plan: Mapping[str, int | None]) -> None:
    """Every planned rank is an int in [1, min(m, n)] for a known layer."""
    for name, k in plan.items():
        if name not in shapes:
            raise ConfigError(f"rank plan names {name!r}, which is not a targeted layer")
        if k is None:
            continue
        m, n = shapes[name]
        if not isinstance(k, int) or not 1 <= k <= min(m, n):
            raise ConfigError(f"rank {k!r} for {name} ({m} x {n}) must be an int in [1, {min(m, n)}]")
