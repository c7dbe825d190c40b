"""Monarch matrices ``W' = P2 B2 P1 B1`` (Dao et al. 2022), with rank-r blocks, for any ``m x n``.

Shapes: the input splits into ``b`` blocks of ``p = n / b``, the output into ``l`` blocks of
``s = m / l``; ``r`` is the rank of each block pair.

* ``B1`` (b, l r, p): block ``i`` maps ``x[i p : (i+1) p]`` to ``z_i`` (l, r);
* ``P1``: the transpose ``z (b, l, r) -> (l, b, r)`` (block ``j`` of the second stage reads ``z[:, j]``);
* ``B2`` (l, s, b r): block ``j`` maps ``z[:, j]`` (b r values) to ``y_j`` (s);
* ``P2``: the transpose ``y (l, s) -> (s, l)``: output ``o = t l + j``.

Entry-wise ``W'[t l + j, i p + c] = sum_q B2[j, t, i r + q] B1[i, j r + q, c]``: the ``(s, p)``
sub-matrix ``W'[j::l, i p:(i+1) p]`` (rows ``t l + j``, columns of input block ``i``) equals
``B2[j][:, i r:(i+1) r] @ B1[i][j r:(j+1) r, :]``, a rank-``r`` product that no other block shares.
So Monarch matrices are exactly the matrices whose ``l x b`` grid of these blocks has rank <= r
each (``r = 1``, ``b = l = sqrt(n)``: the paper's square Monarch ``M = P L P^T R``). Stored values:
``r (l n + b m)``.

Projection (:func:`monarch_project`), the Monarch paper's closed form: reshape ``W`` into its
``l x b`` blocks and take the rank-r truncated SVD of each. Guarantee: by Eckart-Young per block
this is the exact minimizer of ``||W - W'||_F`` over Monarch ``W'`` (and exact recovery of a
Monarch ``W``). Given a covariance ``C``, each input block is first whitened by its own diagonal
block, ``S_i S_i^T = C_ii``; since ``blockdiag(S_i)`` keeps the block structure, the result is the
exact minimizer of ``tr((W - W') C_bd (W - W')^T)`` with ``C_bd = blockdiag(C_ii)`` (the activation
error when the input blocks are uncorrelated).

Refinement (:func:`monarch_als`) on the full objective ``f = tr((W - W') C (W - W')^T) =
||(W - W') X||_F^2``: alternate

* ``B2`` given ``B1``: the rows of output block ``j`` are ``B2[j] F_j`` with ``F_j`` fixed, so
  ``B2[j] = W_j C F_j^T (F_j C F_j^T)^-1`` (one ``(b r)``-sized solve per block, exact);
* ``B1`` given ``B2``, block by block (Gauss-Seidel): with ``D = W - W'`` and ``H_i`` the columns
  of ``B2`` reading input block ``i``, ``B1_i += (H_i^T H_i)^-1 H_i^T D C[:, i] C_ii^-1`` (exact
  minimizer over ``B1_i`` with the others fixed).

Every step is an exact block minimizer, so ``f`` never increases; a step that would raise it by
round-off is undone and the iteration stops (``history`` records ``f`` after the projection and
after every step).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ._checks import as_covariance, as_matrix
from .whitening import make_whitener


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n``, ascending."""
    return [d for d in range(1, int(n) + 1) if n % d == 0]


def check_monarch_shape(m: int, n: int, in_blocks: int, out_blocks: int, rank: int) -> tuple[int, int]:
    """``(p, s)`` block sizes, or :class:`ConfigError` naming the block counts or ranks that would work."""
    for blocks, size, side in ((in_blocks, n, "input"), (out_blocks, m, "output")):
        if not isinstance(blocks, int) or blocks < 1 or size % blocks:
            raise ConfigError(f"Monarch {side} block count {blocks} does not divide the {side} size {size} of a "
                              f"{m}x{n} matrix; use one of {divisors(size)}")
    p, s = n // in_blocks, m // out_blocks
    if not isinstance(rank, int) or not 1 <= rank <= min(p, s):
        raise ConfigError(f"Monarch block rank {rank} is out of range for {s}x{p} blocks; use 1 <= rank <= {min(p, s)}")
    return p, s


