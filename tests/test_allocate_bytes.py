"""The byte-budget allocator (bits-greedy): candidate tables, budget, optimality against uniform and
brute force, infeasible budgets, and the wiring through compress."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rankwise.calibration.stats import collect_input_stats
from rankwise.compression.allocation import AllocateOptions, AllocationContext, get_allocator
from rankwise.compression.allocation.bytes import byte_budget
from rankwise.compression.compress import build_config, compress, make_plan, measure_layer
from rankwise.compression.methods.base import CandidateGrid, LayerStats, get_method
from rankwise.errors import ConfigError
from rankwise.models.surgery import find_linears, linear_shape
from rankwise.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
CAL = dict(calib_options=dict(windows=8, seqlen=48), progress=False)


def np_rel_error(W, Wp, C) -> float:
    """tr((W - W') C (W - W')^T) / tr(W C W^T) in numpy float64."""
    W, Wp, C = (np.asarray(t.detach().double().numpy()) for t in (W, Wp, C))
    E = W - Wp
    return float(np.trace(E @ C @ E.T) / np.trace(W @ C @ W.T))


@pytest.fixture(scope="module")
def tiny_problem():
    """A tiny Llama, its targeted layers, and the dense model's statistics on random token windows."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 320, (8, 48), generator=g)
    mods = find_linears(model)
    stats = collect_input_stats(model, windows, list(mods))
    weights = {n: m.weight.detach().float() for n, m in mods.items()}
    shapes = {n: linear_shape(m) for n, m in mods.items()}
    return model, windows, weights, {n: LayerStats(s) for n, s in stats.items()}, shapes


def tables_and_plans(tiny_problem, structure, bpw, options, bits=None):
    _, _, weights, stats, shapes = tiny_problem
    plans = {}
    tables = None
    for allocate in ("uniform", "bits-greedy"):
        cfg, meth = build_config(structure, bits_per_weight=bpw, options=options, allocate=allocate,
                                 allocate_options={"bits": bits})
        needs = get_allocator(allocate).needs
        measured = {n: measure_layer(meth, needs, weights[n], stats[n], cfg.allocate_options)
                    for n in shapes} if needs != "none" else {}
        if needs == "costs":
            tables = measured
        plans[allocate] = make_plan(meth, cfg, shapes, measured, AllocationContext())[0]
    return tables, plans


def plan_cost(tables, plan) -> tuple[float, int]:
    cost = nbytes = 0
    for n, spec in plan.items():
        assert spec is not None  # no layer kept dense at these budgets
        c = next(c for c in tables[n] if dict(c.spec) == dict(spec))
        cost += c.cost
        nbytes += c.nbytes
    return cost, nbytes


