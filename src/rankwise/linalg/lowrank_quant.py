"""Quantized plus low-rank: ``W ~ Q + L R`` under the activation objective.

Objective (``C = X X^T``, ``Q`` on a :mod:`.quant` grid, ``L (m, k)``, ``R (k, n)`` stored in float16):

    f(Q, L, R) = ||(W - Q - L R) X||_F^2 = tr(E C E^T),   E = W - Q - L R.

Two steps, each the minimizer (exact or GPTQ's) of ``f`` in one block of variables:

* Q-step: ``Q = quant(W - L R)`` by :func:`.gptq.gptq` (``quantizer="gptq"``, data-aware, never
  worse than RTN) or :func:`.quant.rtn` (``quantizer="rtn"``), on the grid of ``W - L R``;
* LR-step: ``L R = SVD_k((W - Q) S) S^-1`` (``S S^T = C``, :func:`.factorization.whitened_svd`), the
  exact rank-k minimizer of ``f`` for fixed ``Q`` (Eckart-Young on the whitened residual), with
  the value ``sum_{i>k} s_i((W - Q) S)^2`` before the float16 rounding of the factors.

LoRC (ZeroQuant-V2), :func:`lorc`: one Q-step from ``L R = 0`` then one LR-step (the whitened rank-k
fit of the quantization error ``W - Q(W)``).

LQ-LoRA / CALDERA-style alternation, :func:`lq`. A *round* from ``L R`` is a Q-step on
``W - L R`` followed by the LR-step for the new ``Q``. Initialization: LoRC's round from
``L R = 0`` (``init="lorc"``), LQ-LoRA's round from ``L R`` = the whitened rank-k fit of ``W``
(``init="svd"``), or both, keeping the lower ``f`` (``init="best"``, the default). Then up to
``iters`` rounds, each kept only if it lowers ``f`` evaluated on what is stored (float16 grid and
factors, the undamped ``C``); the first round that does not stops the loop (a deterministic
round from the same point would propose the same again). Hence ``history`` (``f`` after the
initialization and after each kept round) is non-increasing by construction, and with
``init`` in ("best", "lorc") ``f(lq) <= f(lorc)`` for the same settings.

Why a round and not a lone Q-step is judged: once ``L R`` fits the error of a given ``Q``, a fresh
quantization of ``W - L R`` is scored against the compensated residual and is almost never better
on its own (on SmolLM2 layers it was rejected in every case tried), although after its own
LR-step it often is. (LQ-LoRA's Fisher weighting is a diagonal special case of ``C``; here ``C``
is the full input covariance.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ._checks import as_covariance, as_matrix, check_rank
from .factorization import whitened_svd
from .gptq import gptq, quant_objective
from .quant import QuantizedMatrix, rtn
from .whitening import Whitener, make_whitener

QUANTIZERS = ("gptq", "rtn")
INITS = ("best", "lorc", "svd")
#: Storage dtype of the low-rank factors.
FACTOR_DTYPE = torch.float16


@dataclass
class LowRankQuant:
    """``W' = Q + L R``: a :class:`QuantizedMatrix` and float16 factors; ``history`` is ``f`` after the
    initialization and after each kept round (non-increasing)."""

    quant: QuantizedMatrix
    left: torch.Tensor
    right: torch.Tensor
    history: list[float] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    def lowrank(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.left.to(dtype) @ self.right.to(dtype)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quant.dense(dtype) + self.lowrank(dtype)


def quantize_target(T: torch.Tensor, C: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                    quantizer: str = "gptq", rule: str = "minmax", **gptq_kw) -> QuantizedMatrix:
    """The Q-step: ``T`` quantized by GPTQ under ``C`` or by RTN (grid ``rule``, :mod:`.quant`)."""
    if quantizer == "gptq":
        return gptq(T, C, bits, group_size, symmetric, rule=rule, **gptq_kw)
    if quantizer == "rtn":
        return rtn(T, bits, group_size, symmetric, rule)
    raise ConfigError(f"unknown quantizer {quantizer!r}; valid: {', '.join(QUANTIZERS)}")


def fit_lowrank(E: torch.Tensor, whitener: Whitener, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The LR-step: float16 ``(L, R)`` of the whitened rank-``rank`` truncation of ``E`` (computed in float32)."""
    L, R = whitened_svd(E, whitener=whitener).factors(rank, dtype=torch.float32)
    return L.to(FACTOR_DTYPE), R.to(FACTOR_DTYPE)


