"""How the cost of compression grows with model size (issue 14, part 4).

Synthetic Llama-shaped models (random weights: time and memory do not depend on the values) of
growing width and depth are written to a temp dir and compressed with ``compress_low_memory``
(svd-llm, uniform, 40 % removed, sequential, block granularity, no refit, one BLAS thread) in a fresh subprocess each, which
reports its peak RSS and the CPU seconds of each step (``time.thread_time`` of the one compute
thread: the machine's load does not inflate it). Steps are exclusive (a step nested in another is
not counted twice):

* forward      -- the decoder blocks run on cached activations (calibration, data-flow groups,
                  advancing the cache), hooks excluded;
* covariance   -- ``InputStats.add_``: the float64 sums ``X X^T`` inside the hooks;
* cholesky     -- ``torch.linalg.cholesky_ex`` (the whitening);
* svd          -- ``torch.linalg.svd`` of the whitened weights;
* capture      -- the embeddings of the calibration windows (block-0 inputs);
* read / write -- safetensors in (block tensors, embedding rows) and out (shards, final merge);
* other        -- everything else (whitening products, triangular solves, plans, report).

Each step's seconds are fitted by one constant per step times its operation count (forward:
``2 T P_block L`` per pass; covariance: ``T sum_inputs n^2 L``; Cholesky: ``sum_inputs n^3 / 3 L``; SVD:
``sum_layers m n min(m, n) L``; read/write: bytes), which extrapolates them to Llama-2 7B and 70B
shapes at the default calibration (64 x 512 tokens).

    python benchmarks/compress_scale.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
STEPS = ["forward", "covariance", "cholesky", "svd", "capture", "read", "write", "other"]

CHILD = r"""
import collections, functools, json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[5]))
src, out, n, L = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
vocab = int(sys.argv[6])
TOT = collections.defaultdict(float)
STACK = []

def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        t0 = time.thread_time()
        STACK.append(0.0)
        try:
            return fn(*a, **k)
        finally:
            el = time.thread_time() - t0
            child = STACK.pop()
            TOT[name] += el - child
            if STACK:
                STACK[-1] += el
    return wrapper

import rankwise.calibration.stats as stats
import rankwise.compression.engine.groups as groups
import rankwise.compression.engine.loop as loop
import rankwise.compression.engine.runner as runner
import rankwise.compression.engine.source as source
import rankwise.models.streaming as streaming
forward = timed("forward", runner.run_block)
for mod in (loop, runner, groups):
    mod.run_block = forward
stats.InputStats.add_ = timed("covariance", stats.InputStats.add_)
torch.linalg.cholesky_ex = timed("cholesky", torch.linalg.cholesky_ex)
torch.linalg.svd = timed("svd", torch.linalg.svd)
loop.capture_inputs = timed("capture", loop.capture_inputs)
source.load_tensors = timed("read", source.load_tensors)
source.load_rows = timed("read", source.load_rows)
source.save_shard = timed("write", source.save_shard)
streaming.stream_merge = timed("write", streaming.stream_merge)

from rankwise.compression.compress import compress_low_memory
g = torch.Generator().manual_seed(0)
windows = torch.randint(0, vocab, (n, L), generator=g)
t0, c0 = time.perf_counter(), time.thread_time()
# the plain engine (block granularity, no refit) with the activations in memory, as the stored results
# were measured; the default's memory is in memory_model(refit=True, cache_on_disk=True) and
# benchmarks/lowmem_phases.py
rep = compress_low_memory(src, out, "lowrank", 0.4, calib=windows, calib_options=dict(windows=n, seqlen=L),
                          progress=False, granularity="block", refit=False, cache_on_disk=False)
