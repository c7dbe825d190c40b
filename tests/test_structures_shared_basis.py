import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from rankwise.errors import ConfigError
from rankwise.structures.base import build_layer
from rankwise.structures.shared_basis import SharedBasisLinear, tie_shared_bases


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _group():
    basis = nn.Parameter(_rand(6, 2, seed=1))
    a = SharedBasisLinear(4, 6, 2, group="a", owner=True, basis=basis)
    b = SharedBasisLinear(5, 6, 2, group="a", owner=False, bias=False, basis=basis)
    with torch.no_grad():
        a.coef.copy_(_rand(2, 4, seed=2))
        a.bias.copy_(_rand(6, seed=3))
        b.coef.copy_(_rand(2, 5, seed=4))
    return a, b


def test_forward_dense_and_counts():
    a, b = _group()
    assert a.basis is b.basis
    for layer in (a, b):
        x = _rand(3, 2, layer.in_features, seed=5)
        ref = x.double().numpy() @ (layer.basis @ layer.coef).detach().double().numpy().T
        if layer.bias is not None:
            ref = ref + layer.bias.detach().double().numpy()
        np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.dense(), (layer.basis @ layer.coef).detach())
    assert a.num_stored() == 6 * 2 + 2 * 4 and b.num_stored() == 2 * 5  # the basis counts once, in its owner
    assert a.nbytes() == 4 * a.num_stored() and b.nbytes() == 4 * b.num_stored()
    assert a.spec() == {"rank": 2, "group": "a", "owner": True} and b.spec()["owner"] is False


def test_saved_once_and_roundtrip_bit_exact(tmp_path):
    a, b = _group()
    container = nn.ModuleDict({"a": a, "b": b})
    save_model(container, str(tmp_path / "w.safetensors"))
    stored = load_file(str(tmp_path / "w.safetensors"))
    assert sum(k.endswith("basis") for k in stored) == 1  # the shared basis is stored once
    (tmp_path / "d.json").write_text(json.dumps({"a": a.describe(), "b": b.describe()}))
    descs = json.loads((tmp_path / "d.json").read_text())
    new = nn.ModuleDict({k: build_layer(d, device="cpu") for k, d in descs.items()})
    assert new["a"].basis is not new["b"].basis and tie_shared_bases(new.values()) == 1
    assert new["a"].basis is new["b"].basis
    load_model(new, str(tmp_path / "w.safetensors"))
    for k in ("a", "b"):
        x = _rand(2, new[k].in_features, seed=6)
        assert torch.equal(new[k](x), container[k](x))
        for name, v in container[k].state_dict().items():
            assert torch.equal(new[k].state_dict()[name], v)


def test_tie_errors_and_bad_shapes():
    a, b = _group()
    b.owner = True
    with pytest.raises(ConfigError, match="2 owners"):
        tie_shared_bases([a, b])
    with pytest.raises(ConfigError, match="shared basis must be"):
        SharedBasisLinear(4, 6, 3, basis=nn.Parameter(torch.zeros(6, 2)))
    with pytest.raises(ConfigError, match="rank"):
        SharedBasisLinear(4, 6, 0)
