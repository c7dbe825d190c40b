"""Issue 21's training benchmark: optimizers, structures and initializations, side by side.

``pretrain`` rows: a small LLaMA built from config (byte-level vocabulary of 257 so that the embeddings
do not dominate: hidden 128, MLP 352, 4 layers, 4 heads, ~0.85 M parameters), pre-trained from scratch
on the default corpus's calib split (windows of 128 bytes, batch 8, 200 steps, warmup then cosine to 10 %,
clipping at 1), held-out loss (mean NLL, nats/byte) on the first 64 windows of the test split. Every
row goes through :func:`rankwise.training.loop.train` (the loop ``rankwise train`` runs):

* ``adamw``: ``torch.optim.AdamW`` on everything (the dense row of the structure table too);
* ``galore`` / ``dct`` / ``randomized``: :class:`rankwise.optim.ProjectedAdamW` on the 28 block
  linears at rank d/4 = 32, ``update_proj_gap`` 50, scale 1, the rest plain;
* ``galore-ref``: pytorch-optimizer's ``GaLore`` with the same groups (the reference implementation);
* ``lowrank`` / ``sltrain`` / ``monarch`` / ``kronecker`` / ``blast``: ``rankwise.structurize`` at
  ratio 0.5 (every block linear keeps <= 50 % of its values), AdamW with the per-factor learning rates
  (``<structure>-plainlr``: the same without them, one learning rate for all);
* ``kronecker-recovered``: the ``adamw`` model compressed to Kronecker at 0.5 by ``rankwise.compress``
  (fitted on 32 calibration windows), then trained ``--recover-steps`` more steps (AdamW on all
  parameters at a tenth of the learning rate, no per-factor multipliers).

``init`` rows: a 20-layer ReLU MLP (width 128, no normalization) on scikit-learn's digits (80/20 split),
SGD with momentum 0.9, batch 64; steps until the training loss (EMA 0.9) first drops below 0.3, and the
test accuracy at the end; inits ``default`` (PyTorch's), ``lsuv``, ``idinit``, ``spectral``.

``speed``: seconds per step of adamw / galore / galore-ref / dct / randomized side by side in one process
(interleaved chunks of 50 steps, one projection refresh each); ``refresh``: the refresh alone.

Each invocation runs one row (``--rows a,b`` for several, ``--seeds 0,1,2`` for its seeds) and merges it into ``results/train_bench.json`` (timing rows run
under the shared lock, with the load average before and after). ``report`` writes the markdown table
and ``results/train_bench_loss.png``.

    flock /work/team/heavy.lock nice -n 5 .venv/bin/python benchmarks/train_bench.py pretrain --row galore --seeds 0,1,2
    .venv/bin/python benchmarks/train_bench.py init --row lsuv --seed 0
    flock /work/team/heavy.lock nice -n 5 .venv/bin/python benchmarks/train_bench.py refresh
    flock /work/team/heavy.lock nice -n 5 .venv/bin/python benchmarks/train_bench.py speed --rounds 3
    .venv/bin/python benchmarks/train_bench.py report
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "train_bench.json"
PRETRAIN_ROWS = ["adamw", "galore", "galore-ref", "dct", "randomized", "lowrank", "sltrain", "monarch", "kronecker",
                 "blast", "kronecker-recovered"]
INIT_ROWS = ["default", "lsuv", "idinit", "spectral"]
MODEL = dict(model_type="llama", vocab_size=257, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)


def _load(path: Path | None = None) -> dict:
    path = path or RESULTS
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


def _merge(rec: dict) -> None:
    from rankwise.files import write_json

    data = _load()
    data["rows"] = [r for r in data["rows"] if (r["kind"], r["row"], r["seed"]) != (rec["kind"], rec["row"], rec["seed"])]
    data["rows"].append(rec)
    write_json(RESULTS, data)


def _all_rows() -> list[dict]:
    """Rows of every results file (``train_bench*.json``; a later file's row replaces an earlier one's)."""
    rows = {}
    for f in sorted(RESULTS.parent.glob("train_bench*.json")):
        for r in _load(f)["rows"]:
            rows[(r["kind"], r["row"], r["seed"])] = r
    return list(rows.values())


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# -- pretraining ------------------------------------------------------------------------------------
def _streams():
    from rankwise.calibration.corpus import load_corpus
    from rankwise.calibration.sampling import tokenize
    from rankwise.training.data import byte_tokenizer

    tok = byte_tokenizer()
    return tok, tokenize(tok, load_corpus("calib")), tokenize(tok, load_corpus("test"))


def _model(seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(MODEL)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d))


def _reference_galore(model, cfg):
    from pytorch_optimizer import GaLore

    from rankwise.training.groups import projected_param_groups

    groups = projected_param_groups(model, cfg.rank, cfg.update_proj_gap, cfg.scale, cfg.proj_type, "svd")
    for g in groups:
        if "rank" in g:
            g["projection_type"] = g.pop("proj_type")
            g.pop("projector"), g.pop("projector_options")
    opt = GaLore(groups, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return opt, list(groups[-1]["params"])


def run_pretrain(row: str, seed: int, args) -> dict:
    import rankwise
    from rankwise.training.loop import TrainConfig, train
    from rankwise.training.structurize import structure_parameters

    tok, train_ids, test_ids = _streams()
    base = dict(steps=args.steps, batch_size=8, seqlen=128, warmup=args.steps // 20, lr=args.lr, seed=seed,
                eval_windows=64, update_proj_gap=50, scale=1.0, min_lr_ratio=0.1)
    model = _model(seed)
    dense_params = sum(p.numel() for p in model.parameters())
    make, extra = None, {}
    if row in ("adamw", "kronecker-recovered"):
        cfg = TrainConfig(optim="adamw", **base)
    elif row in ("galore", "dct", "randomized", "galore-ref"):
        cfg = TrainConfig(optim="galore" if row == "galore-ref" else row, rank=MODEL["hidden_size"] // 4, **base)
        make = _reference_galore if row == "galore-ref" else None
    else:   # a structure; "-plainlr": without the per-factor learning-rate multipliers (ablation)
        structure = row.removesuffix("-plainlr")
        model = rankwise.structurize(model, structure, ratio=0.5, seed=seed, inplace=True)
        cfg = TrainConfig(optim="adamw", structure_lr=not row.endswith("-plainlr"), **base)
        extra["structure"] = structure_parameters(model)
    before = _loadavg()
    t0 = time.perf_counter()
    res = train(model, train_ids, cfg, eval_ids=test_ids, progress=False, make_optimizer=make)
    wall = time.perf_counter() - t0
    rec = {"kind": "pretrain", "row": row, "seed": seed, "eval_loss": res.eval_loss, "losses": res.losses[::5],
           "final_train_loss": sum(res.losses[-10:]) / 10, "seconds_per_step": res.seconds_per_step,
           "optimizer_state_bytes": res.optimizer_state_bytes, "projected_state_bytes": res.projected_state_bytes,
           "projected_dense_adam_bytes": res.projected_dense_adam_bytes,
           "params": sum(p.numel() for p in model.parameters()), "dense_params": dense_params,
           "config": cfg.fingerprint(), "threads": torch.get_num_threads(), "wall_s": wall, **extra}
    if row == "kronecker-recovered":
        from rankwise.training.data import batch_at
        from rankwise.training.loop import held_out_loss

        calib = torch.cat([batch_at(train_ids, 10_000 + i, 1, 128, seed) for i in range(32)])
        rec["dense_eval_loss"] = res.eval_loss
        small, report = rankwise.compress(model, "kronecker", 0.5, calib=calib, progress=False)
        rec["compressed_eval_loss"] = held_out_loss(small, test_ids, 128, 64)[0]
        rec["structure"] = structure_parameters(small)
        # fine-tuning a fitted model: a tenth of the pre-training learning rate, no per-factor multipliers
        # (those are for training from scratch; at 16x on the Kronecker A factors they wreck a fitted model)
        rcfg = TrainConfig(optim="adamw", structure_lr=False,
                           **{**base, "steps": args.recover_steps, "warmup": 10, "lr": args.lr / 10,
                              "seed": seed + 100})
        rres = train(small, train_ids, rcfg, eval_ids=test_ids, progress=False)
        rec.update(eval_loss=rres.eval_loss, recover_losses=rres.losses[::5], recover_steps=args.recover_steps)
    rec["loadavg_before"], rec["loadavg_after"] = before, _loadavg()
    return rec


# -- initialization -----------------------------------------------------------------------------------
def run_init(row: str, seed: int, args) -> dict:
    from sklearn.datasets import load_digits
    from torch import nn

    import rankwise

    X, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(1234)
    perm = torch.randperm(len(X), generator=g)
    X = torch.tensor(X, dtype=torch.float32)[perm] / 16.0
    y = torch.tensor(y)[perm]
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    cut = int(0.8 * len(X))
    Xtr, ytr, Xte, yte = X[:cut], y[:cut], X[cut:], y[cut:]
    torch.manual_seed(seed)
    width, depth = 128, 20
    layers = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(width, 10))
    if row != "default":
        rankwise.init_(net, row, data=Xtr[:256], seed=seed)
    opt = torch.optim.SGD(net.parameters(), lr=args.init_lr, momentum=0.9)
    bg = torch.Generator().manual_seed(seed)
    ema, hit, curve = None, None, []
    for step in range(args.init_steps):
        idx = torch.randint(0, cut, (64,), generator=bg)
        loss = nn.functional.cross_entropy(net(Xtr[idx]), ytr[idx])
        if not torch.isfinite(loss):
            curve.append(float("nan"))
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        lv = float(loss.detach())
        ema = lv if ema is None else 0.9 * ema + 0.1 * lv
        curve.append(ema)
        if hit is None and ema < args.target_loss:
            hit = step + 1
    with torch.no_grad():
        logits = net(Xte)
        acc = float((logits.argmax(1) == yte).float().mean())
        test_loss = float(nn.functional.cross_entropy(logits, yte))
    return {"kind": "init", "row": row, "seed": seed, "steps_to_target": hit, "target_loss": args.target_loss,
            "final_train_loss_ema": curve[-1], "test_accuracy": acc, "test_loss": test_loss, "steps": len(curve),
            "curve": curve[::10], "lr": args.init_lr, "depth": depth, "width": width}


# -- step speed, side by side ----------------------------------------------------------------------------
def run_speed(row: str, seed: int, args) -> dict:
    """Seconds per optimizer step of each optimizer on the pretrain model, measured side by side in one
    process: ``--rounds`` rounds, each running every optimizer for ``update_proj_gap`` (50) consecutive
    steps (so every chunk holds exactly one projection refresh), medians over rounds."""
    from rankwise.calibration.gradients import lm_loss
    from rankwise.training.data import batch_at
    from rankwise.training.loop import TrainConfig, build_optimizer

    _, train_ids, _ = _streams()
    names = ["adamw", "galore", "galore-ref", "dct", "randomized"]
    runs = {}
    for n in names:
        model = _model(seed)
        cfg = TrainConfig(optim="adamw" if n == "adamw" else ("galore" if n == "galore-ref" else n),
                          rank=None if n == "adamw" else MODEL["hidden_size"] // 4, update_proj_gap=50, scale=1.0,
                          lr=args.lr, batch_size=8, seqlen=128, seed=seed)
        opt = (_reference_galore if n == "galore-ref" else build_optimizer)(model, cfg)[0]
        runs[n] = (model.train(), opt)
    times = {n: [] for n in names}
    before = _loadavg()
    step = 0
    for _ in range(args.rounds):
        for n in names:
            model, opt = runs[n]
            t0 = time.perf_counter()
            for k in range(50):
                opt.zero_grad(set_to_none=True)
                lm_loss(model, batch_at(train_ids, step + k, 8, 128, seed)).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            times[n].append((time.perf_counter() - t0) / 50)
        step += 50
    med = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
    return {"kind": "speed", "row": "all", "seed": seed, "median_seconds_per_step": med, "all": times,
            "speed_over_galore": {n: med["galore"] / med[n] for n in names}, "rounds": args.rounds,
            "threads": torch.get_num_threads(), "loadavg_before": before, "loadavg_after": _loadavg()}


# -- projection refresh microbenchmark -----------------------------------------------------------------
def run_refresh(row: str, seed: int, args) -> dict:
    """Seconds to refresh the projections of the 28 block matrices of the pretrain model once (random
    gradients of their shapes), per projector, interleaved rounds, medians: the part of a step that
    differs between GaLore and its SVD-free variant."""
    from rankwise.training.projectors import get_projector
    from rankwise.linalg.projections import projection_side

    d, f, L = MODEL["hidden_size"], MODEL["intermediate_size"], MODEL["num_hidden_layers"]
    shapes = [(d, d)] * 4 * L + [(f, d)] * 2 * L + [(d, f)] * L
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(*s, generator=g) for s in shapes]
    r = d // 4
    names = ["svd", "randomized", "dct", "random"]
    times = {n: [] for n in names}
    before = _loadavg()
    for _ in range(args.rounds):
        for n in names:
            proj = get_projector(n)
            t0 = time.perf_counter()
            for i, G in enumerate(grads):
                proj.compute(G, r, projection_side(tuple(G.shape)), i)
            times[n].append(time.perf_counter() - t0)
    med = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
    return {"kind": "refresh", "row": "all", "seed": seed, "median_seconds": med,
            "svd_over": {n: med["svd"] / med[n] for n in names}, "rounds": args.rounds, "rank": r,
            "threads": torch.get_num_threads(), "loadavg_before": before, "loadavg_after": _loadavg()}


# -- report -------------------------------------------------------------------------------------------
def _stats(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None, 0
    m = sum(vals) / len(vals)
    return m, (max(vals) - min(vals)) / 2, len(vals)


def _fmt(rs, key="eval_loss"):
    m, h, n = _stats([r[key] for r in rs])
    return f"{m:.4f} ± {h:.4f} ({n})", m


def report(args) -> None:
    """The markdown tables (stdout) and the loss-curve figure."""
    from rankwise.figures import new_figure, save_png

    rows = _all_rows()
    pre: dict[str, list] = {}
    for r in rows:
        if r["kind"] == "pretrain":
            pre.setdefault(r["row"], []).append(r)
    speed = next((r for r in rows if r["kind"] == "speed"), None)
    refresh = next((r for r in rows if r["kind"] == "refresh"), None)
    _, dense = _fmt(pre["adamw"]) if pre.get("adamw") else (None, None)
    out = ["| optimizer | held-out loss, mean ± half-range (seeds) | vs AdamW | optimizer state of the 28 block "
           "matrices | x AdamW's | step time vs GaLore (side by side) |", "|---|---|---|---|---|---|"]
    for name in ("adamw", "galore", "galore-ref", "dct", "dct-unaligned", "randomized"):
        rs = pre.get(name)
        if not rs:
            continue
        text, m = _fmt(rs)
        st, dst = rs[0]["projected_state_bytes"], rs[0]["projected_dense_adam_bytes"]
        sp = (speed["median_seconds_per_step"][name] / speed["median_seconds_per_step"]["galore"]
              if speed and name in speed["median_seconds_per_step"] else None)
        out.append(f"| {name} | {text} | {100 * (m / dense - 1):+.2f} % | {st / 2**20:.2f} MiB | {st / dst:.3f} | "
                   + (f"{sp:.3f}x ({speed['median_seconds_per_step'][name]:.3f} s)" if sp else "-") + " |")
    out += ["", "| structure (ratio 0.5) | held-out loss (seeds) | vs dense | values in the block linears | "
                "model parameters |", "|---|---|---|---|---|"]
    for name in ("adamw", "lowrank", "lowrank-plainlr", "sltrain", "sltrain-plainlr", "monarch", "monarch-plainlr",
                 "kronecker", "blast"):
        rs = pre.get(name)
        if not rs:
            continue
        text, m = _fmt(rs)
        st = rs[0].get("structure")
        d_model, d_mlp, layers = MODEL["hidden_size"], MODEL["intermediate_size"], MODEL["num_hidden_layers"]
        dense_values = layers * (4 * d_model * d_model + 3 * d_model * d_mlp)
        frac = (f"{st['structured']:,} ({st['structured'] / st['dense_equivalent']:.3f}x dense)" if st
                else f"{dense_values:,} (dense)")
        out.append(f"| {'dense' if name == 'adamw' else name} | {text} | {100 * (m / dense - 1):+.2f} % | {frac} | "
                   f"{rs[0]['params']:,} |")
    rec = pre.get("kronecker-recovered")
    if rec:
        out += ["", "| Kronecker (ratio 0.5) | held-out loss (seeds) |", "|---|---|"]
        out.append(f"| dense AdamW model it is fitted to | {_fmt(rec, 'dense_eval_loss')[0]} |")
        out.append(f"| fitted by rankwise.compress (kronecker, 32 calibration windows) | "
                   f"{_fmt(rec, 'compressed_eval_loss')[0]} |")
        out.append(f"| fitted, then {rec[0]['recover_steps']} steps of training | {_fmt(rec)[0]} |")
        if pre.get("kronecker"):
            out.append(f"| trained from scratch (structurize) | {_fmt(pre['kronecker'])[0]} |")
    if refresh:
        med = refresh["median_seconds"]
        out += ["", "Projection refresh of the 28 matrices (seconds, median of "
                f"{refresh['rounds']}): " + ", ".join(f"{k} {v:.4f}" for k, v in med.items())
                + " -- svd / dct = " + f"{med['svd'] / med['dct']:.2f}x"]
    ini: dict[str, list] = {}
    for r in rows:
        if r["kind"] == "init":
            ini.setdefault(r["row"], []).append(r)
    out += ["", "| init (20-layer ReLU MLP, no normalization) | steps to training loss < 0.3 (per seed) | test accuracy "
                "(mean) | final training loss (EMA, mean) |", "|---|---|---|---|"]
    for name in INIT_ROWS:
        rs = sorted(ini.get(name, []), key=lambda r: r["seed"])
        if rs:
            hits = ", ".join(str(r["steps_to_target"]) if r["steps_to_target"] else f"never ({r['steps']})" for r in rs)
            out.append(f"| {name} | {hits} | {_stats([r['test_accuracy'] for r in rs])[0]:.3f} | "
                       f"{_stats([r['final_train_loss_ema'] for r in rs])[0]:.3f} |")
    print("\n".join(out))
    fig = new_figure((12, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    for name in ("adamw", "galore", "galore-ref", "dct", "randomized", "lowrank", "sltrain", "monarch", "kronecker",
                 "blast"):
        rs = [r for r in pre.get(name, []) if r["seed"] == 0]
        if rs:
            ax1.plot([5 * i + 1 for i in range(len(rs[0]["losses"]))], rs[0]["losses"], label=name, lw=1.1,
                     ls="-" if name in ("adamw", "galore", "galore-ref", "dct", "randomized") else "--")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("training loss (nats/byte)")
    ax1.set_title("pre-training a 0.84M-parameter LLaMA (seed 0)")
    ax1.set_ylim(2.0, 3.6)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7, ncol=2)
    for name in INIT_ROWS:
        rs = [r for r in ini.get(name, []) if r["seed"] == 0]
        if rs:
            ax2.plot([10 * i + 1 for i in range(len(rs[0]["curve"]))], rs[0]["curve"], label=name, lw=1.2)
    ax2.set_xlabel("SGD step")
    ax2.set_ylabel("training loss (EMA)")
    ax2.set_title("20-layer ReLU MLP, no normalization (digits, seed 0)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, HERE / "results" / "train_bench_loss.png", dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["pretrain", "init", "refresh", "speed", "report"])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--row")
    ap.add_argument("--rows", help="comma-separated rows, run one after the other in this process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", help="comma-separated seeds, run one after the other in this process")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--recover-steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init-steps", type=int, default=1500)
    ap.add_argument("--init-lr", type=float, default=0.01)
    ap.add_argument("--target-loss", type=float, default=0.3)
    ap.add_argument("--results", help="results file (default results/train_bench.json; a run outside the lock "
                                      "writes its own, e.g. results/train_bench_nolock.json)")
    args = ap.parse_args()
    if args.results:
        global RESULTS
        RESULTS = Path(args.results).resolve()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.kind == "report":
        report(args)
        return 0
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    rows = args.rows.split(",") if args.rows else [args.row]
    for row in rows:
        for seed in seeds:
            rec = {"pretrain": run_pretrain, "init": run_init, "refresh": run_refresh,
                   "speed": run_speed}[args.kind](row, seed, args)
            rec["command"] = " ".join(sys.argv)
            _merge(rec)
            print(json.dumps({k: v for k, v in rec.items() if k not in ("losses", "curve", "recover_losses")},
                             default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
