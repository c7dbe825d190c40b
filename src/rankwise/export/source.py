"""Where an export reads the model from: a model in memory, or a saved directory read tensor by tensor.

A :class:`Source` gives a format writer everything it needs without holding the model:

* ``config`` (the transformers config), ``tokenizer`` (or None), ``generation_config`` (or None);
* ``layers`` = ``{name: description}`` of the structured layers (``kind``, ``shape``, ``bias``, ``spec``:
  what ``rankwise.json`` records), so a writer plans every output tensor before computing one;
* ``keys()`` / ``entry(key)`` / ``tensor(key)``: the plain tensors (embeddings, norms, dense linears,
  biases of structured layers), each read alone;
* ``layer(name)``: one structured layer rebuilt from its own tensors (the other layers untouched);
* ``aliases`` = ``{dropped key: kept key}`` (tied embeddings), ``dtype`` (the model's floating dtype),
  ``module_kind(name)`` (``"linear"`` or ``"conv1d"`` for GPT-2's transposed linears).

:class:`DirSource` reads a directory written by ``rankwise compress`` / ``rankwise.save`` or any
Hugging Face safetensors checkpoint (sharded or not) with ``safe_open``, one tensor at a time: a
writer that asks for tensors one by one never holds more than one layer.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ArtifactError, ConfigError
from ..models.saved import dedup_state, is_structured_dir, read_manifest, structured_layers
from ..models.skeleton import empty_model
from ..models.surgery import Conv1D
from ..structures.base import StructuredLinear, build_layer
from .shards import TensorEntry


class Source:
    """The interface; see the module docstring."""

    config: Any
    layers: dict[str, dict[str, Any]]
    aliases: dict[str, str]
    dtype: torch.dtype
    path: Path | None = None

    def keys(self) -> list[str]:
        """Every stored tensor key outside the structured layers (their biases included), aliases excluded."""
        raise NotImplementedError

    def entry(self, key: str) -> TensorEntry:
        raise NotImplementedError

    def tensor(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def layer(self, name: str) -> StructuredLinear:
        raise NotImplementedError

    @property
    def tokenizer(self):
        return None

    @property
    def generation_config(self):
        return None

    # -- shared helpers ----------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return str(getattr(self.config, "model_type", ""))

    def module_kind(self, name: str) -> str:
        """``"conv1d"`` when the original module ``name`` is a GPT-2 ``Conv1D`` (weight stored (in, out)), else ``"linear"``."""
        mod = self._skeleton().get_submodule(name)
        return "conv1d" if (Conv1D is not None and isinstance(mod, Conv1D)) else "linear"

    def _skeleton(self) -> nn.Module:
        if getattr(self, "_skel", None) is None:
            self._skel = empty_model(self.config)
        return self._skel

    def layer_keys(self, name: str) -> list[str]:
        """The state keys that belong to structured layer ``name`` (its own storage, bias excluded)."""
        return [k for k in self._all_keys() if k.startswith(name + ".") and k != f"{name}.bias"]

    def _all_keys(self) -> list[str]:
        raise NotImplementedError

    def in_layer(self, key: str) -> bool:
        """Whether ``key`` is storage of a structured layer (its bias is not: it is written as is)."""
        return any(key.startswith(n + ".") and key != f"{n}.bias" for n in self.layers)


class ModelSource(Source):
    """A model in memory (structured layers or none) and its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer=None) -> None:
        if not hasattr(model, "config"):
            raise ConfigError("export needs a transformers model (with .config); got a plain nn.Module -- wrap it "
                              "or save it with rankwise.save first")
        self.model = model
        self.config = model.config
        self._tok = tokenizer
        mods = structured_layers(model)
        self._mods = mods
        self.layers = {n: m.describe() for n, m in mods.items()}
        state, self.aliases = dedup_state(model.state_dict())
        self._state = state
        floats = [t.dtype for k, t in state.items() if t.is_floating_point() and not self._fixed(k)]
        self.dtype = floats[0] if floats else torch.float32

    def _fixed(self, key: str) -> bool:
        for n, m in self._mods.items():
            if key.startswith(n + ".") and key[len(n) + 1:] in getattr(m, "fixed_dtype_keys", ()):
                return True
        return False

    def _all_keys(self) -> list[str]:
        return list(self._state)

    def keys(self) -> list[str]:
        return [k for k in self._state if not self.in_layer(k)]

    def entry(self, key: str) -> TensorEntry:
        t = self._state[key]
        return TensorEntry(key, t.dtype, tuple(t.shape))

    def tensor(self, key: str) -> torch.Tensor:
        return self._state[key]

    def layer(self, name: str) -> StructuredLinear:
        return self._mods[name]

    def module_kind(self, name: str) -> str:
        mod = self.model.get_submodule(name)
        if isinstance(mod, StructuredLinear):
            return super().module_kind(name)
        return "conv1d" if (Conv1D is not None and isinstance(mod, Conv1D)) else "linear"

    @property
    def tokenizer(self):
        return self._tok

    @property
    def generation_config(self):
        return getattr(self.model, "generation_config", None)


