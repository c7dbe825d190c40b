"""Export to PEFT's format and load with the real peft package; rankwise format; merged checkpoints."""
import json

import pytest
import torch

from rankwise.adaptation import (
    adapt, adapter_layers, load_rankwise, merge, merge_and_unload, save_merged, save_peft, save_rankwise, unmerge,
)
from rankwise.errors import ConfigError
from rankwise.models.tiny import tiny_model

peft = pytest.importorskip("peft")


def _ids(n=2, L=24, seed=0):
    return torch.randint(0, 320, (n, L), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _perturb(model, seed=1):
    """Pretend training happened: move every trainable adapter tensor."""
    g = torch.Generator().manual_seed(seed)
    for a in adapter_layers(model).values():
        for p in a.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch,init", [("llama", "pissa"), ("gpt2", "pissa"), ("llama", "lora"),
                                       ("llama", "eva"), ("gpt2", "olora"), ("llama", "milora"),
                                       ("llama", "lora-ga")])
def test_peft_loads_original_base_same_logits(tmp_path, arch, init):
    from peft import PeftModel

    ids = _ids()
    model = tiny_model(arch)
    adapt(model, init, rank=4, alpha=8, calib=_ids(2, 32, 2))
    _perturb(model)
    ref = _logits(model, ids)
    save_peft(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    residual = init in ("pissa", "olora", "milora", "lora-ga")
    if init != "eva":
        assert cfg["r"] == (8 if residual else 4)        # converted: rank doubles
        assert cfg["lora_alpha"] == (16 if residual else 8)
    assert cfg["fan_in_fan_out"] == (arch == "gpt2")
    pm = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "a")  # the ORIGINAL, unmodified base
    torch.testing.assert_close(_logits(pm, ids), ref, atol=1e-5, rtol=1e-4)


def test_peft_residual_form(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = _ids()
    model = tiny_model("llama")
    adapt(model, "pissa", rank=4)
    _perturb(model)
    save_peft(model, tmp_path / "r", form="residual")
    cfg = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["init_lora_weights"] is True
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "residual_base")
    pm = PeftModel.from_pretrained(base, tmp_path / "r")
    torch.testing.assert_close(_logits(pm, ids), _logits(model, ids), atol=1e-5, rtol=1e-4)


def test_peft_refuses_non_lora_inits(tmp_path):
    model = tiny_model("llama")
    adapt(model, "loldu", rank=2)
    with pytest.raises(ConfigError, match="rankwise's format"):
        save_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("init", ["pissa", "nlora", "loldu", "salt", "singlora", "lora-sb", "nlora-inttune"])
def test_rankwise_format_round_trip_onto_original_base(tmp_path, init):
    ids = _ids()
    model = tiny_model("llama")
    adapt(model, init, rank=3, calib=_ids(2, 32, 3), **({"ramp_steps": 4} if init == "singlora" else {}))
    for a in adapter_layers(model).values():
        if hasattr(a, "set_step"):
            a.set_step(2)
    _perturb(model)
    ref = _logits(model, ids)
    save_rankwise(model, tmp_path / "rw")
    fresh = load_rankwise(tiny_model("llama"), tmp_path / "rw")
    torch.testing.assert_close(_logits(fresh, ids), ref, atol=1e-5, rtol=1e-4)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_round_trip_and_merged_checkpoint(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    ids = _ids()
    model = tiny_model(arch)
    adapt(model, "salt", rank=3)
    _perturb(model)
    weights = {n: a.base.weight.detach().clone() for n, a in adapter_layers(model).items()}
    ref = _logits(model, ids)
    merge(model)
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(a.base.weight, weights[n]) for n, a in adapter_layers(model).items())
    unmerge(model)
    for n, a in adapter_layers(model).items():
        torch.testing.assert_close(a.base.weight, weights[n], atol=1e-6, rtol=0)
    save_merged(model, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(_logits(plain, ids), ref, atol=1e-5, rtol=1e-4)
    assert not adapter_layers(merge_and_unload(model))
