"""Training loop, compressed-model healing, CLI, and one integration run on the real model."""
import json
import math

import pytest
import torch

from rankwise.adaptation import TrainConfig, adapt, adapter_layers, count_trainable, train
from rankwise.adaptation.train import lr_factor
from rankwise.errors import ConfigError
from rankwise.models.tiny import tiny_model
from rankwise.structures.lowrank import LowRankLinear


def _windows(n=16, L=32, seed=0, vocab=40):
    # a small vocabulary makes the text learnable in a few steps
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 10, 2) == pytest.approx(0.5)
    assert lr_factor(1, 10, 2) == pytest.approx(1.0)
    assert lr_factor(2, 10, 2) == pytest.approx(1.0)
    assert lr_factor(6, 10, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_factor(10, 10, 2) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("init", ["pissa", "loldu", "singlora"])
def test_training_lowers_loss_and_only_adapters_change(init):
    model = tiny_model("llama")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapt(model, init, rank=4, **({"ramp_steps": 2} if init == "singlora" else {}))
    base_after_init = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n or "embed" in n}
    w = _windows()
    res = train(model, w, TrainConfig(steps=8, lr=1e-2, batch_size=4, warmup=1, grad_accum=2, seed=0),
                eval_ids=w.flatten(), progress=False)
    assert len(res.losses) == 8 and all(math.isfinite(x) for x in res.losses)
    assert sum(res.losses[-3:]) < sum(res.losses[:3])
    assert res.trainable_params == count_trainable(model)
    for n, p in model.named_parameters():
        if n in base_after_init:
            assert torch.equal(p, base_after_init[n]), n
    assert torch.equal(model.model.embed_tokens.weight, frozen["model.embed_tokens.weight"])
    assert res.evals and res.evals[-1]["step"] == 8


def test_training_is_seeded():
    runs = []
    for _ in range(2):
        model = tiny_model("llama")
        adapt(model, "lora", rank=2, seed=5)
        runs.append(train(model, _windows(), TrainConfig(steps=3, lr=1e-3, seed=7), progress=False).losses)
    assert runs[0] == runs[1]


def test_nan_loss_stops_and_restores_last_good_state():
    model = tiny_model("llama")
    adapt(model, "lora", rank=2)
    a = next(iter(adapter_layers(model).values()))
    seen = []

    def poison(mod, args):
        seen.append({k: v.clone() for k, v in a.adapter_state().items()})
        if len(seen) == 3:   # third forward pass = step 2: the update of step 1 "diverged"
            with torch.no_grad():
                a.lora_A.fill_(float("nan"))
    h = a.register_forward_pre_hook(poison)
    res = train(model, _windows(), TrainConfig(steps=6, lr=1e-3, warmup=0), progress=False)
    h.remove()
    assert res.stopped_on_nan and res.nan_step == 2 and len(res.losses) == 2
    # restored to the parameters that produced the last finite loss (those of step 1)
    assert torch.equal(a.lora_A, seen[1]["lora_A"]) and torch.equal(a.lora_B, seen[1]["lora_B"])
    assert not torch.equal(seen[1]["lora_B"], seen[0]["lora_B"])   # step 0 did update B (A has no grad while B = 0)
    with torch.no_grad():
        assert torch.isfinite(model(_windows(1)).logits).all()


def test_train_rejects_bad_config():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="no trainable adapter"):
        train(model, _windows(), TrainConfig(steps=2), progress=False)
    adapt(model, "lora", rank=2)
    with pytest.raises(ConfigError):
        train(model, _windows(), TrainConfig(steps=0), progress=False)


def _compressed_tiny():
    """A tiny Llama whose MLP projections are LowRankLinear (as rankwise compress produces)."""
    from rankwise.models.surgery import find_linears, linear_weight, set_module

    model = tiny_model("llama")
    for name, mod in find_linears(model, ["gate_proj", "up_proj", "down_proj"]).items():
        W = linear_weight(mod).detach()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        k = 12
        set_module(model, name, LowRankLinear.from_factors(U[:, :k] * S[:k], Vh[:k]))
    return model


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_heal_compressed_model(tmp_path, init):
    from rankwise.adaptation import load_rankwise, save_rankwise

    model = _compressed_tiny()
    w = _windows()
    with torch.no_grad():
        ref = model(w[:2]).logits
    adapt(model, init, rank=4, targets=["up_proj", "down_proj", "q_proj"])
    layers = adapter_layers(model)
    assert isinstance(layers["model.layers.0.mlp.up_proj"].base, LowRankLinear)
    assert "model.layers.0.mlp.up_proj.A" not in layers            # the factor linears are not targeted
    with torch.no_grad():
        torch.testing.assert_close(model(w[:2]).logits, ref, atol=2e-5, rtol=1e-4)
    res = train(model, w, TrainConfig(steps=8, lr=1e-2, batch_size=4, warmup=1), progress=False)
    assert sum(res.losses[-2:]) < sum(res.losses[:2])
    with torch.no_grad():
        healed = model(w[:2]).logits
    save_rankwise(model, tmp_path / "h")
    again = load_rankwise(_compressed_tiny(), tmp_path / "h")
    with torch.no_grad():
        torch.testing.assert_close(again(w[:2]).logits, healed, atol=1e-5, rtol=1e-4)
    from rankwise.adaptation import merge_and_unload

    merged = merge_and_unload(model)
    up = merged.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(up, LowRankLinear) and up.rank == 12 + 4
    with torch.no_grad():
        torch.testing.assert_close(merged(w[:2]).logits, healed, atol=1e-5, rtol=1e-4)


