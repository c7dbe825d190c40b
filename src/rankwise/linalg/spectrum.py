"""Singular-value spectra without singular vectors, and the scalar summaries built on them.

For ``W`` of shape (m, n) with ``p = min(m, n)``, the Gram matrix of the smaller side,
``G = W W^T`` (m <= n) or ``G = W^T W`` (m > n), is (p, p) symmetric PSD and

    sigma_i(W)^2 = lambda_i(G),   i = 1..p.

We form ``G`` in float64 and take ``torch.linalg.eigvalsh`` (no vectors), which costs
``O(m n p)`` for the product plus ``O(p^3)`` for the eigenvalues, against ``O(m n p)`` with a much
larger constant for a full SVD. Error: each eigenvalue is exact to ``~eps64 * sigma_max^2`` in
absolute terms, so singular values above ``~1e-7 sigma_max`` keep float32-or-better relative
accuracy; smaller ones are clamped at 0 when rounding makes them negative.

Matrices of the same shape are stacked and decomposed in one batched call.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import NumericalError


def _gram64(w: torch.Tensor) -> torch.Tensor:
    """``W W^T`` or ``W^T W`` (the smaller one) in float64; works on (..., m, n)."""
    w = w.to(torch.float64)
    if w.shape[-2] <= w.shape[-1]:
        return w @ w.transpose(-1, -2)
    return w.transpose(-1, -2) @ w


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """Singular values of ``w`` (..., m, n), descending, float64, via eigenvalues of the smaller Gram.

    ``sigma = sqrt(max(eigvalsh(G), 0))`` with ``G`` the (p, p) Gram, p = min(m, n).
    """
    if w.ndim < 2:
        raise NumericalError(f"singular values need a matrix, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise NumericalError("matrix has non-finite entries (nan/inf); its spectrum is undefined")
    ev = torch.linalg.eigvalsh(_gram64(w))
    return ev.clamp_min(0).sqrt().flip(-1)


def batched_singular_values(mats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[singular_values(W) for W in mats]``, with same-shape matrices decomposed in one batch."""
    out: list[torch.Tensor | None] = [None] * len(mats)
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(mats):
        groups.setdefault((tuple(w.shape), w.device), []).append(i)
    for idx in groups.values():
        s = singular_values(torch.stack([mats[i] for i in idx]))
        for j, i in enumerate(idx):
            out[i] = s[j]
    return out  # type: ignore[return-value]


def energy_curve(s: torch.Tensor) -> torch.Tensor:
    """``E(k) = sum_{i<=k} sigma_i^2 / sum_i sigma_i^2`` for k = 1..p (s descending)."""
    e = s.to(torch.float64) ** 2
    tot = e.sum()
    if tot <= 0:
        return torch.ones_like(e)
    return e.cumsum(0) / tot


def rank_for_energy(s: torch.Tensor, frac: float) -> int:
    """Smallest k with ``E(k) >= frac``: the rank whose truncation keeps ``frac`` of ``||W||_F^2``."""
    if not 0 < frac <= 1:
        raise ValueError(f"energy fraction must be in (0, 1], got {frac}")
    c = energy_curve(s)
    k = int(torch.searchsorted(c, torch.tensor(frac - 1e-12, dtype=c.dtype)).item()) + 1
    return min(k, int(s.numel()))


def stable_rank(s: torch.Tensor) -> float:
    """Stable rank ``||W||_F^2 / ||W||_2^2 = sum sigma_i^2 / sigma_1^2`` (0 for W = 0)."""
    top = float(s.max()) if s.numel() else 0.0
    return float((s.to(torch.float64) ** 2).sum() / top**2) if top > 0 else 0.0


def effective_rank(s: torch.Tensor) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): ``exp(-sum p_i log p_i)``, ``p_i = sigma_i / sum sigma``.

    Equals r for r equal nonzero singular values; 0 for W = 0.
    """
    s = s.to(torch.float64)
    tot = s.sum()
    if tot <= 0:
        return 0.0
    p = s[s > 0] / tot
    return float(torch.exp(-(p * p.log()).sum()))


def condition_number(s: torch.Tensor) -> float:
    """``sigma_max / sigma_min`` over all p singular values (inf when sigma_min = 0)."""
    lo, hi = float(s.min()), float(s.max())
    return hi / lo if lo > 0 else math.inf
