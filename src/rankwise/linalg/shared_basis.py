"""One output basis shared by several weights (Basis Sharing / concatenated-matrix SVD), whitened.

Layers ``W_i (m, n_i)`` with inputs ``X_i`` (``C_i = X_i X_i^T = S_i S_i^T``) are approximated as
``W_i ~ B K_i`` with one basis ``B (m, k)`` and per-layer coefficients ``K_i (k, n_i)``. Since
``||(W_i - B K_i) X_i||_F = ||W_i S_i - B K_i S_i||_F`` and ``K_i S_i`` ranges over all ``(k, n_i)``
matrices, the joint objective

    sum_i ||(W_i - B K_i) X_i||_F^2 = ||[W_1 S_1, ..., W_g S_g] - B [K_1 S_1, ..., K_g S_g]||_F^2

is minimized by the rank-k SVD of the horizontally stacked whitened weights ``U diag(s) V^T``:
``B = U_k diag(s_k)``, ``K_i = V_{k,i}^T S_i^-1`` (``V_{k,i}``: the rows of ``V_k`` of layer ``i``).
Guarantee (Eckart-Young): the optimum equals ``sqrt(sum_{j>k} s_j^2)``; with one layer this is the
whitened SVD (SVD-LLM) of that layer. Stored values ``m k + k sum_i n_i`` instead of ``k sum_i (m + n_i)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ConfigError, NumericalError
from ._checks import as_matrix, check_rank
from .whitening import Whitener, make_whitener


@dataclass
class SharedBasisFit:
    """``W_i ~ basis @ coefs[i]`` (float64); ``spectrum``: singular values of the stacked whitened weights."""

    basis: torch.Tensor
    coefs: list[torch.Tensor]
    spectrum: torch.Tensor

    def error(self) -> float:
        """The joint optimum ``sqrt(sum_{j>k} s_j^2)`` (see the module docstring)."""
        return float(self.spectrum[self.basis.shape[1]:].square().sum().sqrt())


def shared_whitened_basis(Ws: Sequence[torch.Tensor], rank: int, covs: Sequence[torch.Tensor] | None = None,
                          whiteners: Sequence[Whitener] | None = None, whitening: str = "cholesky") -> SharedBasisFit:
    """The shared rank-``rank`` basis of ``Ws`` under their covariances (or precomputed whiteners)."""
    if not Ws:
        raise ConfigError("shared_whitened_basis needs at least one weight")
    Ws = [as_matrix(W, f"W[{i}]") for i, W in enumerate(Ws)]
    m = Ws[0].shape[0]
    if any(W.shape[0] != m for W in Ws):
        raise ConfigError(f"weights sharing an output basis need the same number of rows; got "
                          f"{[tuple(W.shape) for W in Ws]}")
    if whiteners is None:
        if covs is None or len(covs) != len(Ws):
            raise ConfigError("pass one input covariance (or whitener) per weight")
        whiteners = [make_whitener(C, whitening) for C in covs]
    for i, (W, wh) in enumerate(zip(Ws, whiteners)):
        if wh.n != W.shape[1]:
            raise ConfigError(f"whitener {i} is for {wh.n} inputs, W[{i}] has {W.shape[1]}")
    total = sum(W.shape[1] for W in Ws)
    k = check_rank(rank, m, total, "shared rank")
    stacked = torch.cat([wh.whiten(W) for W, wh in zip(Ws, whiteners)], dim=1)
    try:
        U, S, Vh = torch.linalg.svd(stacked, full_matrices=False)
    except RuntimeError as e:  # LAPACK non-convergence
        raise NumericalError(f"SVD of the stacked {tuple(stacked.shape)} whitened weights did not converge: {e}") from e
    basis = U[:, :k] * S[:k]
    coefs, start = [], 0
    for W, wh in zip(Ws, whiteners):
        n = W.shape[1]
        coefs.append(wh.unwhiten(Vh[:k, start:start + n]))
        start += n
    return SharedBasisFit(basis, coefs, S)


__all__ = ["SharedBasisFit", "shared_whitened_basis"]
