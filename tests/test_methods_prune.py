import numpy as np
import pytest
import torch

from rankwise.calibration.stats import InputStats, LayerStats
from rankwise.compression.methods.base import STRUCTURES, get_method
from rankwise.errors import ConfigError
from rankwise.structures.sparse import SparseLinear


def _stats(n, tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, n, dtype=torch.float64)
    return X, LayerStats(InputStats(X.T @ X, X.abs().sum(0), (X * X).sum(0), tokens))


def test_registered():
    assert "prune" in STRUCTURES.names()


def test_plan_budget_and_binding_constraints():
    m = get_method("prune")
    assert m.plan_layer((576, 576), 0.6 * 576 * 576) == {"pattern": "unstructured", "nnz_per_row": 345}
    assert m.plan_layer((8, 8), 64) is None
    with pytest.raises(ConfigError, match="less than one weight per output row"):
        m.plan_layer((8, 8), 7)
    m24 = get_method("prune", pattern="2:4")
    assert m24.plan_layer((192, 576), 0.6 * 192 * 576) == {"pattern": "2:4", "nnz_per_row": 288}
    with pytest.raises(ConfigError, match="2:4 sparsity alone keeps 50%.*keeps 40.0%.*unstructured"):
        m24.plan_layer((192, 576), 0.4 * 192 * 576)
    with pytest.raises(ConfigError, match="pattern"):
        get_method("prune", pattern="1:2")


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_fit_keeps_wanda_scores_against_numpy(pattern):
    W = torch.randn(6, 12, generator=torch.Generator().manual_seed(1))
    X, stats = _stats(12)
    m = get_method("prune", pattern=pattern)
    spec = m.plan_layer((6, 12), 0.5 * 72)
    layer = m.fit(W, None, stats, spec)
    assert isinstance(layer, SparseLinear) and layer.num_stored() <= 36
    score = np.abs(W.numpy()) * np.linalg.norm(X.numpy(), axis=0)
    kept = layer.weight.numpy() != 0
    if pattern == "2:4":
        order = np.argsort(-score.reshape(6, 3, 4), axis=-1)[..., :2]
        ref = np.zeros((6, 3, 4), bool)
        np.put_along_axis(ref, order, True, -1)
        ref = ref.reshape(6, 12)
    else:
        ref = np.zeros((6, 12), bool)
        np.put_along_axis(ref, np.argsort(-score, axis=1)[:, :6], True, 1)
    assert (kept == ref).all()
    np.testing.assert_array_equal(layer.weight.numpy()[ref], W.numpy()[ref])


def test_fit_without_statistics_names_the_fix():
    m = get_method("prune")
    with pytest.raises(ConfigError, match="input statistics"):
        m.fit(torch.randn(4, 4), None, LayerStats(), {"pattern": "unstructured", "nnz_per_row": 2})
