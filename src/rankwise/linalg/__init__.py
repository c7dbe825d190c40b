"""Pure math on single tensors (no nn.Module, no model knowledge).

* :mod:`.svd` — :func:`truncated_svd` (exact, or randomized per Halko-Martinsson-Tropp, seeded).
* :mod:`.whitening` — :class:`Whitener` (``S S^T = C``, apply ``S^{-1}`` stably);
  :func:`cholesky_whitener` (damped, escalating), :func:`eigh_whitener` (clamped, never fails).
* :mod:`.factorization` — compute once, truncate to any rank: :class:`Factorization`
  (``spectrum``, ``factors(k)``, ``error(k)``) from :func:`plain_svd`, :func:`whitened_svd`
  (SVD-LLM / v2), :func:`scaled_svd` + :func:`asvd_scales` (ASVD), :func:`row_weighted_svd`
  + :func:`fisher_row_weights` (FWSVD).
* :mod:`.refit` — :func:`refit_left` (closed-form least-squares left factor),
  :func:`activation_error` (``||(W - W') X||_F`` from ``C``).
* :mod:`.spectrum`, :mod:`.nystrom`, :mod:`.ldu` — singular-value summaries, Nystrom, LDU.
"""
from .factorization import (
    Factorization, asvd_scales, fisher_row_weights, plain_svd, row_weighted_svd, scaled_svd, whitened_svd,
)
from .refit import activation_error, refit_left
from .svd import truncated_svd
from .whitening import Whitener, cholesky_whitener, eigh_whitener, make_whitener
from .lowrank_quant import LowRankQuant, gptq, lorc, lq, rtn  # noqa: F401  (gptq from .gptq, rtn from .quant)
from . import blockdiag, kronecker, monarch, shared_basis, sparse  # noqa: F401,E402  structured fits (issue 13)

__all__ = [
    "Factorization", "Whitener", "activation_error", "asvd_scales", "cholesky_whitener", "eigh_whitener",
    "fisher_row_weights", "make_whitener", "plain_svd", "refit_left", "row_weighted_svd", "scaled_svd",
    "truncated_svd", "whitened_svd",
]
