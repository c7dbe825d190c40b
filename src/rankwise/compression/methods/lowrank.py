"""Low rank: ``W' = L R`` (``L`` (out, k), ``R`` (k, in)) stored as :class:`LowRankLinear`, fitted under
one of the objectives below (``--method``). For a layer ``y = W x`` with calibration inputs ``X``:

* ``svd``      ``W' = SVD_k(W)``                                      min ||W - W'||_F
* ``asvd``     ``W' = SVD_k(W D) D^-1``, ``D = diag(mean|x_j|^alpha)``   (ASVD, alpha = 0.5)
* ``fwsvd``    ``W' = diag(r)^-1 SVD_k(diag(r) W)``, ``r_i = sqrt(sum_j F_ij)`` from the empirical
               Fisher ``F = sum_b (dL_b/dW)^2``                          (FWSVD)
* ``svd-llm``  ``W' = SVD_k(T S) S^-1``, ``S S^T = C = X X^T``: the exact minimizer of ``||(W - W') X||_F``
               (SVD-LLM); ``whitening`` picks ``S``: ``cholesky`` (SVD-LLM, damped if needed) or ``eigh``
               (symmetric square root, never fails). ``T`` is ``W``, or the sequential refit's corrected
               target (:meth:`LayerStats.target`), which makes the truncation the exact minimizer of
               ``||W X - W' X'||``.
* ``svd-llm-v2`` SVD-LLM v2: the same objective truncated through the eigendecomposition of ``C``
               (its loss-optimized truncation; never fails on a singular ``C``), with the ``svd-llm-v2``
               allocator (a ratio per matrix within each weight type from its theoretical truncation
               loss, :func:`rankwise.compression.allocation.solvers.allocate_svd_llm_v2`) by default.

``lstsq``: after truncation, the left factor is replaced by the closed-form least squares
``L = W C R^T (R C R^T)^-1`` = argmin ``||(W - L R) X||_F`` with ``R`` fixed (useful for the data-free
objectives; for ``svd-llm`` the truncation is already optimal).

Budget: a layer of shape (m, n) kept at rank ``k`` stores ``k (m + n)`` values; the plan of a layer
with ``target`` values is ``k = floor(target / (m + n))``, dense when that saves nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ...calibration.stats import ABS_MEAN, COV, FISHER, LayerStats
from ...errors import ConfigError, NumericalError
from ...linalg import (Factorization, asvd_scales, fisher_row_weights, plain_svd, refit_left, row_weighted_svd,
                       scaled_svd, whitened_svd)
from ...linalg.whitening import KINDS as WHITENINGS
from ...registry import Registry
from ...structures.lowrank import LowRankLinear, lowrank_saves
from .base import STRUCTURES, Method


@dataclass(frozen=True)
class Objective:
    """A named factorization ``fn(W, stats, options, rank=None) -> Factorization`` and the statistics it
    reads; ``rank``: only that rank will be used (the whitened objectives then compute the top ``rank``
    triplets only, :func:`rankwise.linalg.factorization.top_svd`)."""

    name: str
    needs: frozenset[str]
    fn: Callable[..., Factorization]
    description: str = ""


#: name -> Objective (``--method``).
OBJECTIVES: Registry[Objective] = Registry("low-rank objective")


def _objective(name: str, needs: set[str], description: str):
    def deco(fn):
        OBJECTIVES.register(name, Objective(name, frozenset(needs), fn, description))
        return fn
    return deco


@_objective("svd", set(), "plain truncated SVD, min ||W - W'||_F")
def _svd(W, stats, opts, rank=None):
    return plain_svd(W)


@_objective("asvd", {ABS_MEAN}, "activation-scaled SVD, W diag(mean|x|^alpha) (ASVD)")
def _asvd(W, stats, opts, rank=None):
    if stats.inputs is None:
        raise ConfigError("asvd needs the input abs-mean statistics, which were not collected")
    return scaled_svd(W, asvd_scales(stats.inputs.mean_abs, opts.asvd_alpha))


@_objective("fwsvd", {FISHER}, "Fisher-row-weighted SVD (FWSVD)")
def _fwsvd(W, stats, opts, rank=None):
    if stats.fisher is None:
        raise ConfigError("fwsvd needs the Fisher diagonal, which was not collected")
    return row_weighted_svd(W, fisher_row_weights(stats.fisher))


@_objective("svd-llm", {COV}, "whitened SVD, min ||(W - W')X||_F (SVD-LLM)")
def _svd_llm(W, stats, opts, rank=None):
    return whitened_svd(stats.target(W), stats.covariance(), kind=opts.whitening, rank=rank)


@_objective("svd-llm-v2", {COV}, "SVD-LLM v2's loss-optimized truncation: eigh whitening (its default allocator "
                                  "is svd-llm-v2's per-type ratios)")
def _svd_llm_v2(W, stats, opts, rank=None):
    return whitened_svd(stats.target(W), stats.covariance(), kind="eigh", rank=rank)


@dataclass
class LowRankOptions:
    method: str = "svd-llm"        # the objective (OBJECTIVES)
    whitening: str = "cholesky"    # svd-llm: "cholesky" | "eigh"
    lstsq: bool = False            # least-squares refit of the left factor
    asvd_alpha: float = 0.5

    def __post_init__(self) -> None:
        OBJECTIVES.get(self.method)
        if self.whitening not in WHITENINGS:
            raise ConfigError(f"unknown whitening {self.whitening!r}; valid: {', '.join(WHITENINGS)}")


@STRUCTURES.register("lowrank")
class LowRank(Method):
    """Low-rank factors under an objective; see the module docstring."""

    name = "lowrank"
    budget = "params"
    Options = LowRankOptions

    @property
    def objective(self) -> Objective:
        return OBJECTIVES.get(self.options.method)

    def needs(self) -> set[str]:
        return set(self.objective.needs) | ({COV} if self.options.lstsq else set())

    def engine_defaults(self) -> dict[str, Any]:
        """The whitened objectives default to true-sequential sub-groups with the held-out-ridge refit:
        on SmolLM2 (reference text, full protocol) perplexity 87.5 / 160.6 / 343.7 at 20 / 40 / 60 %
        removed, against 322.1 at 40 % for block granularity without refit (BENCHMARKS.md, "compress
        quality against the official SVD-LLM"). The data-free and diagonal objectives keep block
        granularity without refit (not measured with it)."""
        if self.options.method in ("svd-llm", "svd-llm-v2"):
            return {"granularity": "subgroup", "refit": True}
        return {}

    def plan_layer(self, shape: tuple[int, int], target: float) -> dict[str, Any] | None:
        m, n = shape
        k = int(target // (m + n))
        if k < 1 or not lowrank_saves(m, n, k):
            return None
        return {"rank": min(k, m, n)}

    def factorize(self, W: torch.Tensor, stats: LayerStats, rank: int | None = None) -> Factorization:
        """The full factorization under the objective (truncate with :meth:`truncate`); with ``rank``, one
        good for that rank and below (the fit's)."""
        return self.objective.fn(W, stats, self.options, rank=rank)

    def truncate(self, W: torch.Tensor, fac: Factorization, k: int, stats: LayerStats
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-``k`` factors ``(L, R)`` of ``fac`` (float32), with the ``lstsq`` left refit if set."""
        if not self.options.lstsq:
            return fac.factors(k, dtype=torch.float32)
        L, R = fac.factors(k, dtype=torch.float64)
        return refit_left(stats.target(W), R, stats.covariance(), dtype=torch.float32), R.to(torch.float32)

    def fit(self, W: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats,
            spec: Mapping[str, Any], fac: Factorization | None = None) -> LowRankLinear:
        fac = self.factorize(W, stats, rank=int(spec["rank"])) if fac is None else fac
        L, R = self.truncate(W, fac, int(spec["rank"]), stats)
        if not (bool(torch.isfinite(L).all()) and bool(torch.isfinite(R).all())):
            raise NumericalError("factorizing produced non-finite factors; the calibration statistics may be degenerate")
        layer = LowRankLinear.from_factors(L, R, None if bias is None else bias.detach().to(torch.float32))
        layer.fit_info = {"damping": float(fac.info.get("damping", 0.0) or 0.0)}
        return layer
