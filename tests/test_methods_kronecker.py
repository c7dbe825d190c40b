import numpy as np
import pytest
import torch

from rankwise.calibration.stats import InputStats, LayerStats
from rankwise.compression.methods.base import STRUCTURES, get_method
from rankwise.errors import ConfigError
from rankwise.linalg.kronecker import nearest_kron_sum, kron_sum_dense
from rankwise.structures.kronecker import KroneckerLinear


def _stats(n, tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 4.0, n, dtype=torch.float64)
    return X, LayerStats(InputStats(X.T @ X, X.abs().sum(0), (X * X).sum(0), tokens))


@pytest.mark.parametrize("shape,factor", [((576, 576), (24, 24)), ((192, 576), (12, 24)), ((1536, 576), (32, 32)),
                                          ((576, 1536), (18, 48))])
def test_plan_on_smollm2_shapes(shape, factor):
    m, n = shape
    for ratio in (0.4, 0.6):
        target = (1 - ratio) * m * n
        spec = get_method("kronecker").plan_layer(shape, target)
        m1, n1 = factor
        per = m1 * n1 + (m // m1) * (n // n1)
        assert (spec["m1"], spec["n1"]) == factor and spec["terms"] * per <= target < (spec["terms"] + 1) * per


def test_plan_errors():
    assert "kronecker" in STRUCTURES.names()
    with pytest.raises(ConfigError, match="97 and 89 have no divisors.*use lowrank"):
        get_method("kronecker").plan_layer((97, 89), 0.5 * 97 * 89)
    with pytest.raises(ConfigError, match="does not divide the output size 576"):
        get_method("kronecker", factor=[7, 24]).plan_layer((576, 576), 0.5 * 576 * 576)
    with pytest.raises(ConfigError, match="store .* values.*use fewer terms"):
        get_method("kronecker", terms=100).plan_layer((576, 576), 0.1 * 576 * 576)
    with pytest.raises(ConfigError, match="exceed"):
        get_method("kronecker", terms=600).plan_layer((576, 576), 0.9 * 576 * 576)


def test_fit_data_aware_never_worse_than_frobenius():
    W = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    X, stats = _stats(16)
    spec = {"m1": 3, "n1": 4, "terms": 3}
    layer = get_method("kronecker").fit(W, None, stats, spec)
    plain = get_method("kronecker", data_aware=False).fit(W, None, stats, spec)
    assert isinstance(layer, KroneckerLinear) and layer.num_stored() == 3 * (12 + 16)
    err = lambda Wp: float(np.linalg.norm((W.double() - Wp.double()).numpy() @ X.numpy().T))  # noqa: E731
    assert err(layer.weight) <= err(plain.weight) * (1 + 1e-6)
    A, B, _ = nearest_kron_sum(W, 3, 4, 3)
    np.testing.assert_allclose(plain.weight.numpy(), kron_sum_dense(A, B).numpy(), atol=1e-5)
