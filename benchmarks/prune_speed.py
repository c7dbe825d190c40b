"""Prefill and decode tokens/s of one saved model in plain transformers (a helper of ``prune.py speed``).

``--kind plain`` loads the directory with ``AutoModelForCausalLM.from_pretrained`` in a process where
importing rankwise fails (``sys.modules["rankwise"] = None``); ``--kind rankwise`` loads it with
``rankwise.load`` (a low-rank model needs rankwise's layers). Prefill: one forward pass over a
512-token prompt that builds the KV cache and scores the last position (``logits_to_keep=1``, as
``generate`` does), tokens/s = 512 / median seconds. Decode: greedy ``generate`` of 64 tokens after a
16-token prompt minus the same call producing 1 token, tokens/s = 63 / difference of medians.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--kind", choices=("plain", "rankwise"), default="plain")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.kind == "plain":
        sys.modules["rankwise"] = None  # type: ignore[assignment]  # any import of rankwise fails
    import torch

    torch.set_num_threads(args.threads)
    if args.kind == "plain":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.path, dtype=torch.float32).eval()
    else:
        import rankwise

        model = rankwise.load(args.path)[0].eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, 512), generator=g)
    short = torch.randint(0, vocab, (1, 16), generator=g)
    mask = torch.ones_like(short)
    with torch.no_grad():
        t_pre = median_seconds(lambda: model(input_ids=prompt, use_cache=True, logits_to_keep=1), repeats=5)

        def gen(n: int):
            return lambda: model.generate(input_ids=short, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                          do_sample=False, use_cache=True, pad_token_id=0)

        t1 = median_seconds(gen(1), repeats=5)
        t64 = median_seconds(gen(64), repeats=3)
    print(json.dumps({"prefill_tok_s": 512 / t_pre, "decode_tok_s": 63 / max(t64 - t1, 1e-9),
                      "params": sum(p.numel() for p in model.parameters()),
                      "rankwise_imported": "rankwise" in sys.modules and sys.modules["rankwise"] is not None}))


if __name__ == "__main__":
    main()
