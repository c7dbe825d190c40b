"""WeLore's rank rule (Jaiswal et al. 2024, "From GaLore to WeLore"): one global threshold on
normalized singular values.

Each layer's spectrum is normalized by its largest value, ``t_{l,i} = s_{l,i} / s_{l,1}`` (the
objective's spectrum: whitened under svd-llm, plain under ``plain``). One threshold ``tau`` gives
every layer the rank ``k_l(tau) = #{i : t_{l,i} >= tau}``; a layer whose rank would not save
parameters (``k (m + n) >= m n``) stays dense -- WeLore's non-low-rank components, the ones its
fine-tuning keeps frozen. The stored values ``sum_l min(k_l(tau) (m + n), m n)`` never increase with
``tau``, so the smallest ``tau`` among the normalized singular values that meets
``(1 - ratio) sum_l m n`` is found by bisection over their sorted list: layers with a heavy spectral
tail get low ranks, layers whose spectrum decays slowly keep more or stay dense.
"""
from __future__ import annotations

import numpy as np

from .budget import layer_params
from .types import AllocationRequest, RankPlan, register
from ...structures.lowrank import lowrank_saves


def welore_plan(ratio: float, shapes, spectra, min_rank: int = 1) -> tuple[RankPlan, float]:
    """``(plan, tau)``: ranks from one global threshold ``tau`` on ``s_i / s_1`` (module docstring)."""
    norm = {}
    for name, s in spectra.items():
        s = np.sort(np.asarray(s, dtype=np.float64))[::-1]
        norm[name] = s / s[0] if s.size and s[0] > 0 else np.zeros_like(s)
    budget = (1.0 - ratio) * sum(m * n for m, n in shapes.values())

    def plan_for(tau: float) -> RankPlan:
        plan = {}
        for name, (m, n) in shapes.items():
            k = max(int(min_rank), int(np.count_nonzero(norm[name] >= tau)))
            plan[name] = k if lowrank_saves(m, n, k) else None
        return plan

    def cost(plan: RankPlan) -> int:
        return sum(layer_params(shapes[n], k) for n, k in plan.items())

    taus = np.unique(np.concatenate([v for v in norm.values()] + [np.array([np.inf])]))  # ascending
    lo, hi = 0, len(taus) - 1            # cost(taus[hi] = inf) is the least possible
    if cost(plan_for(taus[hi])) > budget:
        return plan_for(taus[hi]), float(taus[hi])
    while lo < hi:                       # smallest index whose plan fits
        mid = (lo + hi) // 2
        if cost(plan_for(taus[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return plan_for(taus[lo]), float(taus[lo])


@register("welore", "spectra", "WeLore: one global threshold on singular values normalized by each layer's largest")
def welore(req: AllocationRequest) -> RankPlan:
    """Ranks ``#{s_i / s_1 >= tau}`` with one ``tau`` solved for the ratio; layers that would not save stay dense."""
    plan, tau = welore_plan(req.ratio, req.shapes, req.spectra(), req.options.min_rank)
    req.info["welore_threshold"] = tau
    req.info["welore_dense"] = sorted(n for n, k in plan.items() if k is None)
    return plan
