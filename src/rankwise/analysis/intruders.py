"""Comparing a tuned weight with its base: intruder dimensions and the update's structure.

Intruder dimensions (Shuttleworth, Andreas, Torralba, Sharma, "LoRA vs Full Fine-tuning: An
Illusion of Equivalence", 2024): with ``W0 = U0 S0 V0^T`` and ``W1 = U1 S1 V1^T`` (left singular
vectors, i.e. the output space of the (out, in) weight), the j-th tuned vector is an intruder when

    max_i |<u1_j, u0_i>| < epsilon,      j = 1..k (the k largest singular values of W1).

Defaults follow the authors' code: ``k = 10``, ``epsilon = 0.5``.

The update ``Delta = W1 - W0`` is summarized by its relative size ``||Delta||_F / ||W0||_F`` and
its stable and entropy effective ranks (a LoRA update has rank <= r).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg.spectrum import effective_rank, singular_values, stable_rank

INTRUDER_K = 10
INTRUDER_EPS = 0.5


@dataclass
class IntruderResult:
    count: int
    max_cos: list[float]      # max_i |<u1_j, u0_i>| for j = 1..k
    indices: list[int]        # the j (0-based) that are intruders


def _left_vectors(w: torch.Tensor) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    return u


def intruder_dimensions(w_base: torch.Tensor, w_tuned: torch.Tensor, k: int = INTRUDER_K,
                        eps: float = INTRUDER_EPS) -> IntruderResult:
    """Count the intruder dimensions among the top-``k`` left singular vectors of ``w_tuned``."""
    if w_base.shape != w_tuned.shape:
        raise ValueError(f"shapes differ: {tuple(w_base.shape)} vs {tuple(w_tuned.shape)}")
    u0, u1 = _left_vectors(w_base), _left_vectors(w_tuned)
    k = min(k, u1.shape[1])
    cos = (u1[:, :k].T @ u0).abs().amax(dim=1)
    idx = torch.nonzero(cos < eps).flatten().tolist()
    return IntruderResult(count=len(idx), max_cos=[float(c) for c in cos], indices=idx)


def update_stats(w_base: torch.Tensor, w_tuned: torch.Tensor) -> dict:
    """``relative_change = ||W1 - W0||_F / ||W0||_F`` and the stable / effective rank of ``W1 - W0``."""
    d = w_tuned.to(torch.float64) - w_base.to(torch.float64)
    n0 = float(torch.linalg.matrix_norm(w_base.to(torch.float64)))
    s = singular_values(d)
    return {
        "relative_change": float(torch.linalg.matrix_norm(d)) / n0 if n0 > 0 else float("inf"),
        "delta_stable_rank": stable_rank(s),
        "delta_effective_rank": effective_rank(s),
    }
