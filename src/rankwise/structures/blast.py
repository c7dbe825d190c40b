"""BLAST layer (Lee et al. 2024, Block-Level Adaptive STructured matrices): ``y = W' x + b`` with

    W'_{ij} = U_i diag(d_ij) V_j^T          (block (i, j) of a b x b grid, s x p each, s = m/b, p = n/b)

``U (b, s, r)`` shared along block row ``i``, ``V (b, p, r)`` shared along block column ``j``, and a
diagonal coupling ``diag (b, b, r)`` per block: low rank (``b = 1``), block low rank (``d_ij = 0``
off the diagonal) and Monarch-like mixes are special cases, all learnt. Forward on ``x (N, n)``:
``z_j = V_j^T x_j`` (one ``bmm``, ``(b, N, r)``), ``w_i = sum_j d_ij * z_j`` (``N b^2 r``), ``y_i = U_i w_i``
(one ``bmm``). Stored values ``r (m + n + b^2)``; multiply-adds per row the same number.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import LAYERS, StructuredLinear


def check_blast_shape(m: int, n: int, nblocks: int, rank: int) -> tuple[int, int]:
    """``(s, p)`` block sizes, or :class:`ConfigError` naming the block counts that divide both sides."""
    if isinstance(nblocks, bool) or not isinstance(nblocks, int) or nblocks < 1 or m % nblocks or n % nblocks:
        common = [d for d in range(1, min(m, n) + 1) if m % d == 0 and n % d == 0]
        raise ConfigError(f"BLAST block count {nblocks} does not divide both sides of a {m}x{n} matrix; use one "
                          f"of {common}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"BLAST rank must be a positive integer, got {rank!r}")
    return m // nblocks, n // nblocks


def blast_dense(U: torch.Tensor, V: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """``W' (b s, b p)`` with block ``(i, j)`` = ``U_i diag(d_ij) V_j^T``."""
    b, s, r = U.shape
    _, p, _ = V.shape
    return torch.einsum("isr,ijr,jpr->isjp", U, diag, V).reshape(b * s, b * p)


@LAYERS.register("blast")
class BlastLinear(StructuredLinear):
    """``y = W' x + bias``, ``W'`` a BLAST matrix; state-dict keys ``U``, ``V``, ``diag``, ``bias``."""

    kind = "blast"

    def __init__(self, in_features: int, out_features: int, nblocks: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features)
        s, p = check_blast_shape(out_features, in_features, int(nblocks), int(rank))
        b, r = int(nblocks), int(rank)
        self.U = nn.Parameter(torch.zeros(b, s, r, dtype=dtype, device=device))
        self.V = nn.Parameter(torch.zeros(b, p, r, dtype=dtype, device=device))
        self.diag = nn.Parameter(torch.zeros(b, b, r, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @property
    def nblocks(self) -> int:
        return self.U.shape[0]

    @property
    def rank(self) -> int:
        return self.U.shape[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, r = self.U.shape
        p = self.V.shape[1]
        x2 = x.reshape(-1, self.in_features)
        N = x2.shape[0]
        z = torch.bmm(x2.reshape(N, b, p).transpose(0, 1), self.V)            # (b_j, N, r)
        w = torch.einsum("jnr,ijr->inr", z, self.diag)                          # (b_i, N, r)
        y = torch.bmm(w, self.U.transpose(1, 2))                                # (b_i, N, s)
        y = y.transpose(0, 1).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        return blast_dense(self.U, self.V, self.diag).to(torch.float32)

    def num_stored(self) -> int:
        """``r (m + n + b^2)``."""
        return self.U.numel() + self.V.numel() + self.diag.numel()

    def factor_dims(self) -> dict[str, Any]:
        b, s, r = self.U.shape
        # the coupling mixes b blocks: as a b x b map per rank index; gain 0.6 brings the product's spectral
        # norm to the other structures' (measured ~3 sqrt(m/n) at gain 1, b = 4)
        return {"V": (self.V.shape[1], r), "diag": (b, b, 0.6), "U": (r, s)}

    def spec(self) -> dict[str, Any]:
        return {"nblocks": self.nblocks, "rank": self.rank}

    @classmethod
    def from_spec(cls, in_features, out_features, bias, spec, dtype=None, device="meta") -> "BlastLinear":
        return cls(in_features, out_features, int(spec["nblocks"]), int(spec["rank"]), bias=bias, dtype=dtype,
                   device=device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
                f"rank={self.rank}, bias={self.bias is not None}")
