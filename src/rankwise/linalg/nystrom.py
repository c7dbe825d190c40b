"""Generalized Nystrom approximation of a rectangular matrix (NLoRA's initialization).

With seeded sketches ``Omega (n, r)`` and ``Psi (m, r)`` with orthonormal columns (QR of Gaussians)::

    C = W Omega          (m, r)    columns of the range of W
    R = Psi^T W          (r, n)    rows of the co-range of W
    M = (Psi^T W Omega)^+ (r, r)   pseudo-inverse of the core

    W ~= C M R

Guarantee: if ``rank(W) <= r`` the approximation is exact (``C M R = W``) with probability 1,
because ``C M R`` is the oblique projection of ``W`` onto its own range and co-range.
In general the error is within a small factor of the best rank-r error (Nakatsukasa 2020).
``rcond`` truncates tiny singular values of the core to keep ``M`` stable. ``C M R`` depends only on the
column spaces of the sketches; orthonormal sketches keep ``C``, ``R`` at the scale of ``W`` and ``M`` at the
scale of ``1 / sigma`` (raw Gaussian sketches inflate ``C``, ``R`` by ``sqrt(n)``, ``sqrt(m)`` and shrink ``M``
by ``sqrt(mn)``, which makes Adam's per-entry steps on ``M`` explode when the three factors are trained).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError


def nystrom(W: torch.Tensor, rank: int, seed: int = 0, rcond: float = 1e-6,
            dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(C, M, R)`` with ``W ~= C @ M @ R``; see the module docstring. Computed in ``dtype``."""
    if W.ndim != 2:
        raise ConfigError(f"nystrom expects a matrix, got shape {tuple(W.shape)}")
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ConfigError(f"Nystrom rank must be in [1, min(m, n) = {min(m, n)}], got {rank}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    Wd = W.detach().to(dtype)
    omega = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=dtype)).Q.to(W.device)
    psi = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=dtype)).Q.to(W.device)
    C = Wd @ omega
    R = psi.T @ Wd
    core = psi.T @ C
    M = torch.linalg.pinv(core, rtol=rcond)
    return C, M, R


def balanced_factors(C: torch.Tensor, M: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A = C @ M @ R``, split like PiSSA: ``B = U sqrt(S)``, ``A = sqrt(S) V^T`` where
    ``U S V^T`` is the SVD of the Nystrom approximation, computed from small factors only:
    ``C = Q_c T_c``, ``R^T = Q_r T_r`` (QR), ``T_c M T_r^T = P S Q^T`` (r x r SVD), ``U = Q_c P``, ``V = Q_r Q``.

    Balanced factors have comparable scale, which Adam needs to train both.
    """
    Qc, Tc = torch.linalg.qr(C)
    Qr, Tr = torch.linalg.qr(R.T)
    P, S, Qh = torch.linalg.svd(Tc @ M @ Tr.T, full_matrices=False)
    sq = S.sqrt()
    return (Qc @ P) * sq, sq[:, None] * (Qh @ Qr.T)
