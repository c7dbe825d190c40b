import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rankwise.errors import ConfigError
from rankwise.structures.base import build_layer
from rankwise.structures.kronecker import KroneckerLinear


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("r,m1,n1,m2,n2", [(2, 3, 2, 2, 4), (3, 1, 4, 5, 2), (1, 4, 4, 4, 4)])
def test_forward_vec_trick_matches_dense(r, m1, n1, m2, n2):
    A, B = _rand(r, m1, n1, seed=1), _rand(r, m2, n2, seed=2)
    layer = KroneckerLinear.from_factors(A, B, bias=_rand(m1 * m2, seed=3))
    ref = sum(np.kron(A[i].numpy(), B[i].numpy()) for i in range(r))
    np.testing.assert_allclose(layer.weight.numpy(), ref, rtol=1e-5, atol=1e-6)
    x = _rand(2, 3, n1 * n2, seed=4)
    out = x.double().numpy() @ ref.T + layer.bias.detach().double().numpy()
    np.testing.assert_allclose(layer(x).detach().numpy(), out, rtol=1e-5, atol=1e-5)
    assert layer.num_stored() == r * (m1 * n1 + m2 * n2) and layer.nbytes() == 4 * layer.num_stored()


def test_roundtrip_bit_exact(tmp_path):
    layer = KroneckerLinear.from_factors(_rand(2, 3, 2), _rand(2, 2, 4, seed=1))
    assert layer.spec() == {"m1": 3, "n1": 2, "terms": 2}
    save_file(layer.state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "d.json").write_text(json.dumps(layer.describe()))
    new = build_layer(json.loads((tmp_path / "d.json").read_text()), device="cpu")
    new.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    x = _rand(5, 8, seed=7)
    assert torch.equal(new(x), layer(x))


def test_bad_shapes():
    with pytest.raises(ConfigError, match="does not divide"):
        KroneckerLinear(8, 6, 4, 3, 1)
    with pytest.raises(ConfigError, match="at least one term"):
        KroneckerLinear(8, 6, 3, 2, 0)


def test_chunked_forward_matches_dense(monkeypatch):
    layer = KroneckerLinear.from_factors(_rand(3, 2, 4, seed=8), _rand(3, 4, 2, seed=9), bias=_rand(8, seed=10))
    monkeypatch.setattr(KroneckerLinear, "chunk_elements", 50)  # a few rows per chunk
    x = _rand(7, 8, seed=11)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias, rtol=1e-5, atol=1e-5)


def test_module_casts_and_copies():
    layer = KroneckerLinear.from_factors(_rand(2, 3, 2), _rand(2, 2, 4, seed=1), bias=_rand(6, seed=2))
    double = layer.to(torch.float64)  # nn.Module machinery (to/_apply) is not shadowed
    assert double.A.dtype == torch.float64
    x = _rand(3, 8, seed=3).double()
    torch.testing.assert_close(double(x), x @ double.dense().double().T + double.bias)
