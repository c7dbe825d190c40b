"""Read and write safetensors checkpoints one tensor at a time (low-memory compression).

* :func:`weight_index` -- ``{tensor key: file}`` of a model directory (single file or sharded index).
* :func:`load_tensors` -- the named tensors only, read with ``safe_open`` (no other tensor touched).
* :func:`index_shapes` -- every tensor's shape from the headers alone.
* :func:`stream_merge` -- concatenate shards (files or in-memory dicts) into one safetensors file,
  holding at most one tensor read from a file at a time.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..errors import ArtifactError

#: safetensors dtype names <-> torch dtypes.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def weight_index(path: Path) -> dict[str, Path]:
    """``{tensor key: safetensors file}`` of a model directory (single file or sharded index)."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    if index.is_file():
        try:
            return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{index} is not a valid safetensors index ({e})") from None
    raise ArtifactError(f"{path} has no model.safetensors (or sharded index); low-memory mode reads safetensors "
                        "only: re-save the model with save_pretrained(safe_serialization=True)")


def _by_file(index: Mapping[str, Path], keys: Sequence[str]) -> dict[Path, list[str]]:
    out: dict[Path, list[str]] = {}
    for k in keys:
        out.setdefault(index[k], []).append(k)
    return out


def load_tensors(index: Mapping[str, Path], keys: Sequence[str], dtype: torch.dtype | None = None
                 ) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` read one by one with ``safe_open`` (floating ones cast to ``dtype`` if given)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for file, ks in _by_file(index, keys).items():
        with safe_open(str(file), framework="pt") as f:
            for k in ks:
                t = f.get_tensor(k)
                out[k] = t.to(dtype) if (dtype is not None and t.is_floating_point()) else t
    return out


def index_shapes(index: Mapping[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor in the checkpoint, read from the headers only."""
    from safetensors import safe_open

    shapes = {}
    for file, ks in _by_file(index, list(index)).items():
        with safe_open(str(file), framework="pt") as f:
            for k in ks:
                shapes[k] = tuple(f.get_slice(k).get_shape())
    return shapes


def _dtype_name(dtype: torch.dtype, key: str) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ArtifactError(f"tensor {key} has dtype {dtype}, which safetensors cannot store here; "
                            f"supported: {', '.join(str(d) for d in DTYPE_NAMES)}") from None


def _write_tensor(out, t: torch.Tensor) -> None:
    t = t.detach().contiguous()
    if t.numel():
        out.write(t.reshape(-1).view(torch.uint8).numpy().data)  # a view: no copy of the bytes


def stream_merge(shards: Sequence[Path | Mapping[str, torch.Tensor]], dest: Path,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Concatenate safetensors ``shards`` (files, or dicts of tensors in memory) into the file ``dest``.

    Layout (safetensors spec): u64-LE header size, JSON header ``{key: {dtype, shape, data_offsets}}``
    padded with spaces to a multiple of 8, then the raw little-endian tensor bytes.
    """
    from safetensors import safe_open

    entries, offset = [], 0
    for shard in shards:
        if isinstance(shard, Mapping):
            for k, t in shard.items():
                nbytes = t.numel() * t.element_size()
                entries.append((k, _dtype_name(t.dtype, k), list(t.shape), offset, offset + nbytes))
                offset += nbytes
            continue
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                shape = list(sl.get_shape())
                name = sl.get_dtype()
                if name not in DTYPES:
                    raise ArtifactError(f"{shard}: tensor {k} has dtype {name}, which low-memory mode does not "
                                        f"support ({', '.join(DTYPES)}); convert the checkpoint first")
                count = 1
                for s in shape:
                    count *= int(s)
                nbytes = torch.empty((), dtype=DTYPES[name]).element_size() * count
                entries.append((k, name, shape, offset, offset + nbytes))
                offset += nbytes
    header: dict = {"__metadata__": dict(metadata or {})}
    for k, dt, shape, a, b in entries:
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [a, b]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(dest, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for shard in shards:
            if isinstance(shard, Mapping):
                for t in shard.values():
                    _write_tensor(out, t)
                continue
            with safe_open(str(shard), framework="pt") as f:
                for k in f.keys():
                    _write_tensor(out, f.get_tensor(k))


def save_shard(state: Mapping[str, torch.Tensor], file: Path) -> None:
    """One safetensors file of ``state`` (tensors made contiguous)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(file))
