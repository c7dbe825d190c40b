"""Rank allocators: turn a parameter budget into a :data:`~rankwise.compress.budget.RankPlan`.

``ALLOCATORS[name].fn(request) -> plan``. An allocator that sets ``needs_factorizations`` gets the
full factorization of every targeted layer (with ``.spectrum``) under the compression method's
objective, computed once; the pipeline then truncates each factorization to the planned rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import UnknownMethodError
from .budget import RankPlan, uniform_rank


@dataclass
class AllocationRequest:
    """Everything an allocator may use.

    ``ratio``: fraction of the targeted weight parameters to remove. ``shapes``: ``{name: (out, in)}``
    in model order. ``factorizations``: ``{name: Factorization}`` (empty unless the allocator
    ``needs_factorizations``). ``context``: extra inputs the pipeline passes (model, calibration
    windows, method, ...), for allocators that measure.
    """

    ratio: float
    shapes: Mapping[str, tuple[int, int]]
    factorizations: Mapping[str, Any] = field(default_factory=dict)
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Allocator:
    name: str
    fn: Callable[[AllocationRequest], RankPlan] = field(repr=False)
    needs_factorizations: bool = False
    description: str = ""


def uniform(req: AllocationRequest) -> RankPlan:
    """Every layer ``m x n`` keeps ``k = floor(m n (1 - R) / (m + n))``; ``None`` (dense) if that saves nothing."""
    return {name: uniform_rank(m, n, req.ratio) for name, (m, n) in req.shapes.items()}


ALLOCATORS: dict[str, Allocator] = {
    "uniform": Allocator("uniform", uniform, False, "same parameter fraction removed from every layer"),
}


def get_allocator(name: str) -> Allocator:
    try:
        return ALLOCATORS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown allocator {name!r}; valid allocators: {', '.join(ALLOCATORS)}") from None
