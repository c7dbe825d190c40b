"""PEFT LoRA adapter directories: the one writer of ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT computes, for each target module with ``lora_A.weight = A (r, in)`` and ``lora_B.weight = B (out, r)``::

    y = base(x) + s B A x,   s = alpha / r   (rslora: alpha / sqrt(r))

with ``r`` and ``alpha`` from ``rank_pattern`` / ``alpha_pattern`` (module name -> value) or, for modules
they do not list, from ``r`` / ``lora_alpha``. Used by the adapter exports of :mod:`rankwise.adaptation`
and by the low-rank + quantized export (``s = 1``: ``alpha = r``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def unit_alpha(rank: int, rslora: bool = False) -> float:
    """The ``alpha`` that makes PEFT's scale ``s`` exactly 1 at rank ``rank``."""
    return math.sqrt(rank) if rslora else float(rank)


def lora_state(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], alphas: Mapping[str, float], *,
               rslora: bool = False, fan_in_fan_out: bool = False, base_model: str | None = None,
               task_type: str = "CAUSAL_LM", dtype: torch.dtype = torch.float32
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, adapter_config)`` of a LoRA adapter: ``factors = {module name: (A (r, in), B (out, r))}``,
    ``alphas = {module name: alpha}``. ``rank_pattern`` / ``alpha_pattern`` list every module when the
    ranks or alphas differ between modules (else ``r`` / ``lora_alpha`` hold for all)."""
    tensors, ranks = {}, {}
    for name, (A, B) in factors.items():
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"{name}: LoRA factors must be A (r, in) and B (out, r), got {tuple(A.shape)}, "
                             f"{tuple(B.shape)}")
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = A.detach().to(dtype).contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = B.detach().to(dtype).contiguous().cpu()
        ranks[name] = int(A.shape[0])
    r0, a0 = next(iter(ranks.values())), next(iter(alphas.values()))
    uniform = all(v == r0 for v in ranks.values()) and all(abs(alphas[n] - a0) < 1e-9 for n in ranks)
    config = {
        "peft_type": "LORA", "task_type": task_type, "r": r0, "lora_alpha": a0,
        "target_modules": sorted(factors), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": bool(fan_in_fan_out), "use_rslora": bool(rslora), "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {} if uniform else ranks, "alpha_pattern": {} if uniform else {n: alphas[n] for n in ranks},
        "base_model_name_or_path": base_model,
    }
    return tensors, config


def write_lora(out: str | Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """Write the adapter files into the (existing, temporary) directory ``out``."""
    from safetensors.torch import save_file

    from ..files import write_json

    save_file(dict(tensors), str(Path(out) / WEIGHTS_FILE), metadata={"format": "pt"})
    write_json(Path(out) / CONFIG_FILE, dict(config))


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "lora_state", "unit_alpha", "write_lora"]
