"""Save / load round trip (bit-exact), dense export loadable by plain transformers, corrupted dirs."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rankwise.compression.compress import compress
from rankwise.compression.saving import save_compressed
from rankwise.models.saved import export_dense, load_structured as load_compressed
from rankwise.errors import ArtifactError, OutputExistsError
from rankwise.models.loading import load_model
from rankwise.models.tiny import tiny_model, tiny_tokenizer
from rankwise.structures.lowrank import LowRankLinear

KW = dict(calib_options=dict(windows=4, seqlen=48), progress=False)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _compressed(arch, ids):
    return compress(tiny_model(arch), "lowrank", 0.4, method="svd-llm", calib=ids, **KW)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_round_trip_is_bit_exact(arch, tmp_path, random_ids, tok):
    model, rep = _compressed(arch, random_ids)
    out = save_compressed(model, tok, tmp_path / "c", rep)
    meta = json.loads((out / "rankwise.json").read_text())
    assert meta["method"] == "svd-llm" and meta["budget"] == {"ratio": 0.4} and meta["format_version"] == 2
    assert meta["format"] == "rankwise" and meta["config"]["structure"] == "lowrank"
    assert {n: v["spec"]["rank"] for n, v in meta["layers"].items()} == rep.ranks
    assert {v["kind"] for v in meta["layers"].values()} == {"lowrank"}
    assert (out / "ranks.md").is_file() and (out / "ranks.png").is_file()
    assert set(meta["versions"]) == {"rankwise", "torch", "transformers"}
    assert meta["tied"] == {"lm_head.weight": "transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"}
    loaded = load_compressed(out)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    x = random_ids[:64].view(2, 32)
    assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    # load_model recognizes the directory too
    again, tok2, _ = load_model(out)
    assert isinstance(again.get_submodule(next(iter(rep.ranks))), LowRankLinear)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_dense_loads_with_plain_transformers(arch, tmp_path, random_ids, tok):
    from transformers import AutoModelForCausalLM

    model, _ = _compressed(arch, random_ids)
    export_dense(model, tok, tmp_path / "d")
    assert not (tmp_path / "d" / "rankwise.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "d", local_files_only=True).eval()
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    assert any(isinstance(m, LowRankLinear) for m in model.modules())  # the model is left factorized
    x = random_ids[:64].view(2, 32)
    torch.testing.assert_close(plain(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def test_existing_output_is_refused_unless_overwrite(tmp_path, random_ids, tok):
    model, rep = _compressed("llama", random_ids)
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_compressed(model, tok, out, rep)
    assert (out / "keep.txt").read_text() == "user data"
    save_compressed(model, tok, out, rep, overwrite=True)
    assert (out / "rankwise.json").is_file() and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temp dirs left behind


def _digest(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_mismatched_directories_raise_artifact_error(tmp_path, random_ids, tok):
    model, rep = _compressed("llama", random_ids)
    out = save_compressed(model, tok, tmp_path / "c", rep)
    before = _digest(out)
    meta = json.loads((out / "rankwise.json").read_text())
    name = "model.layers.1.mlp.down_proj"

    spec = meta["layers"][name]["spec"]
    bad = dict(meta, layers={**meta["layers"], name: {**meta["layers"][name], "spec": {"rank": spec["rank"] + 1}}})
    (out / "rankwise.json").write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match=name):
        load_compressed(out)

    (out / "rankwise.json").write_text(json.dumps(meta))
    state = load_file(str(out / "model.safetensors"))
    del state[f"{name}.A.weight"]
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ArtifactError, match="missing"):
        load_compressed(out)

    (out / "rankwise.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="JSON"):
        load_compressed(out)
    assert before.keys() == _digest(out).keys()


def test_dense_model_cannot_be_saved_as_compressed(tmp_path, tok):
    with pytest.raises(ArtifactError, match="no structured layers"):
        save_compressed(tiny_model("llama"), tok, tmp_path / "x")


def test_format_1_directories_still_load(tmp_path, random_ids, tok):
    """A directory written by rankwise 0.1 (format "rankwise-lowrank", version 1) loads unchanged."""
    model, rep = _compressed("llama", random_ids)
    out = save_compressed(model, tok, tmp_path / "c", rep)
    meta = json.loads((out / "rankwise.json").read_text())
    v1 = {"format": "rankwise-lowrank", "format_version": 1, "tied": meta["tied"], "dtype": "float32",
          "layers": {n: {"rank": d["spec"]["rank"], "shape": d["shape"], "bias": d["bias"]}
                     for n, d in meta["layers"].items()}}
    (out / "rankwise.json").write_text(json.dumps(v1))
    loaded = load_compressed(out)
    x = random_ids[:64].view(2, 32)
    assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)


def test_api_save_reverses_load_for_plain_models_too(tmp_path, tok):
    import rankwise

    dense = tiny_model("llama")
    rankwise.save(dense, tmp_path / "plain", tokenizer=tok)
    again, tok2, path = rankwise.load(tmp_path / "plain")
    assert not (tmp_path / "plain" / "rankwise.json").exists() and path == tmp_path / "plain"
    x = torch.arange(20)[None]
    assert torch.equal(dense(input_ids=x).logits, again(input_ids=x).logits)
