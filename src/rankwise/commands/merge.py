"""``rankwise merge``: merge fine-tunes of one base through their task vectors."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ._common import QuietOpt, console, setup, table

#: CLI flag -> the method option it sets.
FLAGS = {"scale": "--scale", "density": "--density", "alpha": "--alpha"}


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge_cmd(
        base: str = typer.Argument(..., help="The base model (built-in name or local HF directory)."),
        models: List[str] = typer.Argument(..., help="Fine-tunes of BASE: model directories or PEFT LoRA adapter "
                                                     "directories, merged in this order."),
        method: str = typer.Option("task-arithmetic", help="average, task-arithmetic, ties or opcm."),
        out: Path = typer.Option(..., "--out", help="Output directory (a plain Hugging Face model)."),
        scale: Optional[float] = typer.Option(None, help="task-arithmetic / ties: the scale lambda of the merged task "
                                                         "vector (task-arithmetic default 0.3, ties 1.0)."),
        density: Optional[float] = typer.Option(None, help="ties: fraction of each task vector kept (default 0.2)."),
        alpha: Optional[float] = typer.Option(None, help="opcm: energy fraction of the merged subspace that new task "
                                                         "vectors are projected off (default 0.5)."),
        base_check: bool = typer.Option(True, "--base-check/--no-base-check",
                                        help="Refuse models that do not look like fine-tunes of BASE."),
        max_shard_size: str = typer.Option("5GB", help="Largest safetensors shard (e.g. 500MB)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
        quiet: bool = QuietOpt,
    ) -> None:
        """Merge fine-tunes of one base (average, task arithmetic, TIES, OPCM), streamed tensor by tensor."""
        from ..errors import ConfigError
        from ..files import check_new_output
        from ..merging.merge import merge
        from ..merging.methods.base import MERGE_METHODS
        from ..options import make_options
        import dataclasses

        check_new_output(out, overwrite)
        cls = MERGE_METHODS.get(method)
        takes = {f.name for f in dataclasses.fields(cls.Options)}
        given = {k: v for k, v in (("scale", scale), ("density", density), ("alpha", alpha)) if v is not None}
        wrong = [FLAGS[k] for k in given if k not in takes]
        if wrong:
            valid = ", ".join(FLAGS[k] for k in takes) or "none"
            raise ConfigError(f"{', '.join(wrong)} does not apply to --method {method} (it takes: {valid})")
        make_options(cls.Options, given, {}, f"merge method {method!r}")  # bad values fail before any work
        setup(quiet)
        path, rep = merge(base, models, method, out, options=given, check_base=base_check, overwrite=overwrite,
                          max_shard_size=max_shard_size, progress=not quiet)
        table("merge", ["method", "options", "models", "tensors", "scale", "seconds"],
              [[rep.method, str(rep.options), len(rep.models), rep.tensors, rep.scale, rep.seconds]])
        console.print(f"wrote {path}")
