"""Dense vs compressed (40% removed) latency on CPU, same run: 512-token prefill and batch-1 decode.

Latency depends only on the layer shapes and ranks, not on the factor values, so the compressed
models are built by swapping in ``LowRankLinear`` layers at the planned ranks (uniform at
``--ratio``; and the speed-aware uniform plan whose capped layers stay dense). Measurements are
interleaved round-robin over the variants (``--rounds``) and the medians reported with ratios to dense.

    python benchmarks/latency.py --threads 1
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def build(model, shapes, plan):
    from rankwise.models.surgery import linear_bias, set_module
    from rankwise.structures.lowrank import LowRankLinear

    m2 = copy.deepcopy(model)
    for name, k in plan.items():
        if k is None:
            continue
        out_f, in_f = shapes[name]
        b = linear_bias(m2.get_submodule(name))
        set_module(m2, name, LowRankLinear(in_f, out_f, k, bias=b is not None))
    return m2.eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--plans", default=None, help="allocation.json whose 'plans_at_0.4' are added as variants")
    ap.add_argument("--out", default=str(RESULTS / "latency.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from rankwise.compression.allocation.solvers import uniform_speed_aware
    from rankwise.compression.allocation.budget import plan_params, uniform_rank
    from rankwise.compression.allocation.speed import load_speed_profile
    from rankwise.evaluation.latency import decode_tokens_per_second, prefill_seconds
    from rankwise.models.loading import load_model
    from rankwise.models.surgery import find_linears, linear_shape

    model, tok, path = load_model(args.model)
    shapes = {n: linear_shape(m) for n, m in find_linears(model).items()}
    t0 = time.perf_counter()
    prof = load_speed_profile(sorted(set(shapes.values())))
    t_profile = time.perf_counter() - t0
    caps = {n: prof.cap(*s) for n, s in shapes.items()}
    plans = {"uniform": {n: uniform_rank(*s, args.ratio) for n, s in shapes.items()},
             "uniform-speed-aware": uniform_speed_aware(args.ratio, shapes, caps)}
    if args.plans and Path(args.plans).is_file():
        for k, p in json.loads(Path(args.plans).read_text()).get("plans_at_0.4", {}).items():
            if k != "uniform":
                plans[k] = p
    variants = {"dense": model, **{k: build(model, shapes, p) for k, p in plans.items()}}
    removed = {k: 1 - plan_params(shapes, p)[1] / plan_params(shapes, p)[0] for k, p in plans.items()}
    pre, dec = {k: [] for k in variants}, {k: [] for k in variants}
    ttft = {k: [] for k in variants}
    for r in range(args.rounds):
        for k, m in variants.items():
            pre[k].append(prefill_seconds(m, args.prefill, repeats=1, warmup=1 if r == 0 else 0))
            ttft[k].append(prefill_seconds(m, args.prefill, repeats=1, warmup=1 if r == 0 else 0,
                                           last_logits_only=True))
            dec[k].append(decode_tokens_per_second(m, args.new_tokens, repeats=1, warmup=1 if r == 0 else 0))
        print(f"round {r + 1}/{args.rounds}", flush=True)
    rows = []
    for k in variants:
        p, d = statistics.median(pre[k]), statistics.median(dec[k])
        rows.append({"variant": k, "removed": removed.get(k, 0.0), "prefill_s": p, "decode_tok_s": d,
                     "prefill_last_logits_s": statistics.median(ttft[k]),
                     "dense_layers": sum(v is None for v in plans[k].values()) if k in plans else len(shapes)})
    base = rows[0]
    for r in rows:
        r["prefill_vs_dense"] = r["prefill_s"] / base["prefill_s"]
        r["prefill_last_logits_vs_dense"] = r["prefill_last_logits_s"] / base["prefill_last_logits_s"]
        r["decode_latency_vs_dense"] = base["decode_tok_s"] / r["decode_tok_s"]
        print(json.dumps(r))
    res = {"benchmark": "latency", "model": str(path), "device": "cpu", "threads": torch.get_num_threads(),
           "prefill_tokens": args.prefill, "decode_new_tokens": args.new_tokens, "rounds": args.rounds,
           "ratio": args.ratio, "speed_profile": prof.to_json(), "speed_profile_seconds": t_profile, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
