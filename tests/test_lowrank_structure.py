import numpy as np
import pytest
import torch
from torch import nn

from rankwise.errors import ConfigError
from rankwise.structures import LowRankLinear, lowrank_saves, max_saving_rank


def _factors(m=7, n=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(k, n, generator=g), torch.randn(m, generator=g)


def test_forward_matches_dense_matmul():
    L, R, b = _factors()
    layer = LowRankLinear.from_factors(L, R, b)
    x = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(1))
    ref = x.numpy() @ (L.numpy() @ R.numpy()).T + b.numpy()
    np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.dense().detach().numpy(), L.numpy() @ R.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.weight.numpy(), L.numpy() @ R.numpy(), rtol=1e-6, atol=1e-6)
    assert not layer.weight.requires_grad


def test_shapes_keys_and_parameter_count():
    L, R, b = _factors(m=8, n=6, k=2)
    layer = LowRankLinear.from_factors(L, R, b)
    assert (layer.in_features, layer.out_features, layer.rank) == (6, 8, 2)
    sd = layer.state_dict()
    assert set(sd) == {"A.weight", "B.weight", "B.bias"}
    assert sd["A.weight"].shape == (2, 6) and sd["B.weight"].shape == (8, 2)
    assert layer.num_parameters() == 2 * (8 + 6) + 8
    nobias = LowRankLinear(6, 8, 2, bias=False)
    assert set(nobias.state_dict()) == {"A.weight", "B.weight"} and nobias.num_parameters() == 28
    assert nobias.bias is None


def test_to_linear_equal_outputs():
    L, R, b = _factors()
    layer = LowRankLinear.from_factors(L, R, b)
    lin = layer.to_linear()
    assert isinstance(lin, nn.Linear)
    x = torch.randn(3, 5)
    torch.testing.assert_close(lin(x), layer(x), rtol=1e-5, atol=1e-5)


def test_dtype_and_load_state_dict_roundtrip():
    L, R, b = _factors()
    layer = LowRankLinear.from_factors(L.double(), R.double(), b.double(), dtype=torch.bfloat16)
    assert layer.A.weight.dtype == torch.bfloat16
    other = LowRankLinear(5, 7, 3, dtype=torch.bfloat16)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.dense(), layer.dense())


def test_lowrank_saves():
    assert lowrank_saves(10, 10, 4) and not lowrank_saves(10, 10, 5)
    for m, n in [(10, 10), (576, 1536), (3, 100)]:
        k = max_saving_rank(m, n)
        assert lowrank_saves(m, n, k) and not lowrank_saves(m, n, k + 1)


def test_bad_factors():
    with pytest.raises(ConfigError):
        LowRankLinear.from_factors(torch.randn(4, 2), torch.randn(3, 5))
    with pytest.raises(ConfigError):
        LowRankLinear(4, 4, 0)
    with pytest.raises(ConfigError):
        LowRankLinear.from_factors(torch.randn(4, 2), torch.randn(2, 5), bias=torch.randn(5))
