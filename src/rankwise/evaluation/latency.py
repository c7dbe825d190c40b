"""Latency measurement: medians of wall-clock timings, for single matmuls and whole models.

* :func:`median_seconds` — median over ``repeats`` calls of ``fn`` after ``warmup`` calls
  (CUDA work is synchronized before each clock read).
* :func:`prefill_seconds` — one forward pass over a (batch, seqlen) prompt, no KV cache kept.
* :func:`decode_tokens_per_second` — batch-1 greedy ``generate`` with the KV cache; the prompt's
  prefill is timed separately and subtracted, so the number is decode steps per second.

Absolute seconds on a shared machine are noise; compare models side by side in one run.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
                   device: torch.device | str | None = None) -> float:
    """Median wall time in seconds of ``fn()`` over ``repeats`` timed calls after ``warmup`` calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def prefill_seconds(model, seqlen: int = 512, batch: int = 1, repeats: int = 5, warmup: int = 1,
                    seed: int = 0, last_logits_only: bool = False) -> float:
    """Median seconds of one forward pass over random prompt ids of shape (batch, seqlen).

    ``last_logits_only=True`` measures the prefill of generation (time to first token): the KV
    cache is built and only the last position's logits are computed (``logits_to_keep=1``), as
    ``generate`` does. ``False`` scores every position (the perplexity-style forward).
    """
    device = _device_of(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), generator=g).to(device)
    if last_logits_only:
        return median_seconds(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), repeats, warmup, device)
    return median_seconds(lambda: model(input_ids=ids, use_cache=False), repeats, warmup, device)


@torch.no_grad()
def decode_tokens_per_second(model, new_tokens: int = 32, prompt_len: int = 16, repeats: int = 3,
                             warmup: int = 1, seed: int = 0) -> float:
    """Batch-1 greedy decode speed with the KV cache: ``(new_tokens - 1) / (t_generate - t_prefill)``.

    ``t_generate`` is the median time of ``generate`` producing exactly ``new_tokens`` tokens and
    ``t_prefill`` the median time of ``generate`` producing 1 token (the prompt's forward pass), so
    the difference is the time of the ``new_tokens - 1`` cached single-token decode steps.
    """
    device = _device_of(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)

    def gen(n: int):
        return lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, use_cache=True, pad_token_id=0)

    t_one = median_seconds(gen(1), repeats, warmup, device)
    t_all = median_seconds(gen(new_tokens), repeats, warmup, device)
    return (new_tokens - 1) / max(t_all - t_one, 1e-9)
