"""``rankwise train``: train a model (or one built from a config) with a plain or projected-gradient optimizer,
optionally with structured layers and an initialization; checkpoints that resume; saved like any rankwise model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import QuietOpt, TextFileOpt, console, setup, table


def run_train(model_arg, from_config, tokenizer, optim, rank, update_proj_gap, scale, proj_type, oversample, n_iter,
              structure, ratio, init, steps, lr, weight_decay, batch_size, seqlen, grad_accum, warmup,
              eval_windows, text_file, seed, checkpoint_every, checkpoint_dir, resume, out, overwrite, quiet):
    from ..errors import ConfigError
    from ..files import check_new_output
    from ..training.build import model_from_config, prepare, token_streams
    from ..training.data import batch_at
    from ..training.loop import TrainConfig, train
    from ..training.saving import save_trained

    projector_options = {k: v for k, v in (("oversample", oversample), ("n_iter", n_iter)) if v is not None}
    cfg = TrainConfig(optim=optim, rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                      projector_options=projector_options, lr=lr, weight_decay=weight_decay, steps=steps,
                      batch_size=batch_size, seqlen=seqlen, grad_accum=grad_accum, warmup=warmup,
                      eval_windows=eval_windows, seed=seed, checkpoint_every=checkpoint_every)
    if optim != "randomized" and projector_options:
        raise ConfigError(f"--oversample / --n-iter are options of the randomized projector, not of --optim {optim}; "
                          "drop them or use --optim randomized")
    cfg.check()
    if structure is not None:   # unknown names fail before anything is loaded
        from ..training.structurize import BUILDERS

        BUILDERS.get(structure)
    if init is not None:
        from ..training.init import INITS

        INITS.get(init)
    if (model_arg is None) == (from_config is None):
        raise ConfigError("pass either MODEL (a model directory or built-in name) or --from-config CONFIG.json")
    if tokenizer is not None and from_config is None:
        raise ConfigError("--tokenizer is for --from-config (a saved model brings its own tokenizer)")
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else Path(str(out) + ".ckpt")
    if resume and not (ckpt / "trainer.json").is_file():
        raise ConfigError(f"--resume: no checkpoint in {ckpt}; pass --checkpoint-dir, or drop --resume")
    check_new_output(out, overwrite)
    if from_config is not None:
        model, tok = model_from_config(from_config, seed=seed, tokenizer=tokenizer)
        source = {"from_config": str(Path(from_config).resolve()), "tokenizer": tokenizer or "bytes"}
    else:
        from ..models.loading import load_model

        model, tok, path = load_model(model_arg)
        source = {"model": str(path)}
    train_ids, eval_ids = token_streams(tok, text_file)
    init_data = batch_at(train_ids, -1, 8, min(seqlen, 128), seed) if init == "lsuv" else None
    info = prepare(model, structure, ratio, init, init_data, seed)
    fingerprint = {**source, "structure": structure, "ratio": ratio, "init": init,
                   "text": str(Path(text_file).resolve()) if text_file else "default corpus"}
    res = train(model, train_ids, cfg, eval_ids=eval_ids, checkpoint_dir=ckpt if (checkpoint_every or resume) else None,
                resume=resume, fingerprint=fingerprint, progress=not quiet)
    log = {**fingerprint, "optim": optim, "config": cfg.fingerprint(), **info, **res.to_dict()}
    save_trained(model, out, tok, log, overwrite=overwrite)
    return log, res


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        model: Optional[str] = typer.Argument(None, help="Local model directory or built-in name (or --from-config)."),
        from_config: Optional[Path] = typer.Option(None, "--from-config", help="Train from scratch: a Hugging Face "
                                                   "config.json (file or directory)."),
        tokenizer: Optional[str] = typer.Option(None, help="With --from-config: tokenizer directory or built-in model "
                                                "name (default: bytes, 257 ids)."),
        optim: str = typer.Option("adamw", help="adamw, galore (SVD projection), dct (SVD-free), randomized, random."),
        rank: Optional[int] = typer.Option(None, help="Projection rank r (projected optimizers)."),
        update_proj_gap: int = typer.Option(200, help="Optimizer steps between projection refreshes (>= 1)."),
        scale: float = typer.Option(0.25, help="GaLore scale of the projected update."),
        proj_type: str = typer.Option("std", help="Projected side: std (shorter), reverse_std, left, right."),
        oversample: Optional[int] = typer.Option(None, help="randomized: extra test vectors (default 10)."),
        n_iter: Optional[int] = typer.Option(None, help="randomized: power iterations (default 2)."),
        structure: Optional[str] = typer.Option(None, help="Replace the block linears by freshly initialized trainable "
                                                "structured layers (their dense weights are discarded): lowrank, "
                                                "monarch, blockdiag-lowrank, kronecker, sltrain, blast."),
        ratio: Optional[float] = typer.Option(None, help="With --structure: fraction of each layer's values removed "
                                              "(default 0.5)."),
        init: Optional[str] = typer.Option(None, help="Initialize the block linears first: lsuv, idinit, spectral, "
                                           "orthogonal."),
        steps: int = typer.Option(100, help="Optimizer steps."),
        lr: float = typer.Option(1e-3, help="Peak learning rate (warmup, then cosine to 10%)."),
        weight_decay: float = typer.Option(0.0, help="Decoupled weight decay."),
        batch_size: int = typer.Option(8, help="Windows per micro-batch."),
        seqlen: int = typer.Option(128, help="Tokens per window."),
        grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
        warmup: int = typer.Option(10, help="Linear warmup steps."),
        eval_windows: int = typer.Option(16, help="Held-out windows for the final loss."),
        text_file: Optional[Path] = TextFileOpt,
        seed: int = typer.Option(0, help="Seed for the model, structure supports, batches and projections."),
        checkpoint_every: int = typer.Option(0, help="Write a resumable checkpoint every K steps (0: none)."),
        checkpoint_dir: Optional[Path] = typer.Option(None, help="Checkpoint directory (default: OUT.ckpt)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint (same options required)."),
        out: Path = typer.Option(..., "--out", help="Output directory."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
        quiet: bool = QuietOpt,
    ) -> None:
        """Train with projected-gradient optimizers, structured layers and initializations; checkpoints resume."""
        setup(quiet)
        log, res = run_train(model, from_config, tokenizer, optim, rank, update_proj_gap, scale, proj_type,
                             oversample, n_iter, structure, ratio, init, steps, lr, weight_decay, batch_size, seqlen,
                             grad_accum, warmup, eval_windows, text_file, seed, checkpoint_every, checkpoint_dir,
                             resume, out, overwrite, quiet)
        table("rankwise train", ["optim", "structure", "init", "steps", "first loss", "last loss", "held-out loss",
                                 "opt. state (projected)", "s/step", "tokens/s"],
              [[log["optim"], log["structure"] or "dense", log["init"] or "default", len(res.losses),
                res.losses[0] if res.losses else "-", res.losses[-1] if res.losses else "-", res.eval_loss,
                f"{res.projected_state_bytes / 2**20:.2f} MiB", res.seconds_per_step, res.tokens_per_second]])
        console.print(f"wrote {out}")
