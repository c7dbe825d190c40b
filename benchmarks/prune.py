"""Structured pruning (issue 20) on SmolLM2-135M-Instruct and the reference text: quality and speed.

``run``: one row = one structure at one ratio and one calibration seed, the full protocol: 64 x 512
calibration windows of ``wiki_calib.txt`` at seeded random starts, perplexity on the first 64 x 512
windows of ``wiki_test.txt`` (``/work/shared/reference/reference.md``). The model is pruned the way
``rankwise compress --structure S --ratio R --calib-file ... --seed K`` does it (the same API calls,
in one process), evaluated and saved; with ``--heal-steps N`` it is then healed (distilled from the
dense model, KL on the logits, calibration windows only), evaluated and saved again: the unhealed and
the healed row come from the same pruned model. ``lowrank`` rows are the low-rank default (svd-llm,
sub-groups + refit) at the same ratio, for comparison at the same number of targeted weights.

``speed``: prefill and decode tokens/s of the dense model and of every saved row at one ratio and
seed, each in a fresh process (``prune_speed.py``) that loads the directory with plain transformers
and never imports rankwise (the low-rank default needs rankwise's own layers: it is loaded with
``rankwise.load`` in its process and labelled so); models in interleaved rounds, medians, the same
thread count for all, the load average before and after recorded.

Results merge into ``results/prune.json`` (a row already there is replaced). Each row is one heavy
run; run it under the team lock::

    flock /work/team/heavy.lock nice -n 5 python benchmarks/prune.py run --structure width --ratio 0.2 --seed 3 --heal-steps 200
    flock /work/team/heavy.lock nice -n 5 python benchmarks/prune.py speed --ratio 0.2 --seed 3
    python benchmarks/prune.py render
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).parent
OUT = HERE / "results" / "prune.json"
TEXT = Path(os.environ.get("RANKWISE_REFTEXT", "/work/team/reftext"))
MODELS = Path(os.environ.get("RANKWISE_PRUNE_MODELS", "/tmp/rankwise-prune-bench"))
PROTOCOL = {"calib_windows": 64, "calib_seqlen": 512, "eval_windows": 64, "eval_seqlen": 512,
            "calib": "wiki_calib.txt", "test": "wiki_test.txt (first windows)"}


@contextlib.contextmanager
def results():
    OUT.parent.mkdir(exist_ok=True)
    with open(str(OUT) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(OUT.read_text()) if OUT.is_file() else {}
        data.setdefault("benchmark", "prune")
        data.setdefault("model", "smollm2-135m-instruct")
        data.setdefault("protocol", PROTOCOL)
        data.setdefault("rows", [])
        data.setdefault("speed", [])
        yield data
        tmp = OUT.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, OUT)


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def row_name(structure: str, options: dict, healed: bool) -> str:
    opt = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    return structure + (f"[{opt}]" if opt else "") + ("+heal" if healed else "")


def model_dir(name: str, ratio: float, seed: int) -> Path:
    safe = name.replace("[", "_").replace("]", "").replace(",", "_").replace("=", "-").replace("+", "_")
    return MODELS / f"{safe}-r{ratio:g}-s{seed}"


def put(data: dict, key: str, row: dict, match: tuple[str, ...]) -> None:
    data[key] = [r for r in data[key] if any(r.get(k) != row.get(k) for k in match)] + [row]


def cmd_run(args) -> None:
    import torch

    import rankwise
    from rankwise.calibration.corpus import load_corpus
    from rankwise.compression.compress import calibration_windows
    from rankwise.compression.saving import save_compressed
    from rankwise.evaluation.perplexity import perplexity
    from rankwise.healing import HealOptions, heal

    options = dict(kv.split("=", 1) for kv in args.set or [])
    options = {k: json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v for k, v in options.items()}
    threads = torch.get_num_threads()
    model, tok, path = rankwise.load()
    test_text = load_corpus("test", TEXT / "wiki_test.txt")
    windows, _ = calibration_windows(model, load_corpus("calib", TEXT / "wiki_calib.txt"), tok, 64, 512, args.seed)
    teacher = copy.deepcopy(model) if args.heal_steps and args.structure != "lowrank" else None
    before = sum(p.numel() for p in model.parameters())

    def evaluate(m) -> float:
        return perplexity(m, tok, text=test_text, seqlen=512, windows=64, progress=False).ppl

    load0 = loadavg()
    t0 = time.perf_counter()
    model, report = rankwise.compress(model, args.structure, args.ratio, calib=windows, tokenizer=tok, inplace=True,
                                      options=options, progress=False)
    seconds = time.perf_counter() - t0
    load1 = loadavg()
    ppl = evaluate(model)
    name = row_name(args.structure, options, False)
    out = model_dir(name, args.ratio, args.seed)
    save_compressed(model, tok, out, report, overwrite=True, extra={"source_model": str(path)})
    base = {"ratio": args.ratio, "seed": args.seed, "structure": args.structure, "options": options,
            "resolved": {"options": report.config["options"], "engine": report.config["engine"]},
            "achieved_ratio": report.achieved_ratio, "targeted_params_before": report.targeted_params_before,
            "targeted_params_after": report.targeted_params_after, "model_params_before": before,
            "model_params_after": sum(p.numel() for p in model.parameters()), "threads": threads,
            "command": " ".join(["python", "benchmarks/prune.py", *sys.argv[1:]])}
    summary = None
    if report.pruning:
        from rankwise.compression.pruning import pruning_summary

        summary = pruning_summary(report.pruning)
    rows = [{**base, "row": name, "healed": False, "ppl": ppl, "compress_seconds": seconds, "loadavg": [load0, load1],
             "dir": str(out), "pruned": summary}]
    print(f"{name} ratio {args.ratio} seed {args.seed}: ppl {ppl:.3f} ({summary}), {seconds:.0f} s", flush=True)
    if args.heal_steps:
        opts = HealOptions(steps=args.heal_steps, rank=args.heal_rank, lr=args.heal_lr)
        load2 = loadavg()
        t1 = time.perf_counter()
        report.healing = heal(model, windows, opts, teacher=teacher)
        hs = time.perf_counter() - t1
        hppl = evaluate(model)
        # the protocol heals 200 steps; another length is its own row (``+heal400``)
        hname = row_name(args.structure, options, True) + ("" if args.heal_steps == 200 else str(args.heal_steps))
        hout = model_dir(hname, args.ratio, args.seed)
        save_compressed(model, tok, hout, report, overwrite=True, extra={"source_model": str(path)})
        rows.append({**base, "row": hname, "healed": True, "ppl": hppl, "compress_seconds": seconds,
                     "heal_seconds": hs, "healing": report.healing, "loadavg": [load2, loadavg()], "dir": str(hout),
                     "pruned": summary})
        print(f"{hname}: ppl {hppl:.3f}, heal {hs:.0f} s", flush=True)
    with results() as data:
        for r in rows:
            put(data, "rows", r, ("row", "ratio", "seed"))


def _measure(path: str, kind: str, threads: int) -> dict:
    script = HERE / "prune_speed.py"
    res = subprocess.run([sys.executable, str(script), path, "--threads", str(threads), "--kind", kind],
                         capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{path}: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def cmd_speed(args) -> None:
    from rankwise.models.registry import resolve_model

    with results() as data:
        # the default of each structure (a variant row, e.g. ``width[refit_ridge=held-out]``, may name the directory
        # the default's later run overwrote)
        rows = [r for r in data["rows"] if r["ratio"] == args.ratio and r["seed"] == args.seed and not r["healed"]
                and not r.get("options") and r.get("dir") and Path(r["dir"]).is_dir()]
    models = [("dense", str(resolve_model(None)), "plain")]
    for r in sorted(rows, key=lambda r: r["row"]):
        models.append((r["row"], r["dir"], "rankwise" if r["structure"] == "lowrank" else "plain"))
    load0 = loadavg()
    runs: dict[str, list[dict]] = {m[0]: [] for m in models}
    for _ in range(args.rounds):
        for name, path, kind in models:
            runs[name].append(_measure(path, kind, args.threads))
            print(name, runs[name][-1], flush=True)
    load1 = loadavg()
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("prefill_tok_s", "decode_tok_s")}
           for n, rs in runs.items()}
    rec = {"ratio": args.ratio, "seed": args.seed, "threads": args.threads, "rounds": args.rounds,
           "loadavg": [load0, load1], "prefill_tokens": 512, "decode_tokens": 64, "prompt_tokens": 16,
           "models": {n: {**med[n], "runtime": k, "prefill_vs_dense": med[n]["prefill_tok_s"] / med["dense"]["prefill_tok_s"],
                          "decode_vs_dense": med[n]["decode_tok_s"] / med["dense"]["decode_tok_s"], "runs": runs[n]}
                      for n, _, k in models},
           "command": " ".join(["python", "benchmarks/prune.py", *sys.argv[1:]])}
    with results() as data:
        put(data, "speed", rec, ("ratio", "seed"))


def cmd_render(args) -> None:
    data = json.loads(OUT.read_text())
    rows = data["rows"]
    names = sorted({(r["ratio"], r["row"]) for r in rows})
    print("| removed | row | seeds | ppl mean | min - max | vs low-rank default | targeted removed | model params | pruned |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ratio, name in names:
        rs = [r for r in rows if r["ratio"] == ratio and r["row"] == name]
        ppl = [r["ppl"] for r in rs]
        lr = [r["ppl"] for r in rows if r["ratio"] == ratio and r["row"] == "lowrank" and
              r["seed"] in {x["seed"] for x in rs}]
        vs = f"{statistics.mean(ppl) / statistics.mean(lr):.2f}x" if lr and name != "lowrank" else "-"
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        print(f"| {ratio:.0%} | {name} | {seeds} | {statistics.mean(ppl):.2f} | {min(ppl):.2f} - {max(ppl):.2f} | {vs} | "
              f"{rs[0]['achieved_ratio']:.3f} | {rs[0]['model_params_after'] / 1e6:.1f} M | {rs[0].get('pruned') or ''} |")
    for sp in data.get("speed", []):
        print(f"\nspeed at {sp['ratio']:.0%} (seed {sp['seed']}, {sp['threads']} threads, {sp['rounds']} rounds, "
              f"load {sp['loadavg'][0][0]:.1f} -> {sp['loadavg'][1][0]:.1f}):\n")
        print("| model | runtime | prefill tok/s | vs dense | decode tok/s | vs dense |")
        print("|---|---|---|---|---|---|")
        for n, m in sp["models"].items():
            print(f"| {n} | {m['runtime']} | {m['prefill_tok_s']:.0f} | {m['prefill_vs_dense']:.2f}x | "
                  f"{m['decode_tok_s']:.1f} | {m['decode_vs_dense']:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--structure", required=True)
    r.add_argument("--ratio", type=float, required=True)
    r.add_argument("--seed", type=int, default=3)
    r.add_argument("--set", action="append", help="structure option KEY=VALUE")
    r.add_argument("--heal-steps", type=int, default=0)
    r.add_argument("--heal-rank", type=int, default=8)
    r.add_argument("--heal-lr", type=float, default=5e-4)
    s = sub.add_parser("speed")
    s.add_argument("--ratio", type=float, required=True)
    s.add_argument("--seed", type=int, default=3)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--rounds", type=int, default=3)
    sub.add_parser("render")
    args = ap.parse_args()
    {"run": cmd_run, "speed": cmd_speed, "render": cmd_render}[args.cmd](args)


if __name__ == "__main__":
    main()