def lq(W: torch.Tensor, C: torch.Tensor, bits: int, group_size: int, rank: int, symmetric: bool = False, *,
       iters: int = 5, init: str = "best", quantizer: str = "gptq", whitening: str = "cholesky",
       **gptq_kw) -> LowRankQuant:
    """Alternating ``Q + L R`` fit; monotone ``history`` (see the module docstring).

    ``init``: ``"lorc"`` (Q first), ``"svd"`` (LR first, LQ-LoRA), ``"best"`` (both, keep the lower
    ``f``); ``iters`` rounds of (Q-step, LR-step) follow, each kept only if ``f`` does not increase.
    """
    W = as_matrix(W, "W")
    m, n = W.shape
    C = as_covariance(C, n, "C")
    rank = check_rank(rank, m, n, "rank")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ConfigError(f"iters must be an integer >= 0, got {iters!r}")
    if quantizer not in QUANTIZERS:
        raise ConfigError(f"unknown quantizer {quantizer!r}; valid: {', '.join(QUANTIZERS)}")
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    whitener = make_whitener(C, whitening)

    def f(Qd: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> float:
        return quant_objective(W, Qd + L.to(torch.float64) @ R.to(torch.float64), C)

    def round_from(T: torch.Tensor) -> tuple:
        """Q-step on ``T`` then the LR-step: ``(f, Q, dense Q, L, R)``."""
        Q = quantize_target(T, C, bits, group_size, symmetric, quantizer, **gptq_kw)
        Qd = Q.dense(torch.float64)
        L, R = fit_lowrank(W - Qd, whitener, rank)
        return f(Qd, L, R), Q, Qd, L, R

    starts: dict[str, tuple] = {}
    if init in ("lorc", "best"):
        starts["lorc"] = round_from(W)
    if init in ("svd", "best"):
        L0, R0 = fit_lowrank(W, whitener, rank)
        starts["svd"] = round_from(W - L0.to(torch.float64) @ R0.to(torch.float64))
    start = min(starts, key=lambda k: starts[k][0])
    cur, Q, Qd, L, R = starts[start]
    history, solvers = [cur], [Q.info.get("solver")]
    for _ in range(iters):
        val, Qn, Qnd, Ln, Rn = round_from(W - L.to(torch.float64) @ R.to(torch.float64))
        if not val < cur:  # a deterministic round from the same point would propose the same again
            break
        cur, Q, Qd, L, R = val, Qn, Qnd, Ln, Rn
        history.append(cur)
        solvers.append(Q.info.get("solver"))
    info = {"objective": cur, "objective_quant_only": quant_objective(W, Qd, C), "init": start,
            "init_objectives": {k: v[0] for k, v in starts.items()}, "rounds": len(history) - 1,
            "quantizer": quantizer, "q_solvers": solvers, "whitener": whitener.kind, "damping": whitener.damping}
    return LowRankQuant(Q, L, R, history, info)


def lorc(W: torch.Tensor, C: torch.Tensor, bits: int, group_size: int, rank: int, symmetric: bool = False, *,
         quantizer: str = "gptq", whitening: str = "cholesky", **gptq_kw) -> LowRankQuant:
    """LoRC: ``Q = quant(W)``, then ``L R`` = the whitened rank-k fit of ``W - Q`` (:func:`lq`, ``init="lorc"``,
    ``iters=0``)."""
    return lq(W, C, bits, group_size, rank, symmetric, iters=0, init="lorc", quantizer=quantizer,
              whitening=whitening, **gptq_kw)


__all__ = ["FACTOR_DTYPE", "INITS", "LowRankQuant", "QUANTIZERS", "fit_lowrank", "lorc", "lq", "quantize_target"]
