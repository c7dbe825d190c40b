"""Block-diagonal plus low rank: ``W' = BD + L R``.

``BD = blockdiag(D_1, ..., D_b)``: block ``g`` (s, p) maps input columns ``g p : (g+1) p`` to output
rows ``g s : (g+1) s`` (``m = b s``, ``n = b p``); ``L (m, k)``, ``R (k, n)``. Stored values:
``m n / b + k (m + n)``.

Objective: the activation error ``f = tr((W - W') C (W - W')^T) = ||(W - W') X||_F^2`` (``C = I``:
Frobenius). Alternating fit, from the rank-k fit of ``W`` (or from ``L R = 0``):

* block-diagonal step (:func:`blockdiag_fit`): the rows of block ``g`` only see the columns of block
  ``g``, so the exact minimizer over ``BD`` given the residual ``T = W - L R`` is, row block by row
  block, ``D_g = T[g rows] C[:, g cols] C_gg^-1`` (``C = I``: the diagonal blocks of ``T``);
* low-rank step: the whitened rank-k truncation ``SVD_k((W - BD) S) S^-1`` (``S S^T = C``), the exact
  minimizer over rank-k ``L R`` given ``BD`` (Eckart-Young after whitening).

Both steps are exact minimizers of ``f`` over their variable, so ``f`` never increases
(``history`` records it after every step). No global optimality is claimed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ._checks import as_covariance, as_matrix, check_rank
from .factorization import whitened_svd
from .whitening import make_whitener


def check_blocks(m: int, n: int, nblocks: int) -> tuple[int, int]:
    """``(s, p)`` block sizes of ``nblocks`` diagonal blocks of an ``m x n`` matrix, or :class:`ConfigError`."""
    if isinstance(nblocks, bool) or not isinstance(nblocks, int) or nblocks < 1 or m % nblocks or n % nblocks:
        common = [d for d in range(1, min(m, n) + 1) if m % d == 0 and n % d == 0]
        raise ConfigError(f"{nblocks} diagonal blocks do not divide a {m}x{n} matrix (both sides must split evenly); "
                          f"use one of {common}")
    return m // nblocks, n // nblocks


def blockdiag_dense(blocks: torch.Tensor) -> torch.Tensor:
    """``blockdiag(blocks[0], ..., blocks[b-1])`` (b s, b p) of ``blocks (b, s, p)``."""
    return torch.block_diag(*blocks.unbind(0))


def blockdiag_fit(T: torch.Tensor, nblocks: int, C: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks ``(b, s, p)`` of the block-diagonal ``BD`` minimizing ``tr((T - BD) C (T - BD)^T)``
    (``C = None``: ``||T - BD||_F``, the diagonal blocks of ``T``), float64."""
    T = as_matrix(T, "T")
    m, n = T.shape
    s, p = check_blocks(m, n, nblocks)
    Tb = T.reshape(nblocks, s, nblocks, p)
    if C is None:
        return torch.stack([Tb[g, :, g, :] for g in range(nblocks)])
    C = as_covariance(C, n, "C")
    out = []
    for g in range(nblocks):
        cols = slice(g * p, (g + 1) * p)
        rhs = T[g * s:(g + 1) * s] @ C[:, cols]                          # (s, p)
        Cgg = C[cols, cols]
        lam = 1e-12 * float(torch.diagonal(Cgg).mean().clamp_min(1e-300))
        chol, info = torch.linalg.cholesky_ex(Cgg + lam * torch.eye(p, dtype=C.dtype, device=C.device))
        sol = torch.cholesky_solve(rhs.T, chol).T if int(info) == 0 else torch.linalg.lstsq(Cgg, rhs.T).solution.T
        out.append(sol)
    return torch.stack(out)


@dataclass
class BlockDiagLowRank:
    """``W' = blockdiag(blocks) + L @ R`` (float64) and ``f`` after every step (non-increasing)."""

    blocks: torch.Tensor
    L: torch.Tensor
    R: torch.Tensor
    history: list[float] = field(default_factory=list)

    def dense(self) -> torch.Tensor:
        return blockdiag_dense(self.blocks) + self.L @ self.R


def _objective(D: torch.Tensor, C: torch.Tensor | None) -> float:
    return float(D.square().sum()) if C is None else float(((D @ C) * D).sum())


def blockdiag_lowrank_fit(W: torch.Tensor, nblocks: int, rank: int, C: torch.Tensor | None = None,
                          iters: int = 10, whitening: str = "cholesky", tol: float = 1e-6,
                          init: str = "lowrank") -> BlockDiagLowRank:
    """Alternating fit of ``W ~ BD + L R`` (module docstring); ``iters`` rounds of (BD step, low-rank step),
    stopping early when a round lowers ``f`` by less than ``tol`` (relative). ``init``: start from the
    rank-k fit of ``W`` (``"lowrank"``) or from ``L R = 0`` (``"blockdiag"``)."""
    W = as_matrix(W, "W")
    m, n = W.shape
    check_blocks(m, n, nblocks)
    check_rank(rank, m, n, "rank")
    if int(iters) < 1:
        raise ConfigError(f"iters must be >= 1, got {iters}")
    C = None if C is None else as_covariance(C, n, "C")
    whitener = None if C is None else make_whitener(C, whitening)
    def lowrank(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if whitener is None:
            U, S, Vh = torch.linalg.svd(T, full_matrices=False)
            root = S[:rank].sqrt()
            return U[:, :rank] * root, root[:, None] * Vh[:rank]
        return whitened_svd(T, whitener=whitener, dtype=torch.float64).factors(rank, dtype=torch.float64)

    if init == "lowrank":
        L, R = lowrank(W)
    elif init == "blockdiag":
        L = torch.zeros(m, rank, dtype=W.dtype, device=W.device)
        R = torch.zeros(rank, n, dtype=W.dtype, device=W.device)
    else:
        raise ConfigError(f"init must be 'lowrank' or 'blockdiag', got {init!r}")
    history: list[float] = [_objective(W - L @ R, C)]
    blocks = None
    for _ in range(int(iters)):
        blocks = blockdiag_fit(W - L @ R, nblocks, C)
        T = W - blockdiag_dense(blocks)
        history.append(_objective(T - L @ R, C))
        L, R = lowrank(T)
        history.append(_objective(T - L @ R, C))
        if history[-3] - history[-1] <= tol * max(history[-3], 1e-300):
            break
    return BlockDiagLowRank(blocks, L, R, history)


__all__ = ["BlockDiagLowRank", "blockdiag_dense", "blockdiag_fit", "blockdiag_lowrank_fit", "check_blocks"]
