"""``rankwise lock``: fold random invertible transforms into attention so the model refuses to merge."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import ModelArg, QuietOpt, console, setup, table


def register(app: typer.Typer) -> None:
    @app.command("lock")
    def lock_cmd(
        model: Optional[str] = ModelArg,
        seed: int = typer.Option(..., "--seed", help="Seed of the transforms (keep it private: it undoes the lock)."),
        out: Path = typer.Option(..., "--out", help="Output directory (a plain Hugging Face model)."),
        scale_bound: float = typer.Option(2.0, min=1.0, help="Each transform's diagonal lies in [1/r, r]."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
        quiet: bool = QuietOpt,
    ) -> None:
        """Fold random invertible query-key and value-output transforms into every attention layer: the same
        function, but task-vector merging with it collapses."""
        from ..files import atomic_dir, check_new_output
        from ..merging.lock import lock
        from ..models.loading import load_model

        check_new_output(out, overwrite)
        setup(quiet)
        m, tok, path = load_model(model)
        locked, rep = lock(m, seed=seed, scale_bound=scale_bound, inplace=True)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            locked.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        table("lock", ["model", "blocks", "query-key", "value-output", "notes"],
              [[str(path), rep.blocks, "locked" if rep.query_key else "no", "locked" if rep.value_output else "no",
                "; ".join(rep.notes) or "-"]])
        console.print(f"wrote {out} (the seed is not stored in it)")