class DirSource(Source):
    """A saved directory: rankwise's format (``rankwise.json``) or a plain Hugging Face safetensors checkpoint."""

    def __init__(self, path: str | os.PathLike) -> None:
        from transformers import AutoConfig

        from ..models.offline import hub_offline
        from ..models.streaming import DTYPES, weight_index

        self.path = Path(path)
        if not self.path.is_dir():
            raise ArtifactError(f"{self.path} is not a directory; pass a directory written by rankwise compress, "
                                "rankwise.save or save_pretrained")
        try:
            with hub_offline():
                self.config = AutoConfig.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{self.path}/config.json is missing or invalid ({e})") from None
        if is_structured_dir(self.path):
            meta = read_manifest(self.path)
            self.layers = dict(meta["layers"])
            self.aliases = dict(meta.get("tied", {}))
        else:
            self.layers, self.aliases = {}, {}
        self._index = weight_index(self.path)
        self._entries: dict[str, TensorEntry] = {}
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k, f in self._index.items():
            by_file.setdefault(f, []).append(k)
        for f, ks in by_file.items():
            with safe_open(str(f), framework="pt") as h:
                for k in ks:
                    sl = h.get_slice(k)
                    self._entries[k] = TensorEntry(k, DTYPES[sl.get_dtype()], tuple(sl.get_shape()))
        for name in self.layers:
            if not any(k.startswith(name + ".") for k in self._entries):
                raise ArtifactError(f"{self.path}: no tensor for structured layer {name!r}; the directory is "
                                    "incomplete -- re-run rankwise compress")
        want = str(getattr(self.config, "torch_dtype", None) or getattr(self.config, "dtype", None) or "")
        dtype = getattr(torch, want.replace("torch.", ""), None) if want else None
        if meta_dtype := (read_manifest(self.path).get("dtype") if self.layers else None):
            dtype = getattr(torch, str(meta_dtype), dtype)
        if not isinstance(dtype, torch.dtype):
            floats = [e.dtype for k, e in self._entries.items() if e.dtype.is_floating_point and not self.in_layer(k)]
            dtype = floats[0] if floats else torch.float32
        self.dtype = dtype

    def _all_keys(self) -> list[str]:
        return list(self._entries)

    def keys(self) -> list[str]:
        return [k for k in self._entries if not self.in_layer(k)]

    def entry(self, key: str) -> TensorEntry:
        return self._entries[key]

    def _read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from ..models.streaming import load_tensors

        return load_tensors(self._index, keys)

    def tensor(self, key: str) -> torch.Tensor:
        return self._read([key])[key]

    def layer(self, name: str) -> StructuredLinear:
        desc = self.layers[name]
        try:
            layer = build_layer(desc, device="meta")
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{self.path}: rankwise.json entry for layer {name!r} is invalid ({e})") from None
        keys = [k for k in self._entries if k.startswith(name + ".")]
        state = {k[len(name) + 1:]: v for k, v in self._read(keys).items()}
        fixed = set(getattr(layer, "fixed_dtype_keys", ()))
        expected = layer.state_dict()
        if set(state) != set(expected):
            raise ArtifactError(f"{self.path}: layer {name!r} has tensors {sorted(state)}, its description implies "
                                f"{sorted(expected)}; the directory is corrupted -- re-run rankwise compress")
        for k, want in expected.items():
            got = state[k]
            if tuple(got.shape) != tuple(want.shape):
                raise ArtifactError(f"{self.path}: tensor {name}.{k} has shape {tuple(got.shape)}, expected "
                                    f"{tuple(want.shape)}; the directory is corrupted -- re-run rankwise compress")
            if got.is_floating_point() and k not in fixed and want.is_floating_point():
                state[k] = got  # keeps the stored dtype
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.eval()

    @property
    def tokenizer(self):
        if not hasattr(self, "_tok"):
            from ..models.loading import load_tokenizer

            try:
                self._tok = load_tokenizer(self.path)
            except (OSError, ValueError, TypeError):
                self._tok = None
        return self._tok

    @property
    def generation_config(self):
        from transformers import GenerationConfig

        if (self.path / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(str(self.path))
        return None


def open_source(model_or_dir: nn.Module | str | os.PathLike | Source, tokenizer=None) -> Source:
    """A :class:`Source` for a model in memory, a saved directory (or built-in model name), or a Source."""
    if isinstance(model_or_dir, Source):
        return model_or_dir
    if isinstance(model_or_dir, nn.Module):
        return ModelSource(model_or_dir, tokenizer)
    from ..models.registry import resolve_model

    return DirSource(resolve_model(str(model_or_dir)))


def tied_embedding_alias(source: Source) -> Mapping[str, str]:
    """The aliases that are the tied input/output embedding (dropped when ``tie_word_embeddings`` is set)."""
    if not getattr(source.config, "tie_word_embeddings", False):
        return {}
    return {k: v for k, v in source.aliases.items() if k.endswith("lm_head.weight") or "embed" in v}


__all__ = ["DirSource", "ModelSource", "Source", "open_source", "tied_embedding_alias"]
