"""Every issue-13 structure against low rank on SmolLM2-135M-Instruct: quality, size, time, CPU latency.

For each row (a structure and its options) and each ratio of the targeted weight values removed, the
model from ``rankwise.load()`` is compressed in memory by the default engine (sequential, block
granularity, no refit; every linear layer of the 30 blocks targeted, uniform budget) on the same
calibration windows, then:

* perplexity on the first ``--eval-windows`` non-overlapping 512-token windows of the test split;
* bytes on disk: the size of the saved ``model.safetensors`` (float32, shared tensors once);
* compression wall time: the engine's own ``report.seconds`` (calibration + fitting + replacing);
* whole-model CPU latency (``latency`` sub-command, separately, on the saved models): prefill of 512
  tokens with ``logits_to_keep=1`` and batch-1 decode per token with the KV cache, 1 thread, the
  models of one ratio measured in interleaved rounds (dense, lowrank, each structure, repeat), medians.
  ``--random-rows`` adds structures that have no fitted model: every targeted layer planned by the
  structure's method at the ratio (default options) and filled with random values, as
  ``structure_latency.py`` builds them (latency depends on shapes, ranks, blocks and sparsity
  patterns, not on the values); those records carry ``"values": "random"``.

Protocols: ``full`` = 64 x 512 calibration windows of the calib split (seed 3), perplexity on 64 x 512
test windows (the default protocol); ``reduced`` = 16 x 512 calibration windows and perplexity on the first
16 x 512 test windows (for the rows the full grid had no time for; compared only with low rank and
dense at the same protocol).

Results are merged into ``results/structures.json`` as each row finishes (resumable: a row already
there is skipped). A budget a structure cannot reach is recorded as an infeasible row with the error.

    python benchmarks/structures.py run --protocol full --rows lowrank,lowrank-sparse,lowrank-sparse-2:4 --ratios 0.4,0.6
    python benchmarks/structures.py run --protocol reduced --ratios 0.2,0.4,0.6
    python benchmarks/structures.py latency --protocol full --ratio 0.4
    python benchmarks/structures.py latency --protocol reduced --ratio 0.4 --random-rows monarch,blockdiag-lowrank
    python benchmarks/structures.py render
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "structures.json"
MODELS = Path(os.environ.get("RANKWISE_BENCH_MODELS", "/tmp/rankwise-structures-bench"))

#: Row name -> (structure, options).
ROWS = {
    "lowrank": ("lowrank", {}),  # run with PLAIN_ENGINE (see ENGINE)
    "lowrank-sparse": ("lowrank-sparse", {}),
    "lowrank-sparse-2:4": ("lowrank-sparse", {"pattern": "2:4"}),
    "prune": ("prune", {}),
    "prune-2:4": ("prune", {"pattern": "2:4"}),
    "monarch": ("monarch", {}),
    "monarch-undamped": ("monarch", {"damping": 0.0}),  # the fit before its default damping (0.01)
    "blockdiag-lowrank": ("blockdiag-lowrank", {}),
    "blockdiag-lowrank-undamped": ("blockdiag-lowrank", {"damping": 0.0}),  # before its default damping
    "kronecker": ("kronecker", {}),
    "shared-basis": ("shared-basis", {}),
}
#: Engine settings per row: low rank's default engine became sub-groups + refit (issue 11); its rows here
#: stay the plain block-granular, no-refit baseline the other structures run with (their default).
PLAIN_ENGINE = {"granularity": "block", "refit": False}
ENGINE = {"lowrank": PLAIN_ENGINE}
PROTOCOLS = {
    "full": {"calib_windows": 64, "calib_seqlen": 512, "eval_windows": 64, "eval_seqlen": 512},
    "reduced": {"calib_windows": 16, "calib_seqlen": 512, "eval_windows": 16, "eval_seqlen": 512},
}
SEED = 3


# -- the results file (merged under a lock: a run and a latency job may write at the same time) --------

@contextlib.contextmanager
def results():
    """The results dict, written back atomically on exit, under an exclusive lock."""
    RESULTS.mkdir(exist_ok=True)
    with open(str(OUT) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(OUT.read_text()) if OUT.is_file() else {}
        data.setdefault("benchmark", "structures")
        data.setdefault("model", "smollm2-135m-instruct")
        data.setdefault("protocols", PROTOCOLS)
        data.setdefault("rows", [])
        data.setdefault("latency", [])
        yield data
        tmp = OUT.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, OUT)


def find(rows: list[dict], **key) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in key.items())), None)


def model_dir(protocol: str, row: str, ratio: float) -> Path:
    return MODELS / protocol / f"{row.replace(':', '_')}-{ratio:g}"


# -- compression rows ----------------------------------------------------------------------------

def dense_row(protocol: str) -> dict:
    import rankwise
    from rankwise.calibration.corpus import load_corpus
    from rankwise.evaluation.perplexity import perplexity
    from rankwise.models.saved import dedup_state

    p = PROTOCOLS[protocol]
    model, tok, path = rankwise.load()
    res = perplexity(model, tok, text=load_corpus("test"), seqlen=p["eval_seqlen"], windows=p["eval_windows"])
    state, _ = dedup_state(model.state_dict())
    return {"row": "dense", "protocol": protocol, "ratio": 0.0, "ppl": res.ppl,
            "bytes": sum(t.numel() * t.element_size() for t in state.values()),
            "bytes_note": "float32 state dict, tied embedding once (what a float32 save stores)",
            "when": time.strftime("%Y-%m-%d %H:%M")}


def run_row(row: str, ratio: float, protocol: str) -> dict:
    import rankwise
    from rankwise.calibration.corpus import load_corpus
    from rankwise.compression.compress import compress
    from rankwise.compression.saving import save_compressed
    from rankwise.errors import ConfigError
    from rankwise.evaluation.perplexity import perplexity

    structure, options = ROWS[row]
    p = PROTOCOLS[protocol]
    model, tok, _ = rankwise.load()
    base = {"row": row, "structure": structure, "options": options, "engine": ENGINE.get(row, "default"),
            "protocol": protocol, "ratio": ratio,
            "when": time.strftime("%Y-%m-%d %H:%M")}
    t0 = time.perf_counter()
    try:
        model, report = compress(model, structure, ratio, options=options, tokenizer=tok, progress=False,
                                 engine=ENGINE.get(row),
                                 calib_options={"windows": p["calib_windows"], "seqlen": p["calib_seqlen"],
                                                "seed": SEED})
    except ConfigError as e:
        return {**base, "infeasible": str(e)}
    wall = time.perf_counter() - t0
    res = perplexity(model, tok, text=load_corpus("test"), seqlen=p["eval_seqlen"], windows=p["eval_windows"])
    report.perplexity = {"compressed": res.ppl, "windows": res.windows, "seqlen": res.seqlen, "corpus": "wiki test"}
    dest = model_dir(protocol, row, ratio)
    if dest.exists():
        shutil.rmtree(dest)
    save_compressed(model, tok, dest, report)
    kinds: dict[str, int] = {}
    for lr in report.layers:
        kinds[lr.kind or "dense"] = kinds.get(lr.kind or "dense", 0) + 1
    specs = sorted({json.dumps(lr.spec, sort_keys=True) for lr in report.layers if lr.spec})
    return {**base, "ppl": res.ppl, "eval_seconds": res.seconds, "compress_seconds": report.seconds,
            "compress_wall_seconds": wall, "bytes": (dest / "model.safetensors").stat().st_size,
            "targeted_bytes_after": report.targeted_bytes_after, "targeted_bytes_before": report.targeted_bytes_before,
            "achieved_ratio": report.achieved_ratio, "layer_kinds": kinds, "distinct_specs": specs[:12],
            "notes": sorted({lr.note for lr in report.layers if getattr(lr, "note", None)}),
            "model_dir": str(dest)}


def cmd_run(args) -> None:
    torch.set_num_threads(args.threads)
    rows = args.rows.split(",") if args.rows else list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
    with results() as data:
        have_dense = find(data["rows"], row="dense", protocol=args.protocol) is not None
    if not have_dense:
        res = dense_row(args.protocol)
        print(json.dumps(res), flush=True)
        with results() as data:
            data["rows"].append(res)
    for ratio in [float(x) for x in args.ratios.split(",")]:
        for row in rows:
            with results() as data:
                if find(data["rows"], row=row, protocol=args.protocol, ratio=ratio) is not None:
                    continue
            try:
                res = run_row(row, ratio, args.protocol)
            except Exception:  # keep the grid going; the failure is recorded
                res = {"row": row, "protocol": args.protocol, "ratio": ratio, "failed": traceback.format_exc()[-3000:]}
            print(json.dumps(res), flush=True)
            with results() as data:
                data["rows"].append(res)


# -- latency ------------------------------------------------------------------------------------------

@torch.inference_mode()
def prefill_once(model, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t


@torch.inference_mode()
def decode_once(model, prompt: torch.Tensor, steps: int) -> float:
    """Seconds per token of ``steps`` cached single-token forward passes after a short prompt."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t) / steps


