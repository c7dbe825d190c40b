"""Orthogonal matrices for rotating a residual stream: Hadamard matrices of many orders, random orthogonal.

A Hadamard matrix ``H (n, n)`` has entries ``+-1`` and ``H H^T = n I``, so ``H / sqrt(n)`` is
orthogonal and spreads every coordinate evenly over all ``n`` outputs (the incoherence QuaRot relies
on). :func:`hadamard_matrix` builds one of order ``n`` from

* Sylvester: ``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]`` (``n`` a power of two);
* Paley I: ``q`` prime, ``q = 3 (mod 4)``: order ``q + 1``, ``H = I + [[0, 1^T], [-1, J]]`` with the
  Jacobsthal matrix ``J_ab = chi(a - b)`` (``chi`` the Legendre symbol mod ``q``);
* Paley II: ``q`` prime, ``q = 1 (mod 4)``: order ``2 (q + 1)``, from the symmetric conference matrix
  ``S = [[0, 1^T], [1, J]]``: each ``0`` of ``S`` becomes ``[[1, -1], [-1, -1]]`` and each ``+-1``
  becomes ``+-[[1, 1], [1, -1]]``;
* Kronecker products: ``H_a (x) H_b`` is a Hadamard matrix of order ``a b``.

So e.g. 576 = 12 x 48 (SmolLM2), 640 = 20 x 32 (Gemma-3-270M), 768 = 12 x 64 (GPT-2) all have one.
Orders with no such factorization (``n`` odd, or e.g. ``4 p`` for a prime ``p`` outside both Paley
families) return None, and :func:`stream_rotation` falls back to a Haar-random orthogonal matrix
(``Q`` of the QR factorization of a Gaussian matrix, signs fixed by ``diag(R) > 0``), and says so.

A *random Hadamard* rotation is ``Q = D H / sqrt(n)`` with ``D`` a diagonal of random signs from a
seeded ``torch.Generator``: ``Q^T Q = H^T D D H / n = I``.

Mean-preserving rotations (for LayerNorm models; :func:`align_mean`): a LayerNorm subtracts the mean
of its input, so a rotated stream ``x Q`` can be fed to it unchanged only if ``Q`` maps the all-ones
direction ``u = 1 / sqrt(d)`` onto ``u' = 1 / sqrt(d')``: ``u Q = u'``. Given any ``Q`` (``d x d'``,
orthonormal columns) whose column space contains ``u``, ``Q P`` with the Householder reflection
``P = I - 2 w w^T / w^T w``, ``w = u Q - u'``, does: ``u Q P = (u Q) P = u'`` (a reflection swaps
the two unit vectors ``u Q`` and ``u'``), and ``Q P`` still has orthonormal columns.
"""
from __future__ import annotations

import functools
import math

import torch

from ..errors import ConfigError
from .hadamard import is_power_of_two


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % f for f in range(2, int(math.isqrt(q)) + 1))


def _legendre(q: int) -> list[int]:
    """``chi(a)`` for ``a`` in ``0 .. q-1``: 0 at 0, +1 on the quadratic residues mod ``q``, else -1."""
    squares = {(a * a) % q for a in range(1, q)}
    return [0] + [1 if a in squares else -1 for a in range(1, q)]


