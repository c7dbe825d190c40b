"""rtn / gptq / lorc / lq end to end: CLI compress -> save -> load -> eval on a saved tiny model, the
reported bytes against the safetensors file, and the low-memory path equal to the in-memory one."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from rankwise.cli import main
from rankwise.compression.compress import compress, compress_low_memory
from rankwise.compression.saving import save_compressed
from rankwise.evaluation.perplexity import perplexity
from rankwise.models.loading import load_model
from rankwise.models.saved import load_structured
from rankwise.models.tiny import TINY_TEXT, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE_BYTES = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "I64": 8}


def safetensors_layout(path) -> tuple[dict, int, int]:
    """``({key: (dtype, shape, nbytes)}, header bytes, file size)`` read from the raw file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for k, v in header.items():
        start, end = v["data_offsets"]
        numel = 1
        for d in v["shape"]:
            numel *= d
        assert end - start == numel * DTYPE_BYTES[v["dtype"]], k
        out[k] = (v["dtype"], v["shape"], end - start)
    return out, 8 + n, len(raw)


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TINY_TEXT * 12)
    return f


@pytest.mark.parametrize("structure,bpw,extra", [
    ("rtn", 3.2, []),
    ("gptq", 3.5, ["--allocate", "bits-greedy"]),
    ("lorc", 4.0, []),
    ("lq", 4.0, ["--set", "iters=2", "--set", "rotate=true"]),
])
def test_cli_compress_save_load_eval(tiny_dir, text_file, tmp_path, capsys, structure, bpw, extra):
    out = tmp_path / "c"
    args = ["compress", str(tiny_dir), "--structure", structure, "--bits-per-weight", str(bpw), "--group-size", "32",
            "--text-file", str(text_file), "--calib-windows", "4", "--calib-seqlen", "64", "--out", str(out),
            "--eval", "--eval-windows", "2", "--eval-seqlen", "64", *extra]
    assert main(args) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "rankwise.json").read_text())
    rep = meta["report"]
    assert meta["structure"] == structure and meta["budget"] == {"bits_per_weight": bpw}
    assert rep["bits_per_weight"] <= bpw and f"{rep['bits_per_weight']:.3f}" in printed  # table shows it
    # bytes per layer in the report == bytes of that layer's tensors in the safetensors file
    layout, header, size = safetensors_layout(out / "model.safetensors")
    assert size == header + sum(v[2] for v in layout.values())
    for lr in rep["layers"]:
        keys = [k for k in layout if k.startswith(lr["name"] + ".")]
        assert lr["bytes_after"] == sum(layout[k][2] for k in keys if not k.endswith(".bias")), lr["name"]
        assert layout[lr["name"] + ".scales"][0] == "F16"
        assert lr["spec"] == meta["layers"][lr["name"]]["spec"]
    assert rep["targeted_bytes_after"] == sum(lr["bytes_after"] for lr in rep["layers"])
    assert rep["bits_per_weight"] == pytest.approx(8 * rep["targeted_bytes_after"] / rep["targeted_params_before"])
    if structure == "lorc":
        assert all(lr["spec"]["rank"] >= 1 for lr in rep["layers"])
    # load the saved model: the same perplexity as the in-memory model had
    model, tok, _ = load_model(out)
    from rankwise.calibration.corpus import load_corpus, split_text

    _, tail = split_text(load_corpus("calib", text_file))
    ppl = perplexity(model, tok, text=tail, windows=2, seqlen=64).ppl
    assert ppl == pytest.approx(meta["perplexity"]["compressed"], rel=1e-6)
    assert main(["eval", str(out), "--text-file", str(text_file), "--windows", "2", "--seqlen", "64", "-q"]) == 0


CAL = dict(calib_options=dict(windows=8, seqlen=48), progress=False)


@pytest.mark.parametrize("arch,structure,kw", [
    ("llama", "rtn", dict(options={"group_size": 32})),
    ("llama", "gptq", dict(options={"group_size": 32}, allocate="bits-greedy")),
    ("gpt2", "gptq", dict(options={"group_size": 32, "rotate": "layer"}, engine=dict(granularity="subgroup"))),
    ("llama", "lorc", dict(options={"group_size": 32}, engine=dict(mode="one-shot"))),
    ("llama", "lq", dict(options={"group_size": 32, "iters": 1}, engine=dict(refit=True, refit_ridge=0.01))),
])
def test_low_memory_equals_in_memory_for_byte_methods(tmp_path, random_ids, arch, structure, kw):
    windows = random_ids[:8 * 48].view(8, 48)
    bpw = 3.6 if structure in ("rtn", "gptq") else 4.2
    src = save_tiny(tmp_path / f"tiny-{arch}", arch)
    model, tok, _ = load_model(src)
    kw = {"allocate_options": {"validate": False}, **kw}  # a validated allocation needs the whole model in memory
    model, rep = compress(model, structure, bits_per_weight=bpw, calib=windows, **kw, **CAL)
    save_compressed(model, tok, tmp_path / "mem", rep)
    rep_low = compress_low_memory(src, tmp_path / "low", structure, bits_per_weight=bpw, calib=windows, **kw, **CAL)
    assert [(lr.name, lr.spec, lr.bytes_after) for lr in rep_low.layers] == \
        [(lr.name, lr.spec, lr.bytes_after) for lr in rep.layers]
    assert rep_low.bits_per_weight == rep.bits_per_weight <= bpw
    a = load_structured(tmp_path / "mem").state_dict()
    b = load_structured(tmp_path / "low").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert any(k.endswith(".codes") for k in a)


def test_dense_export_of_a_quantized_layer_keeps_float32():
    """``to_linear`` (used by --export-dense and PEFT's residual base) must not inherit the float16 storage."""
    from rankwise.linalg.quant import rtn
    from rankwise.structures.quant import QuantLinear

    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    layer = QuantLinear.from_quantized(rtn(W, 3, 16), None, dtype=torch.float32)
    lin = layer.to_linear()
    assert lin.weight.dtype == torch.float32 and torch.equal(lin.weight, layer.dense())
