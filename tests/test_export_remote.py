"""The exports of structures no quantized format holds, read by the real packages in a process that cannot
import rankwise (one process for all, to pay transformers' start-up once):

* remote-code: ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``, same logits, for every
  factorized structure and for per-block widths;
* compressed-tensors-lora: the compressed-tensors base loaded by transformers plus the PEFT adapter loaded
  by peft give rankwise's logits of the low-rank + quantized model."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import rankwise
from rankwise.cli import main
from rankwise.errors import ConfigError
from rankwise.export import UnsupportedExportError
from rankwise.linalg.sparse import pack_2bit
from rankwise.models.surgery import set_module
from rankwise.models.tiny import tiny_model
from rankwise.structures.base import LAYERS
from rankwise.structures.kernels import exact

IDS = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
SHORT = IDS[:1, :5]  # decode-sized: the sparse layers take their CSR path

#: One tiny Llama holding every structure of the format (shared-basis: a group of two layers).
MIXED = {
    "model.layers.0.self_attn.q_proj": ("lowrank", {"rank": 8}),
    "model.layers.0.self_attn.k_proj": ("lowrank-sparse", {"rank": 4, "pattern": "unstructured", "nnz_per_row": 16}),
    "model.layers.0.self_attn.v_proj": ("sparse", {"pattern": "2:4"}),
    "model.layers.0.self_attn.o_proj": ("monarch", {"in_blocks": 4, "out_blocks": 4, "rank": 2}),
    "model.layers.0.mlp.gate_proj": ("blockdiag-lowrank", {"nblocks": 4, "rank": 4}),
    "model.layers.0.mlp.up_proj": ("shared-basis", {"rank": 8, "group": "g", "owner": True}),
    "model.layers.1.mlp.up_proj": ("shared-basis", {"rank": 8, "group": "g", "owner": False}),
    "model.layers.1.mlp.gate_proj": ("kronecker", {"m1": 8, "n1": 8, "terms": 3}),
    "model.layers.1.mlp.down_proj": ("kronecker", {"m1": 2, "n1": 64, "terms": 2}),  # the other product order
    "model.layers.1.self_attn.v_proj": ("lowrank-sparse", {"rank": 2, "pattern": "2:4"}),
}


def _random_layer(kind, spec, old, g):
    layer = LAYERS.get(kind).from_spec(old.in_features, old.out_features, old.bias is not None, spec, device="cpu")
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    S = layer if kind == "sparse" else getattr(layer, "S", None)
    if S is not None and S.pattern == "2:4":
        pos = torch.stack([torch.randperm(4, generator=g)[:2].sort().values for _ in range(S.out_features * S.in_features // 4)])
        S.positions.copy_(pack_2bit(pos.reshape(S.out_features, -1)))
    elif S is not None:
        S.cols.copy_(torch.stack([torch.randperm(S.in_features, generator=g)[:S.nnz_per_row].sort().values
                                  for _ in range(S.out_features)]).to(S.cols.dtype))
    return layer


def mixed_model():
    g = torch.Generator().manual_seed(0)
    model = tiny_model("llama")
    owner = None
    for name, (kind, spec) in MIXED.items():
        layer = _random_layer(kind, spec, model.get_submodule(name), g)
        if kind == "shared-basis":
            owner = layer if spec["owner"] else owner
            layer.basis = owner.basis
        set_module(model, name, layer)
    return model.eval()


def pruned_model():
    """Per-block widths: block 1 keeps 2 of 4 query heads (one per KV head) and 96 of 128 FFN channels."""
    model = tiny_model("llama", seed=3)
    att, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    heads = torch.cat([torch.arange(0, 16), torch.arange(32, 48)])  # query heads 0 and 2
    keep = torch.arange(96)
    with torch.no_grad():
        for parent, name, rows, cols in ((att, "q_proj", heads, None), (att, "o_proj", None, heads),
                                         (mlp, "gate_proj", keep, None), (mlp, "up_proj", keep, None),
                                         (mlp, "down_proj", None, keep)):
            W = getattr(parent, name).weight
            W = W[rows] if rows is not None else W[:, cols]
            lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
            lin.weight.copy_(W)
            setattr(parent, name, lin)
    att.num_key_value_groups = 1
    model.config.rankwise_attributes = {"model.layers.1.self_attn": {"num_key_value_groups": 1}}
    return model.eval()


def lowrank_quant_model():
    """Low-rank + quantized layers (4-bit symmetric, g32) of ranks 4 and 2 (a rank_pattern), one plain
    quantized layer, random codes, scales and factors."""
    g = torch.Generator().manual_seed(5)
    model = tiny_model("llama", seed=5)
    for i, name in enumerate(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n):
        old = model.get_submodule(name)
        spec = {"bits": 4, "group_size": 32, "symmetric": True}
        kind = "quant" if name.endswith("0.mlp.down_proj") else "lowrank-quant"
        if kind == "lowrank-quant":
            spec["rank"] = 4 if i % 2 else 2
        layer = LAYERS.get(kind).from_spec(old.in_features, old.out_features, False, spec, device="cpu")
        with torch.no_grad():
            layer.codes.copy_(torch.randint(0, 256, layer.codes.shape, generator=g, dtype=torch.uint8))
            layer.scales.copy_((torch.rand(layer.scales.shape, generator=g) * 0.02 + 0.005).half())
            if kind == "lowrank-quant":
                layer.left.copy_((torch.randn(layer.left.shape, generator=g) * 0.1).half())
                layer.right.copy_((torch.randn(layer.right.shape, generator=g) * 0.1).half())
        set_module(model, name, layer)
    return model.eval()


HAVE_CT = importlib.util.find_spec("compressed_tensors") is not None and importlib.util.find_spec("peft") is not None


def _logits(model, ids):
    """rankwise's float32 reference (its runtime kernels compute in bfloat16, see structures/kernels.py)."""
    with torch.no_grad(), exact():
        return model(input_ids=ids).logits


