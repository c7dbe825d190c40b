"""Read and write safetensors checkpoints one tensor at a time (low-memory compression).

* :func:`weight_index` -- ``{tensor key: file}`` of a model directory (single file or sharded index).
* :func:`load_tensors` -- the named tensors only, read with ``safe_open`` (no other tensor touched).
* :func:`index_shapes` -- every tensor's shape from the headers alone.
* :func:`index_dtypes` -- every tensor's dtype from the headers alone.
* :func:`load_rows` -- chosen rows of one tensor (an embedding's rows for the calibration tokens).
* :func:`stream_merge` -- concatenate shards (files, in-memory dicts, or :class:`FileTensors`: named
  tensors of the source checkpoint copied in row chunks, cast on the way) into one safetensors file,
  holding at most one tensor read from a shard file, or one chunk of a source tensor, at a time.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
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


def read_header(file: Path) -> tuple[int, dict]:
    """``(offset of the data, {key: {dtype, shape, data_offsets}})`` of a safetensors file."""
    try:
        with open(file, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ArtifactError(f"{file} is not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return 8 + n, header


def _entries(index: Mapping[str, Path], keys: Sequence[str]) -> dict[str, tuple[Path, int, dict]]:
    heads: dict[Path, tuple[int, dict]] = {}
    out = {}
    for k in keys:
        file = index[k]
        if file not in heads:
            heads[file] = read_header(file)
        start, header = heads[file]
        if k not in header:
            raise ArtifactError(f"{file} has no tensor {k} although its index lists it")
        out[k] = (file, start, header[k])
    return out


def index_dtypes(index: Mapping[str, Path]) -> dict[str, torch.dtype]:
    """Dtypes of every tensor in the checkpoint, read from the headers only."""
    out = {}
    for k, (file, _, e) in _entries(index, list(index)).items():
        if e["dtype"] not in DTYPES:
            raise ArtifactError(f"{file}: tensor {k} has dtype {e['dtype']}, which low-memory mode does not support "
                                f"({', '.join(DTYPES)}); convert the checkpoint first")
        out[k] = DTYPES[e["dtype"]]
    return out


def load_rows(index: Mapping[str, Path], key: str, rows: torch.Tensor, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    """Rows ``rows`` (sorted, unique) of the tensor ``key`` (an embedding matrix), read from its file
    run by run: ``len(rows) x row`` bytes are read, not the whole tensor."""
    file, start, e = _entries(index, [key])[key]
    src = DTYPES[e["dtype"]]
    shape = list(e["shape"])
    row_bytes = torch.empty((), dtype=src).element_size()
    for s in shape[1:]:
        row_bytes *= int(s)
    r = rows.tolist()
    out = torch.empty((len(r), *shape[1:]), dtype=src)
    flat = out.view(len(r), -1).view(torch.uint8) if out.numel() else out
    base = start + e["data_offsets"][0]
    with open(file, "rb") as f:
        i = 0
        while i < len(r):
            j = i
            while j + 1 < len(r) and r[j + 1] == r[j] + 1:
                j += 1
            f.seek(base + r[i] * row_bytes)
            f.readinto(memoryview(flat[i: j + 1].numpy()).cast("B"))
            i = j + 1
    return out.to(dtype) if dtype is not None and out.is_floating_point() else out


@dataclass
class FileTensors:
    """Tensors ``keys`` of a checkpoint (``index``), to be copied by :func:`stream_merge` in row
    chunks of at most ``chunk_bytes`` (floating ones cast to ``dtype`` if given)."""

    index: Mapping[str, Path]
    keys: Sequence[str]
    dtype: torch.dtype | None = None
    chunk_bytes: int = 16 * 2**20


def _copy_chunks(out, src: FileTensors, key: str, entry: tuple[Path, int, dict]) -> None:
    file, start, e = entry
    dt = DTYPES[e["dtype"]]
    shape = list(e["shape"])
    a, b = e["data_offsets"]
    elem = torch.empty((), dtype=dt).element_size()
    row = elem
    for s in shape[1:]:
        row *= int(s)
    rows = max(1, src.chunk_bytes // max(1, row)) if shape else 1
    cast = src.dtype is not None and dt.is_floating_point and src.dtype != dt
    with open(file, "rb") as f:
        f.seek(start + a)
        left = b - a
        while left > 0:
            n = min(left, rows * row)
            raw = f.read(n)
            if len(raw) != n:
                raise ArtifactError(f"{file} is truncated: tensor {key} ends early")
            if cast:
                t = torch.frombuffer(bytearray(raw), dtype=dt).to(src.dtype)
                out.write(t.view(torch.uint8).numpy().data)
            else:
                out.write(raw)
            left -= n


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
        if isinstance(shard, FileTensors):
            for k, (file, _, e) in _entries(shard.index, shard.keys).items():
                dt = DTYPES.get(e["dtype"])
                if dt is None:
                    raise ArtifactError(f"{file}: tensor {k} has dtype {e['dtype']}, which low-memory mode does not "
                                        f"support ({', '.join(DTYPES)}); convert the checkpoint first")
                if shard.dtype is not None and dt.is_floating_point:
                    dt = shard.dtype
                count = 1
                for s in e["shape"]:
                    count *= int(s)
                nbytes = torch.empty((), dtype=dt).element_size() * count
                entries.append((k, _dtype_name(dt, k), list(e["shape"]), offset, offset + nbytes))
                offset += nbytes
            continue
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
            if isinstance(shard, FileTensors):
                for k, entry in _entries(shard.index, shard.keys).items():
                    _copy_chunks(out, shard, k, entry)
                continue
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


def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"`` (transformers' units:
    GB = 10^9, GiB = 2^30)."""
    if isinstance(size, int):
        return size
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.I)
    if not m:
        raise ArtifactError(f"cannot read the size {size!r}; write e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0] if unit != "B" else "B"]
    return int(float(m.group(1)) * base ** power)


class ShardWriter:
    """Write tensors one at a time into safetensors shards of at most ``max_shard_size`` bytes (a tensor
    larger than that gets a shard of its own), named as transformers names them: ``model.safetensors``
    when one shard suffices, else ``model-0000k-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``. At most one shard's tensors are held at a time."""

    def __init__(self, directory: Path, max_shard_size: int | str = "5GB",
                 metadata: Mapping[str, str] | None = None) -> None:
        self.dir = Path(directory)
        self.limit = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.limit:
            self._flush()
        self.pending[key] = t.detach().contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        file = self.dir / f".shard-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(file), metadata=self.metadata)
        self.files.append((file, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush, name the shards, write the index (several shards); returns the weight files."""
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            dest = self.dir / "model.safetensors"
            os.replace(self.files[0][0], dest)
            return [dest]
        weight_map, out = {}, []
        for i, (file, keys) in enumerate(self.files, 1):
            dest = self.dir / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(file, dest)
            out.append(dest)
            weight_map.update({k: dest.name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return out
