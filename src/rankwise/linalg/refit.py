"""Least-squares refit of the left factor with the right factor fixed (SVD-LLM's update, closed form).

    L* = argmin_L ||(W - L R) X||_F^2 = W C R^T (R C R^T)^{-1},     C = X X^T.

More generally, when the layer's inputs in the compressed model are ``X'`` instead of ``X``,
``argmin_L ||W X - L R X'||_F^2 = W M R^T (R C' R^T)^{-1}`` with ``M = X X'^T`` (``cross``) and
``C' = X' X'^T`` (``C``). Guarantee: the objective at ``L*`` is <= its value at any other ``L``, in
particular at the truncation being refit. ``R C R^T`` (k, k) is solved by Cholesky with a tiny
relative damping ``ridge * tr(R C R^T) / k``; if that fails, by least squares (``lstsq``).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ._checks import as_covariance, as_matrix


def refit_left(W: torch.Tensor, R: torch.Tensor, C: torch.Tensor, cross: torch.Tensor | None = None,
               ridge: float = 1e-10, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``L (m, k)`` minimizing ``||(W - L R) X||_F`` (or ``||W X - L R X'||_F`` with ``cross``); see module doc."""
    W = as_matrix(W, "W")
    R = as_matrix(R, "R")
    m, n = W.shape
    if R.shape[1] != n:
        raise ConfigError(f"R has {R.shape[1]} columns, W has {n}: R must be (k, {n})")
    C = as_covariance(C, n, "C")
    M = C if cross is None else as_matrix(cross, "cross")
    if M.shape != (n, n):
        raise ConfigError(f"cross covariance must be ({n}, {n}), got {tuple(M.shape)}")
    RC = R @ C
    G = RC @ R.T
    G = 0.5 * (G + G.T)
    rhs = W @ M @ R.T  # (m, k)
    k = G.shape[0]
    lam = ridge * float(torch.diagonal(G).sum()) / k
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    chol, info = torch.linalg.cholesky_ex(G + lam * eye)
    if int(info) == 0:
        L = torch.cholesky_solve(rhs.T, chol).T
    else:
        L = torch.linalg.lstsq(G, rhs.T).solution.T
    return L.to(dtype)


def activation_error(W: torch.Tensor, Wp: torch.Tensor, C: torch.Tensor) -> float:
    """``||(W - W') X||_F = sqrt(tr((W - W') C (W - W')^T))`` from ``C = X X^T`` (float64)."""
    D = as_matrix(W, "W") - as_matrix(Wp, "W'")
    C = as_covariance(C, D.shape[1], "C")
    return float(((D @ C) * D).sum().clamp_min(0).sqrt())
