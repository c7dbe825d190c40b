"""``rankwise adapt``: attach initialized low-rank adapters, train them, save them (PEFT or rankwise format)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import ModelArg, QuietOpt, TextFileOpt, console, setup, table


def run_adapt(model_arg, init, rank, alpha, rslora, targets, steps, lr, batch_size, seqlen, grad_accum, warmup,
              eval_every, eval_windows, text_file, calib_windows, seed, svd, bf16, out, fmt, peft_form, merge,
              overwrite, quiet, quant_bits=None, quant_group_size=None, quant_iters=None):
    import torch

    from ..adaptation.attach import adapt, count_trainable
    from ..adaptation.inits import get_init
    from ..adaptation.saving import peft_inits, save_merged, save_peft, save_rankwise
    from ..adaptation.train import TrainConfig, plot_losses, train
    from ..calibration.corpus import load_corpus
    from ..calibration.sampling import calib_windows as sample_windows, check_seqlen, tokenize
    from ..errors import ConfigError, OutputExistsError
    from ..files import write_json
    from ..models.loading import load_model
    from ..structures.lowrank import LowRankLinear

    spec = get_init(init)  # unknown init -> error listing the valid ones, before any loading
    init_options = _init_options(spec, {"--svd": svd, "--quant-bits": quant_bits,
                                        "--quant-group-size": quant_group_size, "--quant-iters": quant_iters})
    if alpha is not None and not alpha > 0:
        raise ConfigError(f"--alpha must be positive (the adapter scale is alpha / r), got {alpha}; omit it for alpha = r")
    if fmt not in ("auto", "peft", "rankwise"):
        raise ConfigError(f"unknown --format {fmt!r}; use auto, peft or rankwise")
    if Path(out).exists() and not overwrite:
        raise OutputExistsError(f"output directory {out} already exists; choose another --out or pass --overwrite")
    model, tok, path = load_model(model_arg)
    check_seqlen(model, seqlen)
    train_ids = tokenize(tok, load_corpus("calib", text_file))
    test_ids = tokenize(tok, load_corpus("test"))
    n = steps * batch_size * grad_accum
    windows = sample_windows(train_ids, n=n, seqlen=seqlen, seed=seed)
    calib = sample_windows(train_ids, n=calib_windows, seqlen=seqlen, seed=seed + 1) if spec.needs != "none" else None
    if spec.quantized:
        peft_form = "residual"  # the only exact PEFT form on a quantized base (adaptation.saving)
    adapt(model, init, rank=rank, alpha=alpha, targets=targets, calib=calib, rslora=rslora, seed=seed,
          progress=not quiet, **init_options)
    model._rankwise_adapt["base_model"] = str(path)
    compressed = any(isinstance(m, LowRankLinear) for m in model.modules())
    if fmt == "auto":
        fmt = "peft" if init in peft_inits() and not compressed else "rankwise"
    if fmt == "peft" and not merge:
        from ..adaptation.saving import peft_state

        peft_state(model, peft_form)  # fail before training when PEFT cannot represent the result
    cfg = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, warmup=warmup,
                      eval_every=eval_every, eval_windows=eval_windows, eval_seqlen=min(seqlen * 2, 512),
                      bf16=bf16, seed=seed)
    if bf16:
        model.to(torch.bfloat16)
        for a in model.modules():
            if hasattr(a, "adapter_state"):
                for p in a.parameters(recurse=False):
                    p.data = p.data.float()
                for name, b in list(a.named_buffers(recurse=False)):
                    setattr(a, name, b.float())
    res = train(model, windows, cfg, eval_ids=test_ids, progress=not quiet)
    log = {"model": str(path), "init": init, "rank": rank, "alpha": alpha, "rslora": rslora, "format": fmt,
           "merged": merge, "trainable_params": count_trainable(model), "config": cfg.__dict__, **res.to_dict()}

    def extra(d: Path) -> None:
        write_json(d / "train_log.json", log)
        plot_losses({init: res.losses}, d / "loss.png", title=f"rankwise adapt: {init}, rank {rank}")

    if merge:
        save_merged(model, out, tok, overwrite=overwrite, extra=extra)
    elif fmt == "peft":
        save_peft(model, out, form=peft_form, tokenizer=tok, overwrite=overwrite, extra=extra)
    else:
        save_rankwise(model, out, overwrite=overwrite, extra=extra)
    return log, res


#: CLI flag -> the init option it sets (each init takes the flags of its ``Options`` fields).
INIT_FLAGS = {"--svd": "svd", "--quant-bits": "bits", "--quant-group-size": "group_size", "--quant-iters": "iters"}


def _init_options(spec, given: dict) -> dict:
    """The init options from the flags the user set (``None`` = not set); a flag the init does not take is a
    :class:`ConfigError`; the values are validated by the init's ``Options`` before anything is loaded."""
    from ..errors import ConfigError

    fields = set(spec.option_names())
    set_flags = {flag: v for flag, v in given.items() if v is not None}
    bad = [flag for flag in set_flags if INIT_FLAGS[flag] not in fields]
    if bad:
        takes = [flag for flag, key in INIT_FLAGS.items() if key in fields]
        what = f"its flags: {', '.join(takes)}" if takes else f"it takes none of {', '.join(INIT_FLAGS)}"
        raise ConfigError(f"{', '.join(bad)} does not apply to --init {spec.name} ({what}); drop {', '.join(bad)}")
    options = {INIT_FLAGS[flag]: v for flag, v in set_flags.items()}
    spec.build_options(options)
    return options


