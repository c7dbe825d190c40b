"""Quantized linear layer: packed integer codes + float16 group scales, de-quantized on the fly.

``y = W' x + b`` with ``W' = dequant(codes) Q^T`` (``Q`` the optional randomized Hadamard rotation of
the input space, :mod:`rankwise.linalg.hadamard`): the forward computes ``x Q`` by fast transforms,
unpacks the codes, forms ``scale * code + offset`` per group and multiplies. Nothing dense is kept
between calls.

Stored tensors (the state dict *is* the storage; every byte counted by :meth:`nbytes`):

=================== ===================================== =========================================
key                 shape, dtype                          content
=================== ===================================== =========================================
``codes``           (out, ceil(in bits / 8)), uint8       codes packed as in :mod:`rankwise.linalg.quant`
``scales``          (out, ceil(in / g)), float16          per (row, group) step
``mins``            (out, ceil(in / g)), float16          per (row, group) minimum (asymmetric only)
``rotation_signs``  (blocks * p,), int8                   Hadamard block signs (rotated layers only)
``bias``            (out,), model dtype                   optional
=================== ===================================== =========================================

Groups run along the input dimension; the last one is shorter when ``g`` does not divide ``in``.
The storage dtypes are fixed: ``.to(dtype)`` / ``.half()`` / ``.float()`` move these tensors between
devices but never cast them (only the bias follows the model's dtype), so a layer keeps its size
and its exact values in a bfloat16 model. The forward computes in the input's dtype (the
de-quantization and the rotation in float32).

Error guarantee: that of the quantizer that produced the codes (:func:`rankwise.linalg.quant.rtn`,
:func:`rankwise.linalg.gptq.gptq`); the rotation is orthogonal, so ``||W - W'||`` is the error of the
quantized ``W Q``.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..linalg.hadamard import HadamardRotation, rotation_layout, rotation_signs_size
from ..linalg.quant import (
    QuantGrid, QuantizedMatrix, check_bits, check_group_size, dequantize, num_groups, pack_codes, packed_row_bytes,
    unpack_codes,
)
from .base import LAYERS, StructuredLinear


class FixedStorageMixin(nn.Module):
    """Keeps the float16 storage buffers named in ``fixed_storage`` float16 through dtype casts
    (``.to(dtype)``, ``.half()``, ``.float()``, ``.bfloat16()``); device moves still apply."""

    fixed_storage: ClassVar[tuple[str, ...]] = ()

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        held = []
        for name in self.fixed_storage:
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype == torch.float16:
                self._buffers[name] = buf.view(torch.int16)  # integers are never cast
                held.append(name)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name in held:
                self._buffers[name] = self._buffers[name].view(torch.float16)


def rotation_spec(rotation: dict[str, Any] | None, in_features: int, out_features: int) -> dict[str, Any] | None:
    """The normalized ``{"kind", "seed"}`` of a rotation of the layer's inputs (``kind`` resolved), or None."""
    if rotation is None:
        return None
    kind, _, _ = rotation_layout(in_features, str(rotation.get("kind", "auto")),
                                 f"the ({out_features} x {in_features}) layer")
    return {"kind": kind, "seed": int(rotation.get("seed", 0))}


