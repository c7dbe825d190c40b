"""Exports: every format read back by the real readers (transformers, compressed-tensors, gguf-py) in
processes that never import rankwise, the sharded streaming writer, atomic and permission behaviour,
and the one-line refusals."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rankwise
from rankwise.export import FORMATS, UnsupportedExportError, export
from rankwise.export.formats.gptq import read_gptq
from rankwise.export.formats.gguf import permute_rows
from rankwise.export.shards import ShardedSafetensorsWriter, TensorEntry, parse_size, plan_shards
from rankwise.models.tiny import tiny_model, tiny_tokenizer

CAL = dict(calib_options=dict(windows=4, seqlen=32), progress=False)
IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))


def _quantized(structure: str, **options):
    model = tiny_model("llama")
    win = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    q, _ = rankwise.compress(model, structure, bits_per_weight=9, calib=win, options={"group_size": 32, **options}, **CAL)
    return q


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def models():
    """The quantized tiny Llamas every format test reads (fitted once)."""
    return {
        "sym4": _quantized("gptq", bits=4, symmetric=True, grid="gguf"),
        "asym4-zp": _quantized("rtn", bits=4, symmetric=False, zero_point="exact"),
        "asym4": _quantized("gptq", bits=4, symmetric=False, zero_point="float"),
        "sym8": _quantized("rtn", bits=8, symmetric=True),
        "sym3": _quantized("rtn", bits=3, symmetric=True),
    }


def _logits(model) -> torch.Tensor:
    """The model's float32 reference logits (``exact()``: quantized layers de-quantize and multiply in
    float32 instead of their bfloat16 runtime kernels)."""
    from rankwise.structures.kernels import exact

    with torch.no_grad(), exact():
        return model(IDS).logits


def _run_clean(code: str) -> None:
    """Run ``code`` in a fresh interpreter (``-I``, no PYTHONPATH, cwd=/) and check it never imported rankwise."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    full = "import sys\n" + code + "\nassert 'rankwise' not in sys.modules, 'rankwise was imported'\n"
    p = subprocess.run([sys.executable, "-I", "-c", full], capture_output=True, text=True, env=env, cwd="/")
    assert p.returncode == 0, p.stderr[-4000:]


# ---- the sharded streaming writer -----------------------------------------------------------


def test_parse_size_follows_transformers_units():
    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("2MiB") == 2 * 2 ** 20 and parse_size(1000) == 1000
    with pytest.raises(rankwise.RankwiseError):
        parse_size("lots")


