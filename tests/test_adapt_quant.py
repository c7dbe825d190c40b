"""Adapters on a quantized base (lq-lora, loftq): the fit against numpy references, training touches only
the adapter, PEFT loads what it can (adapter + de-quantized base: same logits), the CLI end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rankwise.adaptation import adapt, adapter_layers, count_trainable, merge_and_unload, save_peft, save_rankwise
from rankwise.calibration.stats import collect_input_stats
from rankwise.errors import ConfigError
from rankwise.linalg.gptq import gptq
from rankwise.linalg.quant import rtn
from rankwise.models.surgery import find_linears
from rankwise.models.tiny import tiny_model
from rankwise.structures.kernels import exact
from rankwise.structures.quant import QuantLinear

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(n=2, L=32, seed=0):
    return torch.randint(0, 320, (n, L), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def np_act_err(W, Wp, C) -> float:
    E = W.detach().double().numpy() - Wp.detach().double().numpy()
    return float(np.trace(E @ C.double().numpy() @ E.T))


def test_lq_lora_base_is_quantized_and_the_fit_beats_gptq_alone():
    model = tiny_model("llama")
    dense = {n: m.weight.detach().clone() for n, m in find_linears(model).items()}
    calib = _ids(4, 48, 1)
    covs = {n: s.cov for n, s in collect_input_stats(model, calib, list(dense)).items()}
    adapt(model, "lq-lora", rank=4, alpha=8, calib=calib, bits=3, group_size=32, iters=2)
    layers = adapter_layers(model)
    assert set(layers) == set(dense)
    for name, a in layers.items():
        assert isinstance(a.base, QuantLinear) and a.base.bits == 3 and a.base.group_size == 32
        assert a.rank == 4 and a.scaling == 2.0
        assert not any(p.requires_grad for p in a.base.parameters())
        W, C = dense[name], covs[name]
        fit = a.base.dense() + a.delta()
        hist = a.base.fit_info["history"]
        assert all(b <= x for x, b in zip(hist, hist[1:]))  # monotone alternation
        assert np_act_err(W, fit, C) == pytest.approx(hist[-1], rel=1e-3)  # what is stored is what was fitted
        alone = gptq(W, C, 3, 32).dense()
        assert np_act_err(W, fit, C) < np_act_err(W, alone, C)  # the low-rank part helps
    assert count_trainable(model) == sum(4 * (m + n) for m, n in (w.shape for w in dense.values()))


def test_loftq_is_rtn_plus_the_best_rank_r_frobenius_correction():
    model = tiny_model("llama")
    name = "model.layers.0.mlp.down_proj"
    W = model.get_submodule(name).weight.detach().clone()
    adapt(model, "loftq", rank=3, targets=[name], bits=2, group_size=32, iters=1)
    a = adapter_layers(model)[name]
    Q = rtn(W, 2, 32).dense()
    torch.testing.assert_close(a.base.dense(), Q)  # one alternation: Q = RTN(W)
    s = np.linalg.svd((W.double() - Q.double()).numpy(), compute_uv=False)
    best = float(np.sqrt((s[3:] ** 2).sum()))  # Eckart-Young: the best rank-3 correction
    got = float(torch.linalg.norm(W - a.base.dense() - a.delta().detach()))
    assert got == pytest.approx(best, rel=1e-3)  # float16 factors
    model2 = tiny_model("llama")
    adapt(model2, "loftq", rank=3, targets=[name], bits=2, group_size=32, iters=4)
    a2 = adapter_layers(model2)[name]
    assert float(torch.linalg.norm(W - a2.base.dense() - a2.delta().detach())) <= got + 1e-6


def test_training_moves_only_the_adapter():
    model = tiny_model("llama")
    adapt(model, "loftq", rank=2, bits=4, group_size=32, iters=2)
    a = next(iter(adapter_layers(model).values()))
    codes = a.base.codes.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = _ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert a.lora_B.grad is not None and float(a.lora_B.grad.abs().sum()) > 0
    assert torch.equal(a.base.codes, codes)


@pytest.mark.parametrize("init", ["lq-lora", "loftq"])
def test_peft_loads_the_adapter_on_the_dequantized_base(tmp_path, init):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    adapt(model, init, rank=4, calib=_ids(2, 48, 3), bits=4, group_size=32, iters=1)
    with torch.no_grad():  # pretend training happened
        for a in adapter_layers(model).values():
            a.lora_A.add_(0.05 * torch.randn(a.lora_A.shape, generator=torch.Generator().manual_seed(1)))
    ids = _ids()
    with exact():  # the stored weights' float32 reference (the CPU int4 kernel computes in bfloat16)
        ref = _logits(model, ids)
    with pytest.raises(ConfigError, match="form='residual'"):
        save_peft(model, tmp_path / "o")
    with pytest.raises(ConfigError, match="PEFT's format"):
        save_rankwise(model, tmp_path / "rw")
    save_peft(model, tmp_path / "a", form="residual")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "residual_base")
    assert all(type(m).__name__ == "Linear" for m in find_linears(base).values())  # plain transformers weights
    pm = PeftModel.from_pretrained(base, tmp_path / "a")
    torch.testing.assert_close(_logits(pm, ids), ref, atol=1e-4, rtol=1e-4)
    merged = merge_and_unload(model)  # dense layers holding dequant(Q) + Delta W
    torch.testing.assert_close(_logits(merged, ids), ref, atol=1e-4, rtol=1e-4)


def test_cli_adapt_lq_lora(tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rankwise.cli import main

    text = tmp_path / "t.txt"
    text.write_text("Low rank adapters learn small updates to large matrices. " * 200)
    out = tmp_path / "out"
    rc = main(["adapt", str(tiny_dir), "--init", "lq-lora", "--rank", "4", "--steps", "2", "--seqlen", "32",
               "--calib-windows", "4", "--quant-bits", "3", "--quant-group-size", "32", "--quant-iters", "1",
               "--text-file", str(text), "--out", str(out), "--quiet", "--eval-windows", "1"])
    assert rc == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["init"] == "lq-lora" and len(log["losses"]) == 2
    assert json.loads((out / "rankwise_adapter.json").read_text())["form"] == "residual"
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "residual_base"), out)
    with torch.no_grad():
        assert torch.isfinite(pm(_ids(1, 16)).logits).all()
