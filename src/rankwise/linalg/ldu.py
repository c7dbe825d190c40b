"""Truncated LDU decomposition with complete pivoting (LoLDU's initialization).

Gaussian elimination with complete pivoting, stopped after ``r`` steps, gives permutations
``P`` (rows) and ``Q`` (columns) with::

    P W Q = [L11  0] [D  0] [U11 U12]      L unit lower-triangular (m, r), D diagonal (r,),
            [L21  I] [0  S] [0    I ]      U unit upper-triangular (r, n), S the Schur complement

    W = Pt L D U Qt + Pt [0 0; 0 S] Qt

so ``ldu(W, r)`` returns ``(L, d, U)`` already un-permuted (``L <- P^T L``, ``U <- U Q^T``) with
``W ~= L diag(d) U``. Guarantee: exact when ``rank(W) <= r``; for ``r = min(m, n)`` it is the full
LDU and ``L diag(d) U = W`` (up to rounding). The residual is the Schur complement after r steps.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError, NumericalError


def ldu(W: torch.Tensor, rank: int, dtype: torch.dtype = torch.float64,
        tol: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L (m, r), d (r,), U (r, n))`` with ``W ~= L @ diag(d) @ U``; see the module docstring.

    Pivots smaller than ``tol * max|W|`` stop the elimination early (W has numerical rank < r);
    the remaining columns of L / rows of U are zero, so the product stays exact.
    """
    if W.ndim != 2:
        raise ConfigError(f"ldu expects a matrix, got shape {tuple(W.shape)}")
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ConfigError(f"LDU rank must be in [1, min(m, n) = {min(m, n)}], got {rank}")
    A = W.detach().to(dtype).clone()
    if not bool(torch.isfinite(A).all()):
        raise NumericalError("ldu: matrix has non-finite entries")
    L = torch.zeros(m, rank, dtype=dtype, device=A.device)
    U = torch.zeros(rank, n, dtype=dtype, device=A.device)
    d = torch.zeros(rank, dtype=dtype, device=A.device)
    scale = float(A.abs().max()) if A.numel() else 0.0
    for k in range(rank):
        flat = int(torch.argmax(A.abs()))
        i, j = divmod(flat, n)
        piv = A[i, j]
        if float(piv.abs()) <= tol * scale or float(piv) == 0.0:
            break
        col = A[:, j].clone()
        row = A[i, :].clone()
        L[:, k] = col / piv          # L[i, k] = 1
        U[k, :] = row / piv          # U[k, j] = 1
        d[k] = piv
        A -= torch.outer(col, row) / piv   # Schur complement; zeroes row i and column j
    return L, d, U
