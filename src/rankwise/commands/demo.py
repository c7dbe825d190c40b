"""``rankwise demo``: the README's main job on the bundled default model."""
from __future__ import annotations

from pathlib import Path

import typer

from ._common import QuietOpt, console, setup, table


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        out: Path = typer.Option(Path("demo-out"), help="Where to write report.md."),
        quiet: bool = QuietOpt,
    ) -> None:
        """Evaluate the bundled default model on the default corpus and write a report."""
        from .._io import write_json
        from .eval import evaluate_model

        setup(quiet)
        path, res = evaluate_model(None, None, 512, 64, 4, quiet)
        table("rankwise demo: dense baseline", ["model", "ppl (64 x 512, wiki test)", "seconds"],
              [[path.name, res.ppl, res.seconds]])
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "results.json", {"model": str(path), "dense": res.to_dict()})
        (out / "report.md").write_text(
            f"# rankwise demo\n\nModel: `{path.name}`\n\n| model | perplexity |\n|---|---|\n"
            f"| dense | {res.ppl:.3f} |\n"
        )
        console.print(f"wrote {out / 'report.md'}")
