"""Sparse layers: a pruned layer ``y = S x + b`` and a low-rank + sparse layer ``y = B(A x) + S x + b``.

``S`` (out, in) keeps the same number ``k`` of entries in every row, in one of two patterns
(:mod:`rankwise.linalg.sparse`):

* ``"unstructured"``: ``values (out, k)`` and column indices ``cols (out, k)`` (int16 when
  ``in <= 32768``, else int32), ascending per row (a fixed-width CSR: the row pointer is ``k * i``);
* ``"2:4"``: 2 kept in every 4 consecutive columns, ``k = in / 2``: ``values (out, in/2)`` and the
  positions within each group, 2 bits each, packed 4 per byte: ``positions (out, ceil(in/8))`` uint8.

Stored values (``num_stored``) are the nonzeros (plus ``rank (out + in)`` for the low-rank part);
indices and positions are overhead, counted in ``nbytes``. The forward multiplies by a torch sparse
CSR tensor built from these buffers (its int32 index arrays are cached, not stored) when fewer than
``densify_rows`` rows come in (decoding); for more rows (prefill, calibration, evaluation) it scatters
``S`` into a transient dense (out, in) matrix, freed after the call, and uses one dense product (always
when the values are being trained: the gradient flows to them through the scatter): on
CPU at the densities used here (40-70% kept) the CSR product is 2-4x slower than the dense one for
hundreds of rows, while scattering costs one pass over ``out * in`` values. CSR products run in
float32/float64; other dtypes compute in float32 and cast back.

**On CPU both layers are merged to dense at run time** (``merged-dense``, a runtime form of
:mod:`rankwise.structures.kernels`): ``S`` (and ``B A + S`` for the low-rank + sparse layer) is built
once as a dense matrix in the input's dtype, kept beside the stored tensors (never saved; its bytes
in :meth:`prepare`'s report) and rebuilt when they change. torch has no CPU kernel that beats a dense
product at these densities: at one row (decoding) torch's CSR product took 1.0-1.3x a dense
product's time on SmolLM2's shapes at 10 % kept and 3-8x at 25-60 % (the densities rankwise's pruning
and low rank + sparse fits keep; BENCHMARKS.md, decode speed), and 2:4 sparsity has only CUDA kernels. On other devices the stored form runs as described above. When
autograd must reach the values or factors (training them), the forward uses the stored form.
"""
from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..linalg.sparse import check_pattern, index_dtype, mask_to_rows, semistructured_columns, semistructured_compress
from .base import LAYERS, StructuredLinear
from .kernels import RuntimeCached, RuntimeForm, dense_cache, grad_through

_CSR_DTYPES = (torch.float32, torch.float64)


