"""Forward latency of the structured layers against ``nn.Linear`` on CPU, SmolLM2 shapes, one layer at a time.

Each structure is planned by its compression method (default options) at ``--ratio`` of the weights
removed, built empty from its spec and filled with random values (latency depends on shapes, block
counts, ranks and sparsity patterns, not on the values; sparse masks are drawn as the top-|x| of a
random matrix). Low rank at the same budget is the reference row. Inputs are ``(tokens, in)`` for
``--tokens`` (1 = decode, 512 = prefill). Measurements are interleaved round-robin over the variants
(``--rounds`` rounds of up to ``--reps`` calls each, fewer for layers slower than 50 ms / ``--reps``); the
median per-call time is reported, with
``vs_dense = time / dense time`` (< 1 is faster than dense).

    python benchmarks/structure_latency.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SHAPES = [(576, 576), (1536, 576), (576, 1536), (192, 576)]
STRUCTURES = ["monarch", "blockdiag-lowrank", "lowrank-sparse", "prune", "kronecker"]


def build(name: str, shape: tuple[int, int], ratio: float, gen: torch.Generator):
    """(layer, spec) of structure ``name`` for an (out, in) ``shape`` with random contents."""
    from rankwise.compression.methods.base import get_method
    from rankwise.linalg.sparse import project_pattern
    from rankwise.structures.base import LAYERS
    from rankwise.structures.lowrank import LowRankLinear
    from rankwise.structures.sparse import SparseLinear

    m, n = shape
    target = (1.0 - ratio) * m * n
    if name == "lowrank":
        k = int(target // (m + n))
        layer, spec = LowRankLinear(n, m, k), {"rank": k}
    else:
        spec = get_method(name).plan_layer(shape, target)
        kind = {"prune": "sparse"}.get(name, name)
        layer = LAYERS.get(kind).from_spec(n, m, True, spec, device="cpu")
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        for mod_name, mod in list(layer.named_modules()):
            if isinstance(mod, SparseLinear):
                scores = torch.randn(m, n, generator=gen)
                mask = project_pattern(scores, mod.pattern, mod.nnz_per_row)
                new = SparseLinear.from_dense(scores, mask, mod.pattern, bias=mod.bias)
                if mod_name:
                    setattr(layer, mod_name, new)
                else:
                    layer = new
    return layer.eval(), spec


def time_call(fn, x, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--structures", nargs="+", default=STRUCTURES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "structure_latency.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)

    rows = []
    for m, n in SHAPES:
        variants = {"dense": (torch.nn.Linear(n, m).eval(), {})}
        for name in ["lowrank", *args.structures]:
            variants[name] = build(name, (m, n), args.ratio, gen)
        for tokens in args.tokens:
            x = torch.randn(tokens, n, generator=gen)
            times: dict[str, list[float]] = {k: [] for k in variants}
            reps = {}
            with torch.inference_mode():
                for k, (layer, _) in variants.items():  # warm up (CSR index caches, allocator); slow layers get fewer reps
                    layer(x)
                    reps[k] = max(3, min(args.reps, int(0.05 / max(time_call(layer, x, 2), 1e-6))))
                for _ in range(args.rounds):
                    for k, (layer, _) in variants.items():
                        times[k].append(time_call(layer, x, reps[k]))
            dense = statistics.median(times["dense"])
            for k, (layer, spec) in variants.items():
                t = statistics.median(times[k])
                stored = m * n if k == "dense" else layer.num_stored()
                rows.append({"shape": [m, n], "tokens": tokens, "structure": k, "spec": spec,
                             "stored_fraction": stored / (m * n), "ms": 1e3 * t, "vs_dense": t / dense,
                             "spread_ms": [1e3 * min(times[k]), 1e3 * max(times[k])]})
                print(f"{m}x{n} tokens={tokens:4d} {k:18s} stored={stored / (m * n):.3f} {1e3 * t:8.3f} ms "
                      f"vs dense {t / dense:.2f}", flush=True)
    result = {"benchmark": "structure_latency", "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": args.threads, "ratio": args.ratio, "rounds": args.rounds,
              "reps": args.reps, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
