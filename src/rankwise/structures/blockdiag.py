"""Block-diagonal plus low-rank layer ``y = BD x + B(A x) + b`` (:mod:`rankwise.linalg.blockdiag`).

``blocks (b, s, p)``: block ``g`` maps input columns ``g p : (g+1) p`` to output rows
``g s : (g+1) s``. Forward: one ``bmm`` over the ``b`` blocks, added in place into the low-rank
product ``B(A x)``. Stored values ``m n / b + k (m + n)``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..linalg.blockdiag import blockdiag_dense, check_blocks
from .base import LAYERS, StructuredLinear


@LAYERS.register("blockdiag-lowrank")
class BlockDiagLowRankLinear(StructuredLinear):
    """``y = blockdiag(blocks) x + B(A x) + bias``; keys ``blocks``, ``A.weight``, ``B.weight``, ``bias``."""

    kind = "blockdiag-lowrank"

    def __init__(self, in_features: int, out_features: int, nblocks: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features)
        s, p = check_blocks(out_features, in_features, int(nblocks))
        if rank < 1:
            raise ConfigError(f"BlockDiagLowRankLinear rank must be >= 1, got {rank}")
        self.nblocks = int(nblocks)
        self.blocks = nn.Parameter(torch.zeros(self.nblocks, s, p, dtype=dtype, device=device))
        self.A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.B = nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @property
    def rank(self) -> int:
        return self.A.out_features

    @classmethod
    def from_parts(cls, blocks: torch.Tensor, L: torch.Tensor, R: torch.Tensor, bias: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> "BlockDiagLowRankLinear":
        """Layer with ``W' = blockdiag(blocks) + L @ R``; ``blocks (b, s, p)``, ``L (b s, k)``, ``R (k, b p)``."""
        b, s, p = blocks.shape
        if L.shape[0] != b * s or R.shape[1] != b * p or L.shape[1] != R.shape[0]:
            raise ConfigError(f"parts do not match: blocks {tuple(blocks.shape)}, L {tuple(L.shape)}, R {tuple(R.shape)}")
        dtype = dtype or torch.float32
        layer = cls(b * p, b * s, b, L.shape[1], bias=bias is not None, dtype=dtype, device=blocks.device)
        with torch.no_grad():
            layer.blocks.copy_(blocks.to(dtype))
            layer.A.weight.copy_(R.to(dtype))
            layer.B.weight.copy_(L.to(dtype))
            if bias is not None:
                layer.bias.copy_(bias.to(dtype))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, (_, s, p) = self.nblocks, self.blocks.shape
        x2 = x.reshape(-1, self.in_features)
        N = x2.shape[0]
        y = self.B(self.A(x2))                                                       # (N, m), fresh
        bd = torch.bmm(x2.reshape(N, b, p).transpose(0, 1), self.blocks.transpose(1, 2))  # (b, N, s)
        y = y.reshape(N, b, s).add_(bd.transpose(0, 1)).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        return (blockdiag_dense(self.blocks) + self.B.weight @ self.A.weight).to(torch.float32)

    def num_stored(self) -> int:
        """``m n / b + k (m + n)``."""
        return self.blocks.numel() + self.rank * (self.in_features + self.out_features)

    def factor_dims(self) -> dict[str, Any]:
        """Blocks ``p -> s`` and the low-rank ``A: n -> k``, ``B: k -> m``; the two summed parts get gain 1/sqrt 2."""
        _, s, p = self.blocks.shape
        h = 0.5 ** 0.5
        return {"blocks": (p, s, h), "A.weight": (self.in_features, self.rank), "B.weight": (self.rank, self.out_features, h)}

    def spec(self) -> dict[str, Any]:
        return {"nblocks": self.nblocks, "rank": self.rank}

    @classmethod
    def from_spec(cls, in_features, out_features, bias, spec, dtype=None, device="meta") -> "BlockDiagLowRankLinear":
        return cls(in_features, out_features, int(spec["nblocks"]), int(spec["rank"]), bias=bias, dtype=dtype,
                   device=device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
                f"rank={self.rank}, bias={self.bias is not None}")
