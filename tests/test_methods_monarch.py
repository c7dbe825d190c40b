import numpy as np
import pytest
import torch

from rankwise.calibration.stats import InputStats, LayerStats
from rankwise.compression.methods.base import STRUCTURES, get_method
from rankwise.errors import ConfigError
from rankwise.linalg.monarch import monarch_dense
from rankwise.structures.monarch import MonarchLinear


def _stats(n, tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.3, 3.0, n, dtype=torch.float64)
    X[:, 1] += X[:, n - 1]  # correlate two input blocks
    return X, LayerStats(InputStats(X.T @ X, X.abs().sum(0), (X * X).sum(0), tokens))


def _err(W, Wp, X):
    return float(np.linalg.norm((W.double() - Wp.detach().double()).numpy() @ X.numpy().T))


@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1536, 576), (576, 1536)])
@pytest.mark.parametrize("ratio", [0.4, 0.6])
def test_plan_fits_budget_on_smollm2_shapes(shape, ratio):
    m, n = shape
    target = (1 - ratio) * m * n
    spec = get_method("monarch").plan_layer(shape, target)
    assert (spec["in_blocks"], spec["out_blocks"]) == (4, 4)
    stored = spec["rank"] * (4 * n + 4 * m)
    assert stored <= target < stored + 4 * (m + n)


def test_plan_errors_and_fallbacks():
    assert "monarch" in STRUCTURES.names() and get_method("monarch").plan_layer((8, 8), 64) is None
    with pytest.raises(ConfigError, match=r"rank-1 blocks already store 27648 values.*nblocks=8"):
        get_method("monarch", nblocks=24).plan_layer((576, 576), 0.03 * 576 * 576)
    with pytest.raises(ConfigError, match="block count 5 does not divide the input size 576"):
        get_method("monarch", nblocks=5).plan_layer((576, 576), 0.5 * 576 * 576)
    # a prime output size keeps one output block (documented fallback); the input side still splits
    assert get_method("monarch").plan_layer((97, 576), 0.6 * 97 * 576)["out_blocks"] == 1


def test_fit_refines_the_projection_and_beats_random_monarch():
    W = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    X, stats = _stats(16)
    spec = {"in_blocks": 4, "out_blocks": 2, "rank": 1}
    refined = get_method("monarch", iters=10, damping=0.0).fit(W, None, stats, spec)  # the undamped objective
    closed = get_method("monarch", iters=0, damping=0.0).fit(W, None, stats, spec)
    assert isinstance(refined, MonarchLinear) and refined.B1.dtype == torch.float32
    assert _err(W, refined.dense(), X) <= _err(W, closed.dense(), X) * (1 + 1e-6)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        rand = monarch_dense(torch.randn(4, 2, 4, generator=g, dtype=torch.float64),
                             torch.randn(2, 6, 4, generator=g, dtype=torch.float64))
        assert _err(W, refined.dense(), X) < _err(W, rand, X)
    x = torch.randn(3, 16)
    torch.testing.assert_close(refined(x), x @ refined.dense().T, rtol=1e-4, atol=1e-4)


def test_damping_keeps_the_fit_off_the_calibrations_low_variance_directions(singular_calibration):
    """Fewer calibration tokens than inputs (C singular): undamped, the exact ALS solves fit the
    calibration windows with weights along directions they never excite, which fresh inputs from the
    same distribution then amplify. The default damping fits those inputs better and keeps the norm."""
    W, stats, fresh = singular_calibration(24)
    spec = {"in_blocks": 4, "out_blocks": 4, "rank": 2}
    damped = get_method("monarch").fit(W, None, stats, spec).dense().double()
    raw = get_method("monarch", damping=0.0).fit(W, None, stats, spec).dense().double()
    assert _err(W, damped, fresh) < _err(W, raw, fresh)
    assert float(damped.norm()) < 2 * float(W.double().norm())
    with pytest.raises(ConfigError, match="damping must be a number >= 0"):
        get_method("monarch", damping=-1.0)