def test_quant_candidates_have_exact_bytes_and_the_fits_whitened_error(tiny_problem):
    _, _, weights, stats, _ = tiny_problem
    name = "model.layers.0.mlp.down_proj"  # 64 x 128: two groups of 64 per row
    W, st = weights[name], stats[name]
    meth = get_method("gptq", group_size=64)
    cands = meth.candidates(W, st, CandidateGrid(widths=(2, 3, 8), measure="exact"))
    assert [c.spec["bits"] for c in cands] == [2, 3, 8]
    for c in cands:
        m, n, b = 64, 128, c.spec["bits"]
        assert c.nbytes == m * -(-n * b // 8) + 2 * 2 * m * 2  # packed codes + float16 scales and minimums
        fitted = meth.fit(W, None, st, c.spec)
        assert c.cost == pytest.approx(np_rel_error(W, fitted.dense(), st.covariance()), rel=1e-5)  # float32 products
    assert cands[0].cost > cands[1].cost > cands[2].cost > 0


def test_lowrank_quant_candidates_match_lorc_fits_and_bound_lq(tiny_problem):
    _, _, weights, stats, _ = tiny_problem
    name = "model.layers.1.self_attn.q_proj"
    W, st = weights[name], stats[name]
    C = st.covariance()
    lorc = get_method("lorc", group_size=32)
    cands = {(c.spec["bits"], c.spec["rank"]): c for c in lorc.candidates(W, st, CandidateGrid(widths=(2, 3)))}
    assert {k for _, k in cands} == {1, 2, 3, 4, 6, 8, 12, 16, 24, 32}  # rank grid up to min(m, n) / 2
    for key in ((2, 4), (3, 16)):
        c = cands[key]
        fitted = lorc.fit(W, None, st, c.spec)
        assert c.nbytes == fitted.nbytes()
        # exact up to the float16 rounding of the stored factors
        assert c.cost == pytest.approx(np_rel_error(W, fitted.dense(), C), rel=2e-2)
        lq_fit = get_method("lq", group_size=32, iters=2).fit(W, None, st, c.spec)
        assert np_rel_error(W, lq_fit.dense(), C) <= c.cost * 1.02  # lq never above lorc's error
    assert cands[(2, 1)].cost > cands[(2, 8)].cost > cands[(2, 32)].cost


@pytest.mark.parametrize("structure,bpw,options", [
    ("gptq", 3.5, {"group_size": 32}),
    ("rtn", 4.4, {"group_size": 32, "symmetric": True}),
    ("lorc", 4.0, {"group_size": 32}),
])
def test_plan_meets_the_byte_budget_and_beats_uniform(tiny_problem, structure, bpw, options):
    _, _, _, _, shapes = tiny_problem
    tables, plans = tables_and_plans(tiny_problem, structure, bpw, options, bits=[2, 3, 4])
    budget = byte_budget(bpw, shapes)
    cost_g, bytes_g = plan_cost(tables, plans["bits-greedy"])
    cost_u, bytes_u = plan_cost(tables, plans["uniform"])
    assert bytes_g <= budget and bytes_u <= budget
    assert cost_g < cost_u
    assert len({(s["bits"], s.get("rank")) for s in plans["bits-greedy"].values()}) > 1  # really mixed


def test_greedy_is_close_to_the_brute_force_optimum(tiny_problem):
    """Brute force over every combination of widths for the four attention layers of block 0."""
    _, _, weights, stats, shapes = tiny_problem
    names = [n for n in shapes if n.startswith("model.layers.0.self_attn")]
    sub = {n: shapes[n] for n in names}
    meth = get_method("gptq", group_size=32)
    tables = {n: measure_layer(meth, "costs", weights[n], stats[n], AllocateOptions(bits=[2, 3, 4, 5], measure="exact"))
              for n in names}
    for bpw in (3.3, 3.7, 4.2):
        budget = byte_budget(bpw, sub)
        best = min((sum(c.cost for c in combo), combo) for combo in itertools.product(*tables.values())
                   if sum(c.nbytes for c in combo) <= budget)[0]
        from rankwise.compression.allocation.types import AllocationRequest

        req = AllocationRequest(None, sub, bits_per_weight=bpw, costs=tables)
        plan = get_allocator("bits-greedy").fn(req)
        cost, nbytes = plan_cost(tables, plan)
        assert nbytes <= budget
        assert best <= cost + 1e-12
        assert cost <= best * 1.25  # the hull greedy + slack filling lands near the optimum here
        assert req.info["bits_greedy"]["summed_cost"] == pytest.approx(cost)


def test_compress_with_bits_greedy_records_the_allocation(tiny_problem):
    _, windows, _, _, shapes = tiny_problem
    model, rep = compress(tiny_model("llama"), "gptq", bits_per_weight=3.5, options={"group_size": 32},
                          allocate="bits-greedy", allocate_options={"validate": False}, calib=windows, **CAL)
    assert rep.allocate == "bits-greedy" and rep.bits_per_weight <= 3.5
    assert rep.targeted_bytes_after <= byte_budget(3.5, shapes)
    assert len({lr.spec["bits"] for lr in rep.layers}) > 1
    info = rep.allocation["bits_greedy"]
    assert info["planned_bytes"] == rep.targeted_bytes_after  # the plan's bytes are the stored bytes
    assert rep.config["allocate_options"]["bits"] is None


def test_infeasible_budget_names_the_binding_constraint():
    with pytest.raises(ConfigError, match=r"cannot be met.*3\.000 bits per weight.*group-size"):
        compress(tiny_model("llama"), "rtn", bits_per_weight=2.5, options={"group_size": 32},
                 allocate="bits-greedy", calib=torch.zeros(2, 48, dtype=torch.long), **CAL)
    with pytest.raises(ConfigError, match=r"fixed width bits=4"):
        compress(tiny_model("llama"), "rtn", bits_per_weight=4.5, options={"group_size": 32, "bits": 4},
                 allocate="bits-greedy", calib=torch.zeros(2, 48, dtype=torch.long), **CAL)
    with pytest.raises(ConfigError, match=r"candidate widths.*allow 2-bit"):
        compress(tiny_model("llama"), "rtn", bits_per_weight=3.5, options={"group_size": 32},
                 allocate="bits-greedy", allocate_options={"bits": [3, 4]},
                 calib=torch.zeros(2, 48, dtype=torch.long), **CAL)


@pytest.mark.parametrize("structure,budget,allocate,needle", [
    ("lowrank", {"ratio": 0.4}, "bits-greedy", r"bits-greedy shares a bytes budget.*--ratio"),
    ("gptq", {"bits_per_weight": 3}, "spectrum", r"spectrum shares a params budget.*bits-greedy"),
])
def test_allocator_and_structure_must_share_the_budget(structure, budget, allocate, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config(structure, allocate=allocate, **budget)
