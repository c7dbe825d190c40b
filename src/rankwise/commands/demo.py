"""``rankwise demo``: compress the bundled default model at 40% removed with the best measured
method, evaluate dense and compressed with the default protocol, and write a report."""
from __future__ import annotations

import time
from pathlib import Path

import typer

from ._common import QuietOpt, console, setup, table
from .compress import DEFAULT_CALIB_WINDOWS, DEFAULT_EVAL_WINDOWS, DEFAULT_SEQLEN


def _report_md(model_name: str, dense, comp, rep, compress_seconds: float, out: Path) -> str:
    refit = "yes" if rep.refit else "no"
    return (
        "# rankwise demo\n\n"
        f"Model: `{model_name}`. Structure `{rep.structure}`, method `{rep.method}` (refit: {refit}, {rep.mode} "
        f"calibration at {rep.granularity} granularity on "
        f"{rep.calibration['windows']} x {rep.calibration['seqlen']} tokens of the wiki calib split, "
        f"seed {rep.calibration['seed']}), uniform ranks, {rep.ratio:.0%} of the targeted linear parameters "
        f"removed (achieved {rep.achieved_ratio:.1%}).\n\n"
        f"Perplexity: first {dense.windows} non-overlapping {dense.seqlen}-token windows of the wiki test split.\n\n"
        "| model | params (all) | targeted linear params | perplexity | eval seconds |\n|---|---|---|---|---|\n"
        f"| dense | {rep.model_params_before:,} | {rep.targeted_params_before:,} | {dense.ppl:.3f} | {dense.seconds:.0f} |\n"
        f"| compressed | {rep.model_params_after:,} | {rep.targeted_params_after:,} | {comp.ppl:.3f} | {comp.seconds:.0f} |\n\n"
        f"Compression took {compress_seconds:.0f} s. The compressed model is in `{out / 'model'}` "
        f"(`rankwise eval {out / 'model'}` reloads it).\n"
    )


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        out: Path = typer.Option(Path("demo-out"), help="Where to write report.md, results.json and the model."),
        ratio: float = typer.Option(0.4, help="Fraction of targeted linear parameters removed."),
        windows: int = typer.Option(DEFAULT_EVAL_WINDOWS, help="Evaluation windows (protocol: 64)."),
        calib_windows: int = typer.Option(DEFAULT_CALIB_WINDOWS, help="Calibration windows (protocol: 64)."),
        quiet: bool = QuietOpt,
    ) -> None:
        """Compress the default model (best method, 40% removed), evaluate dense vs compressed, write a report."""
        from ..files import write_json, write_text
        from ..calibration.corpus import load_corpus
        from ..compression.compress import build_config, compress
        from ..compression.saving import save_compressed
        from ..evaluation.perplexity import perplexity
        from ..models.loading import load_model

        setup(quiet)
        build_config(None, ratio, calib_options={"windows": calib_windows})  # bad options fail before any work
        model, tok, path = load_model(None)
        test = load_corpus("test")
        dense = perplexity(model, tok, text=test, seqlen=DEFAULT_SEQLEN, windows=windows, progress=not quiet)
        t0 = time.perf_counter()
        model, rep = compress(model, ratio=ratio, tokenizer=tok, calib_options={"windows": calib_windows},
                              progress=not quiet)
        secs = time.perf_counter() - t0
        comp = perplexity(model, tok, text=test, seqlen=DEFAULT_SEQLEN, windows=windows, progress=not quiet)
        rep.perplexity = {"dense": dense.ppl, "compressed": comp.ppl, "windows": comp.windows, "seqlen": comp.seqlen,
                          "corpus": "wiki test"}
        table("rankwise demo", ["model", "method", "ratio removed", "params", "ppl", "seconds"], [
            ["dense", "-", "-", rep.model_params_before, dense.ppl, dense.seconds],
            ["compressed", f"{rep.structure} {rep.method}{' + refit' if rep.refit else ''} ({rep.mode}, {rep.granularity})",
             f"{rep.achieved_ratio:.3f}", rep.model_params_after, comp.ppl, secs + comp.seconds],
        ])
        out.mkdir(parents=True, exist_ok=True)
        save_compressed(model, tok, out / "model", rep, overwrite=True, extra={"source_model": str(path)})
        write_json(out / "results.json", {"model": str(path), "dense": dense.to_dict(), "compressed": comp.to_dict(),
                                          "compress_seconds": secs, "report": rep.to_dict()})
        write_text(out / "report.md", _report_md(path.name, dense, comp, rep, secs, out))
        console.print(f"wrote {out / 'report.md'}")
