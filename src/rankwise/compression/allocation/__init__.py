"""Budgets and allocators: from one global budget to a per-layer plan.

* :mod:`.types`      -- :class:`AllocationRequest`, :class:`AllocateOptions`, the ``ALLOCATORS`` registry
* :mod:`.budget`     -- the ratio, the uniform rank (one formula), plan checks
* :mod:`.knapsack`   -- the budgeted choice of one option per layer (convex-hull greedy)
* :mod:`.bytes`      -- the byte-budget allocator (bits-greedy: widths and ranks per layer)
* :mod:`.solvers`    -- the pure allocators on spectra and measured losses
* :mod:`.measure`    -- the measuring glue: speed caps, sensitivity losses, dense reasons
* :mod:`.speed`      -- the measured speed model (break-even ranks per machine)
* :mod:`.allocators` -- the registered allocators (uniform, spectrum, ..., sensitivity-band)
"""
from .types import ALLOCATORS, AllocateOptions, AllocationContext, AllocationRequest, Allocator, RankPlan, get_allocator

__all__ = ["ALLOCATORS", "AllocateOptions", "AllocationContext", "AllocationRequest", "Allocator", "RankPlan",
           "get_allocator"]
