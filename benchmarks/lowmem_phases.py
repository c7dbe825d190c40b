"""Where the peak RSS of ``--low-memory`` goes: the peak of each step of ``compress_low_memory``
(svd-llm, uniform, 40 % removed, default calibration; svd-llm's default engine, or ``--engine plain``),
in process, with the peak-RSS counter reset (``/proc/self/clear_refs``, Linux) before each step and
read after it.

    python benchmarks/lowmem_phases.py [--model smollm2-135m-instruct] [--blocks 3] [--without hqq] [--engine plain]
                                       [--cache-in-memory]
    python benchmarks/lowmem_phases.py --model gemma3-270m --blocks 100 --targets '\.0\.(self_attn|mlp)\.'

``--blocks N`` stops after the N-th block (every block of a model has the same shapes, so the first
few show the steady state); ``--without MOD`` makes ``import MOD`` fail, to measure what an optional
package that transformers imports when installed (``hqq``, a benchmark extra here) costs.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import tempfile
import time


def status() -> tuple[float, float]:
    """``(RSS, peak RSS since the last reset)`` in MB."""
    with open("/proc/self/status") as f:
        d = dict(line.split(":", 1) for line in f)
    return int(d["VmRSS"].split()[0]) / 1024, int(d["VmHWM"].split()[0]) / 1024


def reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Done(Exception):
    pass


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--engine", choices=("default", "plain"), default="default",
                    help="default: svd-llm's own (sub-groups + held-out-ridge refit); plain: block granularity, no refit")
    ap.add_argument("--cache-in-memory", action="store_true",
                    help="keep the cached activations in memory (compress_low_memory(cache_on_disk=False)); "
                    "the default spills them to files beside the output, as the CLI does")
    ap.add_argument("--without", action="append", default=[])
    ap.add_argument("--targets", default=None, help="regex of the layers to compress (e.g. one block's, so "
                    "that the run reaches the final write quickly: later blocks are copied)")
    args = ap.parse_args(argv)
    for name in args.without:
        sys.modules[name] = None  # import fails: transformers treats the package as not installed
    import torch

    torch.set_num_threads(1)
    import rankwise.compression.compress as C
    import rankwise.compression.engine.loop as loop
    import rankwise.compression.engine.source as source
    import rankwise.models.streaming as streaming
    from rankwise.compression.engine.memory import mmap_large_allocations

    mmap_large_allocations()  # as the CLI does for --low-memory
    peak: dict[str, float] = collections.defaultdict(float)
    log: list[tuple] = []

    def phase(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            before, hwm0 = status()
            if not log:
                peak["preflight (imports, tokenize, skeleton)"] = hwm0
            reset()
            try:
                return fn(*a, **k)
            finally:
                now, hwm = status()
                peak[name] = max(peak[name], hwm)
                log.append((name, round(before), round(hwm), round(now)))
                reset()
        return wrapper

    loop.capture_inputs = phase("capture (block-0 inputs)", loop.capture_inputs)
    loop.Engine._collect = phase("collect statistics", loop.Engine._collect)
    loop.Engine._fit_group = phase("fit + replace", loop.Engine._fit_group)
    loop.advance = phase("advance activations", loop.advance)
    source.StreamedSource.load = phase("load block", source.StreamedSource.load)
    release = phase("release (write shard)", source.StreamedSource.release)

    def release_then_stop(self, i, write=True):
        release(self, i, write)
        if i + 1 >= args.blocks:
            raise Done

    source.StreamedSource.release = release_then_stop
    streaming.stream_merge = phase("write (merge)", streaming.stream_merge)
    t0 = time.perf_counter()
    reset()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            engine = {"granularity": "block", "refit": False} if args.engine == "plain" else {}
            C.compress_low_memory(args.model, tmp + "/o", "lowrank", 0.4, targets=args.targets, progress=False,
                                  engine=engine, cache_on_disk=not args.cache_in_memory)
        peak["after the last step (side files: tokenizer, rank report)"] = status()[1]
    except Done:
        pass
    res = {"model": args.model, "blocks": args.blocks, "without": args.without, "engine": args.engine,
           "activations": "memory" if args.cache_in_memory else "disk",
           "seconds": time.perf_counter() - t0, "phase_peak_mb": {k: round(v) for k, v in peak.items()},
           "log (phase, rss before, peak, rss after)": log}
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