def random_model(row: str, ratio: float):
    """The dense model with every targeted linear replaced by ``row``'s structure at ``ratio``, planned
    by its method (default options) and filled with random values (:func:`structure_latency.build`)."""
    import rankwise
    from rankwise.models.surgery import find_linears, linear_shape, set_module
    from structure_latency import build

    structure, options = ROWS[row]
    if options or structure == "shared-basis":
        sys.exit(f"--random-rows takes structures with default per-layer options, not {row!r}")
    model = rankwise.load()[0]
    gen = torch.Generator().manual_seed(0)
    for name, mod in find_linears(model).items():
        layer, _ = build(structure, linear_shape(mod), ratio, gen)  # with a bias vector: one add, negligible
        set_module(model, name, layer)
    return model.eval()


def cmd_latency(args) -> None:
    import rankwise

    torch.set_num_threads(args.threads)
    with results() as data:
        done = [r for r in data["rows"] if r["protocol"] == args.protocol and r.get("ratio") == args.ratio
                and "model_dir" in r and (not args.rows or r["row"] in args.rows.split(","))]
    models = {"dense": rankwise.load()[0]}
    for r in sorted(done, key=lambda r: list(ROWS).index(r["row"])):
        models[r["row"]] = rankwise.load(r["model_dir"])[0]
    random_rows = [r for r in args.random_rows.split(",") if r]
    for row in random_rows:
        if row not in ROWS:
            sys.exit(f"unknown row {row!r}; valid: {', '.join(ROWS)}")
        models[row + " (random values)"] = random_model(row, args.ratio)
    g = torch.Generator().manual_seed(0)
    vocab = models["dense"].config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prefill), generator=g)
    prompt = torch.randint(0, vocab, (1, 16), generator=g)
    for m in models.values():  # warm up (allocator, CSR index caches)
        prefill_once(m, ids[:, :64])
        decode_once(m, prompt, 2)
    pre: dict[str, list[float]] = {k: [] for k in models}
    dec: dict[str, list[float]] = {k: [] for k in models}
    for rnd in range(args.rounds):
        for k, m in models.items():
            pre[k].append(prefill_once(m, ids))
            dec[k].append(decode_once(m, prompt, args.decode_steps))
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{k} {1e3 * pre[k][-1]:.0f}/{1e3 * dec[k][-1]:.1f} ms"
                                                            for k in models), flush=True)
    med = {k: (statistics.median(pre[k]), statistics.median(dec[k])) for k in models}
    out = []
    for k, (p, d) in med.items():
        rec = {"row": k, "protocol": args.protocol, "ratio": args.ratio,
               "values": "random" if k.endswith(" (random values)") else "fitted", "prefill_ms": 1e3 * p,
               "decode_ms_per_token": 1e3 * d, "prefill_vs_dense": p / med["dense"][0],
               "decode_vs_dense": d / med["dense"][1],
               "prefill_spread_ms": [1e3 * min(pre[k]), 1e3 * max(pre[k])],
               "decode_spread_ms": [1e3 * min(dec[k]), 1e3 * max(dec[k])]}
        if "lowrank" in med:
            rec.update(prefill_vs_lowrank=p / med["lowrank"][0], decode_vs_lowrank=d / med["lowrank"][1])
        out.append(rec)
        print(json.dumps(rec), flush=True)
    with results() as data:
        data["latency"] = [r for r in data["latency"] if not (r["protocol"] == args.protocol
                                                                and r["ratio"] == args.ratio
                                                                and r["row"] in models)]
        data["latency"].extend(out)
        data.setdefault("latency_setup", {})[f"{args.protocol}@{args.ratio:g}"] = {
            "threads": args.threads, "rounds": args.rounds, "prefill_tokens": args.prefill,
            "decode_steps": args.decode_steps, "decode_prompt": 16, "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "load_average": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M")}


