"""init_: each method's promise checked directly -- unit output variance per layer (LSUV, also on
structured layers of a transformer), identity at init (IDInit), spectral norms sqrt(d_out/d_in)
(spectral, dense and structured), orthonormal rows or columns (orthogonal)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from rankwise.errors import ConfigError
from rankwise.training.init import init_, target_layers
from rankwise.training.structurize import structurize


def _mlp(depth: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(16, 32), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(32, 16))


def _output_variances(model, layers, run) -> dict[str, float]:
    out = {}
    hooks = [l.register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, float(o.double().var())))
             for n, l in layers.items()]
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    return out


def test_lsuv_gives_every_layer_unit_output_variance():
    net, x = _mlp(), torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    info = init_(net, "lsuv", x)
    assert info["order"] == [str(i) for i in range(0, 20, 2)]                      # execution order
    var = _output_variances(net, target_layers(net), lambda: net(x))
    assert all(abs(v - 1) <= 0.01 for v in var.values()), var


def test_lsuv_on_a_structured_transformer(random_ids):
    from rankwise.models.tiny import tiny_model

    model = structurize(tiny_model("llama"), "monarch", 0.5, targets=["q_proj", "o_proj", "up_proj"])
    ids = random_ids[:2 * 16].reshape(2, 16)
    info = init_(model, "lsuv", ids)
    layers = target_layers(model)
    assert info["order"] == list(layers)[:len(info["order"])] and len(info["order"]) == 14
    var = _output_variances(model, layers, lambda: model(input_ids=ids))
    assert all(abs(v - 1) <= 0.01 for v in var.values()), var


def test_idinit_is_the_identity_at_init(random_ids):
    from rankwise.models.tiny import tiny_model

    net = _mlp()
    init_(net, "idinit")
    x = torch.rand(10, 16)                               # ReLU passes non-negative inputs
    torch.testing.assert_close(net(x), x, rtol=0, atol=0)
    llama = tiny_model("llama")
    info = init_(llama, "idinit")
    assert {n.rsplit(".", 1)[-1] for n in info["zeroed"]} == {"o_proj", "down_proj"}
    with torch.no_grad():
        hs = llama(input_ids=random_ids[:16][None], output_hidden_states=True).hidden_states
    for h in hs[1:-1]:                                   # every block passes its input through
        torch.testing.assert_close(h, hs[0])


def test_spectral_norms_are_sqrt_dout_over_din():
    from rankwise.models.tiny import tiny_model

    for model in (_mlp(), structurize(tiny_model("llama"), "blockdiag-lowrank", 0.5, targets=["up_proj", "k_proj"])):
        init_(model, "spectral")
        for name, layer in target_layers(model).items():
            W = (layer.dense() if hasattr(layer, "dense") else layer.weight).detach().double().numpy()
            m, n = W.shape
            assert np.linalg.norm(W, 2) == pytest.approx(math.sqrt(m / n), rel=1e-5), name


def test_orthogonal_rows_or_columns():
    net = _mlp(1)
    init_(net, "orthogonal", seed=3)
    for layer in target_layers(net).values():
        W = layer.weight.detach().double()
        G = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
        torch.testing.assert_close(G, torch.eye(G.shape[0], dtype=torch.float64), atol=1e-6, rtol=0)


def test_bad_input():
    net = _mlp(1)
    with pytest.raises(ConfigError, match="lsuv is data-driven: pass data="):
        init_(net, "lsuv")
    with pytest.raises(ConfigError, match="does not take option"):
        init_(net, "spectral", gain=2)
    from rankwise.models.tiny import tiny_model

    with pytest.raises(ConfigError, match="idinit makes dense layers identity-like.*structured"):
        init_(structurize(tiny_model("llama"), "lowrank", 0.5), "idinit")