def test_sharded_writer_round_trips_through_safetensors(tmp_path):
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(30, 20, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "c": torch.randint(-9, 9, (5, 3), dtype=torch.int32, generator=g), "d": torch.tensor(3.5),
               "e": torch.randn(10, 10, generator=g).half()}
    entries = [TensorEntry(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    shards = plan_shards(entries, 2500)
    assert [len(s) for s in shards] == [4, 1]  # a, b, c, d = 2478 B; e (200 B) would pass 2500: a new shard
    with ShardedSafetensorsWriter(tmp_path, entries, 2500) as w:
        for k in reversed(list(tensors)):  # any order: each tensor goes to its planned offset
            w.write(k, tensors[k])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(e.nbytes for e in entries)
    for k, t in tensors.items():
        with safe_open(str(tmp_path / index["weight_map"][k]), framework="pt") as f:
            assert torch.equal(f.get_tensor(k), t)


# ---- dense, streamed from a saved directory -----------------------------------------------------


def test_dense_export_from_saved_dir_streams_and_loads(tmp_path, models, tok, monkeypatch):
    from transformers import AutoModelForCausalLM

    import rankwise.models.streaming as streaming

    rankwise.save(models["sym4"], tmp_path / "q", tokenizer=tok)
    reads = []
    real = streaming.load_tensors
    monkeypatch.setattr(streaming, "load_tensors", lambda index, keys, dtype=None: (reads.append(len(keys)),
                                                                                     real(index, keys, dtype))[1])
    res = rankwise.export(tmp_path / "q", "dense", tmp_path / "d", max_shard_size="60KB", progress=False)
    assert max(reads) <= 4, "a saved directory is read one tensor / one layer at a time"
    assert "model.safetensors.index.json" in res.files and sum(f.startswith("model-") for f in res.files) > 2
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float32)
    torch.testing.assert_close(_logits(dense), _logits(models["sym4"]), rtol=1e-5, atol=1e-5)


# ---- compressed-tensors, gguf and gptq read by the real packages, rankwise not imported ---------------


@pytest.fixture(scope="module")
def exported(models, tok, tmp_path_factory):
    """Each format written once; with rankwise's logits and dense weights saved for the clean process."""
    root = tmp_path_factory.mktemp("exports")
    torch.save(IDS, root / "ids.pt")
    plan = [("ct-sym4", "sym4", "compressed-tensors", {}), ("ct-sym8", "sym8", "compressed-tensors", {}),
            ("ct-sym3", "sym3", "compressed-tensors", {}), ("ct-asym4", "asym4-zp", "compressed-tensors", {}),
            ("gguf-q40", "sym4", "gguf", {"dense_type": "f32", "embedding_type": "f32"}),
            ("gguf-q41", "asym4", "gguf", {"dense_type": "f32", "embedding_type": "f32"}),
            ("gguf-q80", "sym8", "gguf", {"dense_type": "f32", "embedding_type": "f32"}),
            ("gptq", "sym4", "gptq", {})]
    results = {}
    for name, key, fmt, opts in plan:
        results[name] = export(models[key], fmt, root / name, tokenizer=tok, options=opts, progress=False)
        torch.save(_logits(models[key]), root / f"{name}.ref.pt")
    return root, results


def test_compressed_tensors_and_gguf_load_in_transformers_without_rankwise(exported):
    root, results = exported
    assert any("re-packed exactly as 4-bit" in n for n in results["ct-sym3"].notes)
    cfg = json.loads((root / "ct-sym4" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["quantization_status"] == "compressed"
    assert "lm_head" in cfg["ignore"]
    code = f"""
import torch
from transformers import AutoModelForCausalLM
root = {str(root)!r}
ids = torch.load(root + '/ids.pt')
for name, kw in [('ct-sym4', {{}}), ('ct-sym8', {{}}), ('ct-sym3', {{}}),
                 ('gguf-q40', {{'gguf_file': 'model.gguf'}}), ('gguf-q41', {{'gguf_file': 'model.gguf'}}),
                 ('gguf-q80', {{'gguf_file': 'model.gguf'}})]:
    m = AutoModelForCausalLM.from_pretrained(root + '/' + name, dtype=torch.float32, **kw)
    with torch.no_grad():
        got = m(ids).logits
    ref = torch.load(root + '/' + name + '.ref.pt')
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-4, (name, rel)
"""
    _run_clean(code)


def test_asymmetric_compressed_tensors_unpacks_exactly_with_the_real_decompressor(exported, models):
    """compressed-tensors' own decompressor reads our packed zero points to rankwise's exact weights. (transformers
    5.x cannot load *asymmetric* pack-quantized files at all with compressed-tensors 0.20: its meta-device
    initialization keeps the zero point unpacked, llm-compressor#1618/#1704; vLLM reads the packed layout.)"""
    root, _ = exported
    torch.save({n: m.dense() for n, m in models["asym4-zp"].named_modules() if hasattr(m, "codes")}, root / "asym.pt")
    code = f"""
import json, torch
from safetensors.torch import load_file
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme
root = {str(root)!r}
cfg = json.load(open(root + '/ct-asym4/config.json'))['quantization_config']
state = load_file(root + '/ct-asym4/model.safetensors')
want = torch.load(root + '/asym.pt')
groups = list(cfg['config_groups'].values())
assert len(groups) == 1 and groups[0]['weights']['symmetric'] is False
scheme = QuantizationScheme(targets=['Linear'], weights=groups[0]['weights'])
for name, W in want.items():
    sd = {{k.split('.')[-1]: v for k, v in state.items() if k.rsplit('.', 1)[0] == name}}
    assert set(sd) >= {{'weight_packed', 'weight_scale', 'weight_zero_point', 'weight_shape'}}, sorted(sd)
    out = PackedQuantizationCompressor.decompress(sd, scheme)
    assert torch.equal(out['weight'].float(), W), name
"""
    _run_clean(code)


def test_gguf_blocks_dequantize_exactly_to_rankwise_weights(exported, models):
    from gguf import GGUFReader, quants

    root, _ = exported
    for name, key, qtype in [("gguf-q40", "sym4", "Q4_0"), ("gguf-q41", "asym4", "Q4_1"), ("gguf-q80", "sym8", "Q8_0")]:
        reader = GGUFReader(root / name / "model.gguf")
        tensors = {t.name: t for t in reader.tensors}
        model = models[key]
        for hf, gg, permute in [("self_attn.q_proj", "attn_q", (4, 4)), ("self_attn.k_proj", "attn_k", (4, 2)),
                                ("mlp.down_proj", "ffn_down", None)]:
            t = tensors[f"blk.1.{gg}.weight"]
            assert t.tensor_type.name == qtype
            W = model.get_submodule(f"model.layers.1.{hf}").dense().numpy()
            want = permute_rows(W, *permute) if permute else W
            got = quants.dequantize(t.data, t.tensor_type).reshape(W.shape)
            assert np.array_equal(got, want), (name, hf)
        fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
        assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
        assert fields["llama.attention.head_count_kv"] == 2


def test_gptq_export_reads_back_to_the_same_weights(exported, models):
    root, _ = exported
    cfg = json.loads((root / "gptq" / "config.json").read_text())["quantization_config"]
    assert (cfg["quant_method"], cfg["checkpoint_format"], cfg["desc_act"], cfg["sym"]) == ("gptq", "gptq", False, True)
    weights = read_gptq(root / "gptq")
    assert len(weights) == 14
    for name, W in weights.items():
        assert torch.equal(W, models["sym4"].get_submodule(name).dense())


def test_gptq_export_loads_with_gptqmodel_when_installed(exported):
    pytest.importorskip("gptqmodel")
    root, _ = exported
    _run_clean(f"""
import torch
from transformers import AutoModelForCausalLM
root = {str(root)!r}
m = AutoModelForCausalLM.from_pretrained(root + '/gptq', dtype=torch.float16)
with torch.no_grad():
    got = m(torch.load(root + '/ids.pt')).logits.float()
ref = torch.load(root + '/gptq.ref.pt')
assert float((got - ref).abs().max() / ref.abs().max()) < 2e-2
""")


def test_plain_model_exports_to_gguf_with_llama_cpp_rtn(tmp_path, tok):
    from gguf import GGMLQuantizationType as T, GGUFReader, quants

    model = tiny_model("llama")
    export(model, "gguf", tmp_path / "g", tokenizer=tok, options={"dense_type": "q4_0", "embedding_type": "q8_0"},
           progress=False)
    tensors = {t.name: t for t in GGUFReader(tmp_path / "g" / "model.gguf").tensors}
    W = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    t = tensors["blk.0.ffn_up.weight"]
    assert t.tensor_type == T.Q4_0
    assert np.array_equal(quants.dequantize(t.data, t.tensor_type).reshape(W.shape),
                          quants.dequantize(quants.quantize(W, T.Q4_0), T.Q4_0))
    assert tensors["token_embd.weight"].tensor_type == T.Q8_0 and tensors["output_norm.weight"].tensor_type == T.F32


# ---- refusals, atomicity, permissions, the CLI ---------------------------------------------------------


def test_a_format_that_cannot_hold_the_model_says_which_can_and_writes_nothing(tmp_path, models, tok):
    with pytest.raises(UnsupportedExportError) as e:
        export(models["asym4"], "compressed-tensors", tmp_path / "x", tokenizer=tok, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "zero_point=exact" in msg and "gguf" in msg and "14 layers" in msg
    with pytest.raises(UnsupportedExportError, match="Llama-family"):
        export(tiny_model("gpt2"), "gguf", tmp_path / "y", tokenizer=tok, progress=False)
    assert sorted(os.listdir(tmp_path)) == []  # nothing written, no temp dir left
    res = export(models["asym4"], "compressed-tensors", tmp_path / "r", tokenizer=tok, progress=False,
                 options={"round_zero_points": True})
    assert any("zero points rounded" in n for n in res.notes)


def test_files_are_readable_as_the_umask_allows(tmp_path, models, tok):
    old = os.umask(0o027)
    try:
        rankwise.save(models["sym8"], tmp_path / "q", tokenizer=tok)
        export(models["sym8"], "compressed-tensors", tmp_path / "ct", tokenizer=tok, progress=False)
    finally:
        os.umask(old)
    for d in ("q", "ct"):
        assert stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o750
        for f in (tmp_path / d).iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o640, f  # model.safetensors was 0600 (safetensors' save_file)


def test_export_cli_and_compress_shortcut(tmp_path, tiny_dir, capsys):
    from rankwise.cli import main

    assert main(["compress", str(tiny_dir), "--structure", "rtn", "--set", "bits=4", "--set", "symmetric=true",
                 "--group-size", "32", "--bits-per-weight", "5", "--calib-windows", "2", "--calib-seqlen", "16",
                 "--low-memory", "--out", str(tmp_path / "q"), "--export", "gguf", str(tmp_path / "g"), "-q"]) == 0
    assert (tmp_path / "g" / "model.gguf").is_file() and "wrote gguf export" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "q"), "--format", "gptq", "--out", str(tmp_path / "gq"), "-q"]) == 0
    capsys.readouterr()
    assert main(["export", str(tiny_dir), "--format", "compressed-tensors", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "formats that can hold this model: dense, gguf" in err
    assert not (tmp_path / "bad").exists()


def test_the_api_verb_is_callable_before_and_after_the_package_import():
    import rankwise.export as pkg

    assert callable(rankwise.export) and callable(pkg) and set(FORMATS.names()) >= {"dense", "compressed-tensors",
                                                                                      "gptq", "gguf"}
