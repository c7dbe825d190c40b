"""Pruning surgery (rankwise.models.pruning) is exact: removing heads / channels equals zeroing the
columns of the layer that reads them, dropping blocks equals skipping them (with the KV cache too), and
the rewritten config rebuilds the same shapes."""
import copy

import pytest
import torch

from rankwise.errors import ConfigError
from rankwise.models.pruning import (block_layout, drop_blocks, heads_to_kv, prune_channels, prune_heads, skipping,
                                     widths, write_widths)
from rankwise.models.skeleton import empty_model
from rankwise.models.surgery import decoder_blocks, linear_weight
from rankwise.models.tiny import tiny_model

IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _zero_columns(model, i, name, cols):
    with torch.no_grad():
        linear_weight(decoder_blocks(model)[i].get_submodule(name))[:, cols] = 0.0


def _same_shapes_as_config(model):
    skel = empty_model(model.config)
    want = {k: tuple(v.shape) for k, v in skel.state_dict().items()}
    return all(tuple(t.shape) == want[k] for k, t in model.state_dict().items() if k in want)


@pytest.mark.parametrize("heads", [[0, 2], [0, 1]])  # even across the 2 KV groups / one whole KV group
def test_removing_heads_equals_zeroing_their_output_columns(heads):
    model = tiny_model("llama")  # 4 query heads, 2 KV heads, head_dim 16
    lay = block_layout(model)
    ref = copy.deepcopy(model)
    removed = [h for h in range(4) if h not in heads]
    for i in range(2):
        _zero_columns(ref, i, lay.o, [c for h in removed for c in range(16 * h, 16 * h + 16)])
        prune_heads(decoder_blocks(model)[i], lay, widths(model)[i], heads)
    write_widths(model)
    kv = heads_to_kv(heads, 4, 2)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, len(kv))
    assert torch.allclose(_logits(model), _logits(ref), atol=1e-5)
    assert _same_shapes_as_config(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_removing_channels_equals_zeroing_their_down_columns(arch):
    model = tiny_model(arch)
    lay = block_layout(model)
    ref = copy.deepcopy(model)
    F = widths(model)[0].channels
    keep = list(range(0, F, 2))
    for i in range(2):
        _zero_columns(ref, i, lay.mlp_out, [c for c in range(F) if c not in keep])
        prune_channels(decoder_blocks(model)[i], lay, keep)
    write_widths(model)
    assert torch.allclose(_logits(model), _logits(ref), atol=1e-5)
    assert _same_shapes_as_config(model)
    assert type(decoder_blocks(model)[0].get_submodule(lay.mlp_out)) is type(decoder_blocks(ref)[0].get_submodule(lay.mlp_out))


def test_uneven_gqa_heads_and_per_block_widths_are_refused():
    model = tiny_model("llama")
    lay = block_layout(model)
    with pytest.raises(ConfigError, match="unevenly"):
        prune_heads(decoder_blocks(model)[0], lay, widths(model)[0], [0, 1, 2])
    prune_channels(decoder_blocks(model)[0], lay, list(range(64)))  # block 0 only
    with pytest.raises(ConfigError, match="remote code"):
        write_widths(model)
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ConfigError, match="fuses q, k and v"):
        prune_heads(decoder_blocks(gpt2)[0], block_layout(gpt2), widths(gpt2)[0], [0, 1])


def test_dropping_blocks_equals_skipping_them_with_and_without_the_cache():
    model = tiny_model("llama", num_hidden_layers=4)
    with skipping(model, [1, 2]):
        want = _logits(model)
        want_gen = model.generate(IDS[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    kept = drop_blocks(model, [1, 2])
    assert kept == [0, 3] and model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in decoder_blocks(model)] == [0, 1]
    assert torch.allclose(_logits(model), want, atol=1e-6)
    assert torch.equal(model.generate(IDS[:1], max_new_tokens=4, do_sample=False, pad_token_id=0), want_gen)
    assert _same_shapes_as_config(model)


def test_dropping_blocks_rewrites_per_layer_lists():
    model = tiny_model("gemma3", num_hidden_layers=3, layer_types=["sliding_attention", "full_attention",
                                                                   "sliding_attention"])
    drop_blocks(model, [0])
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    assert torch.isfinite(_logits(model)).all()
    with pytest.raises(ConfigError, match="every one"):
        drop_blocks(model, [0, 1])
