import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rankwise.errors import ConfigError
from rankwise.linalg.monarch import monarch_dense
from rankwise.structures.base import build_layer
from rankwise.structures.monarch import MonarchLinear


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _layer(m=12, n=8, b=2, l=3, r=2, bias=True, seed=0):
    B1, B2 = _rand(b, l * r, n // b, seed=seed), _rand(l, m // l, b * r, seed=seed + 1)
    return MonarchLinear.from_factors(B1, B2, bias=_rand(m, seed=seed + 2) if bias else None), B1, B2


@pytest.mark.parametrize("m,n,b,l,r", [(12, 8, 2, 3, 2), (8, 8, 4, 4, 1), (6, 12, 3, 1, 2)])
def test_forward_matches_dense(m, n, b, l, r):
    layer, B1, B2 = _layer(m, n, b, l, r)
    torch.testing.assert_close(layer.dense(), monarch_dense(B1.double(), B2.double()).float(), rtol=1e-6, atol=1e-6)
    x = _rand(2, 5, n, seed=9)
    ref = x.double().numpy() @ layer.weight.double().numpy().T + layer.bias.detach().double().numpy()
    np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    assert layer(x[0, 0]).shape == (m,)


def test_counts_and_roundtrip(tmp_path):
    layer, B1, B2 = _layer()
    assert layer.num_stored() == B1.numel() + B2.numel() == 2 * (3 * 8 + 2 * 12)
    assert layer.nbytes() == 4 * layer.num_stored() and layer.nbytes(include_bias=True) == 4 * (layer.num_stored() + 12)
    assert layer.spec() == {"in_blocks": 2, "out_blocks": 3, "rank": 2}
    save_file(layer.state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "d.json").write_text(json.dumps(layer.describe()))
    new = build_layer(json.loads((tmp_path / "d.json").read_text()), device="cpu")
    new.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    for k, v in layer.state_dict().items():
        assert torch.equal(new.state_dict()[k], v)
    x = _rand(4, 8, seed=5)
    assert torch.equal(new(x), layer(x))
    assert build_layer(layer.describe()).B1.device.type == "meta"


def test_gradients_flow_and_bad_shapes():
    layer, _, _ = _layer(bias=False)
    layer(_rand(3, 8)).sum().backward()
    assert layer.B1.grad is not None and layer.B2.grad is not None
    with pytest.raises(ConfigError, match="does not divide"):
        MonarchLinear(8, 12, 3, 3, 1)
