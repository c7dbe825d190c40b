"""Merging fine-tunes of SmolLM2 on distinct offline text domains (issue 22).

Domains (all on this machine, no download): Wikipedia (rankwise's default corpus, calib split), Python
source (the standard library of the running interpreter), news (the Lee corpus in gensim's test data).
Each domain's text is cut into a training file (the first 90 %) and a held-out file (the last 10 %).

1. ``--stage finetune``: one LoRA fine-tune per domain, made the way a user makes it:
   ``rankwise adapt --init lora --rank 16 --steps S --lr 5e-4 --text-file DOMAIN_train.txt --out DIR``
   (a PEFT adapter directory).
2. ``--stage eval``: the held-out loss (mean next-token NLL over W windows of T tokens of each domain's
   held-out text) of the base, each fine-tune, and the merges of the three adapters: average,
   task arithmetic (its default scale 0.3), TIES (default density 0.2, scale 1), OPCM over all 6 orders;
   then locking: task arithmetic with the third fine-tune replaced by ``rankwise lock`` of it (the base
   check off, as an attacker would), and the same after weight matching the locked model back to the
   fine-tune.

    python benchmarks/merge_finetunes.py --work /tmp/merge-bench --stage data
    python benchmarks/merge_finetunes.py --work /tmp/merge-bench --stage finetune --steps 150
    python benchmarks/merge_finetunes.py --work /tmp/merge-bench --stage eval --windows 16 --seqlen 256
    python benchmarks/merge_finetunes.py --render
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results" / "merge_finetunes.json"
DOMAINS = ("wiki", "python", "news")


def domain_text(name: str) -> str:
    if name == "wiki":
        from rankwise.calibration.corpus import load_corpus

        return load_corpus("calib")
    if name == "python":
        lib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in lib.glob("*.py"))
        return "\n\n".join(p.read_text(encoding="utf-8", errors="ignore") for p in files)[:3_000_000]
    if name == "news":
        import gensim

        f = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
        return f.read_text(encoding="utf-8", errors="ignore")
    raise ValueError(name)


def stage_data(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    for d in DOMAINS:
        text = domain_text(d)
        cut = int(0.9 * len(text))
        (work / f"{d}_train.txt").write_text(text[:cut], encoding="utf-8")
        (work / f"{d}_test.txt").write_text(text[cut:], encoding="utf-8")
        print(d, len(text), "chars")


def stage_finetune(work: Path, steps: int, rank: int, lr: float) -> None:
    for d in DOMAINS:
        out = work / f"ft_{d}"
        if out.exists():
            continue
        cmd = [sys.executable, "-m", "rankwise", "adapt", "--init", "lora", "--rank", str(rank), "--steps", str(steps),
               "--lr", str(lr), "--text-file", str(work / f"{d}_train.txt"), "--out", str(out), "--quiet"]
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(d, f"{time.perf_counter() - t:.0f} s")


def _held_out(work: Path, tok, windows: int, seqlen: int) -> dict[str, torch.Tensor]:
    from rankwise.calibration.sampling import eval_windows, tokenize

    return {d: eval_windows(tokenize(tok, (work / f"{d}_test.txt").read_text(encoding="utf-8")), seqlen, windows)
            for d in DOMAINS}


def _losses(model, data) -> dict[str, float]:
    from rankwise.merging.data import loss_and_accuracy

    return {d: loss_and_accuracy(model, w, batch_size=4)[0] for d, w in data.items()}


def stage_eval(work: Path, windows: int, seqlen: int) -> dict:
    import rankwise
    from rankwise.merging.lock import lock
    from rankwise.merging.matching import match
    from rankwise.merging.merge import merge

    base, tok, _ = rankwise.load()
    data = _held_out(work, tok, windows, seqlen)
    adapters = [work / f"ft_{d}" for d in DOMAINS]
    rows: dict[str, dict] = {"base": _losses(base, data)}
    fts = {}
    for d, a in zip(DOMAINS, adapters):
        ft, _ = merge(base, [a], "task-arithmetic", options={"scale": 1.0})   # base + the adapter's update
        fts[d] = ft
        rows[f"ft_{d}"] = _losses(ft, data)
    for method in ("average", "task-arithmetic", "ties"):
        m, _ = merge(base, adapters, method)
        rows[method] = _losses(m, data)
    for order in itertools.permutations(range(3)):
        m, _ = merge(base, [adapters[i] for i in order], "opcm")
        rows["opcm:" + "-".join(DOMAINS[i] for i in order)] = _losses(m, data)
    locked, _ = lock(fts[DOMAINS[2]], seed=11)
    m, _ = merge(base, [fts[DOMAINS[0]], fts[DOMAINS[1]], locked], "task-arithmetic", check_base=False)
    rows["task-arithmetic+locked"] = _losses(m, data)
    m, _ = merge(base, [fts[DOMAINS[0]], fts[DOMAINS[1]], fts[DOMAINS[2]]], "task-arithmetic")
    rows["task-arithmetic(full models)"] = _losses(m, data)
    matched, _ = match(fts[DOMAINS[2]], locked)
    m, _ = merge(base, [fts[DOMAINS[0]], fts[DOMAINS[1]], matched], "task-arithmetic", check_base=False)
    rows["task-arithmetic+locked+matched"] = _losses(m, data)
    key = "model.layers.10.self_attn.q_proj.weight"
    a, b = fts[DOMAINS[2]].state_dict()[key], matched.state_dict()[key]
    return {"windows": windows, "seqlen": seqlen, "domains": list(DOMAINS), "rows": rows,
            "locked_matched_relative_distance_q_proj_10": float((a - b).norm() / a.norm())}


def render(res: dict) -> str:
    doms = res["domains"]
    head = "| model | " + " | ".join(f"{d} loss" for d in doms) + " | mean |\n|---|" + "---:|" * (len(doms) + 1)
    lines = [head]
    for name, r in res["rows"].items():
        if name.startswith("opcm:"):
            continue
        lines.append(f"| {name} | " + " | ".join(f"{r[d]:.4f}" for d in doms) + f" | {statistics.fmean(r.values()):.4f} |")
    opcm = [statistics.fmean(r.values()) for n, r in res["rows"].items() if n.startswith("opcm:")]
    per = {d: [r[d] for n, r in res["rows"].items() if n.startswith("opcm:")] for d in doms}
    lines.append("| opcm (6 orders: mean; min-max) | " + " | ".join(
        f"{statistics.fmean(v):.4f} ({min(v):.4f}-{max(v):.4f})" for v in per.values())
        + f" | {statistics.fmean(opcm):.4f} ({min(opcm):.4f}-{max(opcm):.4f}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/rankwise-merge-bench"))
    ap.add_argument("--stage", choices=("data", "finetune", "eval"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(args.out.read_text())))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.stage == "data":
        stage_data(args.work)
    elif args.stage == "finetune":
        stage_finetune(args.work, args.steps, args.rank, args.lr)
    elif args.stage == "eval":
        t = time.perf_counter()
        res = stage_eval(args.work, args.windows, args.seqlen)
        res.update({"command": f"python benchmarks/merge_finetunes.py --stage eval --windows {args.windows} "
                               f"--seqlen {args.seqlen}", "finetune": {"steps": args.steps, "rank": args.rank,
                                                                       "lr": args.lr},
                    "seconds": time.perf_counter() - t, "threads": torch.get_num_threads()})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        print(render(res))


if __name__ == "__main__":
    main()
