"""Sparse masks, Wanda pruning, and the low-rank + sparse fit (OATS) in the activation-scaled space.

Notation: ``W (m, n)``, calibration inputs ``X (n, T)``, ``C = X X^T``, column scales
``d_j = sqrt(C_jj) = ||x_j||`` (the input feature norms), ``D = diag(d)``.

Patterns (the sets a sparse matrix ``S`` may live in):

* ``"unstructured"`` with ``k`` kept per output row: at most ``k`` nonzeros in each row;
* ``"2:4"``: at most 2 nonzeros in each group of 4 consecutive input columns (``n % 4 == 0``).

:func:`project_pattern` keeps, per row (per group for 2:4), the entries of largest ``|score|``:
for ``score = R`` it is the Euclidean projection onto the pattern set, ``argmin_S ||R - S||_F``.

Pruning (Wanda): keep the entries of largest ``|W_ij| d_j`` under the pattern, values unchanged.
Guarantee: among masks ``M`` of the pattern it minimizes ``||(W - W . M) D||_F^2 =
sum_{ij pruned} W_ij^2 d_j^2``, which equals the activation error ``||(W - W . M) X||_F^2`` when
``C`` is diagonal (the diagonal approximation of ``C``; off-diagonal correlations are ignored).

Low-rank + sparse (OATS): ``W ~ L R + S`` with ``rank(L R) <= k`` and ``S`` in the pattern. In the
scaled space ``W~ = W D`` it alternates, from ``S~ = 0``,

    L~ = SVD_k(W~ - S~)            (Eckart-Young: exact minimizer over rank-k L~)
    S~ = P(W~ - L~)                (projection onto the pattern: exact minimizer over S~)

so ``f = ||W~ - L~ - S~||_F = ||(W - L R - S) D||_F`` never increases (``history`` records it
after every half step; after the first, the L-step is a warm-started subspace iteration that is
never worse than the previous L~, see :func:`lowrank_sparse_fit`), and maps back ``R = R~ D^-1``, ``S = S~ D^-1`` (same pattern). ``f`` is the
activation error when ``C`` is diagonal; for a general ``C``, :func:`refit_lowrank_under_cov` then
replaces the low-rank part by the whitened rank-k fit of ``W - S`` (exact minimizer of the full
``||(W - L R - S) X||_F`` given ``S``), which can only lower the true activation error.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ._checks import as_matrix, as_vector, check_rank
from .factorization import whitened_svd
from .whitening import Whitener

PATTERNS = ("unstructured", "2:4")


def check_pattern(pattern: str, n: int | None = None) -> str:
    """``pattern`` if valid (and, for 2:4, ``n % 4 == 0``), else :class:`ConfigError` naming the fix."""
    if pattern not in PATTERNS:
        raise ConfigError(f"unknown sparsity pattern {pattern!r}; valid: {', '.join(PATTERNS)}")
    if pattern == "2:4" and n is not None and n % 4:
        raise ConfigError(f"2:4 sparsity needs the number of input columns to be a multiple of 4, got {n}; "
                          "use pattern 'unstructured' for this layer")
    return pattern


def feature_scales(sq_sum: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """``d_j = sqrt(sum_t x_tj^2)`` (= ``sqrt(diag C)``), floored at ``floor * max d`` so ``1/d`` is finite."""
    if not isinstance(sq_sum, torch.Tensor) or sq_sum.ndim != 1:
        raise ConfigError("sq_sum must be a 1-D tensor of summed squared input activations")
    s = as_vector(sq_sum, sq_sum.shape[0], "sq_sum")
    if bool((s < 0).any()):
        raise ConfigError("sq_sum must be non-negative (summed squared activations)")
    d = s.sqrt()
    top = float(d.max())
    return torch.ones_like(d) if top <= 0.0 else d.clamp_min(floor * top)


def project_pattern(scores: torch.Tensor, pattern: str, keep_per_row: int | None = None) -> torch.Tensor:
    """Boolean mask (m, n) keeping the largest ``|scores|`` per row (``keep_per_row``) or 2 of every 4
    consecutive columns (``"2:4"``). Ties go to the lower column index (``torch.topk`` order, deterministic)."""
    m, n = scores.shape
    check_pattern(pattern, n)
    a = scores.abs()
    mask = torch.zeros(m, n, dtype=torch.bool, device=scores.device)
    if pattern == "2:4":
        idx = a.reshape(m, n // 4, 4).topk(2, dim=-1).indices
        return mask.view(m, n // 4, 4).scatter_(-1, idx, True).view(m, n)
    if keep_per_row is None or not 0 <= int(keep_per_row) <= n:
        raise ConfigError(f"keep_per_row must be in [0, {n}] for unstructured sparsity, got {keep_per_row}")
    if keep_per_row == 0:
        return mask
    return mask.scatter_(1, a.topk(int(keep_per_row), dim=1).indices, True)


def wanda_mask(W: torch.Tensor, d: torch.Tensor, pattern: str, keep_per_row: int | None = None) -> torch.Tensor:
    """Wanda mask: the largest ``|W_ij| d_j`` per row under ``pattern`` (see the module docstring)."""
    W = as_matrix(W, "W")
    d = as_vector(d, W.shape[1], "feature scales d")
    return project_pattern(W * d, pattern, keep_per_row)


# -- storage formats -------------------------------------------------------------------------------

def index_dtype(n: int) -> torch.dtype:
    """Smallest signed integer dtype holding column indices ``0 .. n-1`` (int16 or int32)."""
    return torch.int16 if n <= torch.iinfo(torch.int16).max + 1 else torch.int32


def mask_to_rows(W: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values (m, k), cols (m, k))`` of a mask with exactly ``k`` entries in every row, columns
    ascending; ``cols`` in :func:`index_dtype`."""
    m, n = mask.shape
    counts = mask.sum(1)
    k = int(counts[0]) if m else 0
    if bool((counts != k).any()):
        raise ConfigError("the mask must keep the same number of entries in every row")
    cols = torch.nonzero(mask)[:, 1].reshape(m, k)  # row-major: ascending columns per row
    return W.gather(1, cols), cols.to(index_dtype(n))


