"""Global allocators and the budgeted-choice solver against brute force on tiny problems."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rankwise.compression.allocation.solvers import (
    allocate_sensitivity, allocate_spectrum, candidate_ranks, relative_tail, sensitivity_costs,
)
from rankwise.compression.allocation.knapsack import Option, solve_budget
from rankwise.errors import ConfigError
from rankwise.structures.lowrank import max_saving_rank


def brute(tables, max_params):
    """(best cost, all combos as (params, cost)) by exhaustive search."""
    names = list(tables)
    combos = []
    for choice in itertools.product(*(tables[n] for n in names)):
        combos.append((sum(o.params for o in choice), sum(o.cost for o in choice)))
    feasible = [c for p, c in combos if p <= max_params]
    return (min(feasible) if feasible else None), combos


def lagrangian_points(combos):
    """Combos that minimize cost + lam * params for some lam >= 0 (exact optimum at their own params)."""
    P = np.array([p for p, _ in combos], dtype=float)
    E = np.array([c for _, c in combos])
    pts = set()
    for lam in np.concatenate([[0.0], np.geomspace(1e-6, 1e3, 3000)]):
        obj = E + lam * P
        pts.add((P[np.argmin(obj)], E[np.argmin(obj)]))
    return sorted(pts)


def random_tables(rng, layers):
    tables = {}
    for li in range(layers):
        k = int(rng.integers(2, 6))
        params = sorted(rng.choice(np.arange(1, 40), size=k, replace=False).tolist(), reverse=True)
        costs = np.sort(rng.random(k))  # fewer params -> more cost, mostly
        if rng.random() < 0.5:
            costs = rng.random(k)  # and sometimes not monotone at all
        tables[f"l{li}"] = [Option(i, int(p), float(c)) for i, (p, c) in enumerate(zip(params, costs))]
    return tables


@pytest.mark.parametrize("seed", range(40))
def test_solver_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    tables = random_tables(rng, int(rng.integers(2, 4)))
    floor = sum(min(o.params for o in t) for t in tables.values())
    top = sum(max(o.params for o in t) for t in tables.values())
    _, combos = brute(tables, top)
    lag = lagrangian_points(combos)
    for B in range(floor, top + 1):
        opt, _ = brute(tables, B)
        got = solve_budget(tables, B)
        params = sum(o.params for o in got.values())
        cost = sum(o.cost for o in got.values())
        assert params <= B, "budget must hold"
        assert cost >= opt - 1e-12
        bound = min(c for p, c in lag if p <= B)  # best Lagrangian plan that fits
        assert cost <= bound + 1e-12
        if any(p == B for p, _ in lag):
            assert cost == pytest.approx(opt, abs=1e-12), "exact at Lagrangian budgets"


def test_solver_infeasible():
    with pytest.raises(ConfigError, match="below the minimum"):
        solve_budget({"a": [Option(None, 10, 0.0), Option(1, 5, 1.0)]}, 4)


# ---- spectrum allocator ------------------------------------------------------------------------

SHAPES = {"a": (12, 10), "b": (9, 9), "c": (16, 6)}


def spectra(seed):
    rng = np.random.default_rng(seed)
    return {k: np.sort(rng.random(min(s)) ** rng.uniform(1, 6))[::-1] for k, s in SHAPES.items()}


def brute_spectrum(ratio, shapes, spec, min_rank=1, caps=None):
    total = sum(m * n for m, n in shapes.values())
    B = math.floor((1 - ratio) * total)
    tables = {}
    for k, (m, n) in shapes.items():
        e = relative_tail(spec[k])
        cap = min(max_saving_rank(m, n), len(spec[k]), (caps or {}).get(k, 10**9))
        tables[k] = [Option(None, m * n, 0.0)] + [Option(r, r * (m + n), e[r]) for r in range(min_rank, cap + 1)]
    return brute(tables, B), B


def plan_cost(plan, spec):
    return sum(0.0 if r is None else relative_tail(spec[k])[r] for k, r in plan.items())


def plan_params(plan, shapes):
    return sum(m * n if plan[k] is None else plan[k] * (m + n) for k, (m, n) in shapes.items())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_spectrum_meets_budget_and_is_near_brute_force(seed, ratio):
    spec = spectra(seed)
    plan = allocate_spectrum(ratio, SHAPES, spec)
    (opt_and_combos), B = brute_spectrum(ratio, SHAPES, spec)
    opt, combos = opt_and_combos
    assert plan_params(plan, SHAPES) <= B
    cost = plan_cost(plan, spec)
    assert opt - 1e-12 <= cost <= min(c for p, c in lagrangian_points(combos) if p <= B) + 1e-12


def test_spectrum_prefers_layers_with_fast_decay():
    # layer "a" is nearly rank 1, "b" is flat: a good plan cuts "a" hard and keeps "b"
    spec = {"a": np.array([10.0] + [1e-3] * 9), "b": np.ones(9), "c": np.ones(6)}
    plan = allocate_spectrum(0.3, SHAPES, spec)
    # brute force: the unique optimum keeps "b" and "c" dense (cost ~1e-7); the runner-up costs 0.33
    (opt, combos), B = brute_spectrum(0.3, SHAPES, spec)
    assert plan == {"a": 1, "b": None, "c": None}
    assert plan_params(plan, SHAPES) <= B and plan_cost(plan, spec) == pytest.approx(opt, abs=1e-15)
    assert sorted(c for p, c in combos if p <= B)[1] > 0.3


def test_speed_caps_keep_layers_dense_and_budget_moves():
    spec = spectra(1)
    caps = {"a": 0, "b": 99, "c": 99}
    plan = allocate_spectrum(0.3, SHAPES, spec, speed_caps=caps)
    assert plan["a"] is None
    total = sum(m * n for m, n in SHAPES.values())
    assert plan_params(plan, SHAPES) <= math.floor(0.7 * total)
    (opt, _), _ = brute_spectrum(0.3, SHAPES, spec, caps=caps)
    assert plan_cost(plan, spec) >= opt - 1e-12
    caps = {"a": 2, "b": 3, "c": 99}
    capped = allocate_spectrum(0.2, SHAPES, spec, speed_caps=caps)
    assert all(capped[k] is None or capped[k] <= caps[k] for k in caps)  # caps hold ...
    (opt, _), B = brute_spectrum(0.2, SHAPES, spec, caps=caps)
    assert plan_params(capped, SHAPES) <= B  # ... within the budget, at the capped brute-force optimum
    assert plan_cost(capped, spec) == pytest.approx(opt, abs=1e-12)


def test_min_rank_respected():
    plan = allocate_spectrum(0.3, SHAPES, spectra(2), min_rank=3)
    assert all(r is None or r >= 3 for r in plan.values())


def test_infeasible_budget_names_the_constraint():
    spec = spectra(0)
    with pytest.raises(ConfigError, match="min-rank"):
        allocate_spectrum(0.6, SHAPES, spec, min_rank=4)
    with pytest.raises(ConfigError, match="no-speed-aware"):
        allocate_spectrum(0.5, SHAPES, spec, speed_caps={"a": 0, "b": 0, "c": 99})
    with pytest.raises(ConfigError, match="lower --ratio"):
        allocate_spectrum(0.9, SHAPES, spec)
    with pytest.raises(ConfigError, match="min-rank must be"):
        allocate_spectrum(0.2, SHAPES, spec, min_rank=0)


def test_relative_tail_formula():
    s = np.array([3.0, 2.0, 1.0])
    np.testing.assert_allclose(relative_tail(s), [1.0, 5 / 14, 1 / 14, 0.0])


# ---- sensitivity allocator ---------------------------------------------------------------------

def test_candidate_ranks():
    assert candidate_ranks(30, 1, 3) == [10, 20, 30]
    assert candidate_ranks(30, 15, 3) == [15, 20, 30]
    assert candidate_ranks(2, 3, 3) == []


def test_sensitivity_costs_interpolate_in_error():
    e = relative_tail(np.array([4.0, 3.0, 2.0, 1.0]))  # e = [1, .6, .2667, .0667, 0]
    costs = sensitivity_costs(e, {2: 1.0 + 0.5, 3: 1.0 + 0.1}, base_loss=1.0)
    assert costs[4] == 0.0
    assert costs[3] == pytest.approx(0.1) and costs[2] == pytest.approx(0.5)
    # beyond the last measured point: proportional to e
    assert costs[1] == pytest.approx(0.5 * e[1] / e[2])


@pytest.mark.parametrize("seed", range(3))
def test_sensitivity_with_uniform_weights_equals_spectrum(seed):
    spec = spectra(seed)
    calls = []

    def loss(name, k):
        calls.append((name, k))
        return 2.0 + 0.7 * relative_tail(spec[name])[k]

    plan, table = allocate_sensitivity(0.4, SHAPES, spec, loss, base_loss=2.0, points=3)
    assert plan == allocate_spectrum(0.4, SHAPES, spec)
    assert len(calls) == sum(len(v) for v in table.values()) and all(len(v) <= 3 for v in table.values())


def test_sensitivity_protects_the_sensitive_layer():
    spec = {k: np.ones(min(s)) for k, s in SHAPES.items()}  # identical spectra: only the loss differs
    weight = {"a": 100.0, "b": 1.0, "c": 1.0}

    def loss(name, k):
        return 1.0 + weight[name] * relative_tail(spec[name])[k]

    plan, _ = allocate_sensitivity(0.3, SHAPES, spec, loss, base_loss=1.0)
    assert plan["a"] is None
    total = sum(m * n for m, n in SHAPES.values())
    assert plan_params(plan, SHAPES) <= math.floor(0.7 * total)


def test_sensitivity_rejects_nonfinite_loss():
    spec = spectra(0)
    with pytest.raises(ConfigError, match="non-finite"):
        allocate_sensitivity(0.3, SHAPES, spec, lambda n, k: float("nan"), base_loss=1.0)


def test_slack_is_spent_on_a_cheaper_option_off_the_hull():
    # hull from dense jumps straight to 2 params; the budget of 8 admits the cheaper (8, 0.5)
    table = {"a": [Option(None, 10, 0.0), Option(4, 8, 0.5), Option(1, 2, 0.6)]}
    assert solve_budget(table, 8)["a"].rank == 4
    assert solve_budget(table, 7)["a"].rank == 1


def test_uniform_speed_aware_redistributes_the_budget():
    from rankwise.compression.allocation.solvers import uniform_speed_aware
    from rankwise.compression.allocation.budget import uniform_rank

    shapes = {"q": (64, 64), "k": (16, 64), "up": (128, 64), "down": (64, 128)}
    total = sum(m * n for m, n in shapes.values())
    free = uniform_speed_aware(0.4, shapes, {k: 10**6 for k in shapes})
    assert free == {k: uniform_rank(*s, 0.4) for k, s in shapes.items()}  # no binding cap: plain uniform
    plan = uniform_speed_aware(0.4, shapes, {"q": 31, "k": 2, "up": 42, "down": 42})
    assert plan["k"] is None
    assert plan_params(plan, shapes) <= 0.6 * total
    others = [plan[k] for k in ("q", "up", "down")]
    assert all(r is not None and r < uniform_rank(*shapes[k], 0.4) + 1 for k, r in zip(("q", "up", "down"), others))
    with pytest.raises(ConfigError, match="no-speed-aware"):
        uniform_speed_aware(0.5, shapes, {"q": 0, "k": 0, "up": 0, "down": 42})


def test_spectrum_by_type_equals_per_group_brute_force():
    from rankwise.compression.allocation.solvers import allocate_spectrum_by_type

    shapes = {"l.0.q": (12, 10), "l.1.q": (12, 10), "l.0.up": (9, 9), "l.1.up": (9, 9)}
    rng = np.random.default_rng(5)
    spec = {k: np.sort(rng.random(min(s)) ** rng.uniform(1, 6))[::-1] for k, s in shapes.items()}
    plan = allocate_spectrum_by_type(0.4, shapes, spec)
    for t in ("q", "up"):
        sub = {k: v for k, v in shapes.items() if k.endswith(t)}
        assert {k: plan[k] for k in sub} == allocate_spectrum(0.4, sub, {k: spec[k] for k in sub})
        assert plan_params({k: plan[k] for k in sub}, sub) <= math.floor(0.6 * sum(m * n for m, n in sub.values()))


# ---- spectrum within a band around the uniform rank ----------------------------------------------

BIG = {"a": (24, 20), "b": (18, 18), "c": (32, 12)}


def test_band_zero_is_uniform():
    from rankwise.compression.allocation.solvers import allocate_spectrum_banded
    from rankwise.compression.allocation.budget import uniform_rank

    rng = np.random.default_rng(0)
    spec = {k: np.sort(rng.random(min(s)))[::-1] for k, s in BIG.items()}
    for ratio in (0.2, 0.4, 0.6):
        assert allocate_spectrum_banded(ratio, BIG, spec, band=0.0) == {k: uniform_rank(*s, ratio) for k, s in BIG.items()}


@pytest.mark.parametrize("seed", range(4))
def test_band_stays_in_band_and_matches_brute_force(seed):
    from rankwise.compression.allocation.solvers import allocate_spectrum_banded

    rng = np.random.default_rng(seed)
    spec = {k: np.sort(rng.random(min(s)) ** rng.uniform(1, 6))[::-1] for k, s in BIG.items()}
    ratio, band = 0.4, 0.5
    plan = allocate_spectrum_banded(ratio, BIG, spec, band=band)
    total = sum(m * n for m, n in BIG.values())
    B = math.floor((1 - ratio) * total)
    tables = {}
    for k, (m, n) in BIG.items():
        u = math.floor(m * n * (1 - ratio) / (m + n))
        lo, hi = math.floor(u * (1 - band)), min(max_saving_rank(m, n), math.ceil(u * (1 + band)))
        assert plan[k] is not None and lo <= plan[k] <= hi
        e = relative_tail(spec[k])
        tables[k] = [Option(r, r * (m + n), e[r]) for r in range(lo, hi + 1)]
    assert plan_params(plan, BIG) <= B
    (opt, combos) = brute(tables, B)
    cost = plan_cost(plan, spec)
    assert opt - 1e-12 <= cost <= min(c for p, c in lagrangian_points(combos) if p <= B) + 1e-12


def test_band_rejects_negative_band():
    from rankwise.compression.allocation.solvers import allocate_spectrum_banded

    with pytest.raises(ConfigError, match="band"):
        allocate_spectrum_banded(0.4, BIG, {k: np.ones(min(s)) for k, s in BIG.items()}, band=-0.1)


def test_band_weights_move_rank_to_the_heavy_layer():
    from rankwise.compression.allocation.solvers import allocate_spectrum_banded

    rng = np.random.default_rng(3)
    spec = {k: np.sort(rng.random(min(s)) ** 2)[::-1] for k, s in BIG.items()}
    plain = allocate_spectrum_banded(0.4, BIG, spec, band=0.5)
    assert allocate_spectrum_banded(0.4, BIG, spec, band=0.5, weights={k: 3.0 for k in BIG}) == plain
    heavy = allocate_spectrum_banded(0.4, BIG, spec, band=0.5, weights={"a": 1e3, "b": 1.0, "c": 1.0})
    assert heavy["a"] >= plain["a"] and heavy["a"] == math.ceil(6 * 1.5)
