"""The refit's dense inputs, recorded in one forward of the dense block per batch
(:mod:`rankwise.compression.engine.dense`): layers reading one tensor share a slot, every slot equals
what a hook on the dense layer sees, and the cache is advanced exactly as ``advance`` does."""
from __future__ import annotations

import torch

from rankwise.compression.engine.dense import record_dense_inputs
from rankwise.compression.engine.runner import advance, capture_inputs
from rankwise.compression.engine.spill import SpillFiles
from rankwise.models.surgery import decoder_blocks, find_linears
from rankwise.models.tiny import tiny_model


def test_dense_inputs_slots_values_and_advance(random_ids, tmp_path):
    model = tiny_model("llama").eval()
    blocks = decoder_blocks(model)
    windows = random_ids[:3 * 24].view(3, 24)
    names = [n for n in find_linears(model) if n.startswith("model.layers.1.")]
    mods = {n: model.get_submodule(n) for n in names}
    acts = capture_inputs(model, blocks, windows, 2, torch.device("cpu"))
    advance([(0, blocks[0])], acts, torch.device("cpu"), inplace=True)
    want = advance([(1, blocks[1])], acts, torch.device("cpu"))
    seen = {n: [] for n in names}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in mods.items()]
    with torch.no_grad():
        advance([(1, blocks[1])], acts, torch.device("cpu"))
    for h in hooks:
        h.remove()
    for spill in (None, SpillFiles(tmp_path)):
        cache = acts.copy()
        dense = record_dense_inputs([(1, blocks[1])], cache, mods, torch.device("cpu"), spill)
        typ = lambda n: n.rsplit(".", 1)[1]  # noqa: E731
        lead = dense.leaders(names)
        assert {typ(n): typ(lead[n]) for n in names} == {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj",
                                                        "o_proj": "o_proj", "gate_proj": "gate_proj",
                                                        "up_proj": "gate_proj", "down_proj": "down_proj"}
        for b in range(len(cache.hidden)):
            assert torch.equal(cache.hidden[b], want[b])
            got = dense.batch(b, names)
            for n in names:
                assert torch.equal(got[n], seen[n][b])
            assert got[names[1]] is got[names[0]]  # q and k: one tensor
        dense.close()
