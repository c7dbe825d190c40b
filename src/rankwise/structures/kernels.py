"""Runtime forms of structured layers: packed integer kernels and de-quantized (merged) caches.

A *runtime form* is what a layer's forward multiplies with, built from its stored tensors **once**
(at the first forward, or by ``layer.prepare()``), kept beside them as a plain attribute (never in
the state dict, never saved, so :meth:`StructuredLinear.nbytes` still counts stored bytes only), and
rebuilt by itself whenever what it was built from changed:

* :func:`state_key` records every stored tensor it was built from (the tensor itself), its in-place
  version counter (``Tensor._version``) and data pointer: an in-place edit (``codes.copy_``,
  ``scales.mul_``, ``load_state_dict``, which copies into the buffers), a replaced tensor
  (``load_state_dict(assign=True)``, ``layer.scales = ...``) or ``.data`` swap changes the key, and
  the next forward rebuilds; device moves and casts (``module.to``) drop the form at once. The key
  is checked on every call (about a microsecond).

Forms (``path`` is the name a runtime report prints):

=============== =====================================================================================
``int4-cpu``    ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on the packed form of
                ``_convert_weight_to_int4pack_for_cpu`` (torch >= 2.6): ``w = (q - 8) scale + zero``
                (:mod:`rankwise.linalg.kernel_grids`). It runs in bfloat16 (scales, zeros and the input
                cast to bfloat16, the product accumulated in float32 inside the kernel, the output
                cast back to the input's dtype): torch's float32 / float16 versions of this kernel are
                scalar reference loops, 100x slower. Rows padded to a multiple of 16 (the
                kernel's block) with zero weights; the output is sliced back. The kernel decodes the
                weights again for every few rows, so from :data:`LONG_ROWS` rows on (prefill) a call
                de-quantizes into a transient bfloat16 matrix instead (freed after the call, its cost
                amortized over the rows) and runs one bfloat16 dense product.
``int8-cpu``    ``torch._weight_int8pack_mm`` (8-bit codes, one group per row): ``x w^T s``
                (+ ``zero * sum(x)`` for an asymmetric grid), in bfloat16 as above.
``int4-cuda``   ``torch.ops.aten._weight_int4pack_mm`` on ``_convert_weight_to_int4pack`` (bfloat16).
                **Not verified on a GPU** (none was lent while this was written); a failure while
                packing falls back to ``dense-cache``.
``dense-cache`` the de-quantized (or merged) ``(out, in)`` matrix in the input's dtype, built once
                and kept: every case no kernel holds (5-7 bits, 8 bits in groups, group sizes no
                kernel size divides, torch < 2.6, unusual devices), and layers with a rotated input,
                whose cache holds ``dequant(codes) Q^T`` so that no transform runs per call (the
                online Hadamard transform of one token costs several times a dense product of the
                layer on CPU).
=============== =====================================================================================

:attr:`RuntimeForm.nbytes` is the memory the form holds besides the stored tensors (the packed
copy, the cache); runtime reports print it.

**Numerics.** The integer kernels compute in bfloat16 whatever the model's dtype (a float32 model's
quantized layers included): the input, the kernel's scales and zeros and the output are rounded to
bfloat16 (relative ``2^-9``), products accumulate in float32. For 4-bit weights this is far below the
quantization error (on SmolLM2 the logits move by ~1e-3 relative), but it is not the float32
reference. Inside ``with exact():`` (:func:`exact`) quantized layers compute the reference instead:
de-quantize, then one product in the input's dtype (slow: for comparisons such as an export's
logits against the stored model, not for serving).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg.kernel_grids import int4_operands, int8_operands
from ..linalg.quant import QuantGrid

#: From this many input rows on, the int4/int8 paths de-quantize into a transient matrix (see module doc):
#: at one thread on SmolLM2's shapes the kernel was 0.6x a float32 dense product's time from 8 to 256
#: rows, and the transient bfloat16 product overtook it between 128 rows (0.94-1.07x the kernel's
#: time) and 256 (0.66-0.71x).
LONG_ROWS = 160
#: The dtype the CPU integer kernels run in (their only vectorized one).
KERNEL_DTYPE = torch.bfloat16


_EXACT = [False]


@contextlib.contextmanager
def exact(on: bool = True) -> Iterator[None]:
    """Within the block, quantized layers compute the reference ``x dequant(codes)^T`` in the input's dtype
    (no integer kernel, no bfloat16 rounding); see the module doc."""
    old = _EXACT[0]
    _EXACT[0] = bool(on)
    try:
        yield
    finally:
        _EXACT[0] = old


def exact_mode() -> bool:
    """Whether :func:`exact` is on."""
    return _EXACT[0]


def has_op(name: str) -> bool:
    """Whether ``torch.ops.aten.<name>`` exists in this torch build."""
    try:
        return hasattr(torch.ops.aten, name)
    except Exception:  # pragma: no cover - exotic builds
        return False


def int4_cpu_available() -> bool:
    return has_op("_convert_weight_to_int4pack_for_cpu") and has_op("_weight_int4pack_mm_for_cpu")


def int8_available() -> bool:
    return has_op("_weight_int8pack_mm")


def state_key(tensors: Iterable[torch.Tensor | None]) -> tuple:
    """``((tensor, version, data pointer), ...)``: what a runtime form was built from. The key holds the
    tensors themselves, so a replaced tensor's identity cannot be reused while the key lives."""
    return tuple(None if t is None else (t, t._version, t.data_ptr()) for t in tensors)