def pack_2bit(pos: torch.Tensor) -> torch.Tensor:
    """Pack positions in ``0..3`` (rows, q) into uint8 (rows, ceil(q/4)), 4 per byte, low bits first."""
    rows, q = pos.shape
    pad = (-q) % 4
    p = torch.nn.functional.pad(pos.to(torch.int32), (0, pad)).reshape(rows, -1, 4)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=pos.device)
    return (p << shifts).sum(-1).to(torch.uint8)


def unpack_2bit(packed: torch.Tensor, q: int) -> torch.Tensor:
    """Inverse of :func:`pack_2bit`: int64 positions (rows, q)."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int64, device=packed.device)
    p = (packed.to(torch.int64)[..., None] >> shifts) & 3
    return p.reshape(packed.shape[0], -1)[:, :q]


def semistructured_compress(W: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values (m, n/2), packed positions (m, ceil(n/8)) uint8)`` of a 2:4 mask with exactly 2 per group."""
    m, n = mask.shape
    check_pattern("2:4", n)
    g = mask.reshape(m, n // 4, 4)
    if bool((g.sum(-1) != 2).any()):
        raise ConfigError("a 2:4 mask must keep exactly 2 entries in every group of 4 columns")
    values, cols = mask_to_rows(W, mask)
    pos = cols.to(torch.int64) % 4
    return values, pack_2bit(pos)


def semistructured_columns(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Column indices (m, n/2) int64 of packed 2:4 positions: ``col = 4 * group + position``."""
    pos = unpack_2bit(packed, n // 2)
    group = torch.arange(n // 2, device=packed.device) // 2
    return 4 * group + pos


# -- low-rank + sparse ------------------------------------------------------------------------------

@dataclass
class LowRankSparseFit:
    """``W' = L @ R + S``: ``L (m, k)``, ``R (k, n)``, ``S (m, n)`` dense with ``mask``'s zeros (float64).

    ``history``: the scaled objective ``||(W - L R - S) D||_F`` after every half step (non-increasing).
    """

    L: torch.Tensor
    R: torch.Tensor
    S: torch.Tensor
    mask: torch.Tensor
    history: list[float] = field(default_factory=list)

    def dense(self) -> torch.Tensor:
        return self.L @ self.R + self.S


def lowrank_sparse_fit(W: torch.Tensor, d: torch.Tensor | None, rank: int, pattern: str = "unstructured",
                       keep_per_row: int | None = None, iters: int = 40, tol: float = 0.0) -> LowRankSparseFit:
    """OATS alternation (module docstring): ``W ~ L R + S`` minimizing ``||(W - L R - S) diag(d)||_F``.

    ``d``: column scales (``None`` = ones: the plain Frobenius fit). ``iters`` >= 1 alternations;
    stops early when an alternation lowers the objective by less than ``tol`` (relative).

    The first L-step is the exact truncated SVD. Later L-steps warm-start from the previous column
    basis ``Q`` with one subspace-iteration step, ``Q' = orth(A A^T Q)`` for ``A = W~ - S~``, and take
    ``L~ = Q' Q'^T A`` (the best rank-k matrix with that column space); ``Q`` is kept instead when it
    captures more of ``A`` (``||Q^T A||_F >= ||Q'^T A||_F``). Either way ``||A - L~||_F`` is at most
    its value at the previous ``L~``, so the objective never increases; as ``S~`` settles the step
    converges to the exact SVD step (power iteration), at ``O(m n k)`` instead of a full SVD.
    """
    W = as_matrix(W, "W")
    m, n = W.shape
    check_rank(rank, m, n, "rank")
    check_pattern(pattern, n)
    if int(iters) < 1:
        raise ConfigError(f"iters must be >= 1, got {iters}")
    d = torch.ones(n, dtype=W.dtype, device=W.device) if d is None else as_vector(d, n, "feature scales d")
    if bool((d <= 0).any()):
        raise ConfigError("feature scales must be positive; floor them (feature_scales does)")
    Wt = W * d
    St = torch.zeros_like(Wt)
    history: list[float] = []
    U, _, _ = torch.linalg.svd(Wt, full_matrices=False)
    Q = U[:, :rank]
    QtA = Q.T @ Wt
    for it in range(int(iters)):
        A = Wt - St
        if it > 0:
            QtA = Q.T @ A
            Qn = torch.linalg.qr(A @ QtA.T).Q
            QntA = Qn.T @ A
            if float(QntA.square().sum()) >= float(QtA.square().sum()):
                Q, QtA = Qn, QntA
        low = Q @ QtA
        resid = Wt - low
        history.append(float(torch.linalg.norm(resid - St)))
        mask = project_pattern(resid, pattern, keep_per_row)
        St = resid * mask
        history.append(float(torch.linalg.norm(resid - St)))
        if len(history) >= 4 and history[-3] - history[-1] <= tol * max(history[-3], 1e-300):
            break
    return LowRankSparseFit(Q, QtA / d, St / d, mask, history)


def refit_lowrank_under_cov(W: torch.Tensor, S: torch.Tensor, rank: int, C: torch.Tensor | None = None,
                            whitener: Whitener | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` = whitened rank-k fit of ``W - S``: the exact minimizer of ``||(W - S - L R) X||_F``
    over rank-k ``L R`` for fixed ``S`` (``C = X X^T`` or a precomputed ``whitener``), float64."""
    fac = whitened_svd(as_matrix(W, "W") - as_matrix(S, "S"), C, whitener=whitener, dtype=torch.float64)
    return fac.factors(rank, dtype=torch.float64)


__all__ = ["LowRankSparseFit", "PATTERNS", "check_pattern", "feature_scales", "index_dtype", "lowrank_sparse_fit",
           "mask_to_rows", "pack_2bit", "project_pattern", "refit_lowrank_under_cov", "semistructured_columns",
           "semistructured_compress", "unpack_2bit", "wanda_mask"]