def _jacobsthal(q: int) -> torch.Tensor:
    chi = torch.tensor(_legendre(q), dtype=torch.float64)
    idx = (torch.arange(q)[:, None] - torch.arange(q)[None, :]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order ``q + 1`` (``q`` prime, ``q = 3 mod 4``)."""
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.float64)
    S[0, 1:] = 1.0
    S[1:, 0] = -1.0
    S[1:, 1:] = _jacobsthal(q)
    return S + torch.eye(n, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Order ``2 (q + 1)`` (``q`` prime, ``q = 1 mod 4``)."""
    m = q + 1
    S = torch.zeros(m, m, dtype=torch.float64)
    S[0, 1:] = 1.0
    S[1:, 0] = 1.0
    S[1:, 1:] = _jacobsthal(q)
    A = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(S, A) + torch.kron((S == 0).to(torch.float64), B)


def _sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def _paley_order(t: int) -> torch.Tensor | None:
    """A Paley Hadamard matrix of order exactly ``t``, or None."""
    if _is_prime(t - 1) and (t - 1) % 4 == 3:
        return _paley1(t - 1)
    if t % 2 == 0 and _is_prime(t // 2 - 1) and (t // 2 - 1) % 4 == 1:
        return _paley2(t // 2 - 1)
    return None


@functools.lru_cache(maxsize=64)
def _hadamard(n: int) -> torch.Tensor | None:
    if is_power_of_two(n):
        return _sylvester(n)
    if n % 4:
        return None  # a Hadamard matrix of order > 2 has order divisible by 4
    for t in range(12, n + 1, 4):  # the smallest Paley factor first: small dense blocks
        if n % t:
            continue
        P = _paley_order(t)
        if P is None:
            continue
        rest = _hadamard(n // t)
        if rest is not None:
            return torch.kron(P, rest)
    return None


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``n`` (float64, entries +-1, ``H H^T = n I``) from the constructions of
    the module docstring, or None when none of them reaches ``n``."""
    if n < 1:
        raise ConfigError(f"a Hadamard matrix needs a positive order, got {n}")
    H = _hadamard(int(n))
    return None if H is None else H.clone()


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64) * 2 - 1).to(torch.float64)


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random orthogonal ``(n, n)`` float64 matrix (QR of a Gaussian, ``diag(R) > 0``)."""
    g = torch.Generator().manual_seed(int(seed))
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return Q * torch.where(torch.diagonal(R) >= 0, 1.0, -1.0).to(torch.float64)[None, :]


KINDS = ("hadamard", "orthogonal")


def stream_rotation(n: int, seed: int = 0, kind: str = "hadamard") -> tuple[torch.Tensor, str]:
    """``(Q (n, n) float64, kind used)``: ``kind="hadamard"`` is ``D H / sqrt(n)`` (random signs ``D``
    from ``seed``) when :func:`hadamard_matrix` reaches ``n``, else a random orthogonal matrix (the
    kind returned says ``"orthogonal"``); ``kind="orthogonal"`` is always :func:`random_orthogonal`."""
    if kind not in KINDS:
        raise ConfigError(f"unknown rotation kind {kind!r}; valid: {', '.join(KINDS)}")
    if n < 2:
        raise ConfigError(f"a rotation of the residual stream needs a hidden size >= 2, got {n}")
    if kind == "hadamard":
        H = hadamard_matrix(n)
        if H is not None:
            g = torch.Generator().manual_seed(int(seed))
            return random_signs(n, g)[:, None] * H / math.sqrt(n), "hadamard"
    return random_orthogonal(n, seed), "orthogonal"


def check_orthonormal_columns(Q: torch.Tensor, d: int, tol: float = 1e-6) -> torch.Tensor:
    """``Q`` as float64 after checking it is ``(d, d')``, ``d' <= d``, with ``Q^T Q = I`` to ``tol``."""
    if not isinstance(Q, torch.Tensor) or Q.ndim != 2 or Q.shape[0] != d or not 1 <= Q.shape[1] <= d:
        shape = tuple(Q.shape) if isinstance(Q, torch.Tensor) else type(Q).__name__
        raise ConfigError(f"the stream transform must be a (hidden, k) matrix with 1 <= k <= hidden = {d}, got "
                          f"{shape}; pass a ({d}, {d}) rotation or ({d}, k) orthonormal columns to slice")
    Q = Q.detach().to(torch.float64)
    err = float((Q.T @ Q - torch.eye(Q.shape[1], dtype=torch.float64)).abs().max())
    if not err <= tol:
        raise ConfigError(f"the stream transform's columns are not orthonormal (max |Q^T Q - I| = {err:.3g} > "
                          f"{tol:g}); orthonormalize it first (e.g. torch.linalg.qr)")
    return Q


def align_mean(Q: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """``Q P`` with ``u Q P = u'`` (see the module docstring), ``Q`` (d, d') with orthonormal columns whose
    span contains ``u = 1/sqrt(d)``; :class:`ConfigError` when it does not."""
    Q = check_orthonormal_columns(Q, Q.shape[0] if isinstance(Q, torch.Tensor) and Q.ndim == 2 else -1)
    d, k = Q.shape
    v = torch.full((d,), 1.0 / math.sqrt(d), dtype=torch.float64) @ Q  # u Q: unit iff u is in span(Q)
    if abs(float(v.norm()) - 1.0) > tol:
        raise ConfigError(f"a LayerNorm model's stream transform must keep the all-ones direction: only "
                          f"{float(v.norm()):.4f} of it lies in the span of Q; add 1/sqrt(d) to Q's columns "
                          "(e.g. orthonormalize [1/sqrt(d), your basis]) before slicing")
    target = torch.full((k,), 1.0 / math.sqrt(k), dtype=torch.float64)
    w = v - target
    if float(w.norm()) < 1e-12:
        return Q
    P = torch.eye(k, dtype=torch.float64) - 2.0 * torch.outer(w, w) / float(w @ w)
    return Q @ P


__all__ = ["KINDS", "align_mean", "check_orthonormal_columns", "hadamard_matrix", "random_orthogonal",
           "stream_rotation"]