def monarch_num_values(m: int, n: int, in_blocks: int, out_blocks: int, rank: int) -> int:
    """Stored values ``r (l n + b m)``."""
    return rank * (out_blocks * n + in_blocks * m)


def _sizes(B1: torch.Tensor, B2: torch.Tensor) -> tuple[int, int, int, int, int]:
    b, lr, p = B1.shape
    l, s, br = B2.shape
    if lr % l or br % b or lr // l != br // b:
        raise ConfigError(f"Monarch factors do not match: B1 {tuple(B1.shape)} needs (b, l r, p), "
                          f"B2 {tuple(B2.shape)} needs (l, s, b r)")
    return b, l, lr // l, p, s


def monarch_dense(B1: torch.Tensor, B2: torch.Tensor) -> torch.Tensor:
    """``W'`` (m, n) of factors ``B1 (b, l r, p)``, ``B2 (l, s, b r)`` (module docstring)."""
    b, l, r, p, s = _sizes(B1, B2)
    return torch.einsum("jtiq,ijqc->tjic", B2.reshape(l, s, b, r), B1.reshape(b, l, r, p)).reshape(s * l, b * p)


def monarch_blocks(W: torch.Tensor, in_blocks: int, out_blocks: int) -> torch.Tensor:
    """The (l, b, s, p) blocks ``W[j::l, i p:(i+1) p]`` of ``W`` (a copy)."""
    m, n = W.shape
    s, p = m // out_blocks, n // in_blocks
    return W.reshape(s, out_blocks, in_blocks, p).permute(1, 2, 0, 3).contiguous()


