"""Healing quantized models: scales and minimums (and lorc's factors) trained with the codes frozen, the
saved tensors unchanged in shape, dtype and bytes, the loss on the training windows lowered, and the
CLI reporting the perplexity before and after."""
from __future__ import annotations

import json

import pytest
import torch

from rankwise.cli import main
from rankwise.compression.compress import compress
from rankwise.errors import ConfigError
from rankwise.evaluation.perplexity import window_nll
from rankwise.healing import HealOptions, QuantTrainer, heal, quant_layers
from rankwise.linalg.quant import rtn
from rankwise.models.surgery import set_module
from rankwise.models.tiny import TINY_TEXT, tiny_model
from rankwise.structures.base import LAYERS
from rankwise.structures.quant import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")
WINDOWS = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(1))


def quantized(structure: str, **options):
    model, _ = compress(tiny_model("llama"), structure, bits_per_weight=3.5, calib=WINDOWS, options=options,
                        allocate="uniform", calib_options=dict(windows=4, seqlen=32), progress=False)
    return model


def test_trainer_starts_at_the_stored_layer_and_its_gradient_reaches_the_scales():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 40, generator=g)
    layer = QuantLinear.from_quantized(rtn(W, 3, 16), None, dtype=torch.float32)
    x = torch.randn(5, 40, generator=g)
    y0 = layer(x)
    t = QuantTrainer(layer)
    y = layer(x)
    assert torch.equal(y, y0)  # a = b = 0: exactly the stored grid
    y.square().sum().backward()
    assert t.a.grad is not None and t.b.grad is not None and t.a.grad.abs().sum() > 0
    # d/da of s0 (1 + a) c x: the analytic gradient of one entry against a finite difference
    with torch.no_grad():
        t.a[2, 1] += 1e-3
        up = layer(x).square().sum()
        t.a[2, 1] -= 2e-3
        down = layer(x).square().sum()
    assert float(t.a.grad[2, 1]) == pytest.approx(float(up - down) / 2e-3, rel=1e-2)


@pytest.mark.parametrize("structure,options,trained", [
    ("gptq", {}, {"scales", "mins"}),
    ("gptq", {"symmetric": True}, {"scales"}),
    ("lorc", {}, {"scales", "mins", "left", "right"}),
])
def test_healing_trains_scales_minimums_and_factors_with_the_codes_frozen(structure, options, trained):
    model = quantized(structure, **options)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nbytes = {n: m.nbytes() for n, m in quant_layers(model).items()}
    nll0 = window_nll(model, WINDOWS)[0]
    info = heal(model, WINDOWS, HealOptions(steps=12, lr=0.05, batch_size=4))
    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = set()
    for k in before:
        assert before[k].dtype == after[k].dtype and before[k].shape == after[k].shape, k
        if not torch.equal(before[k], after[k]):
            changed.add(k.rsplit(".", 1)[1])
    assert changed == trained  # codes, rotation signs, biases, norms, embeddings untouched
    assert {n: m.nbytes() for n, m in quant_layers(model).items()} == nbytes
    assert window_nll(model, WINDOWS)[0] < nll0  # the loss it trained on went down
    assert info["trained"] == ["quantization scales and minimums (codes frozen)"]
    assert not any(p.requires_grad for p in model.parameters() if p.grad is not None)
    assert all(not h for m in quant_layers(model).values() for h in (m._forward_pre_hooks,))


def test_healing_a_model_with_only_untrainable_structure_is_an_error():
    model = tiny_model("llama")
    set_module(model, "model.layers.0.mlp.up_proj",
               LAYERS.get("monarch").from_spec(96, 64, False, {"in_blocks": 4, "out_blocks": 4}, device="cpu"))
    with pytest.raises(ConfigError, match="other structured layers.*--structure"):
        heal(model, WINDOWS, HealOptions(steps=2))


def test_cli_heal_reports_the_perplexity_before_and_after(tiny_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TINY_TEXT * 12)
    out = tmp_path / "o"
    assert main(["compress", str(tiny_dir), "--structure", "gptq", "--bits", "3", "--text-file", str(text),
                 "--calib-windows", "4", "--calib-seqlen", "64", "--eval", "--eval-windows", "2", "--eval-seqlen", "64",
                 "--heal-steps", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "rankwise.json").read_text())
    p = meta["perplexity"]
    from rankwise.commands._common import fmt

    assert "healed" in printed and fmt(p["before_healing"]) in printed and fmt(p["compressed"]) in printed
    assert meta["healing"]["options"]["steps"] == 3 and meta["healing"]["options"]["lr"] == 1e-3
    assert all(lr["kind"] == "quant" for lr in meta["report"]["layers"])
