"""Streaming, sharded safetensors: every tensor written straight to its place, one at a time.

The safetensors file format is ``u64 header length | JSON header | data``, the header giving each
tensor's ``dtype``, ``shape`` and ``data_offsets`` (relative to the data start, contiguous, in
header order). Because an export knows every tensor's dtype and shape before it computes a single
value (from the saved manifest alone), :class:`ShardedSafetensorsWriter` lays all files out first
(:func:`plan_shards`), writes the headers, and then writes each tensor at its offset as soon as it
is produced: memory holds one tensor, never a shard or the model.

Sharding follows ``transformers``' ``save_pretrained``: tensors are taken in order and a new shard is
started when adding one would exceed ``max_shard_size`` bytes (a tensor larger than the limit gets a
shard of its own); one shard is ``model.safetensors``, several are
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` =
``{"metadata": {"total_size": bytes}, "weight_map": {key: file}}``.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..errors import ConfigError

#: transformers' default ``max_shard_size`` (``PreTrainedModel.save_pretrained``).
DEFAULT_MAX_SHARD_SIZE = "5GB"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or a string such as ``"5GB"`` (10^9) / ``"500MiB"`` (2^20), as transformers."""
    if isinstance(size, bool):
        raise ConfigError(f"max shard size must be bytes or a size such as '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*", str(size).upper())
        if m is None:
            raise ConfigError(f"max shard size {size!r} is not a size; use bytes or e.g. '5GB', '500MB', '2GiB'")
        value = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if value < 1:
        raise ConfigError(f"max shard size must be positive, got {size!r}")
    return value


@dataclass(frozen=True)
class TensorEntry:
    """One tensor to be written: its key, dtype and shape (known before its values)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(entries: Sequence[TensorEntry], max_shard_size: int | str) -> list[list[TensorEntry]]:
    """The entries cut into shards in order: a shard is closed when the next tensor would exceed the limit."""
    limit = parse_size(max_shard_size)
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """File names of ``count`` shards, as transformers names them."""
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardedSafetensorsWriter:
    """Write the planned ``entries`` into ``out_dir`` (sharded above ``max_shard_size``), one tensor at a time.

    ``write(key, tensor)`` in any order; ``close()`` checks every tensor was written and writes the index.
    Use as a context manager. The files are complete only after ``close``; an exception leaves them
    partial, which is why exports write inside :func:`rankwise.files.atomic_dir`.
    """

    def __init__(self, out_dir: str | Path, entries: Sequence[TensorEntry], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 metadata: Mapping[str, str] | None = None) -> None:
        keys = [e.key for e in entries]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise ConfigError(f"tensor keys written twice: {dup[:5]}")
        for e in entries:
            if e.dtype not in _DTYPE_NAMES:
                raise ConfigError(f"tensor {e.key}: dtype {e.dtype} cannot be stored in safetensors")
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(entries, max_shard_size)
        self.names = shard_names(len(self.shards))
        self._where: dict[str, tuple[int, int, TensorEntry]] = {}  # key -> (shard, absolute offset, entry)
        self._files = []
        meta = {"format": "pt", **dict(metadata or {})}
        for i, (shard, name) in enumerate(zip(self.shards, self.names)):
            header: dict = {"__metadata__": meta}
            off = 0
            for e in shard:
                header[e.key] = {"dtype": _DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                                 "data_offsets": [off, off + e.nbytes]}
                off += e.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer pads it
            start = 8 + len(raw)
            f = open(self.out_dir / name, "wb")
            self._files.append(f)
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(start + off)
            pos = start
            for e in shard:
                self._where[e.key] = (i, pos, e)
                pos += e.nbytes
        self._written: set[str] = set()

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (dtype and shape as planned) at its place."""
        if key not in self._where:
            raise ConfigError(f"tensor {key} was not planned for this export")
        if key in self._written:
            raise ConfigError(f"tensor {key} written twice")
        i, pos, e = self._where[key]
        t = tensor.detach()
        if t.dtype != e.dtype or tuple(t.shape) != tuple(e.shape):
            raise ConfigError(f"tensor {key}: planned {e.dtype} {tuple(e.shape)}, got {t.dtype} {tuple(t.shape)}")
        data = t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        f = self._files[i]
        f.seek(pos)
        f.write(data)
        self._written.add(key)

    def close(self) -> list[str]:
        """Finish the files (and the index when sharded); returns the file names written."""
        missing = [k for k in self._where if k not in self._written]
        for f in self._files:
            f.close()
        self._files = []
        if missing:
            raise ConfigError(f"tensors planned but never written: {missing[:5]}")
        names = list(self.names)
        if len(self.shards) > 1:
            weight_map = {e.key: name for shard, name in zip(self.shards, self.names) for e in shard}
            total = sum(e.nbytes for shard in self.shards for e in shard)
            (self.out_dir / INDEX_NAME).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
            names.append(INDEX_NAME)
        return names

    def __enter__(self) -> "ShardedSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            for f in self._files:
                f.close()
            self._files = []


__all__ = ["DEFAULT_MAX_SHARD_SIZE", "INDEX_NAME", "ShardedSafetensorsWriter", "TensorEntry", "WEIGHTS_NAME",
           "parse_size", "plan_shards", "shard_names"]
