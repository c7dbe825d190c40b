"""Low-memory (block by block from safetensors) compression equals the in-memory sequential path."""
from __future__ import annotations

import struct

import pytest
import torch

from rankwise.compression import lowmem
from rankwise.compression.lowmem import compress_low_memory, stream_merge
from rankwise.compression.pipeline import compress
from rankwise.compression.saving import load_compressed, save_compressed
from rankwise.errors import ConfigError
from rankwise.models.loading import load_model
from rankwise.models.tiny import save_tiny


@pytest.fixture
def windows(random_ids):
    return random_ids[:6 * 48].view(6, 48)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_low_memory_equals_in_memory(tmp_path, windows, arch):
    src = save_tiny(tmp_path / f"tiny-{arch}", arch)
    model, tok, _ = load_model(src)
    model, rep = compress(model, "svd-llm", 0.4, calib=windows, sequential=True, progress=False)
    save_compressed(model, tok, tmp_path / "mem", rep)
    rep_low = compress_low_memory(src, tmp_path / "low", "svd-llm", 0.4, calib=windows, progress=False)
    assert rep_low.ranks == rep.ranks
    a = load_compressed(tmp_path / "mem").state_dict()
    b = load_compressed(tmp_path / "low").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "low" / "ranks.png").is_file() and (tmp_path / "low" / "ranks.md").is_file()


def test_interrupted_run_leaves_nothing_and_rerun_is_clean(tmp_path, windows, monkeypatch, tiny_dir):
    src = tiny_dir
    out = tmp_path / "out"
    real = lowmem._save_shard
    calls = {"n": 0}

    def boom(state, file):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interrupt after the first block")
        real(state, file)

    monkeypatch.setattr(lowmem, "_save_shard", boom)
    with pytest.raises(KeyboardInterrupt):
        compress_low_memory(src, out, "svd-llm", 0.4, calib=windows, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "no temp dir left behind"
    monkeypatch.setattr(lowmem, "_save_shard", real)
    compress_low_memory(src, out, "svd-llm", 0.4, calib=windows, progress=False)
    assert load_compressed(out) is not None


def test_low_memory_rejects_global_allocators_and_fisher(tmp_path, windows, tiny_dir):
    src = tiny_dir
    with pytest.raises(ConfigError, match="allocate uniform"):
        compress_low_memory(src, tmp_path / "o", allocate="spectrum", calib=windows, progress=False)
    with pytest.raises(ConfigError, match="gradients"):
        compress_low_memory(src, tmp_path / "o", method="fwsvd", calib=windows, progress=False)


def test_stream_merge_matches_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    a = {"x": torch.randn(3, 5, generator=g), "n": torch.arange(7)}
    b = {"y": torch.randn(4, generator=g).to(torch.bfloat16), "z": torch.zeros(0, 2)}
    save_file(a, str(tmp_path / "a.st"))
    save_file(b, str(tmp_path / "b.st"))
    stream_merge([tmp_path / "a.st", tmp_path / "b.st"], tmp_path / "m.st", {"k": "v"})
    got = load_file(str(tmp_path / "m.st"))
    assert got.keys() == {"x", "n", "y", "z"}
    for k, v in {**a, **b}.items():
        assert torch.equal(got[k], v) and got[k].dtype == v.dtype
    raw = (tmp_path / "m.st").read_bytes()
    assert struct.unpack("<Q", raw[:8])[0] % 8 == 0
