"""Finding target linears, weight orientation (Conv1D), module swapping."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.errors import NoTargetLayersError
from rankwise.models import surgery


def test_find_linears_default_targets(tiny_any):
    found = surgery.find_linears(tiny_any)
    n_layers = tiny_any.config.num_hidden_layers
    per_block = 4 if tiny_any.config.model_type == "gpt2" else 7
    assert len(found) == n_layers * per_block
    assert not any("lm_head" in n or "embed" in n for n in found)


def test_target_patterns_and_regex(tiny_llama):
    assert set(surgery.find_linears(tiny_llama, "q_proj,down_proj")) == {
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")
    }
    assert list(surgery.find_linears(tiny_llama, [r"layers\.1\.mlp"])) == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"
    ]


def test_no_match_raises_with_fix(tiny_llama):
    with pytest.raises(NoTargetLayersError, match="--targets"):
        surgery.find_linears(tiny_llama, "nothing_like_this")
    with pytest.raises(NoTargetLayersError, match="no linear layers"):
        surgery.find_linears(nn.Sequential(nn.ReLU()))


def test_conv1d_weight_orientation_matches_forward(tiny_gpt2):
    mod = tiny_gpt2.get_submodule("transformer.h.0.mlp.c_fc")
    x = torch.randn(3, 64)
    w = surgery.linear_weight(mod)
    assert w.shape == (256, 64) and surgery.linear_shape(mod) == (256, 64)
    torch.testing.assert_close(mod(x), x @ w.T + mod.bias)
    lin = surgery.to_linear(mod)
    torch.testing.assert_close(lin(x), mod(x))


def test_set_module_swaps_and_returns_old(tiny_llama):
    name = "model.layers.0.mlp.up_proj"
    old = tiny_llama.get_submodule(name)
    new = nn.Linear(old.in_features, old.out_features, bias=False)
    assert surgery.set_module(tiny_llama, name, new) is old
    assert tiny_llama.get_submodule(name) is new


def test_decoder_blocks_and_layer_index(tiny_any):
    blocks = surgery.decoder_blocks(tiny_any)
    assert len(blocks) == tiny_any.config.num_hidden_layers
    name = next(iter(surgery.find_linears(tiny_any)))
    assert surgery.layer_index(name) == 0
    assert surgery.module_type("model.layers.3.mlp.up_proj") == "up_proj"


def test_get_modules_names_the_missing_one(tiny_llama):
    from rankwise.errors import ConfigError

    mods = surgery.get_modules(tiny_llama, ["model.layers.0.mlp.up_proj"])
    assert mods["model.layers.0.mlp.up_proj"] is tiny_llama.model.layers[0].mlp.up_proj
    with pytest.raises(ConfigError, match="model.layers.9.mlp.up_proj"):
        surgery.get_modules(tiny_llama, ["model.layers.9.mlp.up_proj"])
