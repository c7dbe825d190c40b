"""Well-conditioned random invertible transforms (for function-preserving weight transforms).

* :func:`conditioned` -- ``A = Q D`` with ``Q`` a Haar-random orthogonal matrix (QR of a Gaussian,
  signs fixed) and ``D = diag(d)``, ``d`` log-uniform in ``[1/r, r]``: ``cond(A) <= r^2``, and
  ``A^{-1} = D^{-1} Q^T`` exactly.
* :func:`rope_commuting` -- a transform of a rotary-embedded head that commutes with every rotary
  position rotation: rotary embeddings rotate each plane ``(i, i + h/2)`` (``h`` the head size, the
  ``rotate_half`` convention) by a position-dependent angle, so on each plane ``M`` is a scaled rotation
  ``s_i R(phi_i)`` (``s_i`` log-uniform in ``[1/r, r]``, ``phi_i`` uniform); 2-D rotations commute, so
  ``RoPE(M q) = M RoPE(q)``, and ``M^{-T} = diag(1/s_i) R(phi_i)`` keeps ``<M q, M^{-T} k> = <q, k>``.

Both return ``(A, A^{-1})`` in float64.
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError


def _log_uniform(n: int, r: float, g: torch.Generator) -> torch.Tensor:
    if r < 1.0:
        raise ConfigError(f"the scale bound must be >= 1, got {r}")
    u = torch.rand(n, generator=g, dtype=torch.float64) * 2.0 - 1.0
    return torch.exp(u * math.log(r))


def random_orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    """A Haar-random ``(n, n)`` orthogonal matrix (float64)."""
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones(n, dtype=torch.float64))


def conditioned(n: int, g: torch.Generator, r: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, A^{-1})`` with ``A = Q D`` (module docstring)."""
    Q = random_orthogonal(n, g)
    d = _log_uniform(n, r, g)
    return Q * d, (Q / d).T


def rope_commuting(head_dim: int, g: torch.Generator, r: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, M^{-1})`` for one rotary head (module docstring); ``M^{-T}`` is ``M^{-1}.T``."""
    if head_dim % 2:
        raise ConfigError(f"a rotary head has an even size, got {head_dim}")
    h = head_dim // 2
    s = _log_uniform(h, r, g)
    phi = torch.rand(h, generator=g, dtype=torch.float64) * (2 * math.pi)
    c, sn = torch.cos(phi), torch.sin(phi)
    M = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    Minv = torch.zeros_like(M)
    i = torch.arange(h)
    M[i, i], M[i, i + h], M[i + h, i], M[i + h, i + h] = s * c, -s * sn, s * sn, s * c
    Minv[i, i], Minv[i, i + h], Minv[i + h, i], Minv[i + h, i + h] = c / s, sn / s, -sn / s, c / s
    return M, Minv


__all__ = ["conditioned", "random_orthogonal", "rope_commuting"]