@LAYERS.register("quant")
class QuantLinear(FixedStorageMixin, StructuredLinear):
    """``y = dequant(codes) (x Q) + bias``; see the module docstring."""

    kind = "quant"
    fixed_storage = ("scales", "mins")

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 128,
                 symmetric: bool = False, rotation: dict[str, Any] | None = None, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features)
        if in_features < 1 or out_features < 1:
            raise ConfigError(f"{type(self).__name__} needs positive sizes, got in={in_features}, out={out_features}")
        self.bits = check_bits(bits)
        self.group_size = check_group_size(group_size, in_features)
        self.symmetric = bool(symmetric)
        self.rotation_info = rotation_spec(rotation, in_features, out_features)
        G = num_groups(in_features, self.group_size)
        kw = {"device": device}
        self.register_buffer("codes", torch.zeros(out_features, packed_row_bytes(in_features, self.bits),
                                                  dtype=torch.uint8, **kw))
        self.register_buffer("scales", torch.zeros(out_features, G, dtype=torch.float16, **kw))
        mins = None if self.symmetric else torch.zeros(out_features, G, dtype=torch.float16, **kw)
        self.register_buffer("mins", mins)
        signs = None
        if self.rotation_info is not None:
            signs = torch.ones(rotation_signs_size(in_features, self.rotation_info["kind"]), dtype=torch.int8, **kw)
        self.register_buffer("rotation_signs", signs)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw)) if bias else None

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qm: QuantizedMatrix, bias: torch.Tensor | None = None,
                       rotation: HadamardRotation | None = None, seed: int = 0,
                       dtype: torch.dtype | None = None) -> "QuantLinear":
        """The layer storing ``qm`` (codes of ``W Q`` when ``rotation`` is given, made with ``seed``)."""
        out, n = qm.shape
        rot = None if rotation is None else {"kind": rotation.kind, "seed": seed}
        layer = cls(n, out, qm.grid.bits, qm.grid.group_size, qm.grid.symmetric, rot, bias is not None,
                    dtype=dtype or (bias.dtype if bias is not None else None), device=qm.codes.device)
        layer._fill(qm, bias, rotation)
        return layer

    def _fill(self, qm: QuantizedMatrix, bias: torch.Tensor | None, rotation: HadamardRotation | None) -> None:
        with torch.no_grad():
            self.codes.copy_(pack_codes(qm.codes, self.bits))
            self.scales.copy_(qm.grid.scales)
            if self.mins is not None:
                self.mins.copy_(qm.grid.mins)
            if rotation is not None:
                self.rotation_signs.copy_(rotation.signs)
            if bias is not None:
                if bias.shape != (self.out_features,):
                    raise ConfigError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
                self.bias.copy_(bias)

    # -- parts -----------------------------------------------------------------------------
    def grid(self) -> QuantGrid:
        return QuantGrid(self.bits, self.group_size, self.in_features, self.scales, self.mins)

    def rotation(self) -> HadamardRotation | None:
        if self.rotation_signs is None:
            return None
        return HadamardRotation.from_signs(self.in_features, self.rotation_signs, self.rotation_info["kind"])

    def quantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The de-quantized stored matrix (out, in) (in the rotated input space), computed now."""
        codes = unpack_codes(self.codes, self.bits, self.in_features)
        return dequantize(codes, self.grid(), torch.float32).to(dtype)

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x Q`` (in float32, returned in ``x``'s dtype); ``x`` itself without a rotation."""
        rot = self.rotation()
        return x if rot is None else rot.rotate(x.float()).to(x.dtype)

    # -- math ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xr = self.rotate_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(xr, self.quantized_weight(x.dtype), bias)

    def dense(self) -> torch.Tensor:
        """``dequant(codes) Q^T`` (out, in), float32."""
        W = self.quantized_weight(torch.float32)
        rot = self.rotation()
        return W if rot is None else rot.unrotate(W)

    def num_stored(self) -> int:
        """``out * in`` codes."""
        return self.out_features * self.in_features

    def spec(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "rotation": None if self.rotation_info is None else dict(self.rotation_info)}

    @classmethod
    def from_spec(cls, in_features, out_features, bias, spec, dtype=None, device="meta") -> "QuantLinear":
        return cls(in_features, out_features, int(spec["bits"]), int(spec["group_size"]), bool(spec["symmetric"]),
                   spec.get("rotation"), bias=bias, dtype=dtype, device=device)

    @classmethod
    def spec_nbytes(cls, in_features: int, out_features: int, spec: dict[str, Any]) -> int:
        """Bytes a layer of this spec stores (bias excluded): built empty on ``meta`` and counted."""
        return cls.from_spec(in_features, out_features, False, spec, device="meta").nbytes()

    def extra_repr(self) -> str:
        rot = "none" if self.rotation_info is None else self.rotation_info["kind"]
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, rotation={rot}, bias={self.has_bias}")


__all__ = ["FixedStorageMixin", "QuantLinear", "rotation_spec"]
