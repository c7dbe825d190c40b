"""Structured Optimal Brain Surgeon: remove whole groups of input columns of ``W`` (heads, channels)
one group at a time, the kept columns updated to compensate (ZipLM's structured OBS).

With ``H = X X^T`` (n, n) the layer's input second moment and the current inverse ``G = H^-1``
(restricted to the columns still present), removing the column set ``S`` with the best update of the
others costs

    dE(S) = tr(W_S (G_SS)^-1 W_S^T),                       the increase of ||(W0 - W') X||_F^2,

and the update is ``W <- W - W_S (G_SS)^-1 G_S,:``, ``G <- G - G_:,S (G_SS)^-1 G_S,:`` (the inverse of
``H`` on the remaining columns). The removed order is greedy (smallest ``dE`` first); the sum of the
step costs is exactly ``||(W0 - W') X||^2`` of the final weight, which equals the least-squares fit
``W'_K = W0 H_:K (H_KK)^-1`` on the kept columns ``K`` (:func:`rankwise.linalg.refit.refit_left` with a
selection matrix). ``H`` is damped by ``damping * mean(diag H)`` on its diagonal.

Output weights: with ``row_weights`` ``D`` (one per output row, e.g. the loss's sensitivity to each
output direction, :func:`rankwise.calibration.gradients.output_fisher`) the costs are
``tr(D W_S (G_SS)^-1 W_S^T) = sum_r D_r ||(W0 - W')_r X||^2``; each row's least-squares update is
the same, only which groups go first changes.

Balanced removal: with ``classes`` (one label per group, e.g. the KV head a query head reads), only
groups of the classes with the most groups left are eligible, so ``k * n_classes`` removals take
exactly ``k`` groups from every class (grouped-query attention stays evenly divided).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, NumericalError
from ._checks import as_covariance, as_matrix


@dataclass
class OBSResult:
    """``removed``: group indices in removal order; ``kept``: the others, ascending; ``costs[i]``: the
    cumulative ``||(W0 - W') X||^2`` after ``i + 1`` removals; ``W``: the compensated weight (float64,
    removed columns zero)."""

    removed: list[int]
    kept: list[int]
    costs: list[float] = field(default_factory=list)
    W: torch.Tensor | None = None

    def columns(self, groups: torch.Tensor) -> torch.Tensor:
        """The kept column indices (ascending) for the ``(g, size)`` column table ``groups``."""
        return torch.sort(groups[self.kept].reshape(-1)).values


def contiguous_groups(n: int, size: int) -> torch.Tensor:
    """``(n // size, size)`` table of consecutive column blocks (a head = ``head_dim`` columns)."""
    if size < 1 or n % size:
        raise ConfigError(f"{n} columns do not split into groups of {size}")
    return torch.arange(n).reshape(n // size, size)


def _inverse(H: torch.Tensor, damping: float) -> torch.Tensor:
    n = H.shape[0]
    lam = damping * float(torch.diagonal(H).mean().clamp_min(1e-30))
    A = H + lam * torch.eye(n, dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise NumericalError("the input covariance is not positive definite even after damping; raise the damping "
                             "or use more calibration windows")
    return torch.cholesky_inverse(L)


def obs_remove(W: torch.Tensor, H: torch.Tensor, groups: torch.Tensor, count: int, *,
               classes: torch.Tensor | None = None, damping: float = 1e-4, per_step: int = 1,
               row_weights: torch.Tensor | None = None) -> OBSResult:
    """Greedily remove ``count`` of the column groups ``groups`` ((g, size) column indices, disjoint)
    of ``W`` (m, n) under ``H`` (n, n); see the module docstring. ``per_step > 1`` removes that many
    lowest-cost groups per update (faster, jointly compensated; the greedy order is then approximate)."""
    W = as_matrix(W, "W").clone()
    n = W.shape[1]
    H = as_covariance(H, n, "H")
    groups = torch.as_tensor(groups, dtype=torch.long)
    if groups.ndim != 2 or groups.numel() == 0 or int(groups.max()) >= n or int(groups.min()) < 0:
        raise ConfigError(f"groups must be a (g, size) table of column indices < {n}, got shape {tuple(groups.shape)}")
    g = groups.shape[0]
    if not 0 <= count < g:
        raise ConfigError(f"can remove 0 to {g - 1} of {g} groups (one must stay), asked for {count}")
    if classes is not None:
        classes = torch.as_tensor(classes, dtype=torch.long)
        if classes.shape != (g,):
            raise ConfigError(f"classes must label each of the {g} groups, got shape {tuple(classes.shape)}")
    D = None
    if row_weights is not None:
        D = torch.as_tensor(row_weights, dtype=torch.float64).flatten()
        if D.shape != (W.shape[0],) or bool((D < 0).any()) or not bool(torch.isfinite(D).all()):
            raise ConfigError(f"row_weights must be {W.shape[0]} finite values >= 0")
    G = _inverse(H, damping)
    alive = torch.ones(g, dtype=torch.bool)
    removed: list[int] = []
    costs: list[float] = []
    total = 0.0
    if groups.shape[1] == 1 and classes is None and per_step == 1:  # single columns: rank-1 updates in place
        order = groups[:, 0]
        W, G = W[:, order].contiguous(), G[order][:, order].contiguous()  # group u is column u from here on
        diag = torch.diagonal(G)
        dead = torch.zeros(g, dtype=torch.bool)
        for _ in range(count):
            sq = W.square()
            score = (sq.sum(0) if D is None else D @ sq).div_(diag.clamp_min(1e-300))
            score.masked_fill_(dead, float("inf"))
            u = int(torch.argmin(score))
            gu = G[:, u].clone()
            guu = float(gu[u])
            wu = W[:, u].clone()
            total += max(float(wu.square().sum() if D is None else D @ wu.square()) / guu, 0.0)
            W.addr_(wu, gu, alpha=-1.0 / guu)   # the removed column becomes 0 (up to rounding)
            G.addr_(gu, gu, alpha=-1.0 / guu)   # its row and column of G^-1 too
            dead[u] = True
            removed.append(u)
            costs.append(total)
        W[:, dead] = 0.0
        out = torch.zeros_like(W)
        out[:, order] = W
        return OBSResult(removed, torch.nonzero(~dead).flatten().tolist(), costs, out)
    while len(removed) < count:
        eligible = alive.clone()
        if classes is not None:
            left = torch.bincount(classes[alive], minlength=int(classes.max()) + 1)
            eligible &= left[classes] == left.max()
        cand = torch.nonzero(eligible).flatten()
        if groups.shape[1] == 1:  # single columns: ||w_j||^2 / G_jj for all at once
            cols = groups[cand, 0]
            sq = W[:, cols].square()
            scores = (sq.sum(0) if D is None else D @ sq) / torch.diagonal(G)[cols]
        else:
            scores = torch.empty(len(cand), dtype=W.dtype)
            for j, u in enumerate(cand.tolist()):
                S = groups[u]
                Ws = W[:, S]
                scores[j] = _weighted_trace(Ws, torch.linalg.solve(G[S][:, S], Ws.T), D)
        take = min(per_step, count - len(removed))
        if classes is not None:
            take = 1  # keep the balance exact
        order = torch.argsort(scores)[:take]
        units = [int(cand[i]) for i in order]
        S = groups[units].reshape(-1)
        Gs = G[S][:, S]
        Ginv = torch.linalg.inv(Gs)
        step = float(_weighted_trace(W[:, S], Ginv @ W[:, S].T, D))
        W -= (W[:, S] @ Ginv) @ G[S, :]
        G -= G[:, S] @ Ginv @ G[S, :]
        W[:, S] = 0.0
        G[S, :] = 0.0
        G[:, S] = 0.0
        for u in units:
            alive[u] = False
            removed.append(u)
        total += max(step, 0.0)
        costs.extend([total] * len(units))
    kept = torch.nonzero(alive).flatten().tolist()
    return OBSResult(removed, kept, costs, W)


def _weighted_trace(A: torch.Tensor, B: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    """``tr(diag(D) A B)`` (``tr(A B)`` without weights), from the diagonal only."""
    diag = (A * B.T).sum(1)
    return diag.sum() if D is None else D @ diag


def removal_error(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor) -> float:
    """``min_{W'} ||(W - W') X||_F^2`` over ``W'`` supported on the columns ``keep`` (brute force reference:
    ``tr(W H W^T) - tr(W H_:K H_KK^-1 H_K: W^T)``)."""
    W = as_matrix(W, "W")
    H = as_covariance(H, W.shape[1], "H")
    keep = torch.as_tensor(keep, dtype=torch.long)
    HK = H[:, keep]
    sol = torch.linalg.solve(H[keep][:, keep], HK.T)
    return float(torch.trace(W @ H @ W.T) - torch.trace(W @ HK @ sol @ W.T))
