"""``rankwise compress``: low-rank factorize a model's linear layers and save it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..calibration.sampling import DEFAULT_CALIB_WINDOWS, DEFAULT_EVAL_WINDOWS, DEFAULT_SEED, DEFAULT_SEQLEN
from ._common import ModelArg, QuietOpt, TextFileOpt, console, setup, table


def print_report(report, max_layers: int = 12) -> None:
    """Rich tables: the summary and the per-layer ranks."""
    table("compression", ["method", "refit", "mode", "ratio asked", "removed", "targeted params",
                          "model params", "damped layers", "seconds"],
          [[report.method, "lstsq" if report.refit else "no", report.mode, report.ratio,
            f"{report.achieved_ratio:.3f}",
            f"{report.targeted_params_before:,} -> {report.targeted_params_after:,}",
            f"{report.model_params_before:,} -> {report.model_params_after:,}",
            len(report.damped_layers), report.seconds]])
    rows = [[lr.name, f"{lr.shape[0]} x {lr.shape[1]}", "dense" if lr.rank is None else lr.rank,
             lr.params_before, lr.params_after] for lr in report.layers]
    if len(rows) > max_layers:
        rows = rows[:max_layers] + [[f"... {len(rows) - max_layers} more (see rankwise.json)", "", "", "", ""]]
    table("per-layer ranks", ["layer", "shape", "rank", "params before", "params after"], rows)
    if report.perplexity:
        p = report.perplexity
        table("perplexity", ["dense", "compressed", "windows x seqlen"],
              [[p.get("dense", "-"), p["compressed"], f"{p['windows']} x {p['seqlen']}"]])


def run_compress(model_arg, method, ratio, refit, targets, calib_windows, calib_seqlen, seed, text_file,
                 sequential, allocate, out, overwrite, export_dense_dir, do_eval, eval_windows, quiet,
                 eval_seqlen=DEFAULT_SEQLEN, allocate_options=None, low_memory=False):
    """The command's body (also used by ``rankwise demo``): returns ``(model, tokenizer, path, report)``."""
    from ..calibration.corpus import load_corpus
    from ..compression.pipeline import compress
    from ..compression.saving import export_dense, save_compressed
    from ..errors import OutputExistsError
    from ..evaluation.perplexity import perplexity
    from ..compression.allocate import get_allocator
    from ..compression.budget import check_ratio
    from ..compression.methods import get_method
    from ..models.loading import load_model

    get_method(method), check_ratio(ratio), get_allocator(allocate)  # fail before loading the model
    for d, flag in ((out, "--out"), (export_dense_dir, "--export-dense")):
        if d is not None and Path(d).exists() and not overwrite:
            raise OutputExistsError(f"output directory {d} already exists; choose another {flag} or pass --overwrite")
    calib = load_corpus("calib", text_file) if text_file else None
    if low_memory:  # writes --out block by block; the compressed model is loaded back only if needed
        from ..compression.lowmem import compress_low_memory
        from ..errors import ConfigError

        if out is None:
            raise ConfigError("--low-memory writes the model block by block and needs --out DIR")
        report = compress_low_memory(model_arg, out, method, ratio, calib=calib, targets=targets, refit=refit,
                                     allocate=allocate, calib_windows=calib_windows, calib_seqlen=calib_seqlen,
                                     seed=seed, progress=not quiet, allocate_options=allocate_options,
                                     overwrite=overwrite)
        model, tok, path = (load_model(out) if (do_eval or export_dense_dir is not None)
                            else (None, None, Path(out)))
    else:
        model, tok, path = load_model(model_arg)
        model, report = compress(model, method, ratio, calib=calib, tokenizer=tok, targets=targets, refit=refit,
                                 allocate=allocate, calib_windows=calib_windows, calib_seqlen=calib_seqlen,
                                 seed=seed, sequential=sequential, progress=not quiet,
                                 allocate_options=allocate_options)
    if do_eval:
        res = perplexity(model, tok, text=load_corpus("test", text_file), seqlen=eval_seqlen,
                         windows=eval_windows, progress=not quiet)
        report.perplexity = {"compressed": res.ppl, "windows": res.windows, "seqlen": res.seqlen,
                             "corpus": str(text_file) if text_file else "wiki test"}
    if out is not None and not low_memory:  # the low-memory path has written --out already
        save_compressed(model, tok, out, report, overwrite=overwrite,
                        extra={"source_model": str(path)})
        from ..compression.rankplot import write_rank_report

        write_rank_report(report, out)
    if export_dense_dir is not None:
        export_dense(model, tok, export_dense_dir, overwrite=overwrite)
    return model, tok, path, report