# -- table ----------------------------------------------------------------------------------------------

def render() -> str:
    data = json.loads(OUT.read_text())
    lines = []
    for protocol in PROTOCOLS:
        rows = [r for r in data["rows"] if r["protocol"] == protocol]
        if not rows:
            continue
        dense = find(rows, row="dense")
        lat = {(r["row"], r["ratio"]): r for r in data["latency"] if r["protocol"] == protocol}
        dlat = {ratio: lat.get(("dense", ratio)) for ratio in {r["ratio"] for r in data["latency"]}}
        p = PROTOCOLS[protocol]
        lines += [f"**{protocol} protocol** ({p['calib_windows']} x {p['calib_seqlen']} calibration windows, "
                  f"perplexity on {p['eval_windows']} x {p['eval_seqlen']} test windows)", "",
                  "| removed | structure | ppl | ppl / lowrank | MB on disk | compress s | prefill ms (vs dense, vs lowrank) "
                  "| decode ms/token (vs dense, vs lowrank) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        if dense is not None:
            dl = next((v for v in dlat.values() if v), None)
            lines.append(f"| 0% | dense | {dense['ppl']:.2f} | | {dense['bytes'] / 1e6:.1f} | | "
                         + (f"{dl['prefill_ms']:.0f} | {dl['decode_ms_per_token']:.1f} |" if dl else "| |"))
        for ratio in sorted({r["ratio"] for r in rows if r["row"] != "dense"}):
            lr = find(rows, row="lowrank", ratio=ratio)
            for name in ROWS:
                r = find(rows, row=name, ratio=ratio)
                if r is None:
                    continue
                if "infeasible" in r or "failed" in r:
                    why = r.get("infeasible") or r["failed"].strip().splitlines()[-1]
                    lines.append(f"| {ratio:.0%} | {name} | infeasible: {why[:160]} | | | | | |")
                    continue
                rel = f"{r['ppl'] / lr['ppl']:.2f}x" if lr and "ppl" in lr else ""
                t = lat.get((name, ratio))
                pre = (f"{t['prefill_ms']:.0f} ({t['prefill_vs_dense']:.2f}x, {t.get('prefill_vs_lowrank', 0):.2f}x)"
                       if t else "")
                dec = (f"{t['decode_ms_per_token']:.1f} ({t['decode_vs_dense']:.2f}x, "
                       f"{t.get('decode_vs_lowrank', 0):.2f}x)" if t else "")
                lines.append(f"| {ratio:.0%} | {name} | {r['ppl']:.2f} | {rel} | {r['bytes'] / 1e6:.1f} | "
                             f"{r['compress_seconds']:.0f} | {pre} | {dec} |")
        lines.append("")
        recs = [r for r in data["latency"] if r["protocol"] == protocol]
        if recs:
            lines += [f"Whole-model CPU latency, {protocol} protocol (`values`: fitted = the saved compressed model, "
                      "random = the structure's planned layers filled with random values)", "",
                      "| removed | model | values | prefill 512 tok ms | vs dense | vs lowrank | decode ms/token "
                      "| vs dense | vs lowrank |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
            for t in recs:
                lines.append(f"| {t['ratio']:.0%} | {t['row'].replace(' (random values)', '')} | "
                             f"{'-' if t['row'] == 'dense' else t.get('values', 'fitted')} | {t['prefill_ms']:.0f} | {t['prefill_vs_dense']:.2f}x | "
                             f"{t.get('prefill_vs_lowrank', float('nan')):.2f}x | {t['decode_ms_per_token']:.1f} | "
                             f"{t['decode_vs_dense']:.2f}x | {t.get('decode_vs_lowrank', float('nan')):.2f}x |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="compress + perplexity + bytes for rows x ratios")
    r.add_argument("--rows", default="", help=f"comma-separated rows (default all): {', '.join(ROWS)}")
    r.add_argument("--ratios", default="0.2,0.4,0.6")
    r.add_argument("--protocol", choices=list(PROTOCOLS), default="full")
    r.add_argument("--threads", type=int, default=1)
    lt = sub.add_parser("latency", help="whole-model CPU latency of the saved models of one ratio")
    lt.add_argument("--ratio", type=float, default=0.4)
    lt.add_argument("--protocol", choices=list(PROTOCOLS), default="full")
    lt.add_argument("--rows", default="", help="restrict to these rows (dense always included)")
    lt.add_argument("--random-rows", default="", help="structures timed with random values (no fitted model)")
    lt.add_argument("--rounds", type=int, default=5)
    lt.add_argument("--prefill", type=int, default=512)
    lt.add_argument("--decode-steps", type=int, default=32)
    lt.add_argument("--threads", type=int, default=1)
    sub.add_parser("render", help="print the Markdown table")
    args = ap.parse_args()
    if args.cmd == "run":
        cmd_run(args)
    elif args.cmd == "latency":
        cmd_latency(args)
    else:
        print(render())


if __name__ == "__main__":
    main()
