"""Cached hidden states kept on disk, one raw file per batch (``--low-memory``).

The sequential engine caches the hidden states entering the current block for every calibration
batch (``n x L x d`` values in the model's dtype), and the refit a second such cache: the dense
model's. In memory these two caches are the largest thing a low-memory run holds besides the
interpreter (2 x 72 MB on SmolLM2 with the default 64 x 512 windows, 2 x 0.5 GB for a 7B model).
:class:`SpilledBatches` keeps each batch in a file instead and reads it back when a pass over the
batches reaches it, so that only the batch being run is resident; the files live in a temporary
directory next to the output (the same disk, never a RAM-backed ``/tmp``) and are removed when the
run ends, whether it succeeds or not.

A batch is stored as its raw bytes (``tensor.view(uint8)``) with its shape and dtype kept in memory:
no pickle, no header, bit-exact. :meth:`SpilledBatches.copy` shares the files of the copy with the
original (the dense cache starts as the compressed one): replacing a batch in one writes a new file
and leaves the other's as it was; a file is deleted once no cache refers to it.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ...errors import ArtifactError


class SpillFiles:
    """The directory of one run's spilled batches, with a reference count per file."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.refs: dict[Path, int] = {}
        self._names = itertools.count()

    def write(self, t: torch.Tensor) -> Path:
        path = self.dir / f"{next(self._names):06d}.bin"
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        try:
            data.tofile(path)
        except OSError as e:
            raise ArtifactError(f"cannot write the cached calibration activations to {self.dir}: {e}; free disk "
                                "space there or run without --low-memory") from e
        self.refs[path] = 1
        return path

    def incref(self, path: Path) -> None:
        self.refs[path] += 1

    def decref(self, path: Path) -> None:
        self.refs[path] -= 1
        if self.refs[path] == 0:
            del self.refs[path]
            path.unlink(missing_ok=True)


class SpilledBatches:
    """A list of tensors (one per batch) stored in files: ``len``, ``x[b]`` (read back), ``x[b] = t``
    (a new file), ``append``, ``copy`` (shares the files, copy on write). ``close`` drops this list's
    references (files still used by a copy stay)."""

    def __init__(self, files: SpillFiles) -> None:
        self._files = files
        self._paths: list[Path] = []
        self._meta: list[tuple[torch.Size, torch.dtype]] = []

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, b: int) -> torch.Tensor:
        shape, dtype = self._meta[b]
        raw = np.fromfile(self._paths[b], dtype=np.uint8)
        return torch.from_numpy(raw).view(dtype).reshape(shape)

    def __setitem__(self, b: int, t: torch.Tensor) -> None:
        path = self._files.write(t)
        self._files.decref(self._paths[b])
        self._paths[b], self._meta[b] = path, (t.shape, t.dtype)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[b] for b in range(len(self)))

    def append(self, t: torch.Tensor) -> None:
        self._paths.append(self._files.write(t))
        self._meta.append((t.shape, t.dtype))

    def copy(self) -> "SpilledBatches":
        other = SpilledBatches(self._files)
        for p in self._paths:
            self._files.incref(p)
        other._paths, other._meta = list(self._paths), list(self._meta)
        return other

    def close(self) -> None:
        for p in self._paths:
            self._files.decref(p)
        self._paths, self._meta = [], []


@contextlib.contextmanager
def spill_directory(near: str | os.PathLike) -> Iterator[SpillFiles]:
    """A fresh hidden directory beside ``near`` (the output directory: the same disk) for this run's
    batches (the system temp directory where ``near``'s parent does not exist); removed with
    everything in it when the run ends."""
    parent = Path(near).resolve().parent
    if not parent.exists():  # a rank on another machine than rank 0 (which made the output's parent)
        parent = Path(tempfile.gettempdir())
    try:
        d = Path(tempfile.mkdtemp(prefix=".rankwise-activations-", dir=parent))
    except OSError as e:
        raise ArtifactError(f"cannot create a directory for the cached calibration activations in {parent}: {e}; "
                            "make that directory writable or run without --low-memory") from e
    try:
        yield SpillFiles(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


__all__ = ["SpillFiles", "SpilledBatches", "spill_directory"]
