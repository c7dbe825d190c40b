"""Structured OBS (rankwise.linalg.obs) against brute force: the accumulated step costs are the exact
least-squares error of the kept columns, one removal picks the best group, balanced removal is even."""
import itertools

import numpy as np
import pytest
import torch

from rankwise.errors import ConfigError
from rankwise.linalg.obs import contiguous_groups, obs_remove, removal_error
from rankwise.linalg.refit import refit_left


def _problem(m=5, n=12, t=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, t, generator=g, dtype=torch.float64)
    X[3] += 0.9 * X[4]  # correlated inputs: the update matters
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    return W, X @ X.T, X


def _lstsq_error(W, X, keep):
    """min ||W X - W'_K X_K||_F^2 by numpy's least squares (the independent reference)."""
    Xk = X[keep].numpy()
    sol, *_ = np.linalg.lstsq(Xk.T, (W.numpy() @ X.numpy()).T, rcond=None)
    return float(np.linalg.norm(W.numpy() @ X.numpy() - sol.T @ Xk) ** 2)


def test_costs_are_the_least_squares_error_of_the_kept_columns():
    W, H, X = _problem()
    groups = contiguous_groups(12, 2)
    res = obs_remove(W, H, groups, 3, damping=1e-12)
    keep = res.columns(groups)
    assert len(res.removed) == 3 and sorted(res.removed + res.kept) == list(range(6))
    ref = _lstsq_error(W, X, keep)
    assert res.costs[-1] == pytest.approx(ref, rel=1e-6)
    assert removal_error(W, H, keep) == pytest.approx(ref, rel=1e-6)
    # the compensated weight is the least-squares refit on the kept columns (refit_left, selection R)
    R = torch.zeros(len(keep), 12, dtype=torch.float64)
    R[torch.arange(len(keep)), keep] = 1.0
    assert torch.allclose(res.W[:, keep], refit_left(W, R, H, ridge=0.0, dtype=torch.float64), atol=1e-6)
    assert float(res.W[:, [c for c in range(12) if c not in keep.tolist()]].abs().max()) == 0.0


def test_one_removal_is_the_best_single_group_and_costs_grow():
    W, H, X = _problem(seed=1)
    groups = contiguous_groups(12, 3)
    res = obs_remove(W, H, groups, 1, damping=1e-12)
    errs = [removal_error(W, H, torch.cat([groups[j] for j in range(4) if j != u])) for u in range(4)]
    assert res.removed == [int(np.argmin(errs))]
    full = obs_remove(W, H, groups, 3, damping=1e-12)
    assert all(b >= a - 1e-9 for a, b in zip(full.costs, full.costs[1:]))
    # greedy is never better than the best subset of the same size (brute force over all pairs)
    best2 = min(removal_error(W, H, torch.cat([groups[j] for j in keep]))
                for keep in itertools.combinations(range(4), 2))
    assert full.costs[1] >= best2 - 1e-9


def test_balanced_removal_takes_the_same_number_from_every_class():
    W, H, _ = _problem(n=16, seed=2)
    groups = contiguous_groups(16, 2)  # 8 "heads" of 2 columns
    classes = torch.arange(8) // 4     # 2 KV groups of 4 query heads
    res = obs_remove(W, H, groups, 4, classes=classes)
    assert sorted(int(c) for c in torch.bincount(classes[res.kept])) == [2, 2]


def test_single_columns_vectorized_match_groups_of_one_and_several_per_step():
    W, H, X = _problem(n=10, seed=3)
    one = obs_remove(W, H, contiguous_groups(10, 1), 4, damping=1e-12)
    assert one.costs[-1] == pytest.approx(_lstsq_error(W, X, one.columns(contiguous_groups(10, 1))), rel=1e-6)
    many = obs_remove(W, H, contiguous_groups(10, 1), 4, damping=1e-12, per_step=2)
    keep = many.columns(contiguous_groups(10, 1))
    assert many.costs[-1] == pytest.approx(_lstsq_error(W, X, keep), rel=1e-6)


def test_bad_counts_and_groups():
    W, H, _ = _problem()
    with pytest.raises(ConfigError, match="one must stay"):
        obs_remove(W, H, contiguous_groups(12, 3), 4)
    with pytest.raises(ConfigError, match="groups of 5"):
        contiguous_groups(12, 5)


@pytest.mark.parametrize("size", [1, 3])
def test_row_weights_weigh_each_output_rows_error(size):
    """With output weights D the costs are sum_r D_r (row r's least-squares error): brute force row by row."""
    W, H, X = _problem(n=12, seed=4)
    D = torch.tensor([5.0, 0.1, 1.0, 0.0, 2.0], dtype=torch.float64)
    groups = contiguous_groups(12, size)
    res = obs_remove(W, H, groups, 2, damping=1e-12, row_weights=D)
    keep = res.columns(groups)
    ref = sum(float(D[r]) * _lstsq_error(W[r:r + 1], X, keep) for r in range(5))
    assert res.costs[-1] == pytest.approx(ref, rel=1e-6)
    # the first removal is the group whose weighted error is smallest
    errs = [sum(float(D[r]) * removal_error(W[r:r + 1], H, torch.cat([groups[j] for j in range(len(groups)) if j != u]))
                for r in range(5)) for u in range(len(groups))]
    assert res.removed[0] == int(np.argmin(errs))
