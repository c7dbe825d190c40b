"""Pieces shared by the Hugging Face-style formats: side files, plain tensors, dense weights."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Iterator

import torch

from ..structures.base import StructuredLinear
from .shards import TensorEntry
from .source import DirSource, Source, tied_embedding_alias

#: Tokenizer files copied from a saved directory (whichever exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def export_config(source: Source):
    """A copy of the source's config with ``dtype`` set to the model's (the caller adds its own keys)."""
    config = copy.deepcopy(source.config)
    config.dtype = source.dtype
    return config


def write_side_files(source: Source, out: Path, config=None) -> None:
    """``config.json`` (``config`` or the source's), ``generation_config.json`` and the tokenizer into ``out``."""
    (config if config is not None else export_config(source)).save_pretrained(out)
    gen = source.generation_config
    if gen is not None:
        gen.save_pretrained(out)
    if isinstance(source, DirSource):
        for name in TOKENIZER_FILES:
            if (source.path / name).is_file():
                shutil.copyfile(source.path / name, out / name)
    elif source.tokenizer is not None:
        source.tokenizer.save_pretrained(out)


def plain_keys(source: Source) -> list[str]:
    """The plain tensors to write: every key outside the structured layers, the tied output embedding
    left out (``tie_word_embeddings`` re-ties it on load)."""
    return [k for k in source.keys()]


def alias_copies(source: Source) -> dict[str, str]:
    """Aliases that must be written as copies (every alias but the tied embedding)."""
    tied = tied_embedding_alias(source)
    return {k: v for k, v in source.aliases.items() if k not in tied and not source.in_layer(k)}


def dense_weight(layer: StructuredLinear, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The layer's dense weight in ``dtype``: (out, in), or (in, out) for a GPT-2 ``Conv1D``."""
    W = layer.dense().to(dtype)
    return W.t().contiguous() if kind == "conv1d" else W.contiguous()


def dense_entry(source: Source, name: str, dtype: torch.dtype) -> TensorEntry:
    out_f, in_f = (int(x) for x in source.layers[name]["shape"])
    shape = (in_f, out_f) if source.module_kind(name) == "conv1d" else (out_f, in_f)
    return TensorEntry(f"{name}.weight", dtype, shape)


def layers_in_order(source: Source) -> Iterator[tuple[str, StructuredLinear]]:
    """``(name, layer)`` one at a time (a :class:`DirSource` reads each from disk when asked)."""
    for name in source.layers:
        yield name, source.layer(name)


__all__ = ["TOKENIZER_FILES", "alias_copies", "dense_entry", "dense_weight", "export_config", "layers_in_order",
           "plain_keys", "write_side_files"]