def test_cli_adapt_end_to_end(tmp_path, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rankwise.cli import main

    text = tmp_path / "t.txt"
    text.write_text("Low rank adapters learn small updates to large matrices. " * 200)
    out = tmp_path / "out"
    rc = main(["adapt", str(tiny_dir), "--init", "pissa", "--rank", "4", "--steps", "3", "--seqlen", "32",
               "--text-file", str(text), "--out", str(out), "--quiet", "--eval-windows", "1"])
    assert rc == 0
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["losses"]) == 3 and (out / "loss.png").stat().st_size > 0
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    with torch.no_grad():
        assert torch.isfinite(pm(_windows(1, 16)).logits).all()
    assert main(["adapt", str(tiny_dir), "--init", "nope", "--out", str(tmp_path / "x")]) == 2
    assert main(["adapt", str(tiny_dir), "--init", "loldu", "--format", "peft", "--rank", "2", "--steps", "1",
                 "--seqlen", "32", "--text-file", str(text), "--out", str(tmp_path / "y"), "--quiet"]) == 2
    assert not (tmp_path / "y").exists()
    merged = tmp_path / "merged"
    assert main(["adapt", str(tiny_dir), "--init", "loldu", "--merge", "--rank", "2", "--steps", "2",
                 "--seqlen", "32", "--text-file", str(text), "--out", str(merged), "--quiet",
                 "--eval-windows", "1"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert sum(p.numel() for p in plain.parameters()) == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())


@pytest.mark.integration
def test_real_model_pissa_two_layers(real_model, real_calib_ids):
    import copy

    from rankwise.calibration.sampling import calib_windows

    model = copy.deepcopy(real_model[0])
    # the last block's layers: the backward pass stops there, keeping the test cheap
    adapt(model, "pissa", rank=8, targets=[r"layers\.29\.self_attn\.o_proj", r"layers\.29\.mlp\.down_proj"])
    assert len(adapter_layers(model)) == 2
    w = calib_windows(real_calib_ids, n=2, seqlen=32, seed=0)
    res = train(model, w, TrainConfig(steps=3, lr=2e-3, batch_size=2, warmup=0), progress=False)
    assert all(math.isfinite(x) for x in res.losses)
    # same batches again: the trained adapters fit them better than at step 0
    from rankwise.calibration.gradients import lm_loss

    with torch.no_grad():
        after = float(lm_loss(model.eval(), w))
        before = float(lm_loss(real_model[0], w))
    assert after < before


def test_compress_save_load_then_heal(tmp_path, tiny_tok):
    """compress (rankwise.compress) -> save -> load_model -> adapt -> train -> save/load the adapter."""
    from rankwise.adaptation import load_rankwise, save_rankwise
    from rankwise.api import compress
    from rankwise.compression.saving import save_compressed
    from rankwise.models.loading import load_model

    w = _windows(8, 32)
    small, report = compress(tiny_model("llama"), method="svd", ratio=0.4, calib=w,
                             calib_options=dict(windows=4, seqlen=32), progress=False)
    save_compressed(small, tiny_tok, tmp_path / "c", report)
    model, _, _ = load_model(tmp_path / "c")
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    adapt(model, "pissa", rank=2)
    assert any(isinstance(a.base, LowRankLinear) for a in adapter_layers(model).values())
    res = train(model, w, TrainConfig(steps=6, lr=1e-2, batch_size=4, warmup=1), progress=False)
    assert sum(res.losses[-2:]) < sum(res.losses[:2])
    save_rankwise(model, tmp_path / "heal")
    again = load_rankwise(load_model(tmp_path / "c")[0], tmp_path / "heal")
    with torch.no_grad():
        torch.testing.assert_close(again(w[:2]).logits, model(w[:2]).logits, atol=1e-5, rtol=1e-4)
