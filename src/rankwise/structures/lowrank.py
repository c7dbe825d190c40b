"""Low-rank linear layer: ``y = B (A x) + b`` with ``W' = B.weight @ A.weight`` of rank <= k.

Parameters: ``k (m + n)`` (+ ``m`` for the bias) instead of ``m n``; it saves parameters iff
``k (m + n) < m n`` (:func:`lowrank_saves`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from ..errors import ConfigError
from .base import LAYERS, StructuredLinear


def lowrank_saves(m: int, n: int, k: int) -> bool:
    """True when a rank-``k`` factorization of an ``m x n`` matrix has fewer parameters: ``k(m+n) < mn``."""
    return k * (m + n) < m * n


def max_saving_rank(m: int, n: int) -> int:
    """Largest rank ``k`` with ``k (m + n) < m n`` (0 if none)."""
    return max(0, (m * n - 1) // (m + n))


def _hooked(*mods: nn.Module) -> bool:
    """Whether any forward hook (the modules' own or a global one) would run on a call of ``mods``."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in mods)


@LAYERS.register("lowrank")
class LowRankLinear(StructuredLinear):
    """``y = B(A x) + bias``: ``A: in -> rank`` (no bias), ``B: rank -> out`` (with bias).

    State-dict keys: ``A.weight (rank, in)``, ``B.weight (out, rank)``, ``B.bias (out,)``.
    The dense equivalent is ``W' = B.weight @ A.weight`` (:meth:`dense`).
    """

    kind = "lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features)
        if rank < 1:
            raise ConfigError(f"LowRankLinear rank must be >= 1, got {rank}")
        if in_features < 1 or out_features < 1:
            raise ConfigError(f"LowRankLinear needs positive sizes, got in={in_features}, out={out_features}")
        self.A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.B = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    # -- shape -----------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.A.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        return self.B.bias

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_factors(cls, L: torch.Tensor, R: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "LowRankLinear":
        """Layer with ``W' = L @ R``: ``L (out, k)`` becomes ``B.weight``, ``R (k, in)`` becomes ``A.weight``.

        ``dtype`` defaults to ``L``'s dtype; the factors are copied.
        """
        if L.ndim != 2 or R.ndim != 2 or L.shape[1] != R.shape[0]:
            raise ConfigError(f"factors must be L (out, k) and R (k, in); got {tuple(L.shape)} and {tuple(R.shape)}")
        out, k = L.shape
        n = R.shape[1]
        if bias is not None and bias.shape != (out,):
            raise ConfigError(f"bias must have shape ({out},), got {tuple(bias.shape)}")
        dtype = dtype or L.dtype
        layer = cls(n, out, k, bias=bias is not None, dtype=dtype, device=L.device)
        with torch.no_grad():
            layer.A.weight.copy_(R.to(dtype))
            layer.B.weight.copy_(L.to(dtype))
            if bias is not None:
                layer.B.bias.copy_(bias.to(dtype))
        return layer

    # -- math ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B (A x) + b``: two products called directly (a module call costs a few microseconds, as much
        as a small product at one token); through the sub-modules when they were wrapped or hooked."""
        A, B = self._modules["A"], self._modules["B"]
        if type(A) is nn.Linear and type(B) is nn.Linear and not _hooked(A, B):
            return F.linear(F.linear(x, A.weight), B.weight, B.bias)
        return B(A(x))

    def dense(self) -> torch.Tensor:
        """The dense weight ``B.weight @ A.weight`` of shape (out, in) (a new tensor)."""
        return self.B.weight @ self.A.weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_stored(self) -> int:
        """``k (m + n)`` weight values."""
        return self.rank * (self.in_features + self.out_features)

    def factor_dims(self) -> dict:
        """``A: n -> k``, ``B: k -> m``."""
        return {"A.weight": (self.in_features, self.rank), "B.weight": (self.rank, self.out_features)}

    def spec(self) -> dict:
        return {"rank": self.rank}

    @classmethod
    def from_spec(cls, in_features, out_features, bias, spec, dtype=None, device="meta") -> "LowRankLinear":
        return cls(in_features, out_features, int(spec["rank"]), bias=bias, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.B.bias is not None}")
