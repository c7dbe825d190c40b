"""Where the weights being merged come from, one tensor at a time.

* :class:`ModelSource` -- a model in memory (its state dict).
* :class:`DirSource` -- a saved Hugging Face directory (single or sharded safetensors), read tensor by
  tensor with ``safe_open``: merging a directory never holds a whole model.
* :class:`AdapterSource` -- a PEFT LoRA adapter directory on top of the base: the task vector of a
  target layer is ``scaling B A`` (``scaling = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA;
  ``rank_pattern`` / ``alpha_pattern`` per layer; transposed for ``fan_in_fan_out`` layers such as
  GPT-2's ``Conv1D``), and ``modules_to_save`` tensors replace the base's.

Every source answers ``keys()``, ``shape(key)`` and ``delta(key, base)`` (its task vector for one
tensor, or None where it equals the base).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import ArtifactError, ConfigError, ModelNotFoundError
from ..models.streaming import index_shapes, load_tensors, weight_index


class ModelSource:
    """A model in memory."""

    def __init__(self, model: nn.Module, name: str = "model") -> None:
        self.name = name
        self.model = model
        self.state = model.state_dict()
        self.config = getattr(model, "config", None)

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self.state[key]

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor | None:
        t = self.state[key]
        return t.to(torch.float32) - base.to(torch.float32) if t.is_floating_point() else None


class DirSource:
    """A saved Hugging Face directory, read one tensor at a time."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.name = str(path)
        if not (self.path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a model directory (no config.json); pass a directory written "
                                     "by save_pretrained or a PEFT adapter directory")
        self.index = weight_index(self.path)
        self._shapes = index_shapes(self.index)
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(str(self.path), local_files_only=True)

    def keys(self) -> list[str]:
        return list(self.index)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._shapes[key])

    def get(self, key: str) -> torch.Tensor:
        return load_tensors(self.index, [key])[key]

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor | None:
        t = self.get(key)
        return t.to(torch.float32) - base.to(torch.float32) if t.is_floating_point() else None


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


class AdapterSource:
    """A PEFT LoRA adapter on the merge's base (module docstring)."""

    def __init__(self, path: str | os.PathLike, base_keys: list[str]) -> None:
        from safetensors.torch import load_file

        self.path = Path(path)
        self.name = str(path)
        try:
            cfg = json.loads((self.path / "adapter_config.json").read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{self.path}/adapter_config.json is unreadable ({e})") from None
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            raise ConfigError(f"{path}: only LoRA adapters can be merged as task vectors (peft_type "
                              f"{cfg.get('peft_type')!r}); merge it into its base with PEFT's merge_and_unload and "
                              "pass the full model")
        if cfg.get("use_dora"):
            raise ConfigError(f"{path}: a DoRA adapter is not a plain low-rank update; merge it into its base with "
                              "PEFT's merge_and_unload and pass the full model")
        weights = self.path / "adapter_model.safetensors"
        if not weights.is_file():
            raise ArtifactError(f"{path} has no adapter_model.safetensors (rankwise never reads pickled .bin adapters)")
        self.cfg = cfg
        tensors = load_file(str(weights))
        self.lora: dict[str, dict[str, torch.Tensor]] = {}
        self.replace: dict[str, torch.Tensor] = {}
        base = set(base_keys)
        for k, t in tensors.items():
            m = re.match(r"^(?:base_model\.model\.)?(.*)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", k)
            if m:
                self.lora.setdefault(m.group(1), {})[m.group(2)] = t
                continue
            name = re.sub(r"^base_model\.model\.", "", k).replace(".modules_to_save.default", "")
            if name in base:
                self.replace[name] = t
            elif "lora_embedding" in k or "lora_magnitude" in k:
                raise ConfigError(f"{path}: tensor {k} is not a plain LoRA linear update; merge the adapter with "
                                  "PEFT's merge_and_unload and pass the full model")
        for mod, ab in self.lora.items():
            if set(ab) != {"lora_A", "lora_B"} or f"{mod}.weight" not in base:
                raise ConfigError(f"{path}: LoRA layer {mod!r} does not fit the base model (no {mod}.weight there, or "
                                  "a missing A/B factor); was it trained on another base?")
        self.config = None

    def _scaling(self, module: str, r: int) -> float:
        alpha = self.cfg.get("lora_alpha", r)
        for pat, a in (self.cfg.get("alpha_pattern") or {}).items():
            if re.fullmatch(f"(.*\\.)?{pat}", module):
                alpha = a
        return float(alpha) / (r ** 0.5 if self.cfg.get("use_rslora") else r)

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor | None:
        if key in self.replace:
            return self.replace[key].to(torch.float32) - base.to(torch.float32)
        mod = key[: -len(".weight")] if key.endswith(".weight") else None
        if mod is None or mod not in self.lora:
            return None
        A = self.lora[mod]["lora_A"].to(torch.float32)
        B = self.lora[mod]["lora_B"].to(torch.float32)
        d = self._scaling(mod, A.shape[0]) * (B @ A)
        if self.cfg.get("fan_in_fan_out"):
            d = d.T
        if tuple(d.shape) != tuple(base.shape):
            raise ConfigError(f"{self.path}: LoRA update of {mod} has shape {tuple(d.shape)} but the base tensor is "
                              f"{tuple(base.shape)}; was the adapter trained on another base?")
        return d


def open_source(item, base_keys: list[str] | None = None, name: str | None = None):
    """A source for a model in memory, a model directory or (given the base's keys) a PEFT adapter directory."""
    if isinstance(item, nn.Module):
        return ModelSource(item, name or type(item).__name__)
    if isinstance(item, (str, os.PathLike)):
        if is_adapter_dir(item):
            if base_keys is None:
                raise ConfigError(f"{item} is a PEFT adapter; the base of a merge must be a full model")
            return AdapterSource(item, base_keys)
        return DirSource(item)
    if isinstance(item, Mapping):
        raise ConfigError("pass models, model directories or PEFT adapter directories, not state dicts")
    raise ConfigError(f"cannot merge a {type(item).__name__}; pass a model, a model directory or a PEFT adapter")


__all__ = ["AdapterSource", "DirSource", "ModelSource", "is_adapter_dir", "open_source"]
