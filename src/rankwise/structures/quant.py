"""Quantized linear layer: packed integer codes + float16 group scales, run through packed integer kernels.

``y = W' x + b`` with ``W' = dequant(codes) Q^T`` (``Q`` the optional randomized Hadamard rotation of
the input space, :mod:`rankwise.linalg.hadamard`): the forward computes ``x Q`` by fast transforms and
multiplies by ``dequant(codes)`` through the layer's *runtime form* (:mod:`rankwise.structures.kernels`),
built once from the stored tensors and rebuilt by itself when they change:

* codes of at most 4 bits, a kernel group size dividing the group size and ``in`` (32..256; ragged
  groups included, e.g. 576 inputs in groups of 128): torch's packed int4 kernel (``int4-cpu``,
  ``int4-cuda``), exact mapping in :mod:`rankwise.linalg.kernel_grids`;
* 8-bit codes with one group per row: ``torch._weight_int8pack_mm`` (``int8-cpu``);
* everything else (5-7 bits, 8 bits in groups, group sizes no kernel size divides, old torch): the
  de-quantized matrix, built once and kept (``dense-cache``, its bytes in :meth:`prepare`'s report).

Rotated layers take the same paths on the rotated input. The runtime form is never stored: the state
dict, saved files and :meth:`nbytes` hold only the tensors below. When autograd must reach the scales or
minimums (training the grid with the codes frozen), and inside :func:`rankwise.structures.kernels.exact`,
the forward de-quantizes on every call instead (:meth:`reference_forward`, differentiable).

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
and its exact values in a bfloat16 model. The output has the input's dtype; the integer kernels
compute in bfloat16 with float32 accumulation (see :mod:`rankwise.structures.kernels`), the cache and
the reference path in the input's dtype from a float32 de-quantization.

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
from ..linalg.kernel_grids import dequantize_packed, int4_group_size
from ..linalg.quant import (
    QuantGrid, QuantizedMatrix, check_bits, check_group_size, dequantize, num_groups, pack_codes, packed_row_bytes,
    unpack_codes,
)
from .base import LAYERS, StructuredLinear
from .kernels import (
    KernelMatmul, RuntimeCached, RuntimeForm, dense_cache, exact_mode, grad_through, has_op, int4_cpu, int4_cpu_available, int4_cuda,
    int8_available, int8_kernel,
)


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
class QuantLinear(RuntimeCached, FixedStorageMixin, StructuredLinear):
    """``y = dequant(codes) (x Q) + bias``; see the module docstring."""

    kind = "quant"
    fixed_storage = ("scales", "mins")
    fixed_dtype_keys = fixed_storage  # the engine's and the loader's dtype casts keep them float16 too

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
        key = (self.rotation_signs.data_ptr(), self.rotation_signs._version, self.rotation_signs.device)
        cached = self.__dict__.get("_rotation")
        if cached is None or cached[0] != key:
            cached = (key, HadamardRotation.from_signs(self.in_features, self.rotation_signs, self.rotation_info["kind"]))
            self.__dict__["_rotation"] = cached
        return cached[1]

    def quantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The de-quantized stored matrix (out, in) (in the rotated input space), computed now (differentiable
        in the scales and minimums)."""
        if grad_through((self.scales, self.mins)):
            codes = unpack_codes(self.codes, self.bits, self.in_features)
            return dequantize(codes, self.grid(), torch.float32).to(dtype)
        return dequantize_packed(self.codes, self.grid(), dtype)

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x Q`` (in float32, returned in ``x``'s dtype); ``x`` itself without a rotation."""
        rot = self.rotation()
        return x if rot is None else rot.rotate(x.float()).to(x.dtype)

    # -- runtime -----------------------------------------------------------------------------
    def runtime_state(self) -> tuple[torch.Tensor | None, ...]:
        """The stored tensors the runtime form is built from (buffers, or parameters when the scales or
        minimums are being trained)."""
        return (self.codes, self.scales, self.mins)

    def kernel_path(self, device: torch.device | str | None = None) -> tuple[str, str]:
        """``(path, why)``: the runtime path this layer's spec takes on ``device`` (module doc)."""
        dev = torch.device(device) if device is not None else self.codes.device
        if self.rotation_info is not None:
            return "dense-cache", ("rotated input: W' = dequant(codes) Q^T cached (the online Hadamard transform "
                                   "costs more than the product)")
        kg = int4_group_size(self.in_features, self.group_size)
        if self.bits <= 4 and kg is None:
            return "dense-cache", (f"no int4 kernel group size (32/64/128/256) divides both the group size "
                                   f"{self.group_size} and the {self.in_features} inputs")
        if dev.type == "cpu":
            if self.bits <= 4:
                if int4_cpu_available():
                    return "int4-cpu", ""
                return "dense-cache", f"torch {torch.__version__} has no CPU int4 kernel (needs torch >= 2.6)"
            if self.bits == 8 and self.group_size >= self.in_features:
                if int8_available():
                    return "int8-cpu", ""
                return "dense-cache", f"torch {torch.__version__} has no int8 kernel"
        elif dev.type == "cuda" and self.bits <= 4 and has_op("_weight_int4pack_mm"):
            return "int4-cuda", ""
        if self.bits == 8:
            return "dense-cache", (f"8-bit codes in groups of {self.group_size} < {self.in_features} inputs: the int8 "
                                   "kernel takes one scale per row")
        if self.bits > 4:
            return "dense-cache", f"no kernel for {self.bits}-bit codes"
        return "dense-cache", f"no int4 kernel on {dev.type}"

    def build_runtime(self, dtype: torch.dtype) -> RuntimeForm:
        """The runtime form of :meth:`kernel_path` for inputs of ``dtype``."""
        path, why = self.kernel_path()
        grid = self.grid()
        dense = self.quantized_weight
        with torch.no_grad():
            if path == "int4-cpu":
                return int4_cpu(unpack_codes(self.codes, self.bits, self.in_features), grid, dense)
            if path == "int8-cpu":
                return int8_kernel(unpack_codes(self.codes, self.bits, self.in_features), grid, dense)
            if path == "int4-cuda":
                try:  # unverified on a GPU: pack, and run one row, or keep running on the cache
                    form = int4_cuda(unpack_codes(self.codes, self.bits, self.in_features), grid)
                    form.matmul(torch.zeros(1, self.in_features, dtype=torch.bfloat16, device=self.codes.device))
                    return form
                except (RuntimeError, StopIteration) as e:
                    why = f"the CUDA int4 kernel refused this layer ({(str(e).splitlines() or [''])[0][:120]})"
            if self.rotation_info is not None:
                return dense_cache(self.dense(), dtype, why, whole=True)
            return dense_cache(dense(dtype), dtype, why)

    def form_matmul(self, form: RuntimeForm, x: torch.Tensor) -> torch.Tensor:
        """``x W^T`` (bias excluded) through ``form`` for ``x (..., in)`` (rotated unless ``form.whole``),
        differentiable in ``x``."""
        x2 = x.reshape(-1, self.in_features)
        if not form.autograd and torch.is_grad_enabled() and x2.requires_grad:
            y = KernelMatmul.apply(x2, form, self.quantized_weight)
        else:
            y = form.matmul(x2)
        return y.reshape(*x.shape[:-1], self.out_features)

    # -- math ------------------------------------------------------------------------------
    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward by de-quantizing now (differentiable in the scales and minimums; no runtime form)."""
        xr = self.rotate_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(xr, self.quantized_weight(x.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if exact_mode() or grad_through((self.scales, self.mins)):
            return self.reference_forward(x)
        form = self.runtime(x.dtype)
        y = self.form_matmul(form, x if form.whole else self.rotate_input(x))
        return y if self.bias is None else y + self.bias.to(y.dtype)

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
