"""Empty models: the architecture of a config with every parameter on the ``meta`` device.

Buffers stay real (rotary ``inv_freq``, Gemma's embedding scale, GPT-2's causal mask are computed in
``__init__`` and are not in checkpoints), so a skeleton filled with ``load_state_dict(assign=True)`` is
a complete model. Parameters are moved to ``meta`` as they are registered, one at a time, so building
a skeleton never holds more than one real parameter.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Inside, every ``nn.Parameter`` registered on a module goes to the ``meta`` device."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and not p.is_meta:
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def empty_model(config, model_class: type | None = None) -> nn.Module:
    """``model_class(config)`` with its parameters on ``meta`` (see module doc); without a class, the causal
    LM of the config (``AutoModelForCausalLM.from_config``). The class comes from
    :mod:`rankwise.models.architecture` (a transformers class resolved by name, never an import)."""
    from transformers import AutoModelForCausalLM

    with empty_parameters():
        model = AutoModelForCausalLM.from_config(config) if model_class is None else model_class(config)
    return model.eval()


def meta_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters of ``module`` still on ``meta`` (not loaded)."""
    return [n for n, p in module.named_parameters() if p.is_meta]


def free(module: nn.Module) -> None:
    """Move ``module``'s parameters and buffers to ``meta`` (drops their memory)."""
    module.to("meta")


__all__ = ["empty_model", "empty_parameters", "free", "meta_parameters", "torch"]
