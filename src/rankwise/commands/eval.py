"""``rankwise eval``: perplexity with the default protocol."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..calibration.sampling import DEFAULT_EVAL_WINDOWS, DEFAULT_SEQLEN
from ._common import ModelArg, QuietOpt, TextFileOpt, check_output_file, console, setup, table


def evaluate_model(model_arg, text_file, seqlen, windows, batch_size, quiet):
    from ..calibration.corpus import load_corpus
    from ..evaluation.perplexity import perplexity
    from ..models.loading import load_model

    model, tok, path = load_model(model_arg)
    text = load_corpus("test", text_file)
    res = perplexity(model, tok, text=text, seqlen=seqlen, windows=windows,
                     batch_size=batch_size, progress=not quiet)
    return path, res


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: Optional[str] = ModelArg,
        text_file: Optional[Path] = TextFileOpt,
        seqlen: int = typer.Option(DEFAULT_SEQLEN, min=2, help="Tokens per window."),
        windows: int = typer.Option(DEFAULT_EVAL_WINDOWS, min=0, help="Windows to score; 0 = all."),
        batch_size: int = typer.Option(4, min=1, help="Windows per forward pass."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON."),
        quiet: bool = QuietOpt,
    ) -> None:
        """Perplexity = exp(mean token NLL) over non-overlapping windows of the test split."""
        check_output_file(json_out, "--json", ".json")
        setup(quiet)
        path, res = evaluate_model(model, text_file, seqlen, windows or None, batch_size, quiet)
        table("perplexity", ["model", "corpus", "windows x seqlen", "tokens scored", "ppl", "seconds"],
              [[str(path), str(text_file) if text_file else "wiki test", f"{res.windows} x {res.seqlen}",
                res.tokens, res.ppl, res.seconds]])
        if json_out:
            from ..files import write_json

            write_json(json_out, {"model": str(path), **res.to_dict()})
            console.print(f"wrote {json_out}")
