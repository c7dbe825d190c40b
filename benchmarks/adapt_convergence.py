"""Convergence of adapter initializations on the default model (rankwise adapt benchmark).

Same model, corpus, seed, rank, targets, batch order and learning rate for every init; records the
training-loss curve, the step at which each init's smoothed loss first reaches LoRA's final smoothed
loss, final test perplexity, trainable parameters and seconds per step. Optionally: compress the model
(40% of the targeted parameters removed) and heal it with PiSSA / LoRA adapters, perplexity before/after.

    python benchmarks/adapt_convergence.py [--quick] [--steps 40] [--batch-size 2] [--seqlen 64]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from rankwise.adaptation.attach import adapt, count_trainable
from rankwise.adaptation.train import TrainConfig, plot_losses, train
from rankwise.calibration.corpus import load_corpus
from rankwise.calibration.sampling import calib_windows, tokenize
from rankwise.evaluation.perplexity import perplexity
from rankwise.models.loading import load_model

RESULTS = Path(__file__).parent / "results"
ALL = ["lora", "pissa", "eva", "olora", "milora", "lora-ga", "nlora", "salt", "loldu", "singlora", "lora-sb"]
QUICK = ["lora", "pissa", "eva", "loldu"]


def smooth(xs: list[float], k: int = 10) -> list[float]:
    """Trailing moving average over ``k`` steps (the per-step loss is a 2-window mini-batch: noisy)."""
    return [sum(xs[max(0, i - k + 1): i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(xs))]


def steps_to(target: float, curve: list[float]) -> int | None:
    for i, v in enumerate(curve):
        if v <= target:
            return i + 1
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK}, 30 steps, no compression")
    ap.add_argument("--inits", default=None, help="comma-separated subset")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--windows", type=int, default=8, help="test windows for perplexity")
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--calib", type=int, default=8, help="calibration windows for eva / lora-ga / lora-sb")
    ap.add_argument("--no-compress", action="store_true")
    ap.add_argument("--append", action="store_true", help="add the --inits runs to the existing results JSON")
    ap.add_argument("--report", action="store_true", help="print the markdown tables of the saved results")
    ap.add_argument("--heal-only", action="store_true",
                    help="only the compress(40%) + LoRA/PiSSA healing part -> adapt_heal.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="", help="why these runs were appended (recorded in the JSON)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.report:
        return report("quick" if args.quick else "full")
    inits = args.inits.split(",") if args.inits else (QUICK if args.quick else ALL)
    steps = 30 if args.quick else args.steps
    base, tok, path = load_model()
    train_ids = tokenize(tok, load_corpus("calib"))
    test_ids = tokenize(tok, load_corpus("test"))
    n_train = steps * args.batch_size
    train_win = calib_windows(train_ids, n=n_train, seqlen=args.seqlen, seed=args.seed + 1)
    calib = calib_windows(train_ids, n=args.calib, seqlen=args.seqlen, seed=args.seed + 2)
    cfg = TrainConfig(steps=steps, lr=args.lr, batch_size=args.batch_size, warmup=args.warmup,
                      eval_windows=args.windows, eval_seqlen=args.eval_seqlen, seed=args.seed)
    t0 = time.perf_counter()
    base_ppl = perplexity(base, ids=test_ids, seqlen=args.eval_seqlen, windows=args.windows).ppl
    print(f"base ppl {base_ppl:.3f} ({time.perf_counter() - t0:.1f}s)", flush=True)
    if args.heal_only:
        cfg_heal = {**vars(args), "steps": steps}
        res = {"model": str(path), "protocol": cfg_heal, "base_ppl": base_ppl}
        try:
            res.update(compress_heal(base, tok, train_win, test_ids, cfg, args))
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
        (RESULTS / "adapt_heal.json").write_text(json.dumps(res, indent=1))
        print(f"wrote adapt_heal.json ({time.perf_counter() - t0:.0f}s)", flush=True)
        return
    out = {"model": str(path), "protocol": {**vars(args), "steps": steps, "inits": inits,
                                            "train_tokens_per_step": args.batch_size * args.seqlen,
                                            "targets": "q,k,v,o,gate,up,down (all 30 blocks)"},
           "base_ppl": base_ppl, "runs": {}}
    prev = RESULTS / f"adapt_convergence_{'quick' if args.quick else 'full'}.json"
    if args.append and prev.is_file():
        old = json.loads(prev.read_text())
        out["runs"] = old["runs"]
        out["superseded"] = old.get("superseded", {})
        for init in inits:   # keep the replaced runs (e.g. a diverged first version) for the record
            if init in out["runs"]:
                r = out["runs"].pop(init)
                out["superseded"][f"{init} (before: {args.note})"] = {k: v for k, v in r.items() if k != "losses"} | {
                    "last_losses": r["losses"][-5:]}
        out["protocol"] = old["protocol"]
        out["protocol"].setdefault("appended", []).append({"inits": inits, "note": args.note})
        out.pop("base_batch_losses", None)
    for init in inits:
        model = copy.deepcopy(base)
        t1 = time.perf_counter()
        adapt(model, init, rank=args.rank, calib=calib, seed=args.seed)
        init_s = time.perf_counter() - t1
        res = train(model, train_win, cfg, eval_ids=test_ids, progress=False)
        out["runs"][init] = {"losses": res.losses, "final_ppl": res.evals[-1]["ppl"], "init_seconds": init_s,
                             "seconds_per_step": res.seconds_per_step, "trainable_params": count_trainable(model),
                             "stopped_on_nan": res.stopped_on_nan}
        print(f"{init:10s} loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f}  ppl {res.evals[-1]['ppl']:.3f}  "
              f"{res.seconds_per_step:.2f}s/step  init {init_s:.1f}s", flush=True)
        del model
        write(out, args)
    if "lora" in out["runs"]:
        target = smooth(out["runs"]["lora"]["losses"])[-1]
        lora_steps = steps_to(target, smooth(out["runs"]["lora"]["losses"]))
        out["lora_final_smoothed_loss"] = target
        for init, r in out["runs"].items():
            s = steps_to(target, smooth(r["losses"]))
            r["steps_to_lora_final"] = s
            r["ratio_vs_lora"] = None if s is None or not lora_steps else s / lora_steps
    write(out, args)
    if not args.quick and not args.no_compress and not args.append:
        try:
            out["compress_heal"] = compress_heal(base, tok, train_win, test_ids, cfg, args)
        except Exception as e:  # record, keep the convergence results
            out["compress_heal"] = {"error": f"{type(e).__name__}: {e}"}
            print("compress+heal failed:", e, flush=True)
    write(out, args)
    print(f"done ({time.perf_counter() - t0:.0f}s)", flush=True)


def write(out: dict, args) -> None:
    tag = "quick" if args.quick else "full"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"adapt_convergence_{tag}.json").write_text(json.dumps(out, indent=1))
    plot_losses({k: smooth(v["losses"]) for k, v in out["runs"].items()},
                RESULTS / f"adapt_convergence_{tag}.png",
                title=f"rank {args.rank}, {args.batch_size}x{args.seqlen} tokens/step, lr {args.lr} (10-step avg)")


def base_batch_losses(out: dict) -> list[float]:
    """The frozen base model's loss on each training batch, in the training order (same seed as train())."""
    from rankwise.calibration.gradients import lm_loss

    p = out["protocol"]
    base, tok, _ = load_model()
    ids = tokenize(tok, load_corpus("calib"))
    win = calib_windows(ids, n=p["steps"] * p["batch_size"], seqlen=p["seqlen"], seed=p["seed"] + 1)
    order = torch.randperm(win.shape[0], generator=torch.Generator().manual_seed(p["seed"]))
    bs = p["batch_size"]
    with torch.no_grad():
        return [float(lm_loss(base, win[order[i * bs:(i + 1) * bs]])) for i in range(p["steps"])]


