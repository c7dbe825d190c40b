"""Monarch layer ``y = P2 B2 P1 B1 x + b``: two batched matmuls with the permutations as reshapes.

Factors (see :mod:`rankwise.linalg.monarch` for the conventions and the dense form):
``B1 (b, l r, p)`` (``b`` input blocks of ``p``), ``B2 (l, s, b r)`` (``l`` output blocks of ``s``).
Forward on ``x (N, n)``: ``x -> (b, N, p)``, ``bmm`` with ``B1^T`` -> ``(b, N, l, r)``, transpose to
``(l, N, b r)``, ``bmm`` with ``B2^T`` -> ``(l, N, s)``, transpose to ``(N, s, l) = (N, m)``.
Stored values ``r (l n + b m)`` against ``m n`` dense; multiply-adds per token the same number.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..linalg.monarch import check_monarch_shape, monarch_dense, monarch_num_values
from .base import LAYERS, StructuredLinear


@LAYERS.register("monarch")
class MonarchLinear(StructuredLinear):
    """``y = P2 B2 P1 B1 x + bias``; state-dict keys ``B1``, ``B2``, ``bias``."""

    kind = "monarch"

    def __init__(self, in_features: int, out_features: int, in_blocks: int, out_blocks: int, rank: int = 1,
                 bias: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features)
        p, s = check_monarch_shape(out_features, in_features, int(in_blocks), int(out_blocks), int(rank))
        self.in_blocks, self.out_blocks, self.rank = int(in_blocks), int(out_blocks), int(rank)
        self.B1 = nn.Parameter(torch.zeros(self.in_blocks, self.out_blocks * self.rank, p, dtype=dtype, device=device))
        self.B2 = nn.Parameter(torch.zeros(self.out_blocks, s, self.in_blocks * self.rank, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, B1: torch.Tensor, B2: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "MonarchLinear":
        """Layer with the given ``B1 (b, l r, p)``, ``B2 (l, s, b r)`` (copied, cast to ``dtype``)."""
        b, lr, p = B1.shape
        l, s, _ = B2.shape
        dtype = dtype or torch.float32
        layer = cls(b * p, l * s, b, l, lr // l, bias=bias is not None, dtype=dtype, device=B1.device)
        monarch_dense(B1, B2)  # validates the factor shapes
        with torch.no_grad():
            layer.B1.copy_(B1.to(dtype))
            layer.B2.copy_(B2.to(dtype))
            if bias is not None:
                layer.bias.copy_(bias.to(dtype))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, r = self.in_blocks, self.out_blocks, self.rank
        p = self.in_features // b
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        N = x2.shape[0]
        z = torch.bmm(x2.reshape(N, b, p).transpose(0, 1), self.B1.transpose(1, 2))      # (b, N, l r)
        z = z.reshape(b, N, l, r).permute(2, 1, 0, 3).reshape(l, N, b * r)              # P1
        y = torch.bmm(z, self.B2.transpose(1, 2))                                         # (l, N, s)
        y = y.permute(1, 2, 0).reshape(*lead, self.out_features)                          # P2
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        return monarch_dense(self.B1, self.B2).to(torch.float32)

    def num_stored(self) -> int:
        """``r (l n + b m)``."""
        return monarch_num_values(self.out_features, self.in_features, self.in_blocks, self.out_blocks, self.rank)

    def factor_dims(self) -> dict[str, Any]:
        """Each ``B1`` block maps ``p -> l r``, each ``B2`` block ``b r -> s``."""
        b, l, r = self.in_blocks, self.out_blocks, self.rank
        return {"B1": (self.in_features // b, l * r), "B2": (b * r, self.out_features // l)}

    def spec(self) -> dict[str, Any]:
        return {"in_blocks": self.in_blocks, "out_blocks": self.out_blocks, "rank": self.rank}

    @classmethod
    def from_spec(cls, in_features, out_features, bias, spec, dtype=None, device="meta") -> "MonarchLinear":
        return cls(in_features, out_features, int(spec["in_blocks"]), int(spec["out_blocks"]), int(spec.get("rank", 1)),
                   bias=bias, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, in_blocks={self.in_blocks}, "
                f"out_blocks={self.out_blocks}, rank={self.rank}, bias={self.bias is not None}")
