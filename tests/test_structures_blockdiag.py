import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rankwise.errors import ConfigError
from rankwise.structures.base import build_layer
from rankwise.structures.blockdiag import BlockDiagLowRankLinear


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _layer(bias=True):
    blocks, L, R = _rand(3, 4, 2, seed=1), _rand(12, 2, seed=2), _rand(2, 6, seed=3)
    return BlockDiagLowRankLinear.from_parts(blocks, L, R, bias=_rand(12, seed=4) if bias else None), blocks, L, R


def test_forward_matches_dense_and_counts():
    layer, blocks, L, R = _layer()
    ref = torch.block_diag(*blocks) + L @ R
    torch.testing.assert_close(layer.dense(), ref, rtol=1e-6, atol=1e-6)
    x = _rand(2, 5, 6, seed=5)
    out = x.double().numpy() @ ref.double().numpy().T + layer.bias.detach().double().numpy()
    np.testing.assert_allclose(layer(x).detach().numpy(), out, rtol=1e-5, atol=1e-5)
    assert layer.num_stored() == 3 * 4 * 2 + 2 * (12 + 6)
    assert layer.nbytes() == 4 * layer.num_stored()
    assert layer.spec() == {"nblocks": 3, "rank": 2}


def test_roundtrip_bit_exact(tmp_path):
    layer, *_ = _layer(bias=False)
    save_file(layer.state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "d.json").write_text(json.dumps(layer.describe()))
    new = build_layer(json.loads((tmp_path / "d.json").read_text()), device="cpu")
    new.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    x = _rand(4, 6, seed=6)
    assert torch.equal(new(x), layer(x)) and new.bias is None


def test_bad_shapes():
    with pytest.raises(ConfigError, match="do not divide"):
        BlockDiagLowRankLinear(6, 12, 4, 1)
    with pytest.raises(ConfigError, match="rank"):
        BlockDiagLowRankLinear(6, 12, 3, 0)
