"""Budget: ratio checks, the uniform rank formula against brute force, plan parameter counts."""
from __future__ import annotations

import math

import pytest

from rankwise.compression.allocation import ALLOCATORS, AllocationRequest, get_allocator
from rankwise.compression.allocation.budget import check_plan, check_ratio, layer_params, plan_params, uniform_rank
from rankwise.errors import ConfigError, UnknownMethodError


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.2, float("nan"), float("inf"), "x", None])
def test_ratio_outside_open_unit_interval_is_refused(bad):
    with pytest.raises(ConfigError, match="ratio"):
        check_ratio(bad)


def _brute_uniform(m, n, ratio):
    """Largest k >= 1 with k (m + n) <= m n (1 - R); None if even that k does not save parameters."""
    best = 1
    for k in range(1, min(m, n) + 1):
        if k * (m + n) <= m * n * (1 - ratio) + 1e-9:
            best = k
    return best if best * (m + n) < m * n else None


@pytest.mark.parametrize("m,n", [(576, 576), (192, 576), (1536, 576), (7, 5), (3, 3), (1, 10)])
@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.4, 0.6, 0.95])
def test_uniform_rank_matches_brute_force(m, n, ratio):
    assert uniform_rank(m, n, ratio) == _brute_uniform(m, n, ratio)


def test_uniform_rank_formula_and_dense_fallback():
    assert uniform_rank(576, 576, 0.4) == math.floor(576 * 576 * 0.6 / 1152) == 172
    # a 3 x 3 layer at 10% removed: k = floor(9 * 0.9 / 6) = 1, and 1 * 6 < 9 saves -> rank 1
    assert uniform_rank(3, 3, 0.1) == 1
    # a 1 x 10 layer can never save parameters: stays dense
    assert uniform_rank(1, 10, 0.5) is None


def test_plan_params_and_check_plan():
    shapes = {"a": (10, 20), "b": (4, 4)}
    assert plan_params(shapes, {"a": 3, "b": None}) == (216, 3 * 30 + 16)
    assert layer_params((10, 20), None) == 200
    check_plan(shapes, {"a": 3, "b": None})
    with pytest.raises(ConfigError, match="not a targeted layer"):
        check_plan(shapes, {"zzz": 1})
    with pytest.raises(ConfigError, match=r"\[1, 4\]"):
        check_plan(shapes, {"b": 5})


def test_uniform_allocator_removes_at_least_the_ratio():
    shapes = {"q": (576, 576), "k": (192, 576), "up": (1536, 576), "down": (576, 1536)}
    for ratio in (0.2, 0.4, 0.6):
        plan = ALLOCATORS["uniform"].fn(AllocationRequest(ratio, shapes))
        before, after = plan_params(shapes, plan)
        assert all(isinstance(k, int) for k in plan.values())
        # floor() keeps at most the budget in each layer, losing < (m + n) params per layer
        assert after <= before * (1 - ratio) + 1e-6
        assert after > before * (1 - ratio) - sum(m + n for m, n in shapes.values())


def test_unknown_allocator_lists_valid_names():
    with pytest.raises(UnknownMethodError, match="uniform"):
        get_allocator("nope")