def _nnz_per_row(in_features: int, pattern: str, nnz_per_row: int | None) -> int:
    check_pattern(pattern, in_features)
    if pattern == "2:4":
        if nnz_per_row not in (None, in_features // 2):
            raise ConfigError(f"2:4 sparsity keeps in/2 = {in_features // 2} entries per row, got nnz_per_row="
                              f"{nnz_per_row}; leave nnz_per_row unset for 2:4")
        return in_features // 2
    if nnz_per_row is None or not 1 <= int(nnz_per_row) <= in_features:
        raise ConfigError(f"unstructured sparsity needs 1 <= nnz_per_row <= {in_features}, got {nnz_per_row}")
    return int(nnz_per_row)


def merged_or_native(layer: StructuredLinear, pattern: str, dtype: torch.dtype, native) -> RuntimeForm:
    """``merged-dense`` (``layer.dense()`` kept in ``dtype``) on CPU; elsewhere ``native`` (the stored form)."""
    if layer.device().type == "cpu":
        with torch.no_grad():
            W = layer.dense()
        return dense_cache(W, dtype, f"merged to dense: no CPU {pattern} sparse kernel beats a dense product",
                           "merged-dense")
    return RuntimeForm("sparse-native", native, note="stored sparse form (CSR below densify_rows rows)")


@LAYERS.register("sparse")
class SparseLinear(RuntimeCached, StructuredLinear):
    """``y = S x + bias`` with ``S`` stored as per-row values plus column indices (see module doc)."""

    kind = "sparse"

    def __init__(self, in_features: int, out_features: int, pattern: str = "unstructured",
                 nnz_per_row: int | None = None, bias: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features)
        if in_features < 1 or out_features < 1:
            raise ConfigError(f"SparseLinear needs positive sizes, got in={in_features}, out={out_features}")
        self.pattern = pattern
        self.nnz_per_row = _nnz_per_row(in_features, pattern, nnz_per_row)
        self.values = nn.Parameter(torch.zeros(out_features, self.nnz_per_row, dtype=dtype, device=device))
        if pattern == "2:4":
            self.register_buffer("positions", torch.zeros(out_features, -(-in_features // 8), dtype=torch.uint8,
                                                          device=device))
        else:
            self.register_buffer("cols", torch.zeros(out_features, self.nnz_per_row, dtype=index_dtype(in_features),
                                                     device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._csr_cache: tuple | None = None

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_dense(cls, W: torch.Tensor, mask: torch.Tensor, pattern: str = "unstructured",
                   bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> "SparseLinear":
        """The layer with ``S = W * mask``; ``mask`` keeps the same count per row (2 per group for 2:4)."""
        if W.ndim != 2 or mask.shape != W.shape:
            raise ConfigError(f"W and mask must be equal-shape matrices, got {tuple(W.shape)} and {tuple(mask.shape)}")
        out_f, in_f = W.shape
        if bias is not None and bias.shape != (out_f,):
            raise ConfigError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
        dtype = dtype or (W.dtype if W.dtype in _CSR_DTYPES else torch.float32)
        if pattern == "2:4":
            values, packed = semistructured_compress(W, mask.bool())
            layer = cls(in_f, out_f, "2:4", bias=bias is not None, dtype=dtype, device=W.device)
            layer.positions.copy_(packed)
        else:
            values, cols = mask_to_rows(W, mask.bool())
            layer = cls(in_f, out_f, "unstructured", values.shape[1], bias=bias is not None, dtype=dtype,
                        device=W.device)
            layer.cols.copy_(cols)
        with torch.no_grad():
            layer.values.copy_(values.to(dtype))
            if bias is not None:
                layer.bias.copy_(bias.to(dtype))
        return layer

    # -- indices ---------------------------------------------------------------------------
    def column_indices(self) -> torch.Tensor:
        """Column of every stored value, (out, nnz_per_row) int64."""
        if self.pattern == "2:4":
            return semistructured_columns(self.positions, self.in_features)
        return self.cols.to(torch.int64)

    def _index_buffer(self) -> torch.Tensor:
        return self.positions if self.pattern == "2:4" else self.cols

    def _csr_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self._index_buffer()
        key = (buf.data_ptr(), buf._version, buf.device)
        if self._csr_cache is None or self._csr_cache[0] != key:
            m, k = self.out_features, self.nnz_per_row
            crow = torch.arange(0, m * k + 1, k, dtype=torch.int32, device=buf.device)
            col = self.column_indices().to(torch.int32).reshape(-1)
            self._csr_cache = (key, crow, col)
        return self._csr_cache[1], self._csr_cache[2]

    #: From this many input rows on, ``S`` is scattered into a transient dense matrix (module docstring).
    densify_rows: ClassVar[int] = 32

    def sparse_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ S^T`` for ``x (..., in)`` (bias excluded): a CSR product for fewer than ``densify_rows``
        rows, else one dense product with ``S`` scattered into a transient matrix."""
        rows = x.numel() // self.in_features
        # training: torch's CSR product has no backward for its values; the scatter path has one
        training = torch.is_grad_enabled() and self.values.requires_grad
        if rows >= self.densify_rows or training:
            S = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
            col = self._csr_indices()[1].view(self.out_features, self.nnz_per_row).long()
            S.scatter_(1, col, self.values)
            return x @ S.T.to(x.dtype)
        crow, col = self._csr_indices()
        cdt = self.values.dtype if self.values.dtype in _CSR_DTYPES else torch.float32
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
            S = torch.sparse_csr_tensor(crow, col, self.values.to(cdt).reshape(-1),
                                        (self.out_features, self.in_features), check_invariants=False)
        x2 = x.reshape(-1, self.in_features)
        y = (S @ x2.to(cdt).T).T
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    # -- runtime ---------------------------------------------------------------------------
    def runtime_state(self) -> tuple[torch.Tensor | None, ...]:
        return (self.values, self._index_buffer())

    def build_runtime(self, dtype: torch.dtype) -> RuntimeForm:
        return merged_or_native(self, self.pattern, dtype, self.sparse_matmul)

    # -- math ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if grad_through((self.values,)):
            y = self.sparse_matmul(x)
        else:
            form = self.runtime(x.dtype)
            y = form.matmul(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        """``S`` (out, in) float32, zeros off the pattern."""
        W = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self.values.device)
        return W.scatter_(1, self.column_indices(), self.values.to(torch.float32))

    def num_stored(self) -> int:
        """``out * nnz_per_row`` nonzeros."""
        return self.out_features * self.nnz_per_row

    def factor_dims(self) -> dict[str, Any]:
        """The values as a map with fan-in ``k`` (entries per row) and fan-out ``m k / n`` (entries per column)."""
        k = self.nnz_per_row
        return {"values": (k, max(1, round(self.out_features * k / self.in_features)), 1.0)}

    def spec(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "nnz_per_row": self.nnz_per_row}

    @classmethod
    def from_spec(cls, in_features, out_features, bias, spec, dtype=None, device="meta") -> "SparseLinear":
        return cls(in_features, out_features, spec.get("pattern", "unstructured"), spec.get("nnz_per_row"),
                   bias=bias, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
                f"nnz_per_row={self.nnz_per_row}, bias={self.bias is not None}")


@LAYERS.register("lowrank-sparse")
class LowRankSparseLinear(RuntimeCached, StructuredLinear):
    """``y = B(A x) + S x + bias``: ``W' = B.weight @ A.weight + S`` with ``S`` a :class:`SparseLinear`.

    State-dict keys: ``A.weight (rank, in)``, ``B.weight (out, rank)``, ``S.values``, ``S.cols`` or
    ``S.positions``, ``bias (out,)``.
    """

    kind = "lowrank-sparse"

    def __init__(self, in_features: int, out_features: int, rank: int, pattern: str = "unstructured",
                 nnz_per_row: int | None = None, bias: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features)
        if rank < 1:
            raise ConfigError(f"LowRankSparseLinear rank must be >= 1, got {rank}; use SparseLinear for rank 0")
        self.A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.B = nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)
        self.S = SparseLinear(in_features, out_features, pattern, nnz_per_row, bias=False, dtype=dtype, device=device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @property
    def rank(self) -> int:
        return self.A.out_features

    @classmethod
    def from_parts(cls, L: torch.Tensor, R: torch.Tensor, S: torch.Tensor, mask: torch.Tensor,
                   pattern: str = "unstructured", bias: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> "LowRankSparseLinear":
        """Layer with ``W' = L @ R + S * mask``: ``L (out, k)``, ``R (k, in)``, ``S`` and ``mask`` (out, in)."""
        if L.ndim != 2 or R.ndim != 2 or L.shape[1] != R.shape[0] or S.shape != (L.shape[0], R.shape[1]):
            raise ConfigError(f"parts must be L (out, k), R (k, in), S (out, in); got {tuple(L.shape)}, "
                              f"{tuple(R.shape)}, {tuple(S.shape)}")
        dtype = dtype or torch.float32
        sp = SparseLinear.from_dense(S, mask, pattern, dtype=dtype)
        out_f, k = L.shape
        layer = cls(R.shape[1], out_f, k, pattern, sp.nnz_per_row, bias=bias is not None, dtype=dtype, device=L.device)
        layer.S.load_state_dict(sp.state_dict())
        with torch.no_grad():
            layer.A.weight.copy_(R.to(dtype))
            layer.B.weight.copy_(L.to(dtype))
            if bias is not None:
                if bias.shape != (out_f,):
                    raise ConfigError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
                layer.bias.copy_(bias.to(dtype))
        return layer

    def runtime_state(self) -> tuple[torch.Tensor | None, ...]:
        return (self.A.weight, self.B.weight, *self.S.runtime_state())

    def build_runtime(self, dtype: torch.dtype) -> RuntimeForm:
        return merged_or_native(self, self.S.pattern, dtype, self.native_matmul)

    def native_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``B (A x) + S x`` from the stored form (bias excluded)."""
        return self.B(self.A(x)) + self.S.sparse_matmul(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if grad_through((self.A.weight, self.B.weight, self.S.values)):
            y = self.native_matmul(x)
        else:
            form = self.runtime(x.dtype)
            y = form.matmul(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        return (self.B.weight @ self.A.weight).to(torch.float32) + self.S.dense()

    def num_stored(self) -> int:
        """``rank (out + in)`` factor values plus the sparse nonzeros."""
        return self.rank * (self.in_features + self.out_features) + self.S.num_stored()

    def factor_dims(self) -> dict[str, Any]:
        """``A: n -> k``, ``B: k -> m`` and the sparse ``S`` (as :class:`SparseLinear`); summed parts: gain 1/sqrt 2."""
        h = 0.5 ** 0.5
        d_in, d_out, _ = self.S.factor_dims()["values"]
        return {"A.weight": (self.in_features, self.rank), "B.weight": (self.rank, self.out_features, h),
                "S.values": (d_in, d_out, h)}

    def spec(self) -> dict[str, Any]:
        return {"rank": self.rank, **self.S.spec()}

    @classmethod
    def from_spec(cls, in_features, out_features, bias, spec, dtype=None, device="meta") -> "LowRankSparseLinear":
        return cls(in_features, out_features, int(spec["rank"]), spec.get("pattern", "unstructured"),
                   spec.get("nnz_per_row"), bias=bias, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"pattern={self.S.pattern}, nnz_per_row={self.S.nnz_per_row}, bias={self.bias is not None}")
