"""WeLore: the global-threshold allocator against brute force over every threshold, through
rankwise.compress, and fine-tuning that moves only the low-rank factors."""
from __future__ import annotations

import numpy as np
import torch

from rankwise.compression.allocation import get_allocator
from rankwise.compression.allocation.welore import welore_plan
from rankwise.training.welore import welore_trainable_


def _params(shapes, plan):
    return sum(m * n if plan[k] is None else plan[k] * (m + n) for k, (m, n) in shapes.items())


def test_welore_threshold_is_the_smallest_that_meets_the_budget():
    rng = np.random.default_rng(0)
    shapes = {"a": (40, 30), "b": (30, 30), "c": (50, 20), "d": (20, 60)}
    # a fast-decaying, a flat (does not compress), and two power-law spectra
    spectra = {"a": np.exp(-np.arange(30) / 3), "b": 1 - 0.01 * np.arange(30), "c": 1 / np.arange(1, 21) ** 1.5,
               "d": np.sort(rng.random(20))[::-1]}
    for ratio in (0.2, 0.4, 0.6):
        plan, tau = welore_plan(ratio, shapes, spectra)
        budget = (1 - ratio) * sum(m * n for m, n in shapes.values())
        best = None
        for t in sorted({float(v / s[0]) for s in spectra.values() for v in s}):   # brute force, ascending
            ranks = {k: int((spectra[k] / spectra[k][0] >= t).sum()) for k in shapes}
            p = {k: (r if r * sum(shapes[k]) < shapes[k][0] * shapes[k][1] else None) for k, r in ranks.items()}
            if _params(shapes, p) <= budget:
                best = (t, p)
                break
        assert best is not None and tau == best[0] and plan == best[1], ratio
        assert _params(shapes, plan) <= budget
    assert welore_plan(0.4, shapes, spectra)[0]["b"] is None          # the flat spectrum stays dense
    assert get_allocator("welore").needs == "spectra"


def test_welore_compress_then_finetune_moves_only_low_rank_factors(tiny_llama, random_ids):
    import rankwise
    from rankwise.structures.lowrank import LowRankLinear

    calib = random_ids[:8 * 32].reshape(8, 32)
    small, report = rankwise.compress(tiny_llama, ratio=0.3, allocate="welore", calib=calib, method="svd",
                                      progress=False)
    info = welore_trainable_(small)
    assert info["trainable"] and all(isinstance(small.get_submodule(n), LowRankLinear) for n in info["trainable"])
    before = {n: p.detach().clone() for n, p in small.named_parameters()}
    opt = torch.optim.AdamW([p for p in small.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        small(input_ids=calib[:2], labels=calib[:2]).loss.backward()
        opt.step()
    for n, p in small.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        factor = any(n == f"{t}.{x}.weight" for t in info["trainable"] for x in ("A", "B"))
        assert moved == factor, n
