"""Compute once, truncate to any rank: SVD-based factorizations under four objectives.

Each function transforms ``W (m, n)`` into ``W~ = D_l W D_r``, takes the full thin SVD
``W~ = U diag(s) Vh`` once, and maps the rank-k truncation back:

    W'_k = D_l^{-1} U_k diag(s_k) Vh_k D_r^{-1} = L_k R_k,
    L_k = D_l^{-1} U_k diag(sqrt(s_k)),   R_k = diag(sqrt(s_k)) Vh_k D_r^{-1}.

By Eckart-Young on ``W~``, ``W'_k`` is the exact minimizer of the objective below among rank-k
matrices, and its value is ``error(k) = sqrt(sum_{i>k} s_i^2)``. A fit that needs one rank ``r``
only (``whitened_svd(..., rank=r)``) takes the top ``r`` triplets from the eigendecomposition of the
smaller Gram matrix of ``W~`` instead of a full SVD (:func:`top_svd`); it keeps the rest's energy
(``tail``) so that ``error(k)`` stays exact for ``k <= r``:

=====================  ====================  =======================================================
function               transform             objective minimized
=====================  ====================  =======================================================
plain_svd              none                  ||W - W'||_F
whitened_svd           W S, S S^T = C        ||(W - W') X||_F,  C = X X^T (+ damping, see whitening)
scaled_svd  (ASVD)     W diag(s)             ||(W - W') diag(s)||_F
row_weighted_svd (FW)  diag(sqrt(w)) W       sum_i w_i ||W_i - W'_i||^2
=====================  ====================  =======================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, NumericalError
from ._checks import as_matrix, as_vector, check_rank
from .whitening import Whitener, make_whitener

RightMap = Whitener | torch.Tensor | None


@dataclass
class Factorization:
    """Full thin SVD of the transformed matrix plus the maps back; see the module docstring.

    ``right``: ``None``; a ``Whitener`` (``R <- R S^{-1}``); a 1-D tensor ``s`` (column scales,
    ``R <- R diag(1/s)``); or a 2-D tensor ``T`` (``R <- R T``).
    ``left``: ``None`` or a 1-D tensor ``d`` (row scales, ``L <- diag(1/d) L``).
    ``U (m, r)``, ``Vh (r, n)`` are stored in ``dtype`` of the call, ``S (r,)`` in float64.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    right: RightMap = None
    left: torch.Tensor | None = None
    objective: str = "frobenius"
    info: dict = field(default_factory=dict)
    tail: float = 0.0  # sum of the squared singular values not stored (a truncated factorization)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.Vh.shape[1])

    @property
    def max_rank(self) -> int:
        return int(self.S.shape[0])

    @property
    def spectrum(self) -> torch.Tensor:
        """Singular values of the transformed matrix (descending, float64): ``error(k)^2 = sum_{i>k} s_i^2``."""
        return self.S

    def errors(self) -> torch.Tensor:
        """``[error(0), error(1), ..., error(r)]`` (float64, length r + 1)."""
        sq = self.S.flip(0).square().cumsum(0).flip(0)
        return (torch.cat([sq, sq.new_zeros(1)]) + self.tail).clamp_min(0).sqrt()

    def error(self, k: int) -> float:
        """Objective value of the rank-k solution: ``sqrt(sum_{i>k} s_i^2)`` (0 <= k <= r)."""
        if not 0 <= int(k) <= self.max_rank:
            raise ConfigError(f"rank {k} is out of range: use 0 <= k <= {self.max_rank}")
        return float((self.S[int(k):].square().sum() + self.tail).clamp_min(0).sqrt())

    def factors(self, k: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L (m, k), R (k, n))`` with ``L @ R`` the rank-k minimizer; ``sqrt(s)`` split between them."""
        m, n = self.shape
        k = check_rank(k, m, n, "rank")
        if k > self.max_rank:  # a truncated factorization (top_svd) stores fewer than min(m, n)
            raise ConfigError(f"rank {k} exceeds the stored {self.max_rank} singular values")
        root = self.S[:k].sqrt()
        L = self.U[:, :k].to(torch.float64) * root
        R = root[:, None] * self.Vh[:k].to(torch.float64)
        if self.left is not None:
            L = L / self.left[:, None]
        if isinstance(self.right, Whitener):
            R = self.right.unwhiten(R)
        elif isinstance(self.right, torch.Tensor):
            R = R / self.right if self.right.ndim == 1 else R @ self.right.to(torch.float64)
        if not (bool(torch.isfinite(L).all()) and bool(torch.isfinite(R).all())):
            raise NumericalError(f"rank-{k} factors are non-finite ({self.objective} objective); "
                                 "the weighting is too ill-conditioned: use more damping or the eigh whitener")
        return L.to(dtype), R.to(dtype)

    def dense(self, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``L_k @ R_k`` (m, n)."""
        L, R = self.factors(k, dtype=torch.float64)
        return (L @ R).to(dtype)


