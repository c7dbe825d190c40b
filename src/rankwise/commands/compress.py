"""``rankwise compress``: replace a model's linear layers by fitted structures and save it."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import typer

from ._common import ModelArg, QuietOpt, TextFileOpt, console, setup, table

DEFAULT_CALIB_WINDOWS, DEFAULT_EVAL_WINDOWS, DEFAULT_SEQLEN, DEFAULT_SEED = 64, 64, 512, 3


def print_report(report, max_layers: int = 12) -> None:
    """Rich tables: the summary and the per-layer structures."""
    budget = (f"ratio {report.budget['ratio']:g}" if "ratio" in report.budget
              else f"{report.budget['bits_per_weight']:g} bits/weight" if "bits_per_weight" in report.budget
              else f"{report.budget.get('bits')}-bit codes")
    table("compression", ["structure", "method", "budget", "allocate", "mode", "refit", "removed", "bits/weight",
                          "targeted values", "model params", "seconds"],
          [[report.structure, report.method, budget, report.allocate, f"{report.mode}, {report.granularity}",
            "yes" if report.refit else "no", f"{report.achieved_ratio:.3f}", f"{report.bits_per_weight:.3f}",
            f"{report.targeted_params_before:,} -> {report.targeted_params_after:,}",
            f"{report.model_params_before:,} -> {report.model_params_after:,}", report.seconds]])
    rows = [[lr.name, f"{lr.shape[0]} x {lr.shape[1]}", lr.kind or "dense",
             ", ".join(f"{k}={v}" for k, v in (lr.spec or {}).items()) + (f" ({lr.note})" if lr.note else ""),
             lr.params_after, lr.bytes_after]
            for lr in report.layers]
    if len(rows) > max_layers:
        rows = rows[:max_layers] + [[f"... {len(rows) - max_layers} more (see rankwise.json)", "", "", "", "", ""]]
    table("per layer", ["layer", "shape", "structure", "spec", "values", "bytes"], rows)
    mt = getattr(report, "model_transform", None)
    if mt:
        console.print(f"rotated the residual stream ({mt.get('kind')}, seed {mt.get('seed')}); "
                      + (f"the head was untied from the embeddings: +{mt['untied_params']:,} stored values "
                         "(in 'model params', not in bits/weight)" if mt.get("untied") else "the head stays tied"))
    if report.pruning:
        from ..compression.pruning import pruning_summary

        console.print(f"pruned: {pruning_summary(report.pruning)} (rankwise.json 'pruning' says what and why)")
    for line in allocation_notes(report):
        console.print(line)
    if report.perplexity:
        p = report.perplexity
        healed = "before_healing" in p
        table("perplexity", ["dense", *(["before healing", "healed"] if healed else ["compressed"]),
                             "windows x seqlen", "text"],
              [[p.get("dense", "-"), *([p["before_healing"]] if healed else []), p["compressed"],
                f"{p['windows']} x {p['seqlen']}", p.get("corpus", "")]])


def allocation_notes(report) -> list[str]:
    """One line each: how an allocation was validated (byte budgets, ``--allocate search``), and why a plan
    leaves > 5 % of the budget unused."""
    info = report.allocation or {}
    out = []
    val = info.get("validation")
    if val and "nll" in val:
        nll = ", ".join(f"{k} {v:.4f}" for k, v in val["nll"].items())
        out.append(f"validated on {val['heldout_windows']} held-out calibration windows (mean NLL {nll}): "
                   f"kept the {val['chosen']} plan" + (f" -- {val['note']}" if val.get("note") else ""))
    elif val and val.get("skipped"):
        out.append(f"validation skipped: {val['skipped']}")
    use = info.get("budget")
    if use and use.get("reason"):
        out.append(f"[yellow]warning:[/yellow] the plan leaves {100 * use['unused_fraction']:.1f}% of the byte "
                   f"budget unused ({use['bits_per_weight']:.3f} of {report.budget['bits_per_weight']:g} bits per "
                   f"weight): {use['reason']}")
    return out


def parse_sets(pairs: list[str] | None) -> dict:
    """``["rank=16", "pattern=2:4"]`` -> ``{"rank": 16, "pattern": "2:4"}`` (JSON values where they parse)."""
    import json

    from ..errors import ConfigError

    out = {}
    for p in pairs or []:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE, got {p!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def texts(text_file, calib_file, eval_file):
    """``(calibration text or None, evaluation text or None, evaluation label)``: ``--text-file`` is split
    (its last 10% is held out for evaluation); ``--calib-file`` / ``--eval-file`` set each side."""
    from ..calibration.corpus import load_corpus, split_text
    from ..errors import ConfigError

    if text_file is not None and (calib_file is not None or eval_file is not None):
        raise ConfigError("pass either --text-file (split into calibration and a held-out tail) or "
                          "--calib-file / --eval-file, not both")
    if text_file is not None:
        head, tail = split_text(load_corpus("calib", text_file))
        return head, tail, f"{text_file} (last 10%)"
    calib = load_corpus("calib", calib_file) if calib_file is not None else None
    ev = load_corpus("test", eval_file) if eval_file is not None else None
    return calib, ev, str(eval_file) if eval_file is not None else "wiki test"


def checkpoint_dtype(model_arg):
    """The floating dtype the checkpoint stores (safetensors headers); float32 when unknown."""
    import torch

    from ..errors import RankwiseError
    from ..models.registry import resolve_model
    from ..models.streaming import index_dtypes, weight_index

    try:
        dtypes = index_dtypes(weight_index(Path(resolve_model(model_arg))))
    except RankwiseError:
        return torch.float32
    return next((d for d in dtypes.values() if d.is_floating_point), torch.float32)


def run_compress(model_arg=None, *, structure=None, ratio=None, bits_per_weight=None, method=None, options=None,
                 targets=None, allocate=None, allocate_options=None, engine=None, calib_options=None,
                 text_file=None, calib_file=None, eval_file=None, low_memory=False, out=None, overwrite=False,
                 export_dense_dir=None, do_eval=False, eval_windows=DEFAULT_EVAL_WINDOWS,
                 eval_seqlen=DEFAULT_SEQLEN, heal=None, quiet=False, dtype=None, export_to=None):
    """The command's body (also used by ``rankwise demo``): returns ``(model, tokenizer, path, report)``.

    ``dtype``: ``None``/``"auto"`` (the checkpoint's), ``float32``, ``bfloat16``, ``float16``. In a
    distributed run (every rank calls this) only rank 0 checks and writes the outputs, evaluates, heals
    and exports; bad input fails on every rank with the same message. ``export_to``: ``(format, dir)`` also
    writes the compressed model in that export format (``rankwise export``), from ``out`` when the model
    was written block by block (``low_memory``), else from memory."""
    from ..api import compress
    from ..compression.compress import DEFAULT_STRUCTURE, build_config, calibration_windows, compress_low_memory
    from ..compression.methods.base import STRUCTURES
    from ..compression.pruning import is_pruning
    from ..compression.engine.device import parse_dtype
    from ..compression.engine.distributed import Comm
    from ..healing import HealOptions, heal as heal_model
    from ..options import make_options
    from ..compression.saving import record_perplexity, save_compressed
    from ..errors import ConfigError
    from ..evaluation.perplexity import perplexity
    from ..files import check_new_output
    from ..models.loading import load_model
    from ..models.saved import export_dense

    comm = Comm.current()
    kw = dict(method=method, options=options, targets=targets, allocate=allocate,
              allocate_options=allocate_options, engine=engine, calib_options=calib_options)

    def preflight():
        _, meth = build_config(structure, ratio, bits_per_weight, **kw)  # every option checked before model work
        why = getattr(meth, "plain_output", lambda: None)()
        if why and (out is not None or export_dense_dir is not None):
            raise ConfigError(why)
        healing = make_options(HealOptions, heal, {}, "healing")
        want = parse_dtype(dtype)
        if low_memory and out is None:
            raise ConfigError("--low-memory writes the model block by block and needs --out DIR")
        if comm.is_main:
            check_new_output(out, overwrite, "--out")
            check_new_output(export_dense_dir, overwrite, "--export-dense")
            if export_to is not None:
                from ..export import FORMATS

                FORMATS.get(export_to[0])
                check_new_output(export_to[1], overwrite, "--export")
        return healing, want, texts(text_file, calib_file, eval_file)

    heal, want, (calib, eval_text, eval_label) = comm.agreed(preflight)
    def heal_and_measure(model, tok, report, teacher=None):
        """Heal in memory on the calibration windows (the perplexity before and after with --eval); a pruned
        model is distilled from ``teacher``, the dense model."""
        co = dict(calib_options or {})
        windows, _ = calibration_windows(model, calib, tok, co.get("windows", DEFAULT_CALIB_WINDOWS),
                                         co.get("seqlen", DEFAULT_SEQLEN), co.get("seed", DEFAULT_SEED))
        before = measure(model, tok) if do_eval else None
        report.healing = heal_model(model, windows, heal, progress=not quiet, teacher=teacher)
        return before

    def measure(model, tok):
        from ..calibration.corpus import load_corpus

        return perplexity(model, tok, text=eval_text if eval_text is not None else load_corpus("test"),
                          seqlen=eval_seqlen, windows=eval_windows, progress=not quiet)

    before = None
    if low_memory:  # writes --out block by block; the compressed model is loaded back only if needed
        from ..compression.engine.memory import mmap_large_allocations

        mmap_large_allocations()  # this process is ours: keep freed buffers from fragmenting the heap
        report = compress_low_memory(model_arg, out, structure, ratio, bits_per_weight, calib=calib,
                                     progress=not quiet, overwrite=overwrite, dtype=want, **kw)
        if not comm.is_main:
            return None, None, Path(out), report
        model, tok, path = (load_model(out) if (do_eval or export_dense_dir is not None or heal.steps)
                            else (None, None, Path(out)))
        if heal.steps:  # the compressed model (smaller than the original) is healed in memory, then rewritten
            before = heal_and_measure(model, tok, report)
    else:
        model, tok, path = comm.agreed(lambda: load_model(model_arg, dtype=want or checkpoint_dtype(model_arg)))
        teacher = None  # pruned models heal by distillation from the dense model
        if heal.steps and comm.is_main and is_pruning(STRUCTURES.get(structure or DEFAULT_STRUCTURE)):
            import copy

            teacher = copy.deepcopy(model)
        model, report = compress(model, structure, ratio, bits_per_weight=bits_per_weight, calib=calib, tokenizer=tok,
                                 progress=not quiet, inplace=True, **kw)
        if not comm.is_main:
            return model, tok, path, report
        if heal.steps:
            before = heal_and_measure(model, tok, report, teacher)
            teacher = None
    if do_eval:
        res = measure(model, tok)
        report.perplexity = {"compressed": res.ppl, "windows": res.windows, "seqlen": res.seqlen,
                             "corpus": eval_label}
        if before is not None:
            report.perplexity["before_healing"] = before.ppl
    if out is not None and (not low_memory or heal.steps):  # low-memory wrote --out already, unhealed
        save_compressed(model, tok, out, report, overwrite=overwrite or low_memory,
                        extra={"source_model": str(model_arg if low_memory else path)})
    elif out is not None and do_eval:  # ... before it was evaluated
        record_perplexity(out, report)
    if export_dense_dir is not None:
        export_dense(model, tok, export_dense_dir, overwrite=overwrite)
    if export_to is not None:
        from ..export import export

        src = out if (low_memory and not heal.steps) else model
        report.export = export(src, export_to[0], export_to[1], tokenizer=tok, overwrite=overwrite, progress=not quiet)
    return model, tok, path, report


def register(app: typer.Typer) -> None:
    @app.command("compress")
    def compress_cmd(
        model: Optional[str] = ModelArg,
        structure: Optional[str] = typer.Option(None, "--structure", "-s",
                                                help="lowrank | rtn | gptq | lorc | lq | mixed | lowrank-sparse | "
                                                     "prune | monarch | blockdiag-lowrank | kronecker | shared-basis "
                                                     "(rankwise.compression.methods); structured pruning to a smaller "
                                                     "plain model: depth | width | slice. Default: lowrank; mixed "
                                                     "with --bits-per-weight; gptq with --bits alone."),
        method: Optional[str] = typer.Option(None, "--method", "-m",
                                             help="Low-rank objective: svd | asvd | fwsvd | svd-llm (default) | "
                                                  "svd-llm-v2."),
        whitening: Optional[str] = typer.Option(None, "--whitening",
                                                help="svd-llm whitening: cholesky (default) | eigh."),
        ratio: Optional[float] = typer.Option(None, "--ratio", "-r",
                                              help="Fraction of the targeted weight values REMOVED, in (0, 1) "
                                                   "(parameter-budget structures; default 0.4)."),
        bits_per_weight: Optional[float] = typer.Option(None, "--bits-per-weight", "-b",
                                                        help="Stored bits per targeted weight, all overhead counted "
                                                             "(byte-budget structures: mixed, rtn, gptq, lorc, lq): "
                                                             "widths, group sizes (ranks, dense) chosen per layer."),
        bits: Optional[int] = typer.Option(None, "--bits",
                                           help="Code width of every quantized layer, 2..8 (as in other tools; "
                                                "scales and minimums come on top). With --bits-per-weight: the "
                                                "width is fixed and the group sizes are chosen."),
        group_size: Optional[int] = typer.Option(None, "--group-size",
                                                 help="Quantization group size along the input (default: chosen per "
                                                      "layer under --bits-per-weight, else 128)."),
        rotate: Optional[bool] = typer.Option(None, "--rotate/--no-rotate",
                                              help="rtn | gptq | lorc | lq: fold the norms and rotate the residual "
                                                   "stream by a random Hadamard matrix before quantizing (fused into "
                                                   "the weights; a tied head is untied)."),
        sets: Optional[List[str]] = typer.Option(None, "--set", help="Structure option KEY=VALUE (repeatable)."),
        targets: Optional[str] = typer.Option(None, "--targets",
                                              help="Comma-separated layer names or regexes (default: every linear "
                                                   "layer inside the model's repeated blocks)."),
        calib_windows: int = typer.Option(DEFAULT_CALIB_WINDOWS, help="Calibration windows."),
        calib_seqlen: int = typer.Option(DEFAULT_SEQLEN, help="Tokens per calibration window."),
        seed: int = typer.Option(DEFAULT_SEED, help="Seed of the calibration window starts."),
        text_file: Optional[Path] = TextFileOpt,
        calib_file: Optional[Path] = typer.Option(None, "--calib-file", help="Text to calibrate on (whole file)."),
        eval_file: Optional[Path] = typer.Option(None, "--eval-file", help="Text to evaluate --eval on (whole file)."),
        mode: Optional[str] = typer.Option(None, "--mode",
                                           help="sequential (default: calibrate each block on the compressed "
                                                "prefix) | one-shot."),
        granularity: Optional[str] = typer.Option(None, "--granularity",
                                                  help="block | subgroup (q/k/v -> o -> gate/up -> down, each on the "
                                                       "already compressed ones); default: the best measured."),
        refit: Optional[bool] = typer.Option(None, "--refit/--no-refit",
                                             help="Fit the dense model's outputs from the compressed inputs "
                                                  "(sequential); default: the best measured."),
        refit_ridge: Optional[float] = typer.Option(None, "--refit-ridge",
                                                    help="Relative ridge toward W for --refit (default: chosen per "
                                                         "group on held-out calibration windows; 1.0 for "
                                                         "--structure width)."),
        allocate: Optional[str] = typer.Option(None, "--allocate",
                                               help="Rank allocator: uniform | spectrum | spectrum-typed | "
                                                    "spectrum-band | svd-llm-v2 | sensitivity | sensitivity-band | "
                                                    "search (uniform and rank profiles, each compressed and scored "
                                                    "on held-out windows: 4 passes) (default: uniform; svd-llm-v2 "
                                                    "with --method svd-llm-v2); byte "
                                                    "budgets: bits-greedy (default: widths, group sizes, ranks or "
                                                    "dense per layer) | uniform (one setting for every layer)."),
        min_rank: int = typer.Option(1, "--min-rank", help="Smallest rank a factorized layer may keep."),
        allocate_objective: str = typer.Option("auto", "--allocate-objective",
                                               help="Byte budgets: minimize the summed relative whitened errors "
                                                    "(relative) or the loss increase they predict, each layer's "
                                                    "error weighted by its output-gradient energy (loss: one "
                                                    "backward pass of the dense model); auto: both plans, "
                                                    "validated with uniform on held-out windows."),
        validate: bool = typer.Option(True, "--validate/--no-validate",
                                      help="Byte budgets: keep the allocated plan only if it beats uniform GPTQ on "
                                           "held-out calibration windows end to end (default on; needs the model "
                                           "in memory)."),
        speed_aware: bool = typer.Option(False, "--speed-aware/--no-speed-aware",
                                         help="Keep layers dense whose factorized form is not faster (measured, "
                                              "cached per machine); the allocator moves their budget."),
        speed_profile: Optional[Path] = typer.Option(None, "--speed-profile",
                                                     help="Speed profile JSON instead of the machine cache."),
        low_memory: bool = typer.Option(False, "--low-memory",
                                        help="Compress block by block from the safetensors files (one block "
                                        "resident; the cached calibration activations go to a temporary "
                                        "directory beside --out). Not with --method fwsvd or --allocate "
                                        "sensitivity / sensitivity-band / search, which need the whole model."),
        device: str = typer.Option("cpu", "--device",
                                   help="Compute device: cpu | cuda | cuda:N (blocks visit it one at a time; under "
                                        "torchrun, cuda = each rank's GPU)."),
        dtype: str = typer.Option("auto", "--dtype",
                                  help="Compute and storage dtype: auto (the checkpoint's) | float32 | bfloat16 | "
                                       "float16."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory to write the compressed model to."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out (still atomic)."),
        export_dense_dir: Optional[Path] = typer.Option(None, "--export-dense",
                                                        help="Also write a plain transformers checkpoint."),
        export_to: Optional[Tuple[str, Path]] = typer.Option(None, "--export", metavar="FORMAT DIR",
                                                   help="Also write the compressed model in an export format "
                                                        "(as rankwise export IN --format FORMAT --out DIR)."),
        do_eval: bool = typer.Option(False, "--eval/--no-eval",
                                     help="Measure the compressed model's perplexity (on --eval-file, the held-out "
                                          "last 10% of --text-file, or the default test split)."),
        eval_windows: int = typer.Option(DEFAULT_EVAL_WINDOWS, help="Windows for --eval."),
        eval_seqlen: int = typer.Option(DEFAULT_SEQLEN, help="Tokens per window for --eval."),
        heal_steps: int = typer.Option(0, "--heal-steps",
                                       help="Heal for N steps on the calibration windows (same size, same format): "
                                            "low-rank factors get LoRA corrections merged back; quantized layers "
                                            "train their scales and minimums (and lorc factors), codes frozen; "
                                            "pruned models (depth, width, slice) are distilled from the dense model "
                                            "(KL on the logits, LoRA corrections of every block linear). 0 = off."),
        heal_rank: int = typer.Option(8, "--heal-rank", help="Rank of each LoRA healing correction."),
        heal_lr: Optional[float] = typer.Option(None, "--heal-lr",
                                                help="Healing learning rate (default: 5e-4 for LoRA corrections, "
                                                     "1e-3 relative to each group's step for quantized layers)."),
        quiet: bool = QuietOpt,
    ) -> None:
        """Replace the linear layers by structures fitted on calibration activations.

        Runs data and layer parallel under ``torchrun --nproc-per-node N -m rankwise compress ...``
        (gloo with --device cpu, nccl with --device cuda); rank 0 writes --out."""
        import contextlib

        from ..compression.engine.distributed import Comm, init_from_env, leave, shutdown, sigterm_as_exit

        def run_cmd(main: bool) -> None:
            nonlocal quiet
            quiet = quiet or not main  # one rank reports
            setup(quiet)
            options = parse_sets(sets)
            if rotate is not None:
                options["rotate"] = "stream" if rotate else None
            for key, value in (("whitening", whitening), ("group_size", group_size), ("bits", bits)):
                if value is not None:
                    if key in options and options[key] != value:
                        from ..errors import ConfigError

                        raise ConfigError(f"{key} given twice: --{key.replace('_', '-')} {value} and --set "
                                          f"{key}={options[key]}; keep one")
                    options[key] = value
            _, _, _, report = run_compress(
                model, structure=structure, ratio=ratio, bits_per_weight=bits_per_weight, method=method,
                options=options, targets=targets, allocate=allocate,
                allocate_options={"min_rank": min_rank, "speed_aware": speed_aware, "validate": validate,
                                  "objective": allocate_objective,
                                  "speed_profile": None if speed_profile is None else str(speed_profile)},
                engine={k: v for k, v in (("mode", mode), ("granularity", granularity), ("refit", refit),
                                          ("refit_ridge", refit_ridge), ("device", device)) if v is not None},
                calib_options={"windows": calib_windows, "seqlen": calib_seqlen, "seed": seed},
                text_file=text_file, calib_file=calib_file, eval_file=eval_file, low_memory=low_memory, out=out,
                overwrite=overwrite, export_dense_dir=export_dense_dir, do_eval=do_eval, eval_windows=eval_windows,
                eval_seqlen=eval_seqlen, heal={"steps": heal_steps, "rank": heal_rank, "lr": heal_lr}, quiet=quiet,
                dtype=dtype, export_to=export_to or None)
            if not main:
                return
            if not quiet:
                print_report(report)
            if out is not None:
                console.print(f"wrote {out}  (evaluate it with: rankwise eval {out})")
            if export_dense_dir is not None:
                console.print(f"wrote dense checkpoint {export_dense_dir}")
            if getattr(report, "export", None) is not None:
                from .export import print_result

                print_result(report.export)

        started = init_from_env(device)  # under torchrun: the process group, from its environment
        done = False
        try:
            with sigterm_as_exit() if started else contextlib.nullcontext():
                run_cmd(Comm.current().is_main)
            done = True
        finally:
            if started:
                shutdown(sync=done)
        if started:
            leave(0)  # a run that succeeded on every rank (a failure raises above and exits 2 as usual)
