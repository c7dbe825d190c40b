"""Adapter inits come from one registry, each with its own typed options: an option an init does not take,
or a value out of range, is a ConfigError naming it (in Python and as a one-line CLI exit 2)."""
from __future__ import annotations

import dataclasses
import inspect
import math

import pytest

from rankwise.adaptation import INITS, adapt, adapter_layers
from rankwise.adaptation.inits import InitSpec
from rankwise.adaptation.saving import peft_inits
from rankwise.errors import ConfigError, UnknownMethodError
from rankwise.models.tiny import tiny_model

#: Every init's options and their defaults (the values the catch-all context had before the split).
DEFAULTS = {
    "lora": {}, "milora": {}, "olora": {}, "eva": {}, "nlora": {}, "nlora-inttune": {}, "loldu": {},
    "pissa": {"svd": "exact", "svd_niter": 4}, "salt": {"svd": "exact", "svd_niter": 4},
    "lora-ga": {"gamma": 16.0}, "lora-sb": {"sb_step": 1e-3}, "singlora": {"ramp_steps": 10},
    "lq-lora": {"bits": 4, "group_size": 64, "iters": 5}, "loftq": {"bits": 4, "group_size": 64, "iters": 5},
}


def test_every_init_is_registered_with_typed_options_and_a_formula():
    assert set(INITS) == set(DEFAULTS)
    for name, spec in INITS.items():
        assert isinstance(spec, InitSpec) and spec.name == name
        assert dataclasses.is_dataclass(spec.Options), name
        assert dataclasses.asdict(spec.build_options()) == DEFAULTS[name], name
        assert spec.fn.__module__.startswith("rankwise.adaptation.inits."), name
        assert list(inspect.signature(spec.fn).parameters) == ["base", "W", "r", "opts", "ctx", "name"], name
        doc = inspect.getdoc(spec.fn) or ""
        assert "``" in doc and "=" in doc, f"{name}: the docstring must carry the init's formula"
        assert spec.summary and spec.summary == doc.splitlines()[0]


def test_peft_exportable_inits_come_from_the_registry():
    # the hand-kept list that saving.py had before the registry said it
    assert set(peft_inits()) == {"lora", "eva", "pissa", "milora", "olora", "lora-ga", "lq-lora", "loftq"}
    assert all(INITS[n].peft for n in peft_inits())


@pytest.mark.parametrize("init, option, valid", [
    ("pissa", {"gamma": 4.0}, r"\['svd', 'svd_niter'\]"),
    ("lora", {"bits": 3}, "none"),
    ("milora", {"svd": "randomized"}, "none"),          # milora takes the full SVD: no svd choice
    ("lq-lora", {"ramp_steps": 2}, r"\['bits', 'group_size', 'iters'\]"),
])
def test_an_option_the_init_does_not_take_is_a_config_error_listing_the_valid_ones(init, option, valid):
    model = tiny_model("llama")
    key = next(iter(option))
    with pytest.raises(ConfigError, match=rf"unknown option.*{key}.*init '{init}'; valid: {valid}"):
        if key == "svd":
            adapt(model, init, rank=2, svd=option[key])
        else:
            adapt(model, init, rank=2, **option)
    assert not adapter_layers(model)   # rejected before any layer was touched


@pytest.mark.parametrize("init, options, needle", [
    ("lq-lora", {"bits": 9}, "bits must be an integer from 2 to 8"),
    ("loftq", {"bits": 1}, "bits must be an integer from 2 to 8"),
    ("lq-lora", {"bits": 3.5}, "bits must be an integer"),
    ("lq-lora", {"group_size": 0}, "group_size must be an integer >= 1"),
    ("lq-lora", {"iters": -1}, "iters must be an integer >= 0"),
    ("loftq", {"iters": 0}, "iters must be an integer >= 1"),
    ("pissa", {"svd": "qr"}, "unknown svd method 'qr'"),
    ("salt", {"svd_niter": -1}, "svd_niter must be an integer >= 0"),
    ("lora-ga", {"gamma": 0.0}, "gamma must be a finite number > 0"),
    ("lora-sb", {"sb_step": math.nan}, "sb_step must be a finite number > 0"),
    ("singlora", {"ramp_steps": 0}, "ramp_steps must be an integer >= 1"),
    ("singlora", {"ramp_steps": True}, "ramp_steps must be an integer"),
])
def test_a_bad_value_is_a_config_error_naming_the_option(init, options, needle):
    with pytest.raises(ConfigError, match=needle):
        INITS[init].build_options(options)
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=needle):
        adapt(model, init, rank=2, **options)
    assert not adapter_layers(model)


def test_good_values_are_kept_and_recorded():
    assert INITS["lq-lora"].build_options(bits=2.0).bits == 2          # an integral float is an int
    assert INITS["loftq"].build_options({"bits": 8, "iters": 1}).iters == 1
    model = tiny_model("llama")
    adapt(model, "singlora", rank=2, targets=["q_proj"], ramp_steps=3)
    assert {a.ramp_steps for a in adapter_layers(model).values()} == {3}
    assert model._rankwise_adapt["options"] == {"ramp_steps": 3}
    assert model._rankwise_adapt["svd"] is None
    model = tiny_model("llama")
    adapt(model, "pissa", rank=2, targets=["q_proj"], svd="randomized")
    assert model._rankwise_adapt["options"] == {"svd": "randomized", "svd_niter": 4}
    assert model._rankwise_adapt["svd"] == "randomized"


def test_unknown_init_lists_the_registered_ones():
    with pytest.raises(UnknownMethodError, match="unknown init 'bogus'; valid: .*lq-lora"):
        INITS.get("bogus")


@pytest.mark.parametrize("args, needle", [
    (["--init", "pissa", "--quant-bits", "3"], "--quant-bits does not apply to --init pissa (its flags: --svd)"),
    (["--init", "lora", "--svd", "randomized"], "--svd does not apply to --init lora (it takes none of"),
    (["--init", "loftq", "--svd", "exact", "--quant-iters", "2"], "--svd does not apply to --init loftq (its flags: "
                                                                  "--quant-bits, --quant-group-size, --quant-iters)"),
    (["--init", "lq-lora", "--quant-bits", "9"], "option bits must be an integer from 2 to 8"),
])
def test_cli_init_flag_the_init_does_not_take_is_one_line_exit_2(args, needle, tmp_path, capsys):
    from rankwise.cli import main

    # checked before the model is loaded: the model path need not exist
    rc = main(["adapt", str(tmp_path / "no-model"), *args, "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "out").exists()