def report(tag: str) -> None:
    """Markdown tables from adapt_convergence_<tag>.json (+ adapt_heal.json).

    Each step's loss is a different 2-window batch, so raw curves are dominated by batch difficulty;
    the comparison uses the paired gain ``loss_t - base_loss_t`` (base model on the same batch), averaged
    over a trailing 10-step window.
    """
    path = RESULTS / f"adapt_convergence_{tag}.json"
    out = json.loads(path.read_text())
    if "base_batch_losses" not in out:
        out["base_batch_losses"] = base_batch_losses(out)
        path.write_text(json.dumps(out, indent=1))
    bl = out["base_batch_losses"]
    runs = out["runs"]
    gain = {k: smooth([x - b for x, b in zip(r["losses"], bl)]) for k, r in runs.items()}
    plot_losses(gain, RESULTS / f"adapt_convergence_{tag}_gain.png",
                title="training loss minus base model's loss on the same batch (10-step avg)")
    target = gain["lora"][-1] if "lora" in runs else None
    lora_steps = steps_to(target, gain["lora"]) if target is not None else None
    print(f"base test ppl {out['base_ppl']:.3f}; LoRA final paired gain {target:+.4f} nats/token "
          f"(first reached at step {lora_steps})\n")
    print("| init | trainable params | gain after 10 steps | final gain | steps to LoRA's final gain | ratio vs LoRA"
          " | test ppl | s/step | init s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for init, r in runs.items():
        g = gain[init]
        st = steps_to(target, g) if target is not None else None
        ratio = f"{st / lora_steps:.2f}" if st and lora_steps else "not reached"
        print(f"| {init} | {r['trainable_params']:,} | {g[9]:+.4f} | {g[-1]:+.4f} | "
              f"{st if st else 'not reached'} | {ratio} | {r['final_ppl']:.3f} | {r['seconds_per_step']:.2f} | "
              f"{r['init_seconds']:.1f} |")
    heal = RESULTS / "adapt_heal.json"
    if heal.is_file():
        h = json.loads(heal.read_text())
        if "error" in h:
            print(f"\ncompress+heal failed: {h['error']}")
        else:
            print(f"\n| model | test ppl | trainable params |\n|---|---:|---:|\n| dense base | {h['base_ppl']:.3f} | - |")
            print(f"| compressed 40% ({h.get('method')}) | {h['ppl_compressed']:.3f} | - |")
            for init, r in h["healed"].items():
                print(f"| compressed + {init} healing | {r['ppl']:.3f} | {r['trainable_params']:,} |")


def compress_heal(base, tok, train_win, test_ids, cfg, args) -> dict:
    """Compress 40% with the default method, then heal with PiSSA and with LoRA adapters."""
    from rankwise.api import compress

    t0 = time.perf_counter()
    small, report = compress(base, ratio=0.4, tokenizer=tok, calib_options={"windows": 16, "seqlen": 256},
                             progress=False)
    before = perplexity(small, ids=test_ids, seqlen=args.eval_seqlen, windows=args.windows).ppl
    out = {"ratio": 0.4, "method": getattr(report, "method", None), "compress_seconds": time.perf_counter() - t0,
           "ppl_compressed": before, "healed": {}}
    print(f"compressed 40%: ppl {before:.3f}", flush=True)
    for init in ("lora", "pissa"):
        m = copy.deepcopy(small)
        adapt(m, init, rank=args.rank, seed=args.seed)
        res = train(m, train_win, cfg, eval_ids=test_ids, progress=False)
        out["healed"][init] = {"seconds_per_step": res.seconds_per_step, "ppl": res.evals[-1]["ppl"], "losses": res.losses,
                               "trainable_params": count_trainable(m)}
        print(f"healed with {init}: ppl {res.evals[-1]['ppl']:.3f}", flush=True)
    return out


if __name__ == "__main__":
    main()
