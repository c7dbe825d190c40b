"""``rankwise models``: built-in model names and cache state; ``--verify`` hashes the cache, ``--rebuild``
converts a built-in again."""
from __future__ import annotations

from typing import Optional

import typer

from ._common import console, table


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models_cmd(
        verify: bool = typer.Option(False, "--verify", help="Hash every cached file against its manifest "
                                    "(loads only check sizes and modification times); exit 2 if one is corrupted."),
        rebuild: Optional[str] = typer.Option(None, "--rebuild", metavar="NAME",
                                              help="Convert built-in model NAME into the cache again."),
    ) -> None:
        """List the built-in models, whether their package is installed, and their cache state."""
        from ..errors import ArtifactError
        from ..models.registry import builtin_status, rebuild_builtin

        if rebuild is not None:
            console.print(f"rebuilt {rebuild_builtin(rebuild)}")
        rows = builtin_status(verify=verify)
        table("built-in models", ["name", "default", "installed", "cache", "description"],
              [[r["name"], "yes" if r["default"] else "", "yes" if r["installed"] else "no",
                r["cache"], r["description"]] for r in rows])
        console.print("Any local Hugging Face model directory works wherever a MODEL is taken.")
        if verify:
            for r in rows:
                console.print(f"verify {r['name']}: {r['cache']}"
                              + (f" ({', '.join(r['problems'])})" if r["problems"] else ""), soft_wrap=True)
        bad = [r for r in rows if r["cache"] == "corrupted"]
        if verify and bad:
            raise ArtifactError("; ".join(
                f"the cache of {r['name']} at {r['path']} is corrupted ({', '.join(r['problems'])}): rebuild it "
                f"with `rankwise models --rebuild {r['name']}`" for r in bad))