total = time.thread_time() - c0
steps = dict(TOT)
steps["other"] = total - sum(steps.values())
print(json.dumps({"cpu_seconds": total, "wall_seconds": time.perf_counter() - t0, "steps": steps,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "removed": rep.achieved_ratio}))
"""


def llama_shape(hidden: int, layers: int, vocab: int = 1024, inter: int | None = None, heads: int | None = None,
                kv_heads: int | None = None) -> dict:
    inter = inter or 64 * math.ceil(2.6875 * hidden / 64)
    heads = heads or max(1, hidden // 64)
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads or heads, vocab_size=vocab, max_position_embeddings=4096,
                tie_word_embeddings=False)


#: Llama-2 7B and 70B shapes, for the extrapolation.
LLAMA_7B = llama_shape(4096, 32, 32000, 11008, 32, 32)
LLAMA_70B = llama_shape(8192, 80, 32000, 28672, 64, 8)


def counts(shape: dict, tokens: int, elem: int = 4) -> dict:
    """Operation counts of each step for a Llama shape (see the module docstring)."""
    h, f, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    hd = shape.get("head_dim") or h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    layers = [(q, h), (kv, h), (kv, h), (h, q), (f, h), (f, h), (h, f)]   # (out, in): q k v o gate up down
    block = sum(m * n for m, n in layers)
    inputs = [h, q, h, f]                                                 # distinct inputs: qkv, o, gate/up, down
    return {"forward": 2.0 * tokens * block * L * 2,                     # two passes per block: collect, advance
            "covariance": float(tokens) * sum(n * n for n in inputs) * L,
            "cholesky": sum(n ** 3 for n in inputs) / 3.0 * L,
            "svd": float(sum(m * n * min(m, n) for m, n in layers)) * L,
            "capture": float(tokens * h),
            "read": float(block * L * elem),
            "write": float(block * L * elem),
            "block_params": block, "params": block * L + 2 * shape["vocab_size"] * h}


def memory_model(shape: dict, tokens: int, batch_tokens: int, base_mb: float, elem: int = 4,
                 refit: bool = False, preflight_mb: float = 0.0, cache_on_disk: bool = False) -> dict:
    """Predicted peak RSS (MB) of --low-memory, see BENCHMARKS.md:
    ``max(preflight, base + max(capture, block phase))``, ``base`` the resident interpreter, imports and
    skeleton once the tokenizer is gone, ``preflight`` the peak while tokenizing (0: not a peak).

    ``refit=False``: block granularity, no refit (one activation cache; the block's shared input sums).
    ``refit=True`` (the svd-llm default: sub-groups + held-out-ridge refit): the dense model's
    activations and a dense copy of the block besides the compressed ones, and per sub-group, per
    layer, ``C'`` and ``M = X X'^T``; the peak is the largest sub-group's (``down_proj``: ``2 f^2``
    float64 at SmolLM2's and Llama's shapes).

    ``cache_on_disk`` (the default of ``compress_low_memory`` since issue 14's last stop): each cache
    keeps at most two batches resident (the one read, and advance's output before it is written)."""
    h, f = shape["hidden_size"], shape["intermediate_size"]
    hd = shape.get("head_dim") or h // shape["num_attention_heads"]
    q = shape["num_attention_heads"] * hd
    c = counts(shape, tokens, elem)
    mb = 1 / 2 ** 20
    copies = 2 if refit else 1
    acts = copies * (2 * batch_tokens if cache_on_disk else tokens) * h * elem * mb
    weights = copies * c["block_params"] * elem * mb
    if refit:  # sub-groups [q k v] [o] [gate up] [down], each layer its own (C', M); the held-out windows
        # add to them after the ridge is chosen (before issue 14's last stop: a second pair, 2x this)
        per_layer = lambda n: 8 * (2 * n * n + 2 * n)  # noqa: E731  C', M, |x|, x^2
        stats = max(3 * per_layer(h), per_layer(q), 2 * per_layer(h), per_layer(f)) * mb
    else:
        stats = sum(8 * (n * n + 2 * n) for n in (h, q, h, f)) * mb
    forward = batch_tokens * (3 * f + 4 * h) * elem * mb + 8 * 2 ** 20 * mb   # MLP/attention temporaries + f64 chunk
    fit = 8 * (2 * f * f + 2 * h * f) * mb                                    # C copy, S, W S, U/Vh of the widest layer
    block = weights + stats + acts + max(forward, fit)
    capture = (2 * batch_tokens if cache_on_disk else tokens + batch_tokens) * h * elem * mb
    return {"base": base_mb, "activations": acts, "block_weights": weights, "block_stats": stats,
            "transient": max(forward, fit), "peak": max(preflight_mb, base_mb + max(block, capture))}


def write_model(dest: Path, shape: dict, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankwise.models.tiny import tiny_tokenizer

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    model.save_pretrained(dest, safe_serialization=True)
    tiny_tokenizer().save_pretrained(dest)


def fit_constants(rows: list[dict], tokens: int) -> dict:
    """Seconds per unit of each step: least squares through the origin over the sizes run."""
    out = {}
    for step in STEPS[:-1]:
        num = sum(r["steps"].get(step, 0.0) * r["counts"][step] for r in rows)
        den = sum(r["counts"][step] ** 2 for r in rows)
        out[step] = num / den if den else 0.0
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256x4,512x4,768x4,1024x4,512x2,512x8",
                    help="hidden x layers of each synthetic model")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--base-mb", type=float, default=None, help="interpreter base for the memory model "
                    "(default: measured by benchmarks/lowmem_rss.py, else 470)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
    tokens = args.windows * args.seqlen
    base = args.base_mb
    if base is None:
        try:
            base = json.loads((RESULTS / "lowmem_rss_smollm2-135m-instruct.json").read_text())["base_mb"]
        except (OSError, KeyError, ValueError):
            base = 470.0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.sizes.split(","):
            h, L = (int(x) for x in spec.split("x"))
            shape = llama_shape(h, L)
            src = Path(tmp) / f"m{h}x{L}"
            write_model(src, shape)
            p = subprocess.run([sys.executable, "-c", CHILD, str(src), str(Path(tmp) / f"o{h}x{L}"),
                                str(args.windows), str(args.seqlen), str(args.threads), str(shape["vocab_size"])],
                               capture_output=True, text=True, env=env)
            if p.returncode != 0:
                sys.exit(p.stderr[-3000:])
            row = json.loads(p.stdout.strip().splitlines()[-1])
            row.update(hidden=h, layers=L, intermediate=shape["intermediate_size"],
                       counts=counts(shape, tokens), params=counts(shape, tokens)["params"],
                       predicted_rss_mb=memory_model(shape, tokens, 4 * args.seqlen, base)["peak"])
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("hidden", "layers", "params", "cpu_seconds", "peak_rss_mb",
                                                  "predicted_rss_mb")}),
                  {k: round(v, 2) for k, v in row["steps"].items()}, flush=True)
    const = fit_constants(rows, tokens)
    extrap = {}
    for name, shape in (("llama-7b", LLAMA_7B), ("llama-70b", LLAMA_70B)):
        c = counts(shape, 64 * 512, elem=2)
        steps = {s: const[s] * c[s] for s in const}
        extrap[name] = {"cpu_hours_one_thread": {s: v / 3600 for s, v in steps.items()},
                        "total_cpu_hours_one_thread": sum(steps.values()) / 3600,
                        "share": {s: v / sum(steps.values()) for s, v in steps.items()},
                        "memory_model_bf16_mb": memory_model(shape, 64 * 512, 4 * 512, base, elem=2)}
    res = {"benchmark": "compress_scale", "method": "svd-llm", "ratio": 0.4, "calib": f"{args.windows} x {args.seqlen}",
           "threads": args.threads, "rows": rows, "seconds_per_unit": const, "extrapolation": extrap}
    out = Path(args.out or RESULTS / "compress_scale.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(extrap, indent=1))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
