import numpy as np
import pytest
import torch

from rankwise.calibration.stats import InputStats, LayerStats
from rankwise.compression.methods.base import STRUCTURES, get_method
from rankwise.errors import ConfigError
from rankwise.linalg import whitened_svd
from rankwise.structures.blockdiag import BlockDiagLowRankLinear


def _stats(n, tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.3, 3.0, n, dtype=torch.float64)
    return X, LayerStats(InputStats(X.T @ X, X.abs().sum(0), (X * X).sum(0), tokens))


@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1536, 576), (576, 1536)])
@pytest.mark.parametrize("ratio", [0.4, 0.6])
def test_plan_fits_budget_and_fraction(shape, ratio):
    m, n = shape
    target = (1 - ratio) * m * n
    spec = get_method("blockdiag-lowrank").plan_layer(shape, target)
    b, k = spec["nblocks"], spec["rank"]
    assert m % b == 0 and n % b == 0
    stored = m * n // b + k * (m + n)
    assert stored <= target < stored + (m + n)
    assert m * n / b <= 0.25 * target  # lowrank_fraction 0.75: blocks take at most a quarter


def test_plan_errors():
    assert "blockdiag-lowrank" in STRUCTURES.names()
    with pytest.raises(ConfigError, match="do not divide"):
        get_method("blockdiag-lowrank", nblocks=5).plan_layer((576, 576), 0.6 * 576 * 576)
    with pytest.raises(ConfigError, match="no common divisor"):
        get_method("blockdiag-lowrank").plan_layer((97, 576), 0.6 * 97 * 576)
    with pytest.raises(ConfigError, match="2 diagonal blocks store 8 values.*use more blocks"):
        get_method("blockdiag-lowrank", nblocks=2).plan_layer((4, 4), 10)


def test_fit_never_worse_than_lowrank_of_same_rank():
    W = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    X, stats = _stats(16)
    m = get_method("blockdiag-lowrank", nblocks=4, iters=5, damping=0.0)  # the undamped objective's guarantee
    spec = m.plan_layer((12, 16), 0.7 * 12 * 16)
    layer = m.fit(W, torch.ones(12), stats, spec)
    assert isinstance(layer, BlockDiagLowRankLinear) and layer.num_stored() <= 0.7 * 12 * 16
    err = float(np.linalg.norm((W.double() - layer.weight.double()).numpy() @ X.numpy().T))
    assert err <= whitened_svd(W, stats.covariance()).error(spec["rank"]) * (1 + 1e-5)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + 1.0, rtol=1e-4, atol=1e-4)


def test_damping_keeps_the_blocks_off_the_calibrations_low_variance_directions(singular_calibration):
    """Fewer calibration tokens than inputs (C singular): undamped, the blocks' exact solves put weight
    on directions the calibration never excites, which fresh inputs of the same distribution amplify."""
    W, stats, fresh = singular_calibration(32)
    spec = {"nblocks": 4, "rank": 4}

    def fresh_err(layer):
        return float(np.linalg.norm((W.double() - layer.weight.detach().double()).numpy() @ fresh.numpy().T))

    damped = get_method("blockdiag-lowrank").fit(W, None, stats, spec)
    raw = get_method("blockdiag-lowrank", damping=0.0).fit(W, None, stats, spec)
    assert fresh_err(damped) < fresh_err(raw)
    assert float(damped.weight.norm()) < 2 * float(W.norm())
    with pytest.raises(ConfigError, match="damping must be a number >= 0"):
        get_method("blockdiag-lowrank", damping=-0.5)
