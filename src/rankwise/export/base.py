"""The writer interface every export format implements, and the registry of formats.

A format is one module in :mod:`rankwise.export.formats` with one class registered in
:data:`FORMATS`::

    @FORMATS.register("compressed-tensors")
    class CompressedTensors(Format):
        summary = "pack-quantized int4/int8 (vLLM, transformers)"
        Options = CTOptions                      # a dataclass (``--set KEY=VALUE`` / ``options=``)
        def unsupported(self, source): ...       # what it cannot hold -> one-line reasons (checked first)
        def write(self, source, ctx): ...        # writes into ctx.dir (the atomic temp dir)

The contract:

* **declare** -- :meth:`Format.unsupported` returns the reasons (one short line per offending layer or
  model property) the source cannot be written; ``export`` turns them into one
  :class:`UnsupportedExportError` line *before anything is written*, naming what the format can hold
  (:attr:`Format.holds`) and the formats that can hold the source (:func:`formats_for`);
* **write** -- :meth:`Format.write` writes every file into ``ctx.dir``, a temporary directory that
  :func:`rankwise.files.atomic_dir` renames into place only when the whole export succeeded (so an
  error or an interrupt leaves nothing half-written, and the destination is untouched);
* **stream** -- a writer plans its tensors first (:class:`~rankwise.export.shards.TensorEntry` from
  ``source.layers`` and ``source.entry``, no values) and then asks the source for one layer / one
  tensor at a time (:meth:`Source.layer`, :meth:`Source.tensor`) and hands each result to
  :meth:`ExportContext.safetensors` (sharded above ``ctx.max_shard_size``) or its own streaming
  writer (GGUF): a :class:`~rankwise.export.source.DirSource` never holds the model;
* **notes** -- :meth:`ExportContext.note` records what the user must know (a 3-bit layer re-packed
  as 4-bit, a layer written dense because the format has no form for it); they are printed by the
  CLI, returned in :class:`ExportResult` and written to ``rankwise-export.json`` beside the files.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from ..errors import ConfigError
from ..registry import Registry
from .shards import DEFAULT_MAX_SHARD_SIZE, ShardedSafetensorsWriter, TensorEntry

#: Format name -> :class:`Format` subclass; one module per format in :mod:`rankwise.export.formats`.
FORMATS: Registry = Registry("export format", package="rankwise.export.formats")

#: The record of an export written beside its files.
RECORD = "rankwise-export.json"


class UnsupportedExportError(ConfigError):
    """The source holds a structure or an architecture the chosen format cannot hold."""


@dataclass
class NoOptions:
    """This format takes no options."""


@dataclass
class ExportContext:
    """What a writer gets besides the source: the temp output dir, the shard limit, a place for notes."""

    dir: Path
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    progress: bool = True
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        """Record one line the user must read (printed by the CLI, kept in the record)."""
        if text not in self.notes:
            self.notes.append(text)

    def safetensors(self, entries: Sequence[TensorEntry], metadata: dict[str, str] | None = None
                    ) -> ShardedSafetensorsWriter:
        """A streaming writer of ``entries`` in ``dir`` (``model.safetensors`` or shards + index)."""
        return ShardedSafetensorsWriter(self.dir, entries, self.max_shard_size, metadata)

    def progress_bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)


@dataclass
class ExportResult:
    """What an export wrote: the directory, the format, its files and the notes."""

    path: Path
    format: str
    files: list[str]
    notes: list[str]
    options: dict[str, Any] = field(default_factory=dict)


class Format:
    """One export format; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    #: One line for ``rankwise export --help``.
    summary: ClassVar[str] = ""
    #: What it can hold, said in one phrase (used in error messages).
    holds: ClassVar[str] = ""
    #: The runtimes that read it.
    runtimes: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def unsupported(self, source) -> list[str]:
        """Reasons (short lines) ``source`` cannot be written; empty when it can."""
        return []

    def write(self, source, ctx: ExportContext) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options) else {}


def formats_for(source, exclude: str | None = None) -> list[str]:
    """The registered formats whose :meth:`Format.unsupported` accepts ``source`` (with default options)."""
    out = []
    for name, cls in FORMATS.items():
        if name == exclude:
            continue
        try:
            if not cls().unsupported(source):
                out.append(name)
        except Exception:  # noqa: BLE001 - a format that cannot even judge the source cannot hold it
            continue
    return out


def unsupported_error(fmt: Format, source, reasons: list[str]) -> UnsupportedExportError:
    """One line: what the format cannot hold here, what it holds, and which formats can hold this model."""
    shown = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
    others = formats_for(source, exclude=fmt.name)
    alt = (f"formats that can hold this model: {', '.join(others)}" if others
           else "no registered format can hold this model as it is")
    return UnsupportedExportError(f"format {fmt.name!r} cannot hold this model: {shown}. It holds {fmt.holds}; "
                                  f"{alt} (rankwise export --format NAME)")


__all__ = ["ExportContext", "ExportResult", "FORMATS", "Format", "NoOptions", "RECORD", "UnsupportedExportError",
           "formats_for", "unsupported_error"]