def register(app: typer.Typer) -> None:
    @app.command("adapt")
    def adapt_cmd(
        model: Optional[str] = ModelArg,
        init: str = typer.Option("pissa", help="Initialization: lora, pissa, milora, olora, eva, lora-ga, lora-sb, "
                                               "nlora, nlora-inttune, loldu, salt, singlora; on a quantized base: "
                                               "lq-lora, loftq."),
        rank: int = typer.Option(16, min=1, help="Adapter rank r (EVA: average rank; budget r x layers)."),
        alpha: Optional[float] = typer.Option(None, help="LoRA alpha; scaling = alpha / r (default alpha = r)."),
        rslora: bool = typer.Option(False, "--rslora", help="Scaling alpha / sqrt(r)."),
        targets: Optional[str] = typer.Option(None, help="Comma-separated layer names or regexes (default: all "
                                                         "attention and MLP projections)."),
        steps: int = typer.Option(100, min=1, help="Optimizer steps."),
        lr: float = typer.Option(2e-4, help="Peak learning rate (AdamW)."),
        batch_size: int = typer.Option(2, min=1, help="Windows per micro-batch."),
        seqlen: int = typer.Option(256, min=2, help="Tokens per training window."),
        grad_accum: int = typer.Option(1, min=1, help="Micro-batches per optimizer step."),
        warmup: int = typer.Option(10, min=0, help="Linear warmup steps (then cosine decay)."),
        eval_every: int = typer.Option(0, min=0, help="Evaluate test perplexity every K steps (0: only at the end)."),
        eval_windows: int = typer.Option(4, min=1, help="Test windows per evaluation."),
        text_file: Optional[Path] = TextFileOpt,
        calib_windows: int = typer.Option(8, min=1, help="Calibration windows for eva / lora-ga / lora-sb."),
        seed: int = typer.Option(0, help="Seed for windows, batch order and random inits."),
        svd: Optional[str] = typer.Option(None, help="SVD for pissa / salt: exact or randomized (default exact)."),
        bf16: bool = typer.Option(False, "--bf16", help="Base model in bfloat16 (adapters stay float32)."),
        out: Path = typer.Option(..., "--out", help="Output directory."),
        fmt: str = typer.Option("auto", "--format", help="auto (PEFT when possible), peft or rankwise."),
        peft_form: str = typer.Option("original", help="PiSSA-like inits: 'original' (converted LoRA of rank 2r on "
                                                       "the unmodified base) or 'residual' (+ residual_base/); "
                                                       "lq-lora / loftq always 'residual' (de-quantized base)."),
        merge: bool = typer.Option(False, "--merge", help="Save the merged dense checkpoint instead of the adapter."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
        quant_bits: Optional[int] = typer.Option(None, "--quant-bits", help="lq-lora / loftq: code width of the "
                                                                            "frozen base, 2..8 (default 4)."),
        quant_group_size: Optional[int] = typer.Option(None, "--quant-group-size",
                                                       help="lq-lora / loftq: quantization group size (default 64)."),
        quant_iters: Optional[int] = typer.Option(None, "--quant-iters", help="lq-lora: alternation rounds; loftq: "
                                                                              "alternations (default 5)."),
        quiet: bool = QuietOpt,
    ) -> None:
        """Attach low-rank adapters initialized from the spectrum / activations / gradients, train, save."""
        setup(quiet)
        log, res = run_adapt(model, init, rank, alpha, rslora, targets, steps, lr, batch_size, seqlen, grad_accum,
                             warmup, eval_every, eval_windows, text_file, calib_windows, seed, svd, bf16, out, fmt,
                             peft_form, merge, overwrite, quiet, quant_bits, quant_group_size, quant_iters)
        ppl = res.evals[-1]["ppl"] if res.evals else None
        table("rankwise adapt", ["init", "rank", "trainable params", "steps", "first loss", "last loss",
                                 "test ppl", "s/step", "saved as"],
              [[log["init"], log["rank"], log["trainable_params"], len(res.losses),
                res.losses[0] if res.losses else "-", res.losses[-1] if res.losses else "-",
                ppl if ppl is not None else "-", res.seconds_per_step,
                "merged checkpoint" if log["merged"] else log["format"]]])
        if res.stopped_on_nan:
            console.print(f"[yellow]training stopped at step {res.nan_step}: non-finite loss; the saved adapter is "
                          "the last state with a finite loss[/]")
        console.print(f"wrote {out}")
