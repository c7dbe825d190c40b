"""Kronecker-sum layer ``y = (sum_i A_i (x) B_i) x + b`` computed by the vec trick, never densely.

``A (r, m1, n1)``, ``B (r, m2, n2)`` (:mod:`rankwise.linalg.kronecker`). With ``x`` reshaped
row-major to ``X (n1, n2)``, ``(A (x) B) x = vec(A X B^T)`` (row-major; the column-major form is
``vec(B X A^T)``). Forward on ``N`` rows, in the cheaper of two orders: ``Z_i = X B_i^T`` for all
``i`` in one matmul, then ``Y = sum_i A_i Z_i`` in one batched matmul (``r (m2 n + m n1)``
multiply-adds per row), or ``Z_i = A_i X`` first, then ``Y = sum_i Z_i B_i^T`` (``r (m1 n + m n2)``).
Against ``m n`` for dense this is ``r (1/n1 + m2/m)``-fold (or ``r (1/m2 + n2/n)``): a sum of more
than a few dozen terms is slower than the dense product. For many rows at once (prefill,
calibration, evaluation) the layer therefore multiplies its factors out into a transient dense
``W'`` (``r m n`` multiply-adds once per call, freed after it) whenever ``r m n + N m n`` is below the
vec trick's count: with ``r = 172`` terms on a 576x576 layer that is from about 13 rows on. Rows go
through in chunks so that the intermediate stays below ``chunk_elements``. Stored values
``r (m1 n1 + m2 n2)``.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..linalg.kronecker import check_factor_shape, kron_sum_dense
from .base import LAYERS, StructuredLinear


@LAYERS.register("kronecker")
class KroneckerLinear(StructuredLinear):
    """``y = sum_i (A_i (x) B_i) x + bias``; state-dict keys ``A``, ``B``, ``bias``."""

    kind = "kronecker"

    def __init__(self, in_features: int, out_features: int, m1: int, n1: int, terms: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features)
        m2, n2 = check_factor_shape(out_features, in_features, int(m1), int(n1))
        if terms < 1:
            raise ConfigError(f"KroneckerLinear needs at least one term, got {terms}")
        self.A = nn.Parameter(torch.zeros(int(terms), int(m1), int(n1), dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(int(terms), m2, n2, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @property
    def terms(self) -> int:
        return self.A.shape[0]

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "KroneckerLinear":
        """Layer with ``W' = sum_i A_i (x) B_i``; ``A (r, m1, n1)``, ``B (r, m2, n2)`` (copied)."""
        kron_sum_dense(A[:1], B[:1])  # validates the factor shapes
        r, m1, n1 = A.shape
        _, m2, n2 = B.shape
        dtype = dtype or torch.float32
        layer = cls(n1 * n2, m1 * m2, m1, n1, r, bias=bias is not None, dtype=dtype, device=A.device)
        with torch.no_grad():
            layer.A.copy_(A.to(dtype))
            layer.B.copy_(B.to(dtype))
            if bias is not None:
                layer.bias.copy_(bias.to(dtype))
        return layer

    #: Upper bound on the elements of the per-chunk intermediate ``Z`` (rows are processed in chunks).
    chunk_elements: ClassVar[int] = 1 << 21

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, m1, n1 = self.A.shape
        _, m2, n2 = self.B.shape
        x2 = x.reshape(-1, self.in_features)
        b_first = m2 * self.in_features + self.out_features * n1 <= m1 * self.in_features + self.out_features * n2
        N = x2.shape[0]
        mn = self.out_features * self.in_features
        vec = r * (m2 * self.in_features + self.out_features * n1 if b_first
                   else m1 * self.in_features + self.out_features * n2)
        if r * mn + N * mn < N * vec:  # multiplying the factors out first is cheaper (module docstring)
            y = (x2 @ kron_sum_dense(self.A, self.B).T).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        per_row = r * (n1 * m2 if b_first else m1 * n2)
        step = max(1, self.chunk_elements // per_row)
        parts = [self._rows(x2[i:i + step], b_first) for i in range(0, x2.shape[0], step)]
        y = (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _rows(self, x2: torch.Tensor, b_first: bool) -> torch.Tensor:
        r, m1, n1 = self.A.shape
        _, m2, n2 = self.B.shape
        N = x2.shape[0]
        if b_first:
            # Z_i = X B_i^T: (N n1, n2) @ (n2, r m2); then Y = [A_1 .. A_r] [Z_1; ..; Z_r]
            Z = x2.reshape(N * n1, n2) @ self.B.permute(2, 0, 1).reshape(n2, r * m2)
            Z = Z.reshape(N, n1, r, m2).permute(0, 2, 1, 3).reshape(N, r * n1, m2)
            Y = torch.matmul(self.A.permute(1, 0, 2).reshape(m1, r * n1), Z)                 # (N, m1, m2)
        else:
            # Z_i = A_i X: (m1 r, n1) @ (N, n1, n2); then Y = sum_i Z_i B_i^T as one (r n2)-deep product
            Z = torch.matmul(self.A.reshape(r * m1, n1), x2.reshape(N, n1, n2))              # (N, r m1, n2)
            Z = Z.reshape(N, r, m1, n2).permute(0, 2, 1, 3).reshape(N, m1, r * n2)
            Y = torch.matmul(Z, self.B.permute(0, 2, 1).reshape(r * n2, m2))                 # (N, m1, m2)
        return Y.reshape(N, self.out_features)

    def dense(self) -> torch.Tensor:
        return kron_sum_dense(self.A, self.B).to(torch.float32)

    def num_stored(self) -> int:
        """``r (m1 n1 + m2 n2)``."""
        return self.A.numel() + self.B.numel()

    def factor_dims(self) -> dict[str, Any]:
        """``A_i: n1 -> m1`` and ``B_i: n2 -> m2``; the ``r`` summed terms give ``A`` a gain ``1/sqrt r``."""
        r, m1, n1 = self.A.shape
        _, m2, n2 = self.B.shape
        return {"A": (n1, m1, r ** -0.5), "B": (n2, m2)}

    def spec(self) -> dict[str, Any]:
        return {"m1": self.A.shape[1], "n1": self.A.shape[2], "terms": self.terms}

    @classmethod
    def from_spec(cls, in_features, out_features, bias, spec, dtype=None, device="meta") -> "KroneckerLinear":
        return cls(in_features, out_features, int(spec["m1"]), int(spec["n1"]), int(spec["terms"]), bias=bias,
                   dtype=dtype, device=device)

    def extra_repr(self) -> str:
        r, m1, n1 = self.A.shape
        return (f"in_features={self.in_features}, out_features={self.out_features}, A=({m1}, {n1}), "
                f"B=({self.B.shape[1]}, {self.B.shape[2]}), terms={r}, bias={self.bias is not None}")