def _project_blocks(Wb: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    l, b, s, p = Wb.shape
    U, S, Vh = torch.linalg.svd(Wb, full_matrices=False)
    root = S[..., :rank].sqrt()
    left = U[..., :rank] * root[..., None, :]          # (l, b, s, r)
    right = root[..., :, None] * Vh[..., :rank, :]     # (l, b, r, p)
    B2 = left.permute(0, 2, 1, 3).reshape(l, s, b * rank)
    B1 = right.permute(1, 0, 2, 3).reshape(b, l * rank, p)
    return B1, B2


def monarch_project(W: torch.Tensor, in_blocks: int, out_blocks: int, rank: int = 1,
                    C: torch.Tensor | None = None, whitening: str = "cholesky") -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form Monarch projection ``(B1, B2)`` (float64) of ``W`` (module docstring): Frobenius-optimal
    without ``C``, optimal under ``blockdiag(C_ii)`` with it."""
    W = as_matrix(W, "W")
    m, n = W.shape
    p, _ = check_monarch_shape(m, n, in_blocks, out_blocks, rank)
    if C is None:
        return _project_blocks(monarch_blocks(W, in_blocks, out_blocks), rank)
    C = as_covariance(C, n, "C")
    whiteners = [make_whitener(C[i * p:(i + 1) * p, i * p:(i + 1) * p], whitening) for i in range(in_blocks)]
    Ws = torch.cat([wh.whiten(W[:, i * p:(i + 1) * p]) for i, wh in enumerate(whiteners)], dim=1)
    B1, B2 = _project_blocks(monarch_blocks(Ws, in_blocks, out_blocks), rank)
    B1 = torch.stack([wh.unwhiten(B1[i]) for i, wh in enumerate(whiteners)])
    return B1, B2


def _objective(D: torch.Tensor, C: torch.Tensor) -> float:
    """``tr(D C D^T)`` (float)."""
    return float(((D @ C) * D).sum())


def _spd_solve(G: torch.Tensor, rhs: torch.Tensor, ridge: float = 1e-12) -> torch.Tensor:
    """``G^-1 rhs`` for (batched) symmetric PSD ``G``: Cholesky with a tiny relative ridge, else lstsq."""
    k = G.shape[-1]
    scale = torch.diagonal(G, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    chol, info = torch.linalg.cholesky_ex(G + (ridge * scale)[..., None, None] * eye)
    if bool((info == 0).all()):
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.lstsq(G, rhs).solution


@dataclass
class MonarchFit:
    """Factors ``B1 (b, l r, p)``, ``B2 (l, s, b r)`` (float64) and the objective after each step."""

    B1: torch.Tensor
    B2: torch.Tensor
    history: list[float] = field(default_factory=list)

    def dense(self) -> torch.Tensor:
        return monarch_dense(self.B1, self.B2)


def monarch_als(W: torch.Tensor, C: torch.Tensor, B1: torch.Tensor, B2: torch.Tensor, iters: int = 5,
                tol: float = 1e-6) -> MonarchFit:
    """Alternating least squares on ``tr((W - W') C (W - W')^T)`` from ``(B1, B2)`` (module docstring).

    Stops after ``iters`` rounds (one ``B2`` step and one ``B1`` sweep each) or when a round lowers
    ``f`` by less than ``tol`` (relative).
    """
    W = as_matrix(W, "W")
    m, n = W.shape
    C = as_covariance(C, n, "C")
    B1, B2 = B1.to(W), B2.to(W)
    b, l, r, p, s = _sizes(B1, B2)
    check_monarch_shape(m, n, b, l, r)
    Cii_chol = []
    for i in range(b):
        Cii = C[i * p:(i + 1) * p, i * p:(i + 1) * p]
        lam = 1e-12 * float(torch.diagonal(Cii).mean().clamp_min(1e-300))
        Cii_chol.append(torch.linalg.cholesky_ex(Cii + lam * torch.eye(p, dtype=C.dtype, device=C.device))[0])
    D = W - monarch_dense(B1, B2)
    history = [_objective(D, C)]
    Wv = W.reshape(s, l, n)

    for _ in range(int(iters)):
        start = history[-1]
        # B2 given B1: one exact least-squares solve per output block j
        B1v = B1.reshape(b, l, r, p)
        CF = torch.einsum("nic,ijqc->njiq", C.reshape(n, b, p), B1v)              # (n, l, b, r)
        G = torch.einsum("ijqc,icjkv->jiqkv", B1v, CF.reshape(b, p, l, b, r)).reshape(l, b * r, b * r)
        rhs = torch.einsum("tjn,njk->jkt", Wv, CF.reshape(n, l, b * r))          # (l, b r, s)
        new_B2 = _spd_solve(0.5 * (G + G.transpose(1, 2)), rhs).transpose(1, 2)
        new_D = W - monarch_dense(B1, new_B2)
        f = _objective(new_D, C)
        if f > history[-1] * (1 + 1e-12):
            break
        B2, D = new_B2, new_D
        history.append(f)
        # B1 given B2: Gauss-Seidel over input blocks i, each an exact minimizer
        B2v = B2.reshape(l, s, b, r)
        B1v = B1.reshape(b, l, r, p).clone()
        D_new = D.clone()
        for i in range(b):
            H = B2v[:, :, i, :]                                                    # (l, s, r)
            E = D_new @ C[:, i * p:(i + 1) * p]                                    # (m, p)
            rhs = torch.einsum("jtq,tjc->jqc", H, E.reshape(s, l, p))              # (l, r, p)
            X = _spd_solve(torch.einsum("jtq,jtv->jqv", H, H), rhs)               # (H^T H)^-1 H^T D C_:i
            X = torch.cholesky_solve(X.reshape(l * r, p).T, Cii_chol[i]).T.reshape(l, r, p)  # ... C_ii^-1
            B1v[i] += X
            D_new[:, i * p:(i + 1) * p] -= torch.einsum("jtq,jqc->tjc", H, X).reshape(m, p)
        new_B1 = B1v.reshape(b, l * r, p)
        D_new = W - monarch_dense(new_B1, B2)  # recompute: no drift from the incremental updates
        f = _objective(D_new, C)
        if f > history[-1] * (1 + 1e-12):
            break
        B1, D = new_B1, D_new
        history.append(f)
        if start - f <= tol * max(start, 1e-300):
            break
    return MonarchFit(B1, B2, history)


__all__ = ["MonarchFit", "check_monarch_shape", "divisors", "monarch_als", "monarch_blocks",
           "monarch_dense", "monarch_num_values", "monarch_project"]
