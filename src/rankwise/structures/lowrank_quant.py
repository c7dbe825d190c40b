"""Quantized plus low-rank linear layer: ``y = (dequant(codes) + L R)(x Q) + b``.

``W' = (dequant(codes) + L R) Q^T``: a :class:`~rankwise.structures.quant.QuantLinear` (packed codes,
float16 group scales and minimums, optional Hadamard rotation ``Q``) plus float16 factors
``left = L (out, k)`` and ``right = R (k, in)`` (LoRC, LQ-LoRA, CALDERA;
:mod:`rankwise.linalg.lowrank_quant`). The forward never forms ``L R``: it adds ``L (R x')`` (two skinny
products) to the quantized product ``dequant(codes) x'`` (``x' = x Q``), which runs through the same
runtime form as :class:`~rankwise.structures.quant.QuantLinear` (packed int4/int8 kernel or cache). The
factors are kept converted to the input's dtype beside the form (their bytes counted in
:meth:`prepare`'s report); the float16 stored factors are never cast per call. Storage: the quantized part's bytes plus ``2 k (out + in)``
bytes of factors (:meth:`factor_bytes`). Error guarantee: that of the fit that produced the parts.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..linalg.hadamard import HadamardRotation
from ..linalg.lowrank_quant import FACTOR_DTYPE, LowRankQuant
from .base import LAYERS
from .kernels import RuntimeForm, dense_cache, exact_mode, grad_through
from .quant import QuantLinear


@LAYERS.register("lowrank-quant")
class LowRankQuantLinear(QuantLinear):
    """``y = dequant(codes)(x Q) + L (R (x Q)) + bias``; see the module docstring."""

    kind = "lowrank-quant"
    fixed_storage = ("scales", "mins", "left", "right")
    fixed_dtype_keys = fixed_storage

    def __init__(self, in_features: int, out_features: int, bits: int, rank: int, group_size: int = 128,
                 symmetric: bool = False, rotation: dict[str, Any] | None = None, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bits, group_size, symmetric, rotation, bias, dtype, device)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(in_features, out_features):
            raise ConfigError(f"rank {rank!r} is out of range for a {out_features} x {in_features} layer: use "
                              f"1 <= rank <= {min(in_features, out_features)}")
        self.register_buffer("left", torch.zeros(out_features, rank, dtype=FACTOR_DTYPE, device=device))
        self.register_buffer("right", torch.zeros(rank, in_features, dtype=FACTOR_DTYPE, device=device))

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    @staticmethod
    def factor_bytes(in_features: int, out_features: int, rank: int) -> int:
        """Bytes of the float16 factors: ``2 rank (out + in)``."""
        return torch.finfo(FACTOR_DTYPE).bits // 8 * rank * (in_features + out_features)

    @classmethod
    def from_lowrank_quant(cls, res: LowRankQuant, bias: torch.Tensor | None = None,
                           rotation: HadamardRotation | None = None, seed: int = 0,
                           dtype: torch.dtype | None = None) -> "LowRankQuantLinear":
        """The layer storing ``res`` (fitted to ``W Q`` when ``rotation`` is given, made with ``seed``)."""
        out, n = res.quant.shape
        grid = res.quant.grid
        rot = None if rotation is None else {"kind": rotation.kind, "seed": seed}
        layer = cls(n, out, grid.bits, res.rank, grid.group_size, grid.symmetric, rot, bias is not None,
                    dtype=dtype or (bias.dtype if bias is not None else None), device=res.quant.codes.device)
        layer._fill(res.quant, bias, rotation)
        with torch.no_grad():
            layer.left.copy_(res.left)
            layer.right.copy_(res.right)
        return layer

    def runtime_state(self) -> tuple[torch.Tensor | None, ...]:
        return (*super().runtime_state(), self.left, self.right)

    def build_runtime(self, dtype: torch.dtype) -> RuntimeForm:
        form = super().build_runtime(dtype)
        if form.whole:  # rotated: the cache holds (dequant + L R) Q^T
            return form
        if form.path == "dense-cache":  # no kernel: merge the factors into the cache, one product per call
            with torch.no_grad():
                return dense_cache(self.dense(), dtype, f"{form.note}; factors merged into the cache", whole=True)
        with torch.no_grad():
            form.tensors["left"] = self.left.to(dtype).contiguous()
            form.tensors["right"] = self.right.to(dtype).contiguous()
        form.note = ", ".join(x for x in (form.note, f"+ rank-{self.rank} factors") if x)
        return form

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        xr = self.rotate_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(xr, self.quantized_weight(x.dtype), bias)
        return y + F.linear(F.linear(xr, self.right.to(x.dtype)), self.left.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if exact_mode() or grad_through((self.scales, self.mins, self.left, self.right)):
            return self.reference_forward(x)
        form = self.runtime(x.dtype)
        if form.whole:
            y = self.form_matmul(form, x)
        else:
            xr = self.rotate_input(x)
            y = self.form_matmul(form, xr)
            y = y + F.linear(F.linear(xr, form.tensors["right"]), form.tensors["left"])
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dense(self) -> torch.Tensor:
        """``(dequant(codes) + L R) Q^T`` (out, in), float32."""
        W = self.quantized_weight(torch.float32) + self.left.float() @ self.right.float()
        rot = self.rotation()
        return W if rot is None else rot.unrotate(W)

    def num_stored(self) -> int:
        """``out * in`` codes plus ``rank (out + in)`` factor values."""
        return self.out_features * self.in_features + self.rank * (self.in_features + self.out_features)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "rank": self.rank}

    @classmethod
    def from_spec(cls, in_features, out_features, bias, spec, dtype=None, device="meta") -> "LowRankQuantLinear":
        return cls(in_features, out_features, int(spec["bits"]), int(spec["rank"]), int(spec["group_size"]),
                   bool(spec["symmetric"]), spec.get("rotation"), bias=bias, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


__all__ = ["LowRankQuantLinear"]
