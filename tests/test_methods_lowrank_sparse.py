import numpy as np
import pytest
import torch

from rankwise.calibration.stats import InputStats, LayerStats
from rankwise.compression.methods.base import STRUCTURES, get_method
from rankwise.errors import ConfigError
from rankwise.linalg import whitened_svd
from rankwise.structures.sparse import LowRankSparseLinear


def _stats(n, tokens=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, n, dtype=torch.float64)
    X[:, 1] += 2.0 * X[:, 0]  # correlated inputs: the diagonal scaling is not the full objective
    return X, LayerStats(InputStats(X.T @ X, X.abs().sum(0), (X * X).sum(0), tokens))


def _err(W, Wp, X):
    return float(np.linalg.norm((W.double().numpy() - Wp.detach().double().numpy()) @ X.numpy().T))


def test_registered_and_options():
    assert "lowrank-sparse" in STRUCTURES.names()
    with pytest.raises(ConfigError, match="sparse_fraction"):
        get_method("lowrank-sparse", sparse_fraction=1.0)
    with pytest.raises(ConfigError, match="unknown option"):
        get_method("lowrank-sparse", rank=3)


@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1536, 576), (576, 1536)])
@pytest.mark.parametrize("ratio", [0.4, 0.6])
def test_plan_meets_budget_on_smollm2_shapes(shape, ratio):
    m, n = shape
    target = (1 - ratio) * m * n
    spec = get_method("lowrank-sparse").plan_layer(shape, target)
    stored = spec["rank"] * (m + n) + spec["nnz_per_row"] * m
    assert stored <= target and target - stored < m + (m + n)  # budget used up to rounding
    assert abs(spec["rank"] * (m + n) / target - 0.25) < 0.02  # sparse_fraction 0.75 by default


def test_plan_24_binding_constraint():
    m = get_method("lowrank-sparse", pattern="2:4")
    spec = m.plan_layer((576, 576), 0.6 * 576 * 576)
    assert spec["nnz_per_row"] == 288 and spec["rank"] == int((0.1 * 576 * 576) // 1152)
    with pytest.raises(ConfigError, match="2:4 sparsity alone keeps 50%.*keeps 40.0%"):
        m.plan_layer((576, 576), 0.4 * 576 * 576)
    with pytest.raises(ConfigError, match="use prune or a lower ratio"):
        get_method("lowrank-sparse").plan_layer((8, 8), 20)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_fit_budget_forward_and_refit_never_worse(pattern):
    W = torch.randn(12, 16, generator=torch.Generator().manual_seed(2))
    X, stats = _stats(16)
    target = 0.75 * 12 * 16
    spec = get_method("lowrank-sparse", pattern=pattern).plan_layer((12, 16), target)
    refit = get_method("lowrank-sparse", pattern=pattern, iters=10).fit(W, None, stats, spec)
    plain = get_method("lowrank-sparse", pattern=pattern, iters=10, refit=False).fit(W, None, stats, spec)
    assert isinstance(refit, LowRankSparseLinear) and refit.num_stored() <= target
    assert _err(W, refit.dense(), X) <= _err(W, plain.dense(), X) * (1 + 1e-5)
    x = torch.randn(3, 16)
    torch.testing.assert_close(refit(x), x @ refit.dense().T, rtol=1e-4, atol=1e-4)


def test_beats_lowrank_at_equal_budget_on_a_sparse_plus_lowrank_matrix():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 2, generator=g) @ torch.randn(2, 20, generator=g)
    spikes = torch.rand(16, 20, generator=g) < 0.15
    W = W + 10.0 * spikes * torch.randn(16, 20, generator=g)
    X, stats = _stats(20)
    target = 0.5 * 16 * 20
    m = get_method("lowrank-sparse", sparse_fraction=0.6)
    layer = m.fit(W, None, stats, m.plan_layer((16, 20), target))
    k = int(target // 36)
    lowrank = whitened_svd(W, stats.covariance()).dense(k)
    assert _err(W, layer.dense(), X) < 0.5 * _err(W, lowrank, X)
