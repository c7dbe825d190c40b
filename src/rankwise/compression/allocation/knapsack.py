"""Budgeted choice of one option per layer (multiple-choice knapsack) by a global convex-hull greedy.

Each layer ``l`` offers options ``(rank_or_None, params, cost)``; choose one per layer to

    minimize  sum_l cost_l(choice_l)   subject to   sum_l params_l(choice_l) <= max_params.

Every layer starts at its cheapest option. Its remaining options, seen as points (parameters
saved, cost), have a lower convex hull whose segments have non-decreasing slopes (extra cost per
parameter saved). The greedy takes hull segments of all layers in order of slope until the budget
holds -- this walks the Lagrangian path: after each step the plan is the exact optimum of
``sum cost + lam * sum params`` for some ``lam``, hence optimal for its own parameter count. A final
pass spends the slack: while some layer can move to a costlier-in-parameters, cheaper-in-cost option
within budget, the best such move is made. Guarantee: ``OPT(max_params) <= cost <= OPT(P_hull)``
where ``P_hull <= max_params`` is the parameter count of the last hull plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ...errors import ConfigError


@dataclass(frozen=True)
class Option:
    rank: int | None  # None = dense
    params: int       # the option's size in the budget's unit (parameters, or bytes for a byte budget)
    cost: float
    label: Any = field(default=None, compare=False)  # what the option stands for beyond a rank (a spec)


def _hull(points: list[tuple[int, float, int]]) -> list[int]:
    """Indices of the lower convex hull of (saved, cost, idx) points sorted by saved, from the first."""
    hull: list[tuple[int, float, int]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            # drop hull[-1] if it lies on or above the segment hull[-2] -> p
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return [h[2] for h in hull]


def solve_budget(tables: Mapping[str, Sequence[Option]], max_params: int) -> dict[str, Option]:
    """One option per layer with ``sum params <= max_params`` and small ``sum cost`` (see module doc).

    Raises :class:`ConfigError` if even the fewest-parameter option of every layer exceeds the budget.
    """
    names = list(tables)
    for n in names:
        if not tables[n]:
            raise ConfigError(f"layer {n} has no options to choose from")
    floor = sum(min(o.params for o in tables[n]) for n in names)
    if floor > max_params:
        raise ConfigError(f"budget of {max_params} parameters is below the minimum {floor} the options allow")
    state: dict[str, Option] = {}
    segments = []
    for li, n in enumerate(names):
        opts = tables[n]
        start = min(opts, key=lambda o: (o.cost, o.params))
        state[n] = start
        pts = sorted(((start.params - o.params, o.cost, i) for i, o in enumerate(opts) if o.params <= start.params),
                     key=lambda p: (p[0], p[1]))
        # among equal savings keep the cheapest (first after sort)
        dedup, seen = [], set()
        for p in pts:
            if p[0] not in seen:
                seen.add(p[0])
                dedup.append(p)
        hull = _hull(dedup)
        for si in range(1, len(hull)):
            a, b = opts[hull[si - 1]], opts[hull[si]]
            slope = (b.cost - a.cost) / (a.params - b.params)
            segments.append((slope, li, si, n, b))
    total = sum(o.params for o in state.values())
    for slope, _, _, n, b in sorted(segments, key=lambda s: (s[0], s[1], s[2])):
        if total <= max_params:
            break
        total += b.params - state[n].params
        state[n] = b
    # spend the slack on the best cost reductions that still fit
    while True:
        best = None
        for n in names:
            cur = state[n]
            for o in tables[n]:
                gain = cur.cost - o.cost
                if gain > 0 and total - cur.params + o.params <= max_params and (best is None or gain > best[0]):
                    best = (gain, n, o)
        if best is None:
            break
        _, n, o = best
        total += o.params - state[n].params
        state[n] = o
    return state
