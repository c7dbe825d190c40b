"""Atomic output directories and cache paths.

Everything rankwise writes goes to a temporary sibling directory first and is renamed
into place at the end, so an interrupted run never leaves a half-written output.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputExistsError


def cache_dir() -> Path:
    """Root of rankwise's cache: ``$RANKWISE_CACHE`` or ``~/.cache/rankwise``."""
    root = os.environ.get("RANKWISE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "rankwise"


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir next to ``dest``; on success it replaces ``dest`` atomically.

    On any exception the temp dir is removed and ``dest`` is left untouched.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise OutputExistsError(
            f"output directory {dest} already exists; choose another --out or pass --overwrite"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; outputs are ordinary directories
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)
