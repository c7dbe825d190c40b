"""``rankwise match``: permute MODEL_B into MODEL_A's basis (same function), for merging or comparing."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import QuietOpt, TextFileOpt, console, setup, table


def register(app: typer.Typer) -> None:
    @app.command("match")
    def match_cmd(
        model_a: str = typer.Argument(..., help="The reference model."),
        model_b: str = typer.Argument(..., help="The model to permute into MODEL_A's basis."),
        out: Path = typer.Option(..., "--out", help="Output directory: MODEL_B permuted (a plain HF model)."),
        method: str = typer.Option("weight", help="weight (weight matching) or activation (on calibration windows)."),
        windows: int = typer.Option(16, min=1, help="activation: calibration windows."),
        seqlen: int = typer.Option(256, min=2, help="activation: tokens per window."),
        text_file: Optional[Path] = TextFileOpt,
        seed: int = typer.Option(0, help="Seed of the window draw and of the sweep order."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
        quiet: bool = QuietOpt,
    ) -> None:
        """Permute MODEL_B's hidden units (residual stream, heads, FFN channels) into MODEL_A's basis by weight or
        activation matching; the function of MODEL_B is unchanged."""
        from ..errors import ConfigError
        from ..files import atomic_dir, check_new_output
        from ..merging.matching import match
        from ..models.loading import load_model

        if method not in ("weight", "activation"):
            raise ConfigError(f"unknown --method {method!r}; valid: weight, activation")
        check_new_output(out, overwrite)
        setup(quiet)
        a, tok, _ = load_model(model_a)
        b, _, _ = load_model(model_b)
        data = None
        if method == "activation":
            from ..calibration.corpus import load_corpus
            from ..calibration.sampling import calib_windows, tokenize

            data = calib_windows(tokenize(tok, load_corpus("calib", text_file)), windows, seqlen, seed)
        matched, res = match(a, b, data=data, method=method, seed=seed)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            matched.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        table("match", ["method", "permutations", "sweeps", "<A, B> before", "<A, P(B)> after"],
              [[res.method, len(res.perms), res.sweeps, res.objective_before, res.objective_after]])
        console.print(f"wrote {out}")
