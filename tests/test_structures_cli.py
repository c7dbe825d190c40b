"""Every issue-13 structure end to end on the CLI: compress -> --out -> eval -> load, low memory, bad input.

For each structure (and pattern) on tiny saved Llama, GPT-2 and Gemma 3 models:

* ``rankwise compress --structure S --out OUT`` writes a model whose reloaded logits are bit-identical
  to the same compression done in memory through the API, and ``rankwise eval OUT`` gives exactly
  the in-memory model's perplexity;
* ``--low-memory`` (block by block from the safetensors files) writes the very same tensors, aliases
  and layer descriptions (a basis shared across blocks stored once in both);
* ``rankwise.json`` lists kind / spec / bytes per layer and each layer's ``bytes_after`` equals the
  bytes its tensors take in ``model.safetensors`` (bias excluded, shared tensors counted once);
* a shape a structure cannot take or a budget it cannot reach: exit 2, one error message naming the
  layer, its shape and the fix, and no output directory; fallbacks are listed per layer.
"""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

import rankwise
from rankwise.cli import main
from rankwise.models.saved import structured_layers
from rankwise.models.tiny import TINY_TEXT, save_tiny, tiny_model, tiny_tokenizer

#: (structure, --set options): every issue-13 structure; few iterations keep the tiny fits fast.
STRUCTURES = [
    ("lowrank-sparse", ["iters=1"]),
    ("lowrank-sparse", ["pattern=2:4", "iters=1"]),
    ("prune", []),
    ("prune", ["pattern=2:4"]),
    ("monarch", ["iters=1"]),
    ("blockdiag-lowrank", ["iters=1"]),
    ("kronecker", []),
    ("shared-basis", []),
]
WINDOWS, SEQLEN = 4, 32


def _options(sets: list[str]) -> dict:
    from rankwise.commands.compress import parse_sets

    return parse_sets(sets)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("text") / "t.txt"
    f.write_text(TINY_TEXT * 12)
    return f


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> a saved tiny model directory (made once per module)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(root / arch, arch) for arch in ("llama", "gpt2", "gemma3")}


def _cli(src, out, structure, sets, text_file, *extra) -> int:
    args = ["compress", str(src), "--structure", structure, "--ratio", "0.4", "--calib-file", str(text_file),
            "--calib-windows", str(WINDOWS), "--calib-seqlen", str(SEQLEN), "--out", str(out), "-q", *extra]
    for s in sets:
        args += ["--set", s]
    return main(args)