def key_matches(key: tuple, tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether ``tensors`` are the very tensors of :func:`state_key` ``key``, unmodified since."""
    for t, k in zip(tensors, key):
        if k is None:
            if t is not None:
                return False
        elif t is not k[0] or t._version != k[1] or t.data_ptr() != k[2]:
            return False
    return True


@dataclass
class RuntimeForm:
    """A layer's runtime form: ``matmul(x)`` computes ``x W^T`` for ``x (rows, in)`` in ``x``'s dtype.

    ``path`` names the kernel (module doc); ``tensors`` are what it holds (counted by :attr:`nbytes`);
    ``long`` (optional) handles calls of at least :data:`LONG_ROWS` rows; ``note`` says why this path;
    ``whole`` says that ``W`` is the layer's whole matrix (an input rotation or extra low-rank terms
    folded in), so the layer multiplies its raw input by it and adds nothing but the bias;
    ``autograd`` says that ``matmul`` is differentiable in ``x`` as it is (a dense product).
    """

    path: str
    matmul_fn: Callable[[torch.Tensor], torch.Tensor]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    note: str = ""
    long: Callable[[torch.Tensor], torch.Tensor] | None = None
    whole: bool = False
    autograd: bool = False
    key: tuple = ()
    dtype: torch.dtype | None = None

    @property
    def nbytes(self) -> int:
        seen, total = set(), 0
        for t in self.tensors.values():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.long is not None and x2.shape[0] >= LONG_ROWS:
            return self.long(x2)
        return self.matmul_fn(x2)


# ---- builders ---------------------------------------------------------------------------------


def dense_cache(W: torch.Tensor, dtype: torch.dtype, note: str = "", path: str = "dense-cache",
                whole: bool = False) -> RuntimeForm:
    """The matrix ``W (out, in)`` kept in ``dtype``: ``x W^T`` by one dense product."""
    Wc = W.detach().to(dtype).contiguous()
    return RuntimeForm(path, lambda x: F.linear(x, Wc), {"weight": Wc}, note, whole=whole, autograd=True)


def _pad_rows(t: torch.Tensor, rows: int, value: float = 0) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = t.new_full((rows - t.shape[0], *t.shape[1:]), value)
    return torch.cat([t, pad])


def int4_cpu(codes: torch.Tensor, grid: QuantGrid, dequant: Callable[[torch.dtype], torch.Tensor],
             dtype: torch.dtype = KERNEL_DTYPE) -> RuntimeForm:
    """The ``int4-cpu`` form of unpacked ``codes (out, in)`` on ``grid`` (``bits <= 4``, a kernel group size
    exists); ``dequant(dtype)`` gives the de-quantized matrix for long inputs. ``dtype`` is the kernel's
    compute dtype (bfloat16 for speed; float32 runs torch's exact reference loop, for tests)."""
    q, scale, zero, kg = int4_operands(codes, grid)
    N, K = q.shape
    Np = -(-N // 16) * 16
    q = _pad_rows(q, Np, 8)  # padded rows: (8 - 8) * 0 + 0 = 0
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    sz = torch.stack([_pad_rows(scale, Np).T, _pad_rows(zero, Np).T], -1).to(dtype).contiguous()  # (K/kg, Np, 2)
    op = torch.ops.aten._weight_int4pack_mm_for_cpu

    def matmul(x: torch.Tensor) -> torch.Tensor:
        y = op(x.to(dtype).contiguous(), packed, kg, sz)
        if Np != N:
            y = y[:, :N]
        return y.to(x.dtype)

    return RuntimeForm("int4-cpu", matmul, {"packed": packed, "scale_zero": sz},
                       f"{grid.bits}-bit codes, kernel groups of {kg}", long=_transient(dequant))


def int8_kernel(codes: torch.Tensor, grid: QuantGrid, dequant: Callable[[torch.dtype], torch.Tensor],
                dtype: torch.dtype = KERNEL_DTYPE) -> RuntimeForm:
    """The ``int8-cpu`` form: ``x w^T s (+ zero sum(x))`` (8-bit codes, one group per row)."""
    w, scale, zero = int8_operands(codes, grid)
    w = w.contiguous()
    s = scale.to(dtype)
    z = None if zero is None else zero.to(dtype)
    op = torch._weight_int8pack_mm

    def matmul(x: torch.Tensor) -> torch.Tensor:
        xc = x.to(dtype).contiguous()
        y = op(xc, w, s)
        if z is not None:
            y = torch.addcmul(y, xc.sum(-1, keepdim=True), z)
        return y.to(x.dtype)

    tensors = {"weight": w, "scale": s} | ({} if z is None else {"zero": z})
    return RuntimeForm("int8-cpu", matmul, tensors, "8-bit codes, one group per row", long=_transient(dequant))


def int4_cuda(codes: torch.Tensor, grid: QuantGrid, dtype: torch.dtype = torch.bfloat16) -> RuntimeForm:
    """The ``int4-cuda`` form (``_convert_weight_to_int4pack`` takes ``(N, K/2)`` uint8 with the even column
    in the high nibble; ``K`` a multiple of ``16 * inner_k_tiles``). **Unverified: no GPU was available.**"""
    q, scale, zero, kg = int4_operands(codes, grid)
    N, K = q.shape
    tiles = next(t for t in (8, 4, 2) if K % (16 * t) == 0)
    Np = -(-N // 8) * 8
    q = _pad_rows(q, Np, 8)
    qu8 = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack(qu8, tiles)
    sz = torch.stack([_pad_rows(scale, Np).T, _pad_rows(zero, Np).T], -1).to(dtype).contiguous()
    op = torch.ops.aten._weight_int4pack_mm

    def matmul(x: torch.Tensor) -> torch.Tensor:
        y = op(x.to(dtype).contiguous(), packed, kg, sz)
        return (y[:, :N] if Np != N else y).to(x.dtype)

    return RuntimeForm("int4-cuda", matmul, {"packed": packed, "scale_zero": sz},
                       f"{grid.bits}-bit codes, kernel groups of {kg}, unverified on a GPU")


def _transient(dequant: Callable[[torch.dtype], torch.Tensor],
               dtype: torch.dtype = KERNEL_DTYPE) -> Callable[[torch.Tensor], torch.Tensor]:
    """Long inputs: de-quantize into a transient ``dtype`` matrix (freed after the call) and multiply once."""
    return lambda x: F.linear(x.to(dtype), dequant(dtype)).to(x.dtype)


# ---- the layer side --------------------------------------------------------------------------


class KernelMatmul(torch.autograd.Function):
    """``x W^T`` through a runtime form, differentiable in ``x`` (the integer kernels have no backward):
    the backward de-quantizes ``W`` transiently, ``dL/dx = dL/dy W``."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, form: RuntimeForm, dense: Callable[[torch.dtype], torch.Tensor]):
        ctx.dense = dense
        return form.matmul(x2)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        return gy @ ctx.dense(gy.dtype), None, None


class RuntimeCached(nn.Module):
    """Mixin for a layer whose forward multiplies through a :class:`RuntimeForm` (module doc).

    A subclass implements :meth:`runtime_state` (the stored tensors the form is built from) and
    :meth:`build_runtime`; it calls :meth:`runtime` in its forward. :meth:`prepare` builds the form
    ahead of time and says what it is; :meth:`release` drops it. Device moves and casts
    (``module.to``) drop it too; copies and pickles never carry it.
    """

    def runtime_state(self) -> tuple[torch.Tensor | None, ...]:
        raise NotImplementedError

    def build_runtime(self, dtype: torch.dtype) -> RuntimeForm:
        raise NotImplementedError

    def runtime(self, dtype: torch.dtype) -> RuntimeForm:
        """The runtime form for inputs of ``dtype``, rebuilt when a stored tensor changed (:func:`state_key`)."""
        state = self.runtime_state()
        form = self.__dict__.get("_runtime")
        if form is None or form.dtype != dtype or not key_matches(form.key, state):
            self.__dict__["_runtime"] = None  # free the stale form before building the new one
            form = self.build_runtime(dtype)
            form.key, form.dtype = state_key(state), dtype
            self.__dict__["_runtime"] = form
        return form

    def prepare(self, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """Build the runtime form for inputs of ``dtype`` (default float32) now; ``{"path", "runtime_bytes",
        "note"}`` (``runtime_bytes``: memory held besides the stored tensors)."""
        form = self.runtime(dtype or torch.float32)
        return {"path": form.path, "runtime_bytes": form.nbytes, "note": form.note}

    def release(self) -> None:
        """Drop the runtime form (it is rebuilt at the next forward)."""
        self.__dict__.pop("_runtime", None)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        self.release()
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k != "_runtime"}


def grad_through(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether autograd must flow into any of ``tensors`` (grad mode on and one of them requires grad)."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


__all__ = ["KERNEL_DTYPE", "LONG_ROWS", "KernelMatmul", "exact", "exact_mode", "RuntimeCached", "RuntimeForm", "dense_cache",
           "grad_through", "has_op", "int4_cpu", "int4_cpu_available", "int4_cuda", "int8_available",
           "int8_kernel", "key_matches", "state_key"]
