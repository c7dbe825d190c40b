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
  minimizer over rank-k ``L R`` given ``BD`` (Eckart-Young after whitening). After the first round
  (``warm=True``) the exact SVD is replaced by one subspace-iteration step from the previous column
  basis ``Q`` of ``L``: ``Q' = orth(A A^T Q)`` for ``A = (W - BD) S``, ``L R = Q' Q'^T A S^-1``, keeping
  ``Q`` when it captures more of ``A``; that is never worse than the previous ``L R`` and costs
  ``O(m n k)`` instead of a full SVD.

Every step is an exact minimizer of ``f`` over its variable, or (warm low-rank steps) no worse than
the previous value, so ``f`` never increases (``history`` records it at the start and after every
round, computed in the whitened space as ``||A||^2 - ||Q^T A||^2``). No global optimality is claimed.
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
class BlockDiagLowRankFit:
    """``W' = blockdiag(blocks) + L @ R`` (float64) and ``f`` at the start and after every round (non-increasing)."""

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
                          init: str = "lowrank", warm: bool = True) -> BlockDiagLowRankFit:
    """Alternating fit of ``W ~ BD + L R`` (module docstring); ``iters`` rounds of (BD step, low-rank step),
    stopping early when a round lowers ``f`` by less than ``tol`` (relative). ``init``: start from the
    rank-k fit of ``W`` (``"lowrank"``) or from ``L R = 0`` (``"blockdiag"``). ``warm``: after the first,
    low-rank steps are one warm-started subspace-iteration step (module docstring); ``False``: exact SVDs."""
    W = as_matrix(W, "W")
    m, n = W.shape
    check_blocks(m, n, nblocks)
    check_rank(rank, m, n, "rank")
    if int(iters) < 1:
        raise ConfigError(f"iters must be >= 1, got {iters}")
    C = None if C is None else as_covariance(C, n, "C")
    whitener = None if C is None else make_whitener(C, whitening)
    Q: torch.Tensor | None = None

    def lowrank(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Rank-k step on ``T``; also returns its objective ``||A||^2 - ||Q^T A||^2`` (A = T S)."""
        nonlocal Q
        Tw = T if whitener is None else whitener.whiten(T)
        if Q is None or not warm:
            Q = torch.linalg.svd(Tw, full_matrices=False)[0][:, :rank]
            QtA = Q.T @ Tw
        else:  # one subspace-iteration step from the previous basis, kept only if it captures more
            QtA = Q.T @ Tw
            Qn = torch.linalg.qr(Tw @ QtA.T).Q
            QntA = Qn.T @ Tw
            if float(QntA.square().sum()) >= float(QtA.square().sum()):
                Q, QtA = Qn, QntA
        f = max(float(Tw.square().sum()) - float(QtA.square().sum()), 0.0)
        return Q, (QtA if whitener is None else whitener.unwhiten(QtA)), f

    if init == "lowrank":
        L, R, f0 = lowrank(W)
    elif init == "blockdiag":
        L = torch.zeros(m, rank, dtype=W.dtype, device=W.device)
        R = torch.zeros(rank, n, dtype=W.dtype, device=W.device)
        f0 = _objective(W, C)
    else:
        raise ConfigError(f"init must be 'lowrank' or 'blockdiag', got {init!r}")
    history: list[float] = [f0]
    blocks = None
    for _ in range(int(iters)):
        blocks = blockdiag_fit(W - L @ R, nblocks, C)
        L, R, f = lowrank(W - blockdiag_dense(blocks))
        history.append(f)
        if history[-2] - history[-1] <= tol * max(history[-2], 1e-300):
            break
    return BlockDiagLowRankFit(blocks, L, R, history)


__all__ = ["BlockDiagLowRankFit", "blockdiag_dense", "blockdiag_fit", "blockdiag_lowrank_fit", "check_blocks"]
