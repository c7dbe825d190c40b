"""``export(model_or_dir, format, out)``: check, then write atomically, then record."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..files import atomic_dir, check_new_output, write_json
from ..options import make_options
from .base import FORMATS, RECORD, ExportContext, ExportResult, unsupported_error
from .shards import DEFAULT_MAX_SHARD_SIZE, parse_size
from .source import open_source


def export(model_or_dir: nn.Module | str | os.PathLike, format: str, out: str | os.PathLike, *, tokenizer=None,
           options: dict[str, Any] | Any = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
           overwrite: bool = False, progress: bool = True) -> ExportResult:
    """Write ``model_or_dir`` (a model in memory, or a saved directory read tensor by tensor) in
    ``format`` to the directory ``out``; returns an :class:`ExportResult` (files and notes).

    Every check (format name, options, shard size, whether the format can hold each layer, ``out``)
    runs before anything is written; the output appears whole or not at all.
    """
    cls = FORMATS.get(format)
    opts = make_options(cls.Options, options, {}, f"export format {format!r}")
    parse_size(max_shard_size)
    check_new_output(out, overwrite)
    source = open_source(model_or_dir, tokenizer)
    fmt = cls(opts)
    reasons = fmt.unsupported(source)
    if reasons:
        raise unsupported_error(fmt, source, reasons)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        ctx = ExportContext(tmp, max_shard_size, progress)
        fmt.write(source, ctx)
        from ..models.saved import versions

        write_json(tmp / RECORD, {"format": format, "options": fmt.options_dict(),
                                  "source": str(source.path) if source.path is not None else "in-memory model",
                                  "notes": ctx.notes, "versions": versions()})
        files = sorted(p.name for p in tmp.iterdir())
    return ExportResult(out, format, files, list(ctx.notes), fmt.options_dict())


__all__ = ["export"]
