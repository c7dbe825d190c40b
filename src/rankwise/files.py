"""Everything rankwise writes goes through here: atomic directories and atomic files.

A file or directory is written under a temporary sibling name and renamed into place at the end,
so an interrupted run never leaves a half-written output, and a failed write leaves no temp file.

Permissions: what is renamed into place gets the modes of an ordinary new file or directory under the
user's umask (``0o666 & ~umask`` / ``0o777 & ~umask``), whatever the library that wrote it chose:
temp names are created private (``mkstemp`` / ``mkdtemp``: 0600 / 0700), and some writers create
private files themselves (safetensors >= 0.5 ``save_file`` writes 0600), so every file under an
:func:`atomic_dir` is reset when the directory is committed.
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


def check_new_output(dest: str | os.PathLike | None, overwrite: bool = False, flag: str = "--out") -> None:
    """:class:`OutputExistsError` when ``dest`` exists and ``overwrite`` is off (checked before any work)."""
    if dest is not None and Path(dest).exists() and not overwrite:
        raise OutputExistsError(f"output {dest} already exists; choose another {flag} or pass --overwrite")


def umask() -> int:
    """The process umask, read without changing it where the OS says it (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode a new file (``0o666``) or directory (``0o777``) gets under the umask."""
    return (0o777 if directory else 0o666) & ~umask()


def reset_modes(root: str | os.PathLike) -> None:
    """Give ``root`` (a directory or file) and everything under it the default modes of :func:`default_mode`."""
    root = Path(root)
    fmode, dmode = default_mode(False), default_mode(True)
    if root.is_file():
        os.chmod(root, fmode)
        return
    os.chmod(root, dmode)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), dmode)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, fmode)


_cleanups = 0  # atomic_dir cleanups running in this process (see cleanup_running)


def cleanup_running() -> bool:
    """Whether a failed :func:`atomic_dir` write is being removed right now: a signal handler that would
    raise (to get the output removed) must not, since raising would cut the removal short."""
    return _cleanups > 0


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir next to ``dest``; on success it replaces ``dest`` atomically.

    On any exception the temp dir is removed and ``dest`` is left untouched.
    """
    dest = Path(dest)
    check_new_output(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, default_mode(True))  # mkdtemp makes 0700; outputs are ordinary directories
    try:
        yield tmp
    except BaseException:
        global _cleanups
        _cleanups += 1
        try:
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            _cleanups -= 1
        raise
    reset_modes(tmp)  # whatever wrote inside (safetensors writes 0600): ordinary files under the umask
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", newline: str | None = None) -> Iterator[Any]:
    """Open a temp file next to ``path`` (``mode`` "w" or "wb"; text is UTF-8 with ``newline`` as in
    :func:`open`, e.g. ``""`` for the csv module); on success it replaces ``path``.

    On any exception the temp file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": newline} if "b" not in mode else {})) as f:
            yield f
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path next to ``path`` (same suffix) for writers that take a file name (``savefig``,
    ``save_file``); on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    with atomic_file(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    return Path(path)
