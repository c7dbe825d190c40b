"""Global rank allocators: one parameter budget shared by all targeted layers.

Layer ``l`` of shape ``m x n`` kept at rank ``k`` costs ``k (m + n)`` parameters (``m n`` dense).
With whitened singular values ``sigma_{l,1} >= sigma_{l,2} >= ...`` (the compression objective's
spectrum), truncating to rank ``k`` raises ``||(W - W') X||_F^2`` by exactly
``tail_l(k) = sum_{i > k} sigma_{l,i}^2``.

* ``spectrum``: cost ``e_l(k) = tail_l(k) / sum_i sigma_{l,i}^2`` (the relative error, which makes
  layers comparable); dense costs 0.
* ``sensitivity``: cost = measured increase of the LM loss on a few calibration windows when layer
  ``l`` alone is truncated to a few candidate ranks; between and beyond them it is interpolated
  linearly in ``e_l(k)`` (through ``(0, 0)``: no error, no loss increase).

Both then solve ``min sum_l cost_l(k_l)  s.t.  sum_l params_l(k_l) <= (1 - ratio) sum_l m_l n_l`` with
:func:`~rankwise.compression.knapsack.solve_budget` (global greedy over cost per parameter saved).

Constraints: ranks in ``[min_rank, cap_l]`` where ``cap_l`` is the largest rank that still saves
parameters (``k (m + n) < m n``) and, when speed-aware, the layer's measured break-even rank;
a layer with ``cap_l < min_rank`` stays dense and its share of the budget moves to the others.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Mapping, Sequence

import numpy as np

from ...errors import ConfigError
from ...models.surgery import module_type
from ...structures.lowrank import max_saving_rank
from .budget import rank_for_ratio
from .knapsack import Option, solve_budget

log = logging.getLogger(__name__)

#: ``layer_loss(name, rank) -> loss`` with only that layer truncated (the pipeline provides it).
LayerLoss = Callable[[str, int], float]


def relative_tail(spectrum: Sequence[float] | np.ndarray) -> np.ndarray:
    """``e[k] = sum_{i >= k} s_i^2 / sum_i s_i^2`` for ``k = 0 .. len(s)`` (float64; ``e[len] = 0``)."""
    s2 = np.asarray(spectrum, dtype=np.float64) ** 2
    tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
    total = tail[0]
    return tail / total if total > 0 else np.zeros_like(tail)


def layer_cap(shape: tuple[int, int], n_sigma: int, speed_cap: int | None) -> int:
    """Largest allowed rank: saves parameters, at most the spectrum length, at most the speed cap."""
    m, n = shape
    cap = min(max_saving_rank(m, n), n_sigma)
    return cap if speed_cap is None else min(cap, int(speed_cap))


def _max_removable(shapes: Mapping[str, tuple[int, int]], caps: Mapping[str, int], min_rank: int) -> int:
    return sum(m * n - min_rank * (m + n) for name, (m, n) in shapes.items() if caps[name] >= min_rank)


def check_feasible(ratio: float, shapes: Mapping[str, tuple[int, int]], n_sigma: Mapping[str, int],
                   min_rank: int, speed_caps: Mapping[str, int] | None) -> None:
    """:class:`ConfigError` naming the binding constraint when ``ratio`` cannot be removed."""
    total = sum(m * n for m, n in shapes.values())
    need = ratio * total

    def removable(mr: int, speed: bool) -> int:
        caps = {k: layer_cap(s, n_sigma[k], (speed_caps or {}).get(k) if speed else None) for k, s in shapes.items()}
        return _max_removable(shapes, caps, mr)

    best = removable(min_rank, True)
    if best >= need:
        return
    frac = best / total
    hints = []
    if speed_caps and removable(min_rank, False) >= need:
        dense = sum(1 for k, s in shapes.items() if layer_cap(s, n_sigma[k], speed_caps.get(k)) < min_rank)
        hints.append(f"the speed-aware constraint (factorization not faster than dense keeps {dense} layers dense, "
                     "or caps their rank): pass --no-speed-aware")
    if min_rank > 1 and removable(1, bool(speed_caps)) >= need:
        hints.append(f"the minimum rank {min_rank}: lower --min-rank")
    if not hints:
        hints.append("the parameter count itself (a rank-1 factorization of every layer is the floor): "
                     "lower --ratio or target more layers")
    raise ConfigError(f"--ratio {ratio:g} cannot be met: at most {frac:.1%} of the targeted parameters can be "
                      f"removed; binding constraint: " + "; ".join(hints))


def _options(shape: tuple[int, int], cap: int, min_rank: int, costs: np.ndarray) -> list[Option]:
    m, n = shape
    opts = [Option(None, m * n, 0.0)]
    opts += [Option(k, k * (m + n), float(costs[k])) for k in range(min_rank, cap + 1)]
    return opts


def _solve(ratio: float, shapes: Mapping[str, tuple[int, int]], cost_tables: Mapping[str, np.ndarray],
           caps: Mapping[str, int], min_rank: int) -> dict[str, int | None]:
    total = sum(m * n for m, n in shapes.values())
    max_params = math.floor((1.0 - ratio) * total)
    tables = {name: _options(shapes[name], caps[name], min_rank, cost_tables[name]) for name in shapes}
    chosen = solve_budget(tables, max_params)
    return {name: chosen[name].rank for name in shapes}


def allocate_spectrum(ratio: float, shapes: Mapping[str, tuple[int, int]],
                      spectra: Mapping[str, Sequence[float] | np.ndarray], min_rank: int = 1,
                      speed_caps: Mapping[str, int] | None = None) -> dict[str, int | None]:
    """Ranks minimizing the summed relative whitened error ``sum_l e_l(k_l)`` under the budget."""
    _check_min_rank(min_rank)
    n_sigma = {k: len(spectra[k]) for k in shapes}
    check_feasible(ratio, shapes, n_sigma, min_rank, speed_caps)
    caps = {k: layer_cap(shapes[k], n_sigma[k], (speed_caps or {}).get(k)) for k in shapes}
    return _solve(ratio, shapes, {k: relative_tail(spectra[k]) for k in shapes}, caps, min_rank)


def allocate_spectrum_banded(ratio: float, shapes: Mapping[str, tuple[int, int]],
                             spectra: Mapping[str, Sequence[float] | np.ndarray], band: float = 0.5,
                             min_rank: int = 1, speed_caps: Mapping[str, int] | None = None,
                             weights: Mapping[str, float] | None = None) -> dict[str, int | None]:
    """``spectrum`` with every layer's rank kept in a band around its uniform rank, no dense option.

    With ``u_l = floor(m n (1 - R) / (m + n))`` (the uniform rank), layer ``l`` may take any
    ``k in [max(min_rank, floor(u_l (1 - band))), min(cap_l, ceil(u_l (1 + band)))]`` and the greedy
    minimizes ``sum_l w_l e_l(k_l)`` under the same budget (``w_l = weights[l]``, default 1, e.g. a
    measured loss increase per unit of relative error). ``band = 0`` is exactly ``uniform``; a layer
    whose band is empty (speed cap below it) stays dense. The uniform plan lies inside the bands, so the
    budget is feasible whenever uniform's is.
    """
    _check_min_rank(min_rank)
    if not (isinstance(band, (int, float)) and 0 <= band):
        raise ConfigError(f"band must be a number >= 0 (fraction of the uniform rank), got {band!r}")
    n_sigma = {k: len(spectra[k]) for k in shapes}
    check_feasible(ratio, shapes, n_sigma, min_rank, speed_caps)
    tables = {}
    for name, (m, n) in shapes.items():
        cap = layer_cap((m, n), n_sigma[name], (speed_caps or {}).get(name))
        u = rank_for_ratio(m, n, ratio)
        lo, hi = max(min_rank, math.floor(u * (1 - band))), min(cap, math.ceil(u * (1 + band)))
        costs = relative_tail(spectra[name]) * float((weights or {}).get(name, 1.0))
        tables[name] = ([Option(k, k * (m + n), float(costs[k])) for k in range(lo, hi + 1)] if lo <= hi
                        else [Option(None, m * n, 0.0)])
    total = sum(m * n for m, n in shapes.values())
    chosen = solve_budget(tables, math.floor((1.0 - ratio) * total))
    return {name: chosen[name].rank for name in shapes}


def candidate_ranks(cap: int, min_rank: int, points: int) -> list[int]:
    """``points`` ranks spread over ``[min_rank, cap]`` (fractions ``j / points`` of ``cap``), cap included."""
    if cap < min_rank:
        return []
    ks = {max(min_rank, round(cap * j / points)) for j in range(1, points + 1)}
    return sorted(ks)


def sensitivity_costs(e: np.ndarray, measured: Mapping[int, float], base_loss: float) -> np.ndarray:
    """Loss increase for every rank ``k``: measured ``loss(k) - base_loss`` at the candidate ranks,
    linear in the relative error ``e[k]`` between them, through ``(e=0, 0)``, proportional beyond."""
    ks = sorted(measured)
    xp = np.array([0.0] + [e[k] for k in ks])
    fp = np.array([0.0] + [measured[k] - base_loss for k in ks])
    order = np.argsort(xp, kind="stable")
    xp, fp = xp[order], fp[order]
    out = np.interp(e, xp, fp)
    if xp[-1] > 0:
        beyond = e > xp[-1]
        out[beyond] = fp[-1] * e[beyond] / xp[-1]
    return out


def allocate_sensitivity(ratio: float, shapes: Mapping[str, tuple[int, int]],
                         spectra: Mapping[str, Sequence[float] | np.ndarray], layer_loss: LayerLoss,
                         base_loss: float, min_rank: int = 1, speed_caps: Mapping[str, int] | None = None,
                         points: int = 3, progress: bool = False) -> tuple[dict[str, int | None], dict]:
    """Ranks minimizing the summed measured loss increase under the budget.

    Calls ``layer_loss(name, k)`` ``points`` times per layer; returns the plan and the measured table
    ``{name: {rank: loss}}``.
    """
    from tqdm.auto import tqdm

    _check_min_rank(min_rank)
    n_sigma = {k: len(spectra[k]) for k in shapes}
    check_feasible(ratio, shapes, n_sigma, min_rank, speed_caps)
    caps = {k: layer_cap(shapes[k], n_sigma[k], (speed_caps or {}).get(k)) for k in shapes}
    costs, table = {}, {}
    for name in tqdm(list(shapes), desc="sensitivity", disable=not progress, leave=False):
        e = relative_tail(spectra[name])
        measured = {k: float(layer_loss(name, k)) for k in candidate_ranks(caps[name], min_rank, points)}
        if any(not math.isfinite(v) for v in measured.values()):
            raise ConfigError(f"non-finite calibration loss when truncating {name}; check the model and data")
        table[name] = measured
        costs[name] = sensitivity_costs(e, measured, base_loss) if measured else np.zeros_like(e)
    return _solve(ratio, shapes, costs, caps, min_rank), table


def _check_min_rank(min_rank: int) -> None:
    if not isinstance(min_rank, int) or min_rank < 1:
        raise ConfigError(f"--min-rank must be an integer >= 1, got {min_rank!r}")


def uniform_speed_aware(ratio: float, shapes: Mapping[str, tuple[int, int]], speed_caps: Mapping[str, int],
                        info: dict | None = None) -> dict[str, int | None]:
    """Uniform ranks at one common ratio ``R'`` over the layers that stay factorized.

    Layers whose rank at ``R'`` exceeds their break-even rank stay dense; ``R'`` is then raised so that
    ``sum_{factorized} (m n - k (m + n)) >= R sum_all m n``, repeated until no layer changes side.
    """
    total = sum(m * n for m, n in shapes.values())
    need = ratio * total
    dense: set[str] = set()
    r = ratio
    for _ in range(len(shapes) + 1):
        rest = sum(m * n for k, (m, n) in shapes.items() if k not in dense)
        if rest <= 0:
            break
        r = need / rest
        # smallest r' >= r whose floor-rounded ranks remove enough
        plan = {}
        while r < 1:
            plan = {k: rank_for_ratio(m, n, r) for k, (m, n) in shapes.items() if k not in dense}
            removed = sum(shapes[k][0] * shapes[k][1] - v * sum(shapes[k]) for k, v in plan.items())
            if removed >= need:
                break
            r += 1e-4
        if r >= 1:
            break
        slow = {k for k, v in plan.items() if v > speed_caps.get(k, v) or v > max_saving_rank(*shapes[k])}
        if not slow:
            if info is not None:
                info["uniform_effective_ratio"] = r
            return {k: (None if k in dense else plan[k]) for k in shapes}
        dense |= slow
    raise ConfigError(f"--ratio {ratio:g} cannot be met with the speed-aware constraint ({len(dense)} layers "
                      "must stay dense because their factorized form is not faster); pass --no-speed-aware, "
                      "lower --ratio or use --allocate spectrum")


def allocate_spectrum_by_type(ratio: float, shapes: Mapping[str, tuple[int, int]],
                              spectra: Mapping[str, Sequence[float] | np.ndarray], min_rank: int = 1,
                              speed_caps: Mapping[str, int] | None = None) -> dict[str, int | None]:
    """:func:`allocate_spectrum` run separately within each module type (all ``q_proj``, all ``down_proj``,
    ...), each group removing ``ratio`` of its own parameters: relative errors are compared only
    between layers of the same role (across depth), as in SVD-LLM v2's per-type allocation."""
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(module_type(name), []).append(name)
    plan: dict[str, int | None] = {}
    for t, names in groups.items():
        sub = {n: shapes[n] for n in names}
        caps = None if speed_caps is None else {n: speed_caps[n] for n in names if n in speed_caps}
        try:
            plan.update(allocate_spectrum(ratio, sub, {n: spectra[n] for n in names}, min_rank, caps))
        except ConfigError as e:
            raise ConfigError(f"module type {t}: {e}") from None
    return {n: plan[n] for n in shapes}


