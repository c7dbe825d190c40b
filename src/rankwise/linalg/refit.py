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


def refit_columns(W: torch.Tensor, keep: torch.Tensor, C: torch.Tensor, cross: torch.Tensor | None = None,
                  ridge: float = 1e-10, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`refit_left` with ``R`` the selection of the input columns ``keep`` (input pruning), by
    indexing instead of products: ``L (m, k) = W M_:K (C_KK + lam I)^-1`` minimizes ``||W X - L X'_K||_F``
    (``M = X X'^T``, ``C = X' X'^T``; ``M = C`` without ``cross``, i.e. ``||(W - L S) X||``)."""
    W = as_matrix(W, "W")
    n = W.shape[1]
    C = as_covariance(C, n, "C")
    keep = torch.as_tensor(keep, dtype=torch.long, device=W.device).flatten()
    M = C if cross is None else as_matrix(cross, "cross")
    if M.shape != (n, n):
        raise ConfigError(f"cross covariance must be ({n}, {n}), got {tuple(M.shape)}")
    G = C[keep][:, keep]
    rhs = W @ M[:, keep]
    k = G.shape[0]
    lam = ridge * float(torch.diagonal(G).sum()) / k
    G.diagonal().add_(lam)
    chol, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, chol).T.to(dtype)
    return torch.linalg.lstsq(G, rhs.T).solution.T.to(dtype)


def activation_error(W: torch.Tensor, Wp: torch.Tensor, C: torch.Tensor) -> float:
    """``||(W - W') X||_F = sqrt(tr((W - W') C (W - W')^T))`` from ``C = X X^T`` (float64)."""
    D = as_matrix(W, "W") - as_matrix(Wp, "W'")
    C = as_covariance(C, D.shape[1], "C")
    return float(((D @ C) * D).sum().clamp_min(0).sqrt())


#: Default relative ridge of :func:`cross_target`.
CROSS_RIDGE = 1e-6


def cross_target(W: torch.Tensor, C: torch.Tensor, M: torch.Tensor, rel_ridge: float | None = None) -> torch.Tensor:
    """Corrected target for fitting the dense outputs ``W X`` from other inputs ``X'``:

        T = argmin_T ||W X - T X'||_F^2 + lam ||T - W||_F^2 = (W M + lam W)(C' + lam I)^-1,

    ``M = X X'^T``, ``C' = X' X'^T``, ``lam = rel_ridge * mean(diag C')``. Since
    ``||W X - W' X'||^2 = ||(T - W') S'||^2 + const`` (``S' S'^T = C'``, at ``lam = 0``), the
    whitened rank-k truncation of ``T`` under ``C'`` is the exact rank-k minimizer of the
    sequential objective. The ridge pulls ``T`` toward ``W`` (not toward 0): as ``lam`` grows the
    refit tends to the plain fit of ``W``.
    """
    rel_ridge = CROSS_RIDGE if rel_ridge is None else float(rel_ridge)
    W64 = as_matrix(W, "W")
    n = W64.shape[1]
    A = as_covariance(C, n, "C'")  # a symmetrized copy, made C' + lam I in place below
    M = as_matrix(M, "cross")
    if M.shape != (n, n):
        raise ConfigError(f"cross moment must be ({n}, {n}), got {tuple(M.shape)}")
    lam = rel_ridge * float(torch.diagonal(A).mean().clamp_min(1e-30))
    A.diagonal().add_(lam)  # C' + lam I: no second copy, no (n, n) identity
    rhs = M.T @ W64.T + lam * W64.T  # (C' + lam I) T^T = M^T W^T + lam W^T
    chol, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        del A  # the (n, n) copy is not needed beside its factor
        return torch.cholesky_solve(rhs, chol).T.to(W.dtype)
    return torch.linalg.lstsq(A, rhs).solution.T.to(W.dtype)
