"""``rankwise export``: write a saved model in the format a runtime reads."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ._common import QuietOpt, console, err_console, setup


def print_result(result) -> None:
    """One line per written directory, then each note (re-packed layers, layers kept dense)."""
    console.print(f"wrote {result.format} export {result.path}  ({len(result.files)} files)")
    for note in result.notes:
        err_console.print(f"note: {note}")


def format_list() -> str:
    """The registered formats, one line each (the command's epilog)."""
    from ..export import FORMATS

    return "Formats:\n\n" + "\n\n".join(f"{name}: {cls.summary}" for name, cls in FORMATS.items())


def register(app: typer.Typer) -> None:
    @app.command("export", epilog=format_list())
    def export_cmd(
        model: str = typer.Argument(..., help="Directory written by rankwise compress / rankwise.save, a plain "
                                              "Hugging Face directory, or a built-in model name."),
        format: str = typer.Option(..., "--format", "-f", help="Export format (listed below)."),
        out: Path = typer.Option(..., "--out", "-o", help="Directory to write the export to."),
        sets: Optional[List[str]] = typer.Option(None, "--set", help="Format option KEY=VALUE (repeatable)."),
        max_shard_size: str = typer.Option("5GB", "--max-shard-size",
                                           help="Shard safetensors above this size (bytes or e.g. 5GB, 500MB)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out (still atomic)."),
        quiet: bool = QuietOpt,
    ) -> None:
        """Write a compressed (or plain) model in the format a runtime reads: compressed-tensors (vLLM,
        transformers), gptq, gguf (llama.cpp, ollama), dense, ... Reads the input tensor by tensor."""
        from ..export import export
        from .compress import parse_sets

        setup(quiet)
        shard = int(max_shard_size) if max_shard_size.isdigit() else max_shard_size
        result = export(model, format, out, options=parse_sets(sets), max_shard_size=shard, overwrite=overwrite,
                        progress=not quiet)
        print_result(result)
