"""Merging task vectors ``tau_t = theta_t - theta_0`` of fine-tunes of one base (pure math on tensors).

* :func:`ties` -- TIES-Merging (Yadav et al., 2023) on one tensor: **trim** each ``tau_t`` to its
  ``density`` fraction of largest magnitudes, **elect** the sign ``s = sign(sum_t trim(tau_t))`` per
  entry, and take the **disjoint mean** over the task vectors that agree with it:
  ``tau = sum_t [sign(trim(tau_t)) = s] trim(tau_t) / max(1, #{t: sign(trim(tau_t)) = s, trim(tau_t) != 0})``.
* :func:`orthogonal_update` -- the projection step of OPCM (Tang et al., "Merging Models on the Fly
  Without Retraining: A Sequential Approach to Scalable Continual Model Merging", 2025) for one weight
  matrix: with the merged task vector so far ``M = U S V^T`` (full SVD), the new task vector is
  expressed in that basis, ``T = U^T tau V``; the entries that would write into the subspace ``M``
  already uses -- the top-left ``r x r`` block, ``r`` the smallest rank whose singular values hold
  more than ``alpha`` of ``sum S``, and the diagonal (``u_i v_i^T`` directions) -- are zeroed, and
  ``U T V^T`` is returned. The merged sum grows as ``M <- M + orthogonal_update(M, tau)``; the caller
  rescales the whole model's merged task vector to the mean task-vector norm.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """``tau`` with all but its ``ceil(density n)`` largest-magnitude entries set to 0."""
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    if density >= 1.0 or tau.numel() == 0:
        return tau
    k = max(1, int(-(-density * tau.numel() // 1)))
    flat = tau.flatten()
    thresh = flat.abs().kthvalue(flat.numel() - k + 1).values
    return torch.where(tau.abs() >= thresh, tau, torch.zeros_like(tau))


def ties(taus: Sequence[torch.Tensor], density: float = 0.2) -> torch.Tensor:
    """The TIES merge of the task vectors ``taus`` of one tensor (module docstring), float32."""
    if not taus:
        raise ConfigError("TIES needs at least one task vector")
    trimmed = torch.stack([trim(t.to(torch.float32), density) for t in taus])
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    total = (trimmed * agree).sum(0)
    count = agree.sum(0).clamp(min=1)
    return total / count


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """The smallest ``r`` with ``sum(s[:r]) / sum(s) > alpha`` (0 for a zero matrix)."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    total = float(s.sum())
    if total <= 0.0:
        return 0
    over = torch.nonzero(torch.cumsum(s, 0) / total > alpha)
    return int(over[0]) + 1 if over.numel() else int(s.numel())


def orthogonal_update(merged: torch.Tensor, tau: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """OPCM's projection of ``tau`` off the subspace the merged task vector ``merged`` already uses
    (module docstring); float32 result of ``tau``'s shape. A zero ``merged`` passes ``tau`` through."""
    if merged.shape != tau.shape or merged.ndim != 2:
        raise ConfigError(f"orthogonal_update needs two matrices of one shape, got {tuple(merged.shape)} and "
                          f"{tuple(tau.shape)}")
    M = merged.to(torch.float64)
    if not bool(M.abs().amax() > 0):
        return tau.to(torch.float32)
    U, S, Vh = torch.linalg.svd(M, full_matrices=True)
    T = U.T @ tau.to(torch.float64) @ Vh.T
    r = split_rank(S, alpha)
    T[:r, :r] = 0.0
    T.diagonal().zero_()
    return (U @ T @ Vh).to(torch.float32)


__all__ = ["orthogonal_update", "split_rank", "ties", "trim"]