def _svd(Wt: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        U, S, Vh = torch.linalg.svd(Wt, full_matrices=False)
    except RuntimeError as e:  # LAPACK non-convergence
        raise NumericalError(f"SVD of a {tuple(Wt.shape)} matrix did not converge: {e}") from e
    return U.to(dtype), S, Vh.to(dtype)


#: Singular values below this fraction of the largest are dropped by :func:`top_svd`: from the Gram
#: matrix they are exact only to ~ sqrt(eps) = 1.5e-8 of the largest, so their vectors would be noise;
#: leaving their directions out costs less than 1e-12 of the energy each.
TOP_SVD_FLOOR = 1e-6


def top_svd(G: torch.Tensor, k: int, dtype: torch.dtype = torch.float32
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``(U_k, s_k, Vh_k, tail)``: the top ``k`` singular triplets of ``G`` (m, n) and ``tail =
    ||G||_F^2 - sum s_k^2``, from the eigendecomposition of the smaller Gram matrix, in float64:
    ``G G^T = U diag(s^2) U^T`` and ``Vh = diag(1/s) U^T G`` (``m <= n``), or ``G^T G = V diag(s^2) V^T``
    and ``U = G V diag(1/s)``. The rank-k truncation ``U_k diag(s_k) Vh_k = U_k U_k^T G`` is the one of
    the full SVD; rounding is ``eps * s_1^2`` on ``s^2``, so a singular value near ``sqrt(eps) s_1``
    is inexact, and one below :data:`TOP_SVD_FLOOR` ``* s_1`` is dropped (zero factors). A symmetric
    eigensolver on a k-row Gram matrix is several times faster than an SVD of ``G`` on a CPU."""
    G = G.to(torch.float64)
    m, n = G.shape
    k = min(int(k), m, n)
    wide = m <= n
    lam, Q = torch.linalg.eigh(G @ G.T if wide else G.T @ G)  # ascending
    total = float(lam.clamp_min(0).sum())
    lam, Q = lam.flip(0)[:k].clamp_min(0), Q.flip(1)[:, :k]
    s = lam.sqrt()
    keep = s > TOP_SVD_FLOOR * float(s[0]) if k > 0 and float(s[0]) > 0 else torch.zeros_like(s, dtype=torch.bool)
    inv = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
    s = torch.where(keep, s, torch.zeros_like(s))
    if wide:
        U, Vh = Q, inv[:, None] * (Q.T @ G)
    else:
        U, Vh = (G @ Q) * inv, Q.T
    return U.to(dtype), s, Vh.to(dtype), max(0.0, total - float(s.square().sum()))


def plain_svd(W: torch.Tensor, dtype: torch.dtype = torch.float32) -> Factorization:
    """``W' = SVD_k(W)``: minimizes ``||W - W'||_F``."""
    W = as_matrix(W, "W")
    return Factorization(*_svd(W, dtype), objective="frobenius")


def whitened_svd(W: torch.Tensor, C: torch.Tensor | None = None, kind: str = "cholesky",
                 whitener: Whitener | None = None, dtype: torch.dtype = torch.float32, rank: int | None = None,
                 **whiten_kw) -> Factorization:
    """``W' = SVD_k(W S) S^{-1}`` with ``S S^T = C``: minimizes ``||(W - W') X||_F`` for ``C = X X^T``.

    Pass the input covariance ``C (n, n)`` (e.g. ``InputStats.cov``) and ``kind`` (``"cholesky"``
    = SVD-LLM, ``"eigh"`` = SVD-LLM v2), or a precomputed ``whitener`` (share one across the layers
    that read the same input). ``whiten_kw`` go to the whitener (``damping``, ``max_tries``, ``floor``).
    ``rank``: keep only the top ``rank`` triplets, from :func:`top_svd` (a fit at one known rank).
    """
    W = as_matrix(W, "W")
    if whitener is None:
        if C is None:
            raise ConfigError("whitened_svd needs the input covariance C or a whitener")
        if C.shape != (W.shape[1], W.shape[1]):
            raise ConfigError(f"covariance shape {tuple(C.shape)} does not match the {W.shape[1]} inputs of W")
        whitener = make_whitener(C, kind, **whiten_kw)
    elif whitener.n != W.shape[1]:
        raise ConfigError(f"whitener is for {whitener.n} inputs, W has {W.shape[1]}")
    info = {"whitener": whitener.kind, "damping": whitener.damping, "damping_rel": whitener.damping_rel,
            "clamped": whitener.clamped}
    if rank is not None:
        U, S, Vh, tail = top_svd(whitener.whiten(W), rank, dtype)
        return Factorization(U, S, Vh, right=whitener, objective="activation", info=info, tail=tail)
    return Factorization(*_svd(whitener.whiten(W), dtype), right=whitener, objective="activation", info=info)


def asvd_scales(abs_mean: torch.Tensor, alpha: float = 0.5, floor: float = 1e-6) -> torch.Tensor:
    """ASVD column scales ``s_j = (mean_t |x_j|)^alpha``, floored at ``floor * max_j s_j`` (float64)."""
    if not isinstance(abs_mean, torch.Tensor) or abs_mean.ndim != 1:
        raise ConfigError("abs_mean must be a 1-D tensor of mean absolute input activations")
    a = as_vector(abs_mean, abs_mean.shape[0], "abs_mean")
    if bool((a < 0).any()):
        raise ConfigError("abs_mean must be non-negative (mean absolute activations)")
    s = a.pow(alpha)
    top = float(s.max())
    if top <= 0.0:
        return torch.ones_like(s)
    return s.clamp_min(floor * top)


def scaled_svd(W: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> Factorization:
    """ASVD: ``W' = SVD_k(W diag(s)) diag(s)^{-1}``: minimizes ``||(W - W') diag(s)||_F``. ``s > 0``."""
    W = as_matrix(W, "W")
    s = as_vector(s, W.shape[1], "column scales s")
    if bool((s <= 0).any()):
        raise ConfigError("column scales must be positive; floor them (asvd_scales does)")
    return Factorization(*_svd(W * s, dtype), right=s, objective="column-scaled")


def row_weighted_svd(W: torch.Tensor, row_weights: torch.Tensor, dtype: torch.dtype = torch.float32,
                     floor: float = 1e-8) -> Factorization:
    """FWSVD: ``W' = diag(d)^{-1} SVD_k(diag(d) W)``, ``d = sqrt(w)``: minimizes ``sum_i w_i ||W_i - W'_i||^2``.

    Weights are floored at ``floor * max(w)`` so that rows with zero weight stay finite.
    """
    W = as_matrix(W, "W")
    w = as_vector(row_weights, W.shape[0], "row_weights")
    if bool((w < 0).any()):
        raise ConfigError("row weights must be non-negative")
    top = float(w.max())
    d = (w.clamp_min(floor * top) if top > 0 else torch.ones_like(w)).sqrt()
    return Factorization(*_svd(d[:, None] * W, dtype), left=d, objective="row-weighted")


def fisher_row_weights(fisher: torch.Tensor) -> torch.Tensor:
    """FWSVD row importance ``w_i = sum_j F_ij`` from an (out, in) empirical Fisher diagonal."""
    F = as_matrix(fisher, "fisher")
    return F.sum(1)
