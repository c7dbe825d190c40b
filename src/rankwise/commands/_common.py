"""Shared CLI pieces: consoles, common options, logging, tables."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

ModelArg = typer.Argument(None, help="Built-in model name or local HF model directory (default: smollm2-135m-instruct).")
TextFileOpt = typer.Option(None, "--text-file", help="Plain UTF-8 text file to use instead of the default corpus.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars or info logs.")


def setup(quiet: bool) -> None:
    """Configure logging; progress bars are shown unless quiet."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    for noisy in ("transformers", "httpx", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    if quiet:
        transformers.logging.disable_progress_bar()


def table(title: str, columns: list[str], rows: list[list], quiet_console: Optional[Console] = None) -> Table:
    t = Table(title=title, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    (quiet_console or console).print(t)
    return t


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def check_output_file(path: Optional[Path], flag: str, suffix: str) -> None:
    """A file output (``--json``, ``--csv``) must not be an existing directory: checked before any work."""
    from ..errors import ConfigError

    if path is not None and Path(path).is_dir():
        raise ConfigError(f"{flag} {path} is a directory; pass a file path such as {Path(path) / ('result' + suffix)}")


def path_or_none(p: Optional[Path]) -> Optional[str]:
    return None if p is None else str(p)
