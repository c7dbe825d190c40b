"""``rankwise models``: built-in model names and cache state."""
from __future__ import annotations

import typer

from ._common import console, table


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models_cmd() -> None:
        """List the built-in models, whether their package is installed, and their cache state."""
        from ..models.registry import builtin_status

        rows = builtin_status()
        table("built-in models", ["name", "default", "installed", "cache", "description"],
              [[r["name"], "yes" if r["default"] else "", "yes" if r["installed"] else "no",
                r["cache"], r["description"]] for r in rows])
        console.print("Any local Hugging Face model directory works wherever a MODEL is taken.")
