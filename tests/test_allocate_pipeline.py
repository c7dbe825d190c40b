"""Global allocators and the speed-aware choice inside the compression pipeline (tiny models)."""
from __future__ import annotations

import json

import pytest
import torch

from rankwise.compression.allocation import ALLOCATORS, AllocationContext, get_allocator
from rankwise.compression.allocation.measure import make_layer_loss
from rankwise.compression.compress import compress
from rankwise.compression.allocation.speed import fingerprint
from rankwise.errors import ConfigError, UnknownMethodError
from rankwise.linalg import whitened_svd
from rankwise.models.surgery import find_linears, linear_weight


@pytest.fixture
def windows(random_ids):
    return random_ids[:8 * 64].view(8, 64)


def test_registry_lists_global_allocators():
    assert {"uniform", "spectrum", "sensitivity"} <= set(ALLOCATORS)
    with pytest.raises(UnknownMethodError, match="spectrum"):
        get_allocator("nope")


@pytest.mark.parametrize("alloc", ["spectrum", "spectrum-band", "sensitivity-band", "sensitivity"])
def test_global_allocators_meet_the_budget(tiny_llama, windows, alloc):
    _, rep = compress(tiny_llama, "lowrank", method="svd-llm", ratio=0.4, calib=windows, allocate=alloc, progress=False,
                      allocate_options={"sensitivity_windows": 2, "sensitivity_seqlen": 32})
    assert rep.achieved_ratio >= 0.4
    assert rep.allocate == alloc and "dense" in rep.allocation
    ranks = [r for r in rep.ranks.values() if r is not None]
    assert len(set(ranks)) > 1, "a global allocator should not give every layer the same rank"
    if alloc == "sensitivity":
        s = rep.allocation["sensitivity"]
        assert s["loss_evaluations"] == sum(len(t) for t in s["table"].values()) > 0


def test_speed_aware_keeps_slow_shapes_dense_and_still_meets_budget(windows, tmp_path, monkeypatch):
    from rankwise.models.tiny import tiny_model

    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "cache"))
    prof = tmp_path / "speed.json"
    # k_proj / v_proj (32 x 64) never faster; the rest always faster up to their saving rank
    prof.write_text(json.dumps({"fingerprint": fingerprint("cpu", torch.float32), "break_even": {
        "32x64": {"decode": 0, "prefill": 0}, "64x64": {"decode": 31, "prefill": 31},
        "128x64": {"decode": 42, "prefill": 42}, "64x128": {"decode": 42, "prefill": 42}}}))
    for alloc in ("uniform", "spectrum"):
        _, rep = compress(tiny_model("llama"), "lowrank", method="svd-llm", ratio=0.3, calib=windows, allocate=alloc, progress=False,
                          allocate_options={"speed_aware": True, "speed_profile": str(prof)})
        assert rep.achieved_ratio >= 0.3
        for name, r in rep.ranks.items():
            if name.endswith(("k_proj", "v_proj")):
                assert r is None
        assert rep.allocation["speed"]["caps"]
        if alloc == "spectrum":
            assert any("not faster" in why for why in rep.allocation["dense"].values())
    with pytest.raises(ConfigError, match="no-speed-aware"):
        compress(tiny_model("llama"), "lowrank", method="svd-llm", ratio=0.9, calib=windows, allocate="spectrum", progress=False,
                 allocate_options={"speed_aware": True, "speed_profile": str(prof)})


def test_layer_loss_truncates_one_layer_and_restores_it(tiny_llama, windows):
    from rankwise.calibration.stats import collect_input_stats

    name = "model.layers.0.mlp.down_proj"
    st = collect_input_stats(tiny_llama, windows, [name])
    W0 = linear_weight(tiny_llama.get_submodule(name)).detach().clone()
    fac = whitened_svd(W0, st[name].cov)
    loss, base = make_layer_loss(tiny_llama, windows[:2], {name: fac})
    full = fac.max_rank
    assert loss(name, full) == pytest.approx(base, abs=1e-4)  # full rank = the dense layer
    assert loss(name, 1) != pytest.approx(base, abs=1e-4)
    assert torch.equal(linear_weight(tiny_llama.get_submodule(name)), W0)


def test_sensitivity_band_one_loss_per_layer_and_heavy_layer_keeps_rank(tiny_llama, windows):
    from rankwise.compression.allocation.budget import uniform_rank

    heavy = "model.layers.0.mlp.down_proj"
    calls = []

    def fake_loss(name, k):
        calls.append((name, k))
        return 1e3 if name == heavy else 1.01

    _, rep = compress(tiny_llama, "lowrank", method="svd-llm", ratio=0.4, calib=windows, allocate="sensitivity-band", progress=False,
                      context=AllocationContext(layer_loss=fake_loss, base_loss=1.0))
    shapes = {n: (lay.out_features, lay.in_features) for n, lay in
              ((n, tiny_llama.get_submodule(n)) for n in rep.ranks)}
    assert rep.achieved_ratio >= 0.4
    assert sorted(n for n, _ in calls) == sorted(rep.ranks)  # exactly one evaluation per layer
    assert all(k == uniform_rank(*shapes[n], 0.4) for n, k in calls)
    assert rep.allocation["sensitivity"]["loss_evaluations"] == len(rep.ranks)
    assert rep.ranks[heavy] >= uniform_rank(*shapes[heavy], 0.4)
    assert all(r is not None for r in rep.ranks.values())
