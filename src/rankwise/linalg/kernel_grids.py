"""Our quantization grids rewritten as the operands of torch's packed integer matmul kernels.

Pure math on tensors; the kernels themselves are called from :mod:`rankwise.structures.kernels`.

**int4 (tinygemm)**, ``torch.ops.aten._weight_int4pack_mm_for_cpu`` / ``_weight_int4pack_mm``: a
weight ``(N, K)`` of 4-bit values ``q`` in 0..15, and per (kernel group ``t``, row ``i``) a scale
and a zero, computes ``w = (q - 8) * scale + zero`` in groups of ``kg`` in {32, 64, 128, 256}
consecutive input columns. Our grids (:mod:`rankwise.linalg.quant`) with ``b <= 4`` bits map onto it
exactly (in real arithmetic):

* codes are shifted to the middle of 0..15: ``q = code + 8 - 2^(b-1)`` (2- and 3-bit codes become
  4-bit values in memory only; a 4-bit code is unchanged);
* symmetric ``w = scale * (code - 2^(b-1)) = scale * (q - 8)``: ``zero = 0``;
* asymmetric ``w = scale * code + min = scale * (q - 8) + (min + 2^(b-1) scale)``:
  ``zero = min + 2^(b-1) * scale`` (computed in float32 from the float16 ``scale`` and ``min``).

The kernel's group size ``kg`` (:func:`int4_group_size`) is the largest of 256, 128, 64, 32 that
divides both our group size ``g`` and ``K``; each of our groups is then ``g / kg`` kernel groups with
the same scale and zero, and a ragged last group (``K = (G - 1) g + r``) is ``r / kg`` of them
(``kg`` divides ``g`` and ``K``, hence ``r``). So SmolLM2's 576 inputs with ``g = 128`` (groups of
128, 128, 128, 128, 64) run with ``kg = 64``. None when no such ``kg`` exists (``g = 48``, ``K = 100``).

**int8 per channel**, ``torch._weight_int8pack_mm(x, w, s)`` computes ``x w^T * s`` with ``w`` int8
``(N, K)`` and ``s (N,)``: a grid with one group per row (``g >= K``) and 8-bit codes maps as
``w = code - 128`` and ``s = scale``; symmetric ``zero = 0``, asymmetric ``zero = min + 128 scale``,
added as ``zero * sum_k x_k`` (:func:`int8_operands`).
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .quant import QuantGrid, packed_row_bytes, unpack_codes

#: Group sizes torch's int4 kernels accept, largest first.
INT4_KERNEL_GROUPS = (256, 128, 64, 32)


def int4_group_size(n: int, group_size: int) -> int | None:
    """The kernel group size for ``n`` inputs in our groups of ``group_size`` (see module doc), or None."""
    g = min(int(group_size), int(n))
    for kg in INT4_KERNEL_GROUPS:
        if g % kg == 0 and n % kg == 0:
            return kg
    return None


def code_shift(bits: int) -> int:
    """``8 - 2^(bits-1)``: added to ``bits``-bit codes (bits <= 4) to centre them in 0..15."""
    if not 1 <= bits <= 4:
        raise ConfigError(f"the int4 kernel holds codes of at most 4 bits, got {bits}")
    return 8 - 2 ** (bits - 1)


def grid_zero(grid: QuantGrid, center: int) -> torch.Tensor:
    """``zero`` (m, G) float32: the value of each (row, group)'s centre code ``2^(b-1)``, i.e.
    ``min + 2^(b-1) scale`` (asymmetric) or 0 (symmetric). With ``q = code + center - 2^(b-1)`` the grid
    is ``w = scale * (q - center) + zero``; ``center`` (8 for int4, 128 for int8) must be >= ``2^(b-1)``."""
    half = 2 ** (grid.bits - 1)
    if half > center:
        raise ConfigError(f"a {grid.bits}-bit grid does not fit a kernel centred at {center}")
    if grid.mins is None:
        return torch.zeros(grid.scales.shape, dtype=torch.float32, device=grid.scales.device)
    return grid.mins.float() + half * grid.scales.float()


def int4_operands(codes: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(q, scale, zero, kg)``: ``q`` int32 (m, n) in 0..15 and float32 ``scale``, ``zero`` (m, n / kg) with
    ``(q - 8) * scale + zero == dequantize(codes, grid)`` per kernel group of ``kg`` columns.

    ``codes`` are the unpacked codes (m, n) of ``grid`` (``bits <= 4``); ConfigError when no kernel
    group size fits (:func:`int4_group_size`).
    """
    m, n = codes.shape
    kg = int4_group_size(n, grid.group_size)
    if kg is None:
        raise ConfigError(f"no int4 kernel group size ({', '.join(map(str, INT4_KERNEL_GROUPS))}) divides both the "
                          f"group size {grid.group_size} and the {n} inputs")
    q = codes.to(torch.int32) + code_shift(grid.bits)
    group_of = torch.arange(0, n, kg, device=codes.device) // grid.group_size  # our group of each kernel group
    scale = grid.scales.float()[:, group_of]
    zero = grid_zero(grid, 8)[:, group_of]
    return q, scale, zero, kg


def int8_operands(codes: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(w, scale, zero)`` with ``w`` int8 (m, n) ``= code - 128``, float32 ``scale`` (m,) and ``zero`` (m,)
    (None when symmetric) such that ``dequantize(codes, grid) = scale[:, None] * w + zero[:, None]``.

    Needs 8-bit codes and one group per row (``group_size >= n``), else ConfigError.
    """
    m, n = codes.shape
    if grid.bits != 8 or grid.group_size < n:
        raise ConfigError(f"the int8 kernel needs 8-bit codes with one group per row, got {grid.bits} bits in "
                          f"groups of {grid.group_size} of {n} inputs")
    w = (codes.to(torch.int16) - 128).to(torch.int8)
    zero = None if grid.mins is None else grid_zero(grid, 128)[:, 0]
    return w, grid.scales.float()[:, 0], zero


def dequantize_packed(packed: torch.Tensor, grid: QuantGrid, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dequantize(unpack_codes(packed), grid, float32).to(dtype)``, bit for bit, with fewer passes: 2-, 4- and
    8-bit rows are split by shifts of the bytes, and the grid is applied per block of ``d = gcd(g, n)``
    columns (one scale and offset per block) instead of per column."""
    m, n, b = packed.shape[0], grid.n, grid.bits
    if b in (2, 4, 8) and n * b % 8 == 0 and packed.shape[1] == packed_row_bytes(n, b):
        shifts = torch.arange(0, 8, b, dtype=torch.uint8, device=packed.device)
        codes = ((packed.unsqueeze(-1) >> shifts) & (2 ** b - 1)).reshape(m, n) if b < 8 else packed
    else:
        codes = unpack_codes(packed, b, n)
    d = math.gcd(grid.group_size, n)
    group_of = torch.arange(0, n, d, device=packed.device) // grid.group_size
    scale = grid.scales.float()[:, group_of].unsqueeze(-1)
    if grid.mins is None:
        offset = -(2 ** (b - 1)) * scale
    else:
        offset = grid.mins.float()[:, group_of].unsqueeze(-1)
    W = codes.to(torch.float32).view(m, n // d, d).mul_(scale).add_(offset).view(m, n)
    return W if dtype == torch.float32 else W.to(dtype)


__all__ = ["dequantize_packed", "INT4_KERNEL_GROUPS", "code_shift", "grid_zero", "int4_group_size", "int4_operands", "int8_operands"]
