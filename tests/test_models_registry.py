"""Built-in model resolution, cache validation and rebuild, bad model paths."""
from __future__ import annotations

import json

import pytest

from rankwise.errors import ModelNotFoundError
from rankwise.models import registry
from rankwise.models.tiny import save_tiny


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_unknown_name_lists_builtins(cache):
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        registry.resolve_model("no-such-model")


def test_directory_without_config_is_rejected(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"123")
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        registry.resolve_model(tmp_path / "junk")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        registry.resolve_model(f)


def test_local_model_directory_is_returned_as_is(tmp_path):
    d = save_tiny(tmp_path / "m")
    assert registry.resolve_model(d) == d


def _fake_convert(calls):
    def convert(name, dest):
        calls.append(name)
        from rankwise.files import atomic_dir

        with atomic_dir(dest, overwrite=True) as tmp:
            save_tiny(tmp / "x")
            for p in (tmp / "x").iterdir():
                p.rename(tmp / p.name)
            (tmp / "x").rmdir()
            registry._write_manifest(tmp, "fake")
    return convert


def test_corrupted_cache_is_detected_and_rebuilt(cache, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(registry, "convert_builtin", _fake_convert(calls))
    path = registry.resolve_model("smollm2")  # alias
    assert calls == ["smollm2-135m-instruct"]
    assert registry.cache_is_valid(path)
    # a second resolve uses the cache
    assert registry.resolve_model("smollm2-135m-instruct") == path and len(calls) == 1
    # flip one byte in the weights: same size, different hash -> rebuilt, never used silently
    w = path / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    assert not registry.cache_is_valid(path)
    registry.resolve_model("smollm2-135m-instruct")
    assert len(calls) == 2 and registry.cache_is_valid(path)
    # a truncated file or a missing manifest also invalidates it
    (path / "config.json").write_text("{}")
    assert not registry.cache_is_valid(path)
    (path / registry.CACHE_MANIFEST).unlink()
    assert not registry.cache_is_valid(path)


def test_manifest_lists_every_file(cache, monkeypatch):
    monkeypatch.setattr(registry, "convert_builtin", _fake_convert([]))
    path = registry.resolve_model("smollm2-135m-instruct")
    files = json.loads((path / registry.CACHE_MANIFEST).read_text())["files"]
    on_disk = {p.name for p in path.iterdir() if p.name != registry.CACHE_MANIFEST}
    assert set(files) == on_disk


def test_builtin_status_reports_cache_state(cache, monkeypatch):
    rows = {r["name"]: r for r in registry.builtin_status()}
    assert rows["smollm2-135m-instruct"]["installed"] and rows["smollm2-135m-instruct"]["default"]
    assert rows["smollm2-135m-instruct"]["cache"] == "not yet"
    monkeypatch.setattr(registry, "convert_builtin", _fake_convert([]))
    registry.resolve_model("smollm2-135m-instruct")
    rows = {r["name"]: r for r in registry.builtin_status()}
    assert rows["smollm2-135m-instruct"]["cache"] == "valid"


@pytest.mark.integration
def test_real_default_model_shape(real_model):
    model, tok, path = real_model
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    assert cfg.num_key_value_heads == 3 and cfg.tie_word_embeddings
    assert getattr(cfg, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert registry.cache_is_valid(path) or not str(path).startswith(str(registry.cache_dir()))