def register(app: typer.Typer) -> None:
    from ..compression.pipeline import DEFAULT_METHOD, DEFAULT_REFIT, DEFAULT_SEQUENTIAL

    @app.command("compress")
    def compress_cmd(
        model: Optional[str] = ModelArg,
        method: str = typer.Option(DEFAULT_METHOD, "--method", "-m",
                                   help="svd | asvd | fwsvd | svd-llm | svd-llm-v2."),
        ratio: float = typer.Option(0.4, "--ratio", "-r", help="Fraction of targeted linear parameters REMOVED, in (0, 1)."),
        refit: bool = typer.Option(DEFAULT_REFIT, "--refit/--no-refit",
                                   help="Closed-form least-squares refit of the left factor (lstsq)."),
        targets: Optional[str] = typer.Option(None, "--targets", help="Comma-separated layer names or regexes (default: q,k,v,o,gate,up,down; GPT-2 c_attn,c_proj,c_fc)."),
        calib_windows: int = typer.Option(DEFAULT_CALIB_WINDOWS, help="Calibration windows."),
        calib_seqlen: int = typer.Option(DEFAULT_SEQLEN, help="Tokens per calibration window."),
        seed: int = typer.Option(DEFAULT_SEED, help="Seed of the calibration window starts."),
        text_file: Optional[Path] = TextFileOpt,
        sequential: bool = typer.Option(DEFAULT_SEQUENTIAL, "--sequential/--one-shot",
                                        help="Calibrate block by block on the compressed prefix, or all at once on the dense model."),
        allocate: str = typer.Option("uniform", "--allocate", help="Rank allocator: uniform | spectrum | spectrum-band | sensitivity-band (best measured at 40%, ~6x slower) | sensitivity (see rankwise.compression.allocate.ALLOCATORS)."),
        min_rank: int = typer.Option(1, "--min-rank", help="Smallest rank a factorized layer may keep (spectrum/sensitivity)."),
        speed_aware: bool = typer.Option(False, "--speed-aware/--no-speed-aware",
                                         help="Keep layers dense whose factorized form is not faster (measured, cached per machine: the first run measures each distinct layer shape, ~1-2 s per shape on CPU); the allocator moves their budget."),
        speed_profile: Optional[Path] = typer.Option(None, "--speed-profile", help="Speed profile JSON to use instead of the machine cache (re-measured if from another machine)."),
        low_memory: bool = typer.Option(False, "--low-memory", help="Compress block by block from the safetensors files (peak RSS ~ one block)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory to write the compressed model to."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out (still atomic)."),
        export_dense_dir: Optional[Path] = typer.Option(None, "--export-dense",
                                                        help="Also write a plain transformers checkpoint (factors multiplied back)."),
        do_eval: bool = typer.Option(False, "--eval/--no-eval", help="Measure the compressed model's perplexity."),
        eval_windows: int = typer.Option(DEFAULT_EVAL_WINDOWS, help="Windows for --eval."),
        eval_seqlen: int = typer.Option(DEFAULT_SEQLEN, help="Tokens per window for --eval."),
        quiet: bool = QuietOpt,
    ) -> None:
        """Replace the linear layers by low-rank factors fitted on calibration activations."""
        setup(quiet)
        _, _, _, report = run_compress(model, method, ratio, refit, targets, calib_windows, calib_seqlen, seed,
                                       text_file, sequential, allocate, out, overwrite, export_dense_dir,
                                       do_eval, eval_windows, quiet, eval_seqlen,
                                       allocate_options={"min_rank": min_rank, "speed_aware": speed_aware,
                                                         "speed_profile": None if speed_profile is None
                                                         else str(speed_profile)},
                                       low_memory=low_memory)
        if not quiet:
            print_report(report)
        if out is not None:
            console.print(f"wrote {out}  (evaluate it with: rankwise eval {out})")
        if export_dense_dir is not None:
            console.print(f"wrote dense checkpoint {export_dense_dir}")
