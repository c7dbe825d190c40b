"""Byte-budget allocation: code widths, group sizes (and ranks, or dense) per layer under one global byte budget.

Each targeted layer ``l`` (``m_l x n_l``) offers candidate settings ``c`` (its method's
``candidates``, :mod:`rankwise.compression.methods.candidates`: code widths x group sizes, for
quantized + low-rank structures a grid of ranks, and keeping the layer dense unless ``--bits`` is
fixed), each with its exact stored bytes ``B_l(c)`` (the layer built and counted, all overhead; a
dense layer at the model's dtype) and its cost, the relative whitened error of the fit with that
setting,

    e_l(c) = tr((W_l - W'_l) C_l (W_l - W'_l)^T) / tr(W_l C_l W_l^T),   C_l = X_l X_l^T,

measured on the dense model's calibration statistics (a dry one-shot pass; 0 for dense). ``bits-greedy`` solves

    minimize  sum_l w_l e_l(c_l)   subject to   sum_l B_l(c_l) <= floor(B m n / 8) summed over the layers

(``B`` = ``--bits-per-weight``; ``w_l = 1`` with the default objective ``"relative"``; with ``"loss"``,
``w_l = tr(G_l)/m_l * tr(W_l C_l W_l^T)``, so that ``w_l e_l = tr(G_l)/m_l ||(W_l - W'_l) X_l||^2`` is the
loss increase predicted under an isotropic output-gradient moment ``G_l = sum_t g_t g_t^T`` measured by
one backward pass of the dense model, HAWQ-V2's trace-weighted perturbation) with the multiple-choice knapsack of :mod:`.knapsack` (convex-hull
greedy then slack filling; guarantee there). The summed relative error is the same objective the
``spectrum`` rank allocator uses; the uniform per-layer plan is one feasible point of the same
problem, so the greedy's plan is at most its cost whenever the greedy is optimal for its byte count.
The plan then has to beat the uniform one end to end on held-out calibration windows
(:mod:`rankwise.compression.validation`), else the uniform plan is used.

A plan that leaves more than :data:`UNUSED_WARN` of the budget unused says why
(``info["unused"]``, printed by the CLI): every layer at its largest candidate (fixed ``--bits`` or
``--group-size``, the widths allowed), or no larger candidate of any layer fitting the bytes left.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from ...errors import ConfigError
from .knapsack import Option, solve_budget
from .types import AllocationRequest, register


#: Fraction of the byte budget a plan may leave unused before it is reported with its reason.
UNUSED_WARN = 0.05


def describe_spec(spec: Mapping[str, Any] | None) -> str:
    """``"2-bit codes + float16 scales and minimums in groups of 128 (+ rank-4 float16 factors)"``."""
    if spec is None:
        return "dense"
    text = (f"{spec['bits']}-bit codes + float16 scales{'' if spec.get('symmetric') else ' and minimums'} in groups "
            f"of {spec['group_size']}")
    if spec.get("rotation"):
        text += " (rotated)"
    if spec.get("rank") is not None:
        text += f" + rank-{spec['rank']} float16 factors"
    return text


def byte_budget(bits_per_weight: float, shapes: Mapping[str, tuple[int, int]]) -> int:
    """``floor(B sum_l m_l n_l / 8)``: the bytes all targeted weights may take together."""
    return math.floor(bits_per_weight * sum(m * n for m, n in shapes.values()) / 8.0)


def check_byte_budget(bits_per_weight: float, shapes: Mapping[str, tuple[int, int]],
                      tables: Mapping[str, Sequence[Any]], widths: Sequence[int] | None,
                      group_sizes: Sequence[int] | None = None) -> None:
    """:class:`ConfigError` naming the binding constraint when even the smallest candidate of every
    layer exceeds the budget."""
    total = sum(m * n for m, n in shapes.values())
    smallest = {n: min(t, key=lambda c: c.nbytes) for n, t in tables.items()}
    floor = sum(c.nbytes for c in smallest.values())
    if floor <= byte_budget(bits_per_weight, shapes):
        return
    need = 8.0 * floor / total
    example = next(iter(smallest.values())).spec
    all_bits = {c.spec.get("bits") for t in tables.values() for c in t}
    all_ranks = {c.spec.get("rank") for t in tables.values() for c in t}
    all_groups = {c.spec.get("group_size") for t in tables.values() for c in t}
    if widths and min(widths) > 2:
        hint = f"the candidate widths (allocate option bits={sorted(widths)}): allow 2-bit codes"
    elif len(all_bits) == 1 and example["bits"] > 2:
        hint = f"the fixed width bits={example['bits']}: drop it so that narrower widths can be chosen"
    elif len(all_ranks) == 1 and example.get("rank") not in (None, 1):
        hint = f"the fixed rank={example['rank']}: lower it or drop it"
    elif group_sizes and len(all_groups) > 1:
        hint = f"the candidate group sizes (allocate option group_sizes={sorted(group_sizes)}): allow larger ones"
    elif len(all_groups) == 1:
        hint = (f"the fixed --group-size {example['group_size']}: use a larger one or drop it, or --set "
                "symmetric=true (no minimums)")
    else:
        hint = ("the per-group overhead of the narrowest form: use a larger --group-size, --set symmetric=true "
                "(no minimums) or a structure without low-rank factors")
    raise ConfigError(f"--bits-per-weight {bits_per_weight:g} cannot be met: the smallest form of every targeted "
                      f"layer ({describe_spec(example)}, ...) needs {need:.3f} bits per weight; raise "
                      f"--bits-per-weight to at least {need:.3f}, or relax the binding constraint: {hint}")


def unused_reason(tables: Mapping[str, Sequence[Any]], chosen: Mapping[str, Any], left: int) -> str:
    """Why a knapsack plan leaves ``left`` bytes unused: every layer at its largest candidate, or no
    larger candidate of any layer fitting in what is left."""
    at_top = all(chosen[n].params >= max(o.params for o in tables[n]) for n in tables)
    if at_top:
        example = next(iter(chosen.values())).label
        return (f"every layer already takes its largest candidate (e.g. {describe_spec(example)}); allow wider "
                "codes or smaller groups (drop a fixed --bits / --group-size), or keep layers dense")
    step = min((o.params - chosen[n].params for n in tables for o in tables[n] if o.params > chosen[n].params),
               default=0)
    return (f"no layer's next larger candidate fits in the {left} bytes left (the smallest step up is {step} "
            "bytes): the candidates are discrete")


@register("bits-greedy", "costs", "code widths, group sizes (and ranks, or dense) per layer minimizing the summed "
          "relative whitened error under the byte budget, validated against uniform", budget="bytes")
def bits_greedy(req: AllocationRequest) -> dict[str, dict[str, Any] | None]:
    """``{layer: spec or None (dense)}`` minimizing ``sum_l e_l`` under the byte budget (module docstring)."""
    if req.bits_per_weight is None:
        raise ConfigError("the bits-greedy allocator shares a byte budget: pass --bits-per-weight")
    missing = [n for n in req.shapes if not req.costs.get(n)]
    if missing:
        raise ConfigError(f"no candidate settings were measured for {missing[:3]}; the structure must offer "
                          "candidates (rtn, gptq, lorc, lq, mixed)")
    check_byte_budget(req.bits_per_weight, req.shapes, req.costs, req.options.bits, req.options.group_sizes)
    w = req.weights or {}
    tables = {n: [Option(c.spec.get("rank"), int(c.nbytes), float(c.cost) * w.get(n, 1.0), dict(c.spec))
                  for c in req.costs[n]] for n in req.shapes}
    if req.dense_bytes:
        for n in req.shapes:
            tables[n].append(Option(None, int(req.dense_bytes[n]), 0.0, None))
    budget = byte_budget(req.bits_per_weight, req.shapes)
    chosen = solve_budget(tables, budget)
    plan = {n: (None if chosen[n].label is None else dict(chosen[n].label)) for n in req.shapes}
    total = sum(m * n for m, n in req.shapes.values())
    used = sum(chosen[n].params for n in req.shapes)
    estimated = {n for n in req.shapes for c in req.costs[n] if not getattr(c, "exact", True)}
    info = {
        "objective": req.options.objective, "budget_bytes": budget, "planned_bytes": used, "planned_bits_per_weight": 8.0 * used / total,
        "summed_cost": sum(chosen[n].cost for n in req.shapes),
        "costs": {n: chosen[n].cost for n in req.shapes},
        "candidates": sum(len(t) for t in tables.values()),
        "layers_with_estimated_costs": len(estimated),
        "dense_layers": sorted(n for n in req.shapes if plan[n] is None),
    }
    if budget - used > UNUSED_WARN * budget:
        info["unused"] = unused_reason(tables, chosen, budget - used)
    req.info["bits_greedy"] = info
    return plan