#: Makes ``import rankwise`` fail in the clean process (the editable install would otherwise find it).
BLOCK_RANKWISE = """
import importlib.abc, sys
class _NoRankwise(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "rankwise" or name.startswith("rankwise."):
            raise ImportError("rankwise cannot be imported here")
sys.meta_path.insert(0, _NoRankwise())
"""


def run_clean(code: str, tmp) -> None:
    """``code`` in a fresh interpreter that cannot import rankwise (``-I``, no PYTHONPATH, cwd=/)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp / "hf-modules")
    full = BLOCK_RANKWISE + textwrap.dedent(code) + "\nassert 'rankwise' not in sys.modules, 'rankwise was imported'\n"
    p = subprocess.run([sys.executable, "-I", "-c", full], capture_output=True, text=True, env=env, cwd="/",
                       stdin=subprocess.DEVNULL, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_tok):
    """The mixed model exported from a saved directory (streamed), the pruned one from memory; their logits."""
    root = tmp_path_factory.mktemp("remote")
    mixed, pruned = mixed_model(), pruned_model()
    rankwise.save(mixed, root / "saved", tokenizer=tiny_tok)
    rankwise.export(root / "saved", "remote-code", root / "mixed", progress=False)
    rankwise.export(pruned, "remote-code", root / "pruned", tokenizer=tiny_tok, progress=False)
    ref = {f"{n}.{k}": _logits(m, ids) for n, m in (("mixed", mixed), ("pruned", pruned))
           for k, ids in (("long", IDS), ("short", SHORT))}
    if HAVE_CT:
        lq = lowrank_quant_model()
        rankwise.export(lq, "compressed-tensors-lora", root / "lq", tokenizer=tiny_tok, progress=False)
        ref["lq.long"] = _logits(lq, IDS)
    run_clean(f"""
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
        ids = torch.tensor({IDS.tolist()})
        out = {{}}
        for name in ("mixed", "pruned"):
            path = {str(root)!r} + "/" + name
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
            AutoTokenizer.from_pretrained(path, trust_remote_code=True)
            with torch.no_grad():
                out[name + ".long"] = model(input_ids=ids).logits
                out[name + ".short"] = model(input_ids=ids[:1, :5]).logits
            out[name + ".class"] = torch.tensor([ord(c) for c in type(model).__name__])
        if {HAVE_CT}:
            from peft import PeftModel
            from transformers import CompressedTensorsConfig
            base = AutoModelForCausalLM.from_pretrained({str(root / "lq")!r}, dtype=torch.float32,
                                                        quantization_config=CompressedTensorsConfig(dequantize=True))
            model = PeftModel.from_pretrained(base, {str(root / "lq" / "adapter")!r})
            with torch.no_grad():
                out["lq.long"] = model(input_ids=ids).logits
        save_file(out, {str(root / "logits.safetensors")!r})
    """, root)
    return root, ref, load_file(str(root / "logits.safetensors"))


def test_transformers_loads_every_structure_without_rankwise(exports):
    root, ref, got = exports
    for key, want in ref.items():
        if key.startswith("lq."):
            continue
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-5, msg=key)
    assert "".join(map(chr, got["mixed.class"].tolist())) == "RankwiseLlamaForCausalLM"
    cfg = json.loads((root / "mixed" / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoConfig": "modeling_rankwise.RankwiseLlamaConfig",
                               "AutoModelForCausalLM": "modeling_rankwise.RankwiseLlamaForCausalLM"}
    assert cfg["model_type"] == "rankwise_llama"
    table = cfg["rankwise_structure"]["layers"]
    assert {n: (d["kind"], d["spec"]) for n, d in table.items()} == {n: (k, s) for n, (k, s) in MIXED.items()} | {
        "model.layers.0.self_attn.v_proj": ("sparse", {"pattern": "2:4", "nnz_per_row": 32}),
        "model.layers.1.self_attn.v_proj": ("lowrank-sparse", {"rank": 2, "pattern": "2:4", "nnz_per_row": 32})}
    stored = load_file(str(root / "mixed" / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.basis" in stored and "model.layers.1.mlp.up_proj.basis" not in stored
    assert "import rankwise" not in (root / "mixed" / "modeling_rankwise.py").read_text()


def test_per_block_widths_and_attributes_go_in_the_table(exports):
    root, _, _ = exports
    st = json.loads((root / "pruned" / "config.json").read_text())["rankwise_structure"]
    assert st["layers"] == {
        "model.layers.1.self_attn.q_proj": {"kind": "linear", "shape": [32, 64], "bias": False},
        "model.layers.1.self_attn.o_proj": {"kind": "linear", "shape": [64, 32], "bias": False},
        "model.layers.1.mlp.gate_proj": {"kind": "linear", "shape": [96, 64], "bias": False},
        "model.layers.1.mlp.up_proj": {"kind": "linear", "shape": [96, 64], "bias": False},
        "model.layers.1.mlp.down_proj": {"kind": "linear", "shape": [64, 96], "bias": False}}
    assert st["attributes"] == {"model.layers.1.self_attn": {"num_key_value_groups": 1}}


def test_rankwise_loads_and_generates_the_export_only_when_trusted(exports, capsys):
    root, ref, _ = exports
    with pytest.raises(ConfigError, match="trust_remote_code=True"):
        rankwise.load(root / "mixed")
    model, tok, _ = rankwise.load(root / "mixed", trust_remote_code=True)
    torch.testing.assert_close(_logits(model, IDS), ref["mixed.long"], rtol=1e-5, atol=1e-5)
    assert main(["generate", str(root / "mixed"), "-n", "3", "-q"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert main(["generate", str(root / "mixed"), "-n", "3", "-q", "--trust-remote-code"]) == 0


def test_quantized_layers_are_refused_with_the_formats_that_hold_them(tmp_path):
    model = tiny_model("llama")
    q = LAYERS.get("quant").from_spec(64, 64, False, {"bits": 4, "group_size": 32, "symmetric": True}, device="cpu")
    set_module(model, "model.layers.0.self_attn.q_proj", q)
    with pytest.raises(UnsupportedExportError, match="is a 'quant' layer.*compressed-tensors"):
        rankwise.export(model, "remote-code", tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(UnsupportedExportError, match="no structured or resized layer"):
        rankwise.export(tiny_model("llama"), "remote-code", tmp_path / "x", progress=False)


@pytest.mark.skipif(not HAVE_CT, reason="needs compressed-tensors and peft (dev extras)")
def test_peft_adapter_on_the_compressed_tensors_base_gives_rankwise_logits(exports):
    root, ref, got = exports
    torch.testing.assert_close(got["lq.long"], ref["lq.long"], rtol=1e-5, atol=1e-5)
    cfg = json.loads((root / "lq" / "adapter" / "adapter_config.json").read_text())
    ranks = {n: (4 if i % 2 else 2) for i, n in enumerate(
        n for n, m in tiny_model("llama").named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n)}
    ranks.pop("model.layers.0.mlp.down_proj")
    assert cfg["rank_pattern"] == ranks and cfg["alpha_pattern"] == {n: float(r) for n, r in ranks.items()}
    assert cfg["target_modules"] == sorted(ranks) and not cfg["use_rslora"]  # scale alpha / r = 1 everywhere
    q = json.loads((root / "lq" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and "lm_head" in q["ignore"]
    merged, _, _ = rankwise.load(root / "lq")  # what rankwise generate runs: the base with the adapter merged in
    torch.testing.assert_close(_logits(merged, IDS), ref["lq.long"], rtol=1e-5, atol=1e-5)


def test_lowrank_quant_needs_its_own_format(tmp_path):
    lq = lowrank_quant_model()
    with pytest.raises(UnsupportedExportError, match="lowrank-quant.*compressed-tensors-lora"):
        rankwise.export(lq, "compressed-tensors", tmp_path / "x", progress=False)
    model = tiny_model("llama")
    q = LAYERS.get("quant").from_spec(64, 64, False, {"bits": 4, "group_size": 32, "symmetric": True}, device="cpu")
    set_module(model, "model.layers.0.self_attn.q_proj", q)
    with pytest.raises(UnsupportedExportError, match="no low-rank \\+ quantized layer.*--format compressed-tensors"):
        rankwise.export(model, "compressed-tensors-lora", tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
