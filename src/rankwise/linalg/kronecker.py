"""Nearest sum of Kronecker products: ``W ~ sum_{i<r} A_i (x) B_i`` (Van Loan & Pitsianis 1993).

``W (m, n)``, ``A_i (m1, n1)``, ``B_i (m2, n2)``, ``m = m1 m2``, ``n = n1 n2``;
``(A (x) B)[a m2 + t, c n2 + d] = A[a, c] B[t, d]``. Stored values ``r (m1 n1 + m2 n2)``.

Rearrangement: ``R(W) (m1 n1, m2 n2)`` has row ``a n1 + c`` = the flattened block
``W[a m2:(a+1) m2, c n2:(c+1) n2]``; it maps ``A (x) B`` to the rank-1 ``vec(A) vec(B)^T`` and
preserves the Frobenius norm. Hence (:func:`nearest_kron_sum`)

    min ||W - sum_{i<r} A_i (x) B_i||_F = min_{rank r} ||R(W) - M||_F = sqrt(sum_{i>=r} s_i(R(W))^2),

attained by the rank-r SVD of ``R(W)``: ``vec(A_i) = sqrt(s_i) u_i``, ``vec(B_i) = sqrt(s_i) v_i``
(Eckart-Young). Exact recovery when ``W`` is a sum of ``r`` Kronecker products.

Data-aware version: only for a Kronecker-structured covariance ``C = C1 (x) C2`` (``C1 (n1, n1)``,
``C2 (n2, n2)``) is there a closed form: with ``S_j S_j^T = C_j``, ``(A (x) B)(S1 (x) S2) =
(A S1) (x) (B S2)``, so the rearranged SVD of ``W (S1 (x) S2)`` followed by ``A_i <- A_i S1^-1``,
``B_i <- B_i S2^-1`` is the exact minimizer of ``tr((W - W') C (W - W')^T)``
(:func:`nearest_kron_sum` with ``C1, C2``). For a general ``C``, :func:`nearest_kron_factor` gives the
nearest ``C1 (x) C2`` (the same rearrangement at rank 1; symmetric, and definite up to sign for a
definite ``C``), and the result is then only a heuristic for the true activation error.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ._checks import as_covariance, as_matrix, check_rank
from .whitening import make_whitener


def check_factor_shape(m: int, n: int, m1: int, n1: int) -> tuple[int, int]:
    """``(m2, n2)`` for ``A (m1, n1)``, or :class:`ConfigError` listing the divisors that work."""
    for f, size, side in ((m1, m, "output"), (n1, n, "input")):
        if isinstance(f, bool) or not isinstance(f, int) or f < 1 or size % f:
            divs = [d for d in range(1, size + 1) if size % d == 0]
            raise ConfigError(f"Kronecker factor size {f} does not divide the {side} size {size} of a {m}x{n} "
                              f"matrix; use one of {divs}")
    return m // m1, n // n1


def kron_rearrange(W: torch.Tensor, m1: int, n1: int) -> torch.Tensor:
    """``R(W)`` (m1 n1, m2 n2) of the module docstring."""
    m, n = W.shape
    m2, n2 = check_factor_shape(m, n, m1, n1)
    return W.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def kron_sum_dense(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``sum_i A_i (x) B_i`` (m1 m2, n1 n2) of ``A (r, m1, n1)``, ``B (r, m2, n2)``."""
    if A.ndim != 3 or B.ndim != 3 or A.shape[0] != B.shape[0]:
        raise ConfigError(f"Kronecker factors must be A (r, m1, n1) and B (r, m2, n2), got {tuple(A.shape)}, "
                          f"{tuple(B.shape)}")
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    return torch.einsum("iac,itd->atcd", A, B).reshape(m1 * m2, n1 * n2)


def nearest_kron_factor(C: torch.Tensor, n1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest ``C1 (x) C2`` to a symmetric ``C (n, n)`` in Frobenius norm (``C1 (n1, n1)``), both
    symmetrized and signed so that their traces are positive."""
    C = as_covariance(C)
    n = C.shape[0]
    U, S, Vh = torch.linalg.svd(kron_rearrange(C, n1, n1), full_matrices=False)
    n2 = n // n1
    C1 = (S[0].sqrt() * U[:, 0]).reshape(n1, n1)
    C2 = (S[0].sqrt() * Vh[0]).reshape(n2, n2)
    if float(torch.trace(C1)) < 0:
        C1, C2 = -C1, -C2
    return 0.5 * (C1 + C1.T), 0.5 * (C2 + C2.T)


def nearest_kron_sum(W: torch.Tensor, m1: int, n1: int, r: int, C1: torch.Tensor | None = None,
                     C2: torch.Tensor | None = None, whitening: str = "eigh"
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A (r, m1, n1), B (r, m2, n2), error)`` of the nearest sum of ``r`` Kronecker products (float64).

    Without ``C1, C2``: Frobenius (``error = ||W - W'||_F``, the SVD tail). With both: under
    ``C = C1 (x) C2`` (``error = sqrt(tr((W - W') C (W - W')^T))``); see the module docstring.
    """
    W = as_matrix(W, "W")
    m, n = W.shape
    m2, n2 = check_factor_shape(m, n, m1, n1)
    check_rank(r, m1 * n1, m2 * n2, "number of Kronecker terms r")
    if (C1 is None) != (C2 is None):
        raise ConfigError("pass both Kronecker covariance factors C1 and C2, or neither")
    w1 = w2 = None
    if C1 is not None:
        w1 = make_whitener(as_covariance(C1, n1, "C1"), whitening)
        w2 = make_whitener(as_covariance(C2, n2, "C2"), whitening)
        W = torch.einsum("acd,ce,df->aef", W.reshape(m, n1, n2), w1.S, w2.S).reshape(m, n)
    U, S, Vh = torch.linalg.svd(kron_rearrange(W, m1, n1), full_matrices=False)
    root = S[:r].sqrt()
    A = (U[:, :r] * root).T.reshape(r, m1, n1)
    B = (root[:, None] * Vh[:r]).reshape(r, m2, n2)
    if w1 is not None:
        A = w1.unwhiten(A.reshape(r * m1, n1)).reshape(r, m1, n1)
        B = w2.unwhiten(B.reshape(r * m2, n2)).reshape(r, m2, n2)
    return A, B, float(S[r:].square().sum().sqrt())


def factor_shapes(m: int, n: int) -> list[tuple[int, int]]:
    """Non-trivial ``(m1, n1)`` choices, cheapest per term first (``m1 n1 + m2 n2``, then the most
    balanced ``m1 : m2`` and ``n1 : n2``). Trivial: a scalar factor (``A`` or ``B`` 1x1) or an outer
    product (``A`` or ``B`` a vector pair that makes the sum a plain rank-r matrix)."""
    out = []
    for m1 in (d for d in range(1, m + 1) if m % d == 0):
        for n1 in (d for d in range(1, n + 1) if n % d == 0):
            m2, n2 = m // m1, n // n1
            if m1 * n1 == 1 or m2 * n2 == 1 or (m1 == 1 and n2 == 1) or (m2 == 1 and n1 == 1):
                continue
            imbalance = abs(m1 - m2) / m + abs(n1 - n2) / n
            out.append((m1 * n1 + m2 * n2, imbalance, m1, n1))
    return [(m1, n1) for _, _, m1, n1 in sorted(out)]


__all__ = ["check_factor_shape", "factor_shapes", "kron_rearrange", "kron_sum_dense", "nearest_kron_factor",
           "nearest_kron_sum"]