def _stored_bytes(path) -> dict[str, int]:
    """Bytes per key of the tensors in a safetensors file, read from its header (independent of torch)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    assert sum(out.values()) == len(raw) - 8 - n  # the data section is exactly the tensors
    return out


def _bias_key(layer) -> str | None:
    bias = getattr(layer, "bias", None)
    return None if bias is None else next(k for k, t in layer.state_dict(keep_vars=True).items() if t is bias)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("structure,sets", STRUCTURES, ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_cli_compress_save_load_eval_and_low_memory(arch, structure, sets, saved, text_file, tmp_path, capsys, one_thread):
    src = saved[arch]
    out, low = tmp_path / "mem", tmp_path / "low"
    assert _cli(src, out, structure, sets, text_file) == 0
    assert _cli(src, low, structure, sets, text_file, "--low-memory") == 0

    # the same compression in memory through the API
    model, tok, _ = rankwise.load(src)
    calib = rankwise.load_corpus("calib", text_file)
    ref, report = rankwise.compress(model, structure, 0.4, options=_options(sets), calib=calib, tokenizer=tok,
                                    calib_options={"windows": WINDOWS, "seqlen": SEQLEN}, progress=False)
    loaded, _, _ = rankwise.load(out)
    assert len(structured_layers(loaded)) == len(report.layers) and all(lr.kind for lr in report.layers)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)

    # rankwise eval OUT: exactly the in-memory model's perplexity on the same windows
    capsys.readouterr()
    assert main(["eval", str(out), "--text-file", str(text_file), "--windows", "2", "--seqlen", str(SEQLEN),
                 "--json", str(tmp_path / "ppl.json"), "-q"]) == 0
    want = rankwise.evaluate(ref, tok, text=rankwise.load_corpus("test", text_file), seqlen=SEQLEN, windows=2)
    assert json.loads((tmp_path / "ppl.json").read_text())["ppl"] == want.ppl

    # low memory: the very same tensors, aliases and layer descriptions
    a, b = load_file(str(out / "model.safetensors")), load_file(str(low / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    meta, meta_low = (json.loads((d / "rankwise.json").read_text()) for d in (out, low))
    assert meta["tied"] == meta_low["tied"] and meta["layers"] == meta_low["layers"]
    assert [lr["bytes_after"] for lr in meta["report"]["layers"]] == [lr["bytes_after"] for lr in meta_low["report"]["layers"]]

    # the manifest lists kind / spec / bytes per layer; bytes_after = what the file stores for the layer
    stored = _stored_bytes(out / "model.safetensors")
    layers = structured_layers(loaded)
    rows = {lr["name"]: lr for lr in meta["report"]["layers"]}
    assert set(rows) == set(meta["layers"]) == set(layers)
    for name, layer in layers.items():
        desc, row = meta["layers"][name], rows[name]
        assert desc["kind"] == row["kind"] == layer.kind and desc["spec"] == row["spec"] == layer.spec()
        bias = _bias_key(layer)
        own = sum(size for key, size in stored.items()
                  if key.startswith(name + ".") and key[len(name) + 1:] != bias)
        assert row["bytes_after"] == own, name
    assert meta["report"]["targeted_bytes_after"] == sum(r["bytes_after"] for r in rows.values())
    assert meta["report"]["targeted_bytes_after"] < meta["report"]["targeted_bytes_before"]
    if structure == "shared-basis":  # one basis per role and pair of blocks, the second block's aliased
        aliased = [k for k in meta["tied"] if k.endswith(".basis")]
        assert aliased and all(k not in stored for k in aliased)
        assert all(k.replace(".1.", ".0.", 1) == meta["tied"][k] for k in aliased)  # same role, block 1 -> 0


def test_shared_basis_groups_by_role_inside_the_block(saved, text_file, tmp_path):
    """GPT-2's attn.c_proj (64x64) and mlp.c_proj (64x256) have the same output size and the same last name
    component, but different roles: each shares a basis only with its counterpart in the other block."""
    out = tmp_path / "o"
    assert _cli(saved["gpt2"], out, "shared-basis", [], text_file) == 0
    tied = {k: v for k, v in json.loads((out / "rankwise.json").read_text())["tied"].items() if k.endswith(".basis")}
    assert tied == {f"transformer.h.1.{r}.basis": f"transformer.h.0.{r}.basis"
                    for r in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


# -- bad input ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def odd_dirs(tmp_path_factory):
    """Tiny Llamas with awkward sizes: intermediate 67 (prime MLP side), and hidden 67 with intermediate 71
    (the MLP layers 71x67 and 67x71 have two prime sides)."""
    root = tmp_path_factory.mktemp("odd")
    out = {}
    for name, kw in {"prime-mlp": dict(intermediate_size=67),
                     "prime-both": dict(hidden_size=67, intermediate_size=71, num_attention_heads=1,
                                       num_key_value_heads=1, head_dim=16)}.items():
        model = tiny_model("llama", **kw)
        model.save_pretrained(root / name, safe_serialization=True)
        tiny_tokenizer(model.config.vocab_size).save_pretrained(root / name)
        out[name] = root / name
    return out


def _bad(src, structure, sets, text_file, tmp_path, capsys, *extra):
    out = tmp_path / "o"
    before = set(tmp_path.iterdir())
    capsys.readouterr()
    rc = _cli(src, out, structure, sets, text_file, *extra)
    err = capsys.readouterr().err
    assert rc == 2
    assert set(tmp_path.iterdir()) == before  # no output directory, no temporary left behind
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err  # one line
    return err


@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("structure,sets,ratio,needles", [
    ("monarch", ["nblocks=3"], "0.4",
     ["model.layers.0.self_attn.q_proj (64 x 64)", "block count 3 does not divide", "use one of [1, 2, 4, 8, 16, 32, 64]"]),
    ("kronecker", ["factor=[5, 8]"], "0.4",
     ["model.layers.0.self_attn.q_proj (64 x 64)", "factor size 5 does not divide the output size 64", "use one of"]),
    ("blockdiag-lowrank", ["nblocks=3"], "0.4",
     ["model.layers.0.self_attn.q_proj (64 x 64)", "3 diagonal blocks do not divide", "use one of [1, 2, 4"]),
    ("prune", ["pattern=2:4"], "0.6",
     ["model.layers.0.self_attn.q_proj (64 x 64)", "2:4 sparsity alone keeps 50%", "keeps 40.0%", "lower ratio"]),
    ("lowrank-sparse", ["pattern=2:4"], "0.5",
     ["model.layers.0.self_attn.q_proj (64 x 64)", "rank-1 part 128 more values", "keeps 50.0%", "lower ratio"]),
    ("monarch", ["nblocks=8"], "0.9",
     ["model.layers.0.self_attn.q_proj (64 x 64)", "rank-1 blocks already store 1024 values", "keeps 10.0%",
      "fewer blocks"]),
    ("kronecker", ["terms=100"], "0.4", ["(64 x 64)", "100 terms exceed the 64", "terms <= 64"]),
    ("shared-basis", [], "0.98", ["(64 x 64)", "rank-1 basis shared by 2 layers costs 192 values", "lower ratio"]),
])
def test_bad_options_and_budgets_exit_2_naming_layer_and_fix(structure, sets, ratio, needles, low_memory, saved,
                                                             text_file, tmp_path, capsys):
    extra = ["--ratio", ratio] + (["--low-memory"] if low_memory else [])
    err = _bad(saved["llama"], structure, sets, text_file, tmp_path, capsys, *extra)
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("model,structure,sets,needles", [
    ("prime-mlp", "blockdiag-lowrank", [],
     ["model.layers.0.mlp.gate_proj (67 x 64)", "no common divisor > 1", "--targets", "--structure lowrank"]),
    ("prime-mlp", "prune", ["pattern=2:4"],
     ["model.layers.0.mlp.down_proj (64 x 67)", "multiple of 4, got 67", "pattern 'unstructured'"]),
    ("prime-both", "kronecker", [],
     ["model.layers.0.mlp.gate_proj (71 x 67)", "no divisors that give a non-trivial Kronecker", "lowrank"]),
])
def test_shapes_a_structure_cannot_take(model, structure, sets, needles, odd_dirs, text_file, tmp_path, capsys):
    err = _bad(odd_dirs[model], structure, sets, text_file, tmp_path, capsys)
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("structure,sets,where", [
    ("monarch", ["iters=1"], {"mlp.gate_proj": "output size 67 has no divisor near 4: 1 output block (not split)",
                              "mlp.up_proj": "output size 67 has no divisor near 4: 1 output block (not split)",
                              "mlp.down_proj": "input size 67 has no divisor near 4: 1 input block (not split)"}),
    ("kronecker", [], {"mlp.gate_proj": "no split of both sides: A is 1x32, B is 67x2 (one factor is a vector)",
                       "mlp.up_proj": "no split of both sides: A is 1x32, B is 67x2 (one factor is a vector)",
                       "mlp.down_proj": "no split of both sides: A is 2x67, B is 32x1 (one factor is a vector)"}),
])
def test_fallbacks_are_listed_per_layer(structure, sets, where, odd_dirs, text_file, tmp_path):
    """A prime side is not an error for Monarch (1 block on that side) or Kronecker (a vector factor): the
    model compresses, saves and loads, and the report says which layers took the fallback and how."""
    out = tmp_path / "o"
    assert _cli(odd_dirs["prime-mlp"], out, structure, sets, text_file) == 0
    meta = json.loads((out / "rankwise.json").read_text())
    notes = {lr["name"]: lr["note"] for lr in meta["report"]["layers"]}
    for name, text in notes.items():
        role = name.split(".", 3)[-1]
        if role in where:
            assert text == where[role], name
        else:
            assert text is None, name  # square 64x64 / 32x64 attention layers: no fallback
    md = (out / "ranks.md").read_text()
    assert all(text in md for text in where.values())
    loaded, _, _ = rankwise.load(out)
    spec = meta["layers"]["model.layers.0.mlp.gate_proj"]["spec"]
    assert spec == structured_layers(loaded)["model.layers.0.mlp.gate_proj"].spec()
    if structure == "monarch":
        assert spec["out_blocks"] == 1 and spec["in_blocks"] == 4


def test_plan_fallback_notes_name_the_deviation():
    """Fallbacks decided at planning time travel in the spec's ``note`` (the engine copies it to the report)."""
    from rankwise.compression.methods.base import get_method

    spec = get_method("blockdiag-lowrank").plan_layer((12, 18), 0.6 * 216)
    assert spec["nblocks"] == 6 and spec["rank"] == 3  # no common divisor of 12, 18 gives blocks <= 25% of budget
    assert spec["note"] == "blocks take 28% of the budget (wanted <= 25%): 6 = the largest common divisor of 12 and 18"
    assert "note" not in get_method("blockdiag-lowrank").plan_layer((576, 576), 0.6 * 576 * 576)
    spec = get_method("lowrank-sparse", sparse_fraction=0.95).plan_layer((64, 64), 0.5 * 64 * 64)
    assert spec["rank"] == 1 and "rank raised to 1" in spec["note"]  # 5% of 2048 = 102 < one rank (128)
    assert "note" not in get_method("lowrank-sparse").plan_layer((64, 64), 0.5 * 64 * 64)
    assert get_method("kronecker").plan_layer((64, 64), 0.6 * 64 * 64) == {"m1": 8, "n1": 8, "terms": 19}


def test_short_shared_basis_group_is_listed(saved, text_file):
    """Two blocks in groups of 3: each role's basis is shared by 2 layers, and the report says so."""
    model, tok, _ = rankwise.load(saved["llama"])
    _, report = rankwise.compress(model, "shared-basis", 0.4, options={"group_size": 3},
                                  calib=rankwise.load_corpus("calib", text_file), tokenizer=tok,
                                  calib_options={"windows": WINDOWS, "seqlen": SEQLEN}, progress=False)
    assert {lr.note for lr in report.layers} == {
        "basis shared by 2 layer(s), not group_size=3: fewer blocks were left for this unit"}
