"""Registry of low-rank compression methods: ``METHODS[name]`` maps a weight and its statistics to
a full :class:`~rankwise.linalg.Factorization`, truncated later to the planned rank.

For a layer ``y = W x`` (``W`` of shape (out, in)) with calibration inputs ``X`` (in, tokens):

* ``svd``        ``W' = SVD_k(W)``                                   min ||W - W'||_F
* ``asvd``       ``W' = SVD_k(W D) D^-1``, ``D = diag(mean|x_j|^alpha)``   (ASVD, alpha = 0.5)
* ``fwsvd``      ``W' = diag(r)^-1 SVD_k(diag(r) W)``, ``r_i = sqrt(sum_j F_ij)`` from the
                 empirical Fisher ``F = sum_b (dL_b/dW)^2``                 (FWSVD)
* ``svd-llm``    ``W' = SVD_k(W S) S^-1``, ``S S^T = C = X X^T`` by Cholesky (damped if needed)
                 -- the exact minimizer of ``||(W - W') X||_F``            (SVD-LLM)
* ``svd-llm-v2`` same objective, ``S = Q Lambda^1/2`` from ``eigh(C)``, never fails (SVD-LLM v2)

Any method can be followed by the closed-form least-squares refit of the left factor with the
right factor fixed: ``L = argmin_L ||(W - L R) X||_F = W C R^T (R C R^T)^-1`` (``refit=True``).

Sequential calibration with ``refit`` also records ``M = X X'^T`` between the dense model's inputs
``X`` and the compressed prefix's inputs ``X'``: the refit then solves ``min ||W X - L R X'||`` and
the whitened methods truncate the corrected target ``W M C'^-1`` (:func:`corrected_target`), the
exact rank-k minimizer of that objective.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ...calibration.stats import ABS_MEAN, COV, FISHER, LayerStats
from ...errors import ConfigError, UnknownMethodError
from ...linalg import (
    Factorization, asvd_scales, fisher_row_weights, plain_svd, refit_left, row_weighted_svd, scaled_svd,
    whitened_svd,
)

@dataclass(frozen=True)
class CompressionMethod:
    """A named factorization ``fn(W, stats) -> Factorization`` and the statistics it needs."""

    name: str
    needs: frozenset[str]
    fn: Callable[[torch.Tensor, LayerStats], Factorization] = field(repr=False)
    description: str = ""

    def factorize(self, W: torch.Tensor, stats: LayerStats) -> Factorization:
        return self.fn(W, stats)

    def stats_needed(self, refit: bool) -> frozenset[str]:
        """Statistics to collect: the method's own, plus the covariance when refitting."""
        return self.needs | {COV} if refit else self.needs


ASVD_ALPHA = 0.5


def _svd(W: torch.Tensor, stats: LayerStats) -> Factorization:
    return plain_svd(W)


def _asvd(W: torch.Tensor, stats: LayerStats) -> Factorization:
    if stats.inputs is None:
        raise ConfigError("asvd needs the input abs-mean statistics, which were not collected")
    return scaled_svd(W, asvd_scales(stats.inputs.mean_abs, ASVD_ALPHA))


def _fwsvd(W: torch.Tensor, stats: LayerStats) -> Factorization:
    if stats.fisher is None:
        raise ConfigError("fwsvd needs the Fisher diagonal, which was not collected")
    return row_weighted_svd(W, fisher_row_weights(stats.fisher))


def _svd_llm(W: torch.Tensor, stats: LayerStats) -> Factorization:
    return whitened_svd(stats.target(W), stats.covariance(), kind="cholesky")


def _svd_llm_v2(W: torch.Tensor, stats: LayerStats) -> Factorization:
    return whitened_svd(stats.target(W), stats.covariance(), kind="eigh")


METHODS: dict[str, CompressionMethod] = {
    m.name: m
    for m in (
        CompressionMethod("svd", frozenset(), _svd, "plain truncated SVD, min ||W - W'||_F"),
        CompressionMethod("asvd", frozenset({ABS_MEAN}), _asvd,
                          "activation-scaled SVD, W diag(mean|x|^0.5) (ASVD)"),
        CompressionMethod("fwsvd", frozenset({FISHER}), _fwsvd,
                          "Fisher-row-weighted SVD (FWSVD)"),
        CompressionMethod("svd-llm", frozenset({COV}), _svd_llm,
                          "Cholesky-whitened SVD, min ||(W - W')X||_F (SVD-LLM)"),
        CompressionMethod("svd-llm-v2", frozenset({COV}), _svd_llm_v2,
                          "eigh-whitened SVD, same objective, never fails (SVD-LLM v2)"),
    )
}


def get_method(name: str) -> CompressionMethod:
    """The registered method ``name``; unknown names raise :class:`UnknownMethodError` listing the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown compression method {name!r}; valid methods: {', '.join(METHODS)}"
        ) from None


def truncate(W: torch.Tensor, fac: Factorization, k: int, stats: LayerStats | None = None,
             refit: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``k`` factors ``(L (out, k), R (k, in))`` of ``fac``; with ``refit`` the left factor is
    replaced by the closed-form least-squares ``L = W C R^T (R C R^T)^-1`` (covariance ``C``), or,
    when ``stats.cross`` holds ``M = X X'^T``, ``L = W M R^T (R C' R^T)^-1`` = argmin ``||W X - L R X'||``."""
    L, R = fac.factors(k, dtype=torch.float64 if refit else torch.float32)
    if refit:
        if stats is None:
            raise ConfigError("refit needs the input covariance, which was not collected")
        L = refit_left(W, R, stats.covariance(), cross=stats.cross)
    return L, R