def allocate_svd_llm_v2(ratio: float, shapes: Mapping[str, tuple[int, int]],
                        spectra: Mapping[str, Sequence[float] | np.ndarray]) -> tuple[dict[str, int | None], dict]:
    """SVD-LLM v2's heterogeneous ratios: within each module type ``G`` (all ``q_proj``, all ``down_proj``,
    ...), layer ``i`` gets

        R_i = |G| R (1 / log L_i) / sum_{j in G} (1 / log L_j),

    where ``L_i = sqrt(sum_{l > u_i} s_l^2)`` is its theoretical truncation loss ``||(W - W') X||_F`` at
    the uniform rank ``u_i`` (the whitened tail). A layer that loses more at the uniform ratio is
    compressed less. ``L_i`` is floored at ``e`` (weight 1) so the logarithm stays positive; ``R_i`` is
    clipped to ``[0, 0.99]``. Returns the ranks ``floor(m n (1 - R_i) / (m + n))`` (dense when that
    saves nothing) and ``{layer: R_i}``.
    """
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(module_type(name), []).append(name)
    ratios: dict[str, float] = {}
    for names in groups.values():
        inv = {}
        for name in names:
            m, n = shapes[name]
            u = rank_for_ratio(m, n, ratio)
            s = np.asarray(spectra[name], dtype=np.float64)
            loss = float(np.sqrt(np.square(s[u:]).sum()))
            inv[name] = 1.0 / math.log(max(loss, math.e))
        total = sum(inv.values())
        for name in names:
            ratios[name] = min(0.99, max(0.0, len(names) * ratio * inv[name] / total))
    plan: dict[str, int | None] = {}
    for name, (m, n) in shapes.items():
        k = rank_for_ratio(m, n, ratios[name]) if ratios[name] > 0 else min(m, n)
        plan[name] = k if k * (m + n) < m * n else None
    return plan, ratios
