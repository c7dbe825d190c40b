"""Whitening transforms for the activation-weighted objective ``||(W - W') X||_F``.

With calibration inputs ``X (n, T)`` and ``C = X X^T``, any ``S`` with ``S S^T = C`` gives

    ||M X||_F^2 = tr(M C M^T) = ||M S||_F^2,

so the rank-k minimizer is ``W' = SVD_k(W S) S^{-1}`` (SVD-LLM) and the optimum equals the tail
``sqrt(sum_{i>k} s_i(W S)^2)``.

* :func:`cholesky_whitener`: ``S = chol(C)`` lower triangular, ``M S^{-1}`` by a triangular solve.
  If ``C`` is not positive definite, ``delta = eps * mean(diag C)`` is added to the diagonal, with
  ``eps`` escalating x10 from ``damping`` until the factorization succeeds; the amount is recorded
  (``Whitener.damping``) and logged as a warning. The objective is then the one of ``C + delta I``.
* :func:`eigh_whitener`: ``C = Q diag(lam) Q^T``, ``S = Q diag(sqrt(lam')) Q^T`` (symmetric square root)
  with ``lam' = max(lam, floor * lam_max)``; never fails (SVD-LLM v2). Clamped eigenvalues are counted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import NumericalError
from ._checks import as_covariance

log = logging.getLogger("rankwise")

KINDS = ("cholesky", "eigh")


@dataclass
class Whitener:
    """``S`` with ``S S^T = C_eff`` (``C`` plus whatever damping/clamping was needed), in float64.

    ``kind="cholesky"``: ``factor`` is the lower-triangular ``S``.
    ``kind="eigh"``: ``factor`` is ``Q`` and ``root`` is ``sqrt(lam')``, ``S = Q diag(root) Q^T``.
    ``damping``: absolute amount added to ``diag(C)``; ``damping_rel`` the same over ``mean(diag C)``.
    ``clamped``: eigenvalues raised to the floor (eigh only).
    """

    kind: str
    factor: torch.Tensor
    root: torch.Tensor | None = None
    damping: float = 0.0
    damping_rel: float = 0.0
    clamped: int = 0

    @property
    def n(self) -> int:
        return int(self.factor.shape[0])

    @property
    def S(self) -> torch.Tensor:
        """The (n, n) matrix ``S``."""
        if self.kind == "cholesky":
            return self.factor
        return (self.factor * self.root) @ self.factor.T

    @property
    def covariance(self) -> torch.Tensor:
        """``S S^T``: the covariance whose objective this whitener optimizes."""
        S = self.S
        return S @ S.T

    def whiten(self, W: torch.Tensor) -> torch.Tensor:
        """``W S`` (float64)."""
        W = W.to(torch.float64)
        if self.kind == "cholesky":
            return W @ self.factor
        return ((W @ self.factor) * self.root) @ self.factor.T

    def unwhiten(self, M: torch.Tensor) -> torch.Tensor:
        """``M S^{-1}`` (float64), by a triangular solve (cholesky) or the clamped eigen-inverse (eigh)."""
        M = M.to(torch.float64)
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.factor, M, upper=False, left=False)
        return ((M @ self.factor) / self.root) @ self.factor.T


def cholesky_whitener(C: torch.Tensor, damping: float = 1e-6, max_tries: int = 8) -> Whitener:
    """Cholesky ``S`` of ``C`` (n, n), damping ``C + eps mean(diag C) I`` (eps = damping * 10^i) if needed.

    Raises ``NumericalError`` when ``C`` is non-finite or still not PD after ``max_tries`` escalations.
    """
    C = as_covariance(C)
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) == 0:
        return Whitener("cholesky", L)
    scale = float(torch.diagonal(C).mean())
    if scale <= 0.0:  # an all-zero covariance: every W' is optimal; damping makes it plain SVD
        scale = 1.0
    eps = float(damping)
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    for _ in range(max_tries):
        delta = eps * scale
        L, info = torch.linalg.cholesky_ex(C + delta * eye)
        if int(info) == 0:
            log.warning("covariance (%d x %d) is not positive definite: added %.3g * mean(diag C) = %.3g "
                        "to its diagonal", C.shape[0], C.shape[0], eps, delta)
            return Whitener("cholesky", L, damping=delta, damping_rel=eps)
        eps *= 10.0
    raise NumericalError(
        f"covariance ({C.shape[0]} x {C.shape[0]}) is not positive definite even after adding "
        f"{eps / 10:.3g} * mean(diag C) to its diagonal; use the eigh whitener (svd-llm-v2) or more calibration data"
    )


def eigh_whitener(C: torch.Tensor, floor: float = 1e-10) -> Whitener:
    """Symmetric square root ``S = Q diag(sqrt(max(lam, floor lam_max))) Q^T`` of ``C``; never fails on finite C."""
    C = as_covariance(C)
    lam, Q = torch.linalg.eigh(C)
    top = float(lam.max().clamp_min(0.0))
    lo = max(floor * top, torch.finfo(torch.float64).tiny) if top > 0 else 1.0
    clamped = int((lam < lo).sum())
    root = lam.clamp_min(lo).sqrt()
    return Whitener("eigh", Q, root=root, clamped=clamped)


def damp(C: torch.Tensor, rel: float) -> torch.Tensor:
    """``C + rel * mean(diag C) * I`` (a copy): the objective ``tr(D C D^T)`` plus
    ``rel * mean(diag C) * ||D||_F^2``, which keeps exact least-squares fits off the directions the
    calibration inputs barely excite (GPTQ damps its Hessian the same way). ``rel = 0``: ``C`` itself."""
    if rel <= 0:
        return C
    out = C.clone()
    out.diagonal().add_(float(rel) * float(torch.diagonal(C).mean().clamp_min(1e-300)))
    return out


def make_whitener(C: torch.Tensor, kind: str = "cholesky", **kw) -> Whitener:
    """:func:`cholesky_whitener` or :func:`eigh_whitener` by name."""
    if kind == "cholesky":
        return cholesky_whitener(C, **kw)
    if kind == "eigh":
        return eigh_whitener(C, **kw)
    from ..errors import UnknownMethodError

    raise UnknownMethodError(f"unknown whitening kind {kind!r}; valid: {', '.join(KINDS)}")


__all__ = ["KINDS", "Whitener", "cholesky_whitener", "damp", "eigh_whitener", "make_whitener"]
