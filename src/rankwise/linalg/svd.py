"""Truncated SVD: exact, or randomized (Halko, Martinsson & Tropp 2011).

``W ~= U_k diag(S_k) Vh_k``. By Eckart-Young this is the best rank-k approximation in
Frobenius and spectral norm, with error ``||W - U_k S_k Vh_k||_F = sqrt(sum_{i>k} s_i^2)``.

Randomized (``method="randomized"``): with ``l = k + oversample`` Gaussian test vectors
``Omega (n, l)`` drawn from a seeded ``torch.Generator``, ``q = n_iter`` power iterations

    Y = (W W^T)^q W Omega,   Q = orth(Y),   B = Q^T W = Ub S Vh,   U = Q Ub,

re-orthonormalized after every multiplication. Guarantee (HMT Thm 10.5, q = 0, p = oversample >= 2):
``E ||W - Q Q^T W||_F <= sqrt(1 + k/(p-1)) * sqrt(sum_{i>k} s_i^2)``; power iterations push the
error towards the optimum at rate ``(s_{k+1}/s_k)^(2q)``. The result is then truncated to rank k.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ._checks import as_matrix, check_rank

METHODS = ("exact", "randomized")


def _exact(W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k]


def _randomized(W: torch.Tensor, k: int, oversample: int, n_iter: int, seed: int):
    m, n = W.shape
    flip = m < n  # sketch the longer side: work with the tall matrix
    A = W.T if flip else W
    m, n = A.shape
    l = min(k + oversample, n)
    g = torch.Generator(device=A.device).manual_seed(int(seed))
    omega = torch.randn(n, l, generator=g, dtype=A.dtype, device=A.device)
    Q = torch.linalg.qr(A @ omega).Q
    for _ in range(n_iter):
        Z = torch.linalg.qr(A.T @ Q).Q
        Q = torch.linalg.qr(A @ Z).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ A, full_matrices=False)
    U = Q @ Ub
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    if flip:
        return Vh.T, S, U.T
    return U, S, Vh


def truncated_svd(W: torch.Tensor, k: int, method: str = "exact", oversample: int = 10, n_iter: int = 2,
                  seed: int = 0, dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``k`` SVD ``(U (m,k), S (k,), Vh (k,n))`` of ``W``, computed in float64, returned in ``dtype``.

    Raises ``ConfigError`` for ``k`` outside ``[1, min(m, n)]`` or an unknown method,
    ``NumericalError`` for non-finite ``W``.
    """
    if method not in METHODS:
        from ..errors import UnknownMethodError

        raise UnknownMethodError(f"unknown SVD method {method!r}; valid: {', '.join(METHODS)}")
    W64 = as_matrix(W, "W")
    k = check_rank(k, *W64.shape)
    if method == "exact":
        U, S, Vh = _exact(W64, k)
    else:
        if oversample < 0 or n_iter < 0:
            raise ConfigError(f"oversample and n_iter must be >= 0, got {oversample}, {n_iter}")
        U, S, Vh = _randomized(W64, k, oversample, n_iter, seed)
    return U.to(dtype), S.to(dtype), Vh.to(dtype)
