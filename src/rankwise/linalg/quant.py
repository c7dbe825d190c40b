"""Uniform weight quantization in groups along the input dimension: grids, round-to-nearest, packing.

A matrix ``W (m, n)`` is cut, row by row, into ``G = ceil(n / g)`` groups of ``g`` consecutive input
columns (group ``j`` = columns ``[j g, min((j + 1) g, n))``). **Ragged groups**: when ``g`` does not
divide ``n`` (SmolLM2's 576 inputs with ``g = 128``) the last group is shorter (``n - (G - 1) g``
columns); nothing is padded and nothing is refused. ``g > n`` means one group (``g`` becomes ``n``);
``g < 1`` raises :class:`ConfigError`. Each (row, group) has its own affine grid of ``2^b`` points
(``b`` in 2..8 bits, codes ``0 .. maxq = 2^b - 1``):

* asymmetric: ``w' = scale * code + min``; stored as a scale and a minimum per group (llama.cpp's
  Q4_1 / Q5_1 form) whichever way the grid was chosen. Two ways (``zero_point``):

  - ``"integer"`` (the default; the GPTQ reference, llm-compressor, compressed-tensors): the range
    is widened to contain 0, ``lo' = min(lo, 0)``, ``hi' = max(hi, 0)``, ``scale = (hi' - lo') /
    maxq``, an integer zero point ``z = round(-lo' / scale)`` and ``min = -z scale``: 0 is a grid
    point (up to the float16 rounding of ``min``), so small weights in columns with large
    activations can be stored as 0. Measured on SmolLM2 (layer 2 ``down_proj``, 3-bit g64): the
    activation-weighted RTN error is 1.6x larger with the float minimum, all of it in the two
    "massive activation" input columns, whose weights are ~0.02 against a step of ~0.13.
  - ``"float"``: ``scale = (hi - lo) / maxq``, ``min = lo``: the grid spans exactly ``[lo, hi]``;
    with float16 storage this reproduces a Q4_1 model bit for bit (a float16 code offset ``-lo /
    scale`` would lose up to 2^-8 of a step, 5e-4 relative on SmolLM2, see the tests).
  - ``"exact"``: the integer zero point with ``scale`` rounded *up* to ``11 - b`` significant bits, so
    that ``min = -z scale`` is exact in float16 (a 4-bit step at most 2^-7 coarser): the grid is then
    exactly ``scale (code - z)`` with an integer ``z``, what compressed-tensors / GPTQ / AWQ checkpoints
    store (``rankwise export`` writes it without any rounding).
* symmetric: ``w' = scale * (code - 2^(b-1))``, ``scale = 2 max|w| / maxq`` (GPTQ's symmetric
  grid); no minimum is stored.

The scale rule ``grid`` (for the runtime a model is exported to): ``"minmax"`` (default) as above, or
``"gguf"``, llama.cpp's reference grids: symmetric 8-bit is Q8_0's ``scale = max|w| / 127`` (codes
``-127..127`` used); symmetric ``b < 8`` bits is Q4_0's ``scale = m / -2^(b-1)`` with ``m`` the group's
entry of largest magnitude, sign kept (so ``m`` itself is the grid point ``code = 0`` and the scale may
be negative; on an exact tie ``|lo| = |hi|`` the negative end is taken, where llama.cpp takes the first
in memory); asymmetric is Q4_1, i.e. ``zero_point="float"``. Codes are the nearest on the stored
float16 grid (llama.cpp rounds with the unrounded ``1/d``, so on a rare midpoint a code can differ
from ``llama-quantize``'s by one).

Scales and minimums are stored in float16 (2 bytes each). Every code is chosen against the stored
(float16-rounded) grid, so round-to-nearest really is the nearest stored grid point.

Clipping search (``clip="mse"``, :func:`search_range`): the range ``[r lo, r hi]`` for each ratio
``r`` in :data:`CLIP_RATIOS` (1.0 down to 0.5), per (row, group) the one minimizing the importance-
weighted error ``sum_j h_j (w_j - q(w_j))^2`` (``h = diag(C)`` under GPTQ, as llama.cpp's imatrix and
llm-compressor's ``imatrix_mse`` weight it; ``h = 1`` for data-free RTN). ``r = 1`` is a candidate,
so the search is never worse than min/max on that weighted error. On the symmetric ``gguf`` grid
(Q4_0 form) the search is llama.cpp's own imatrix rule instead (:func:`_gguf_scale_search`): scale
starts around ``m / -2^(b-1)``, each refitted by weighted least squares for its codes, the plain Q4_0
scale among the candidates.

Error guarantee (RTN, min/max, ``zero_point="float"``): every entry inside its group's range is within
``scale / 2`` of its reconstruction, up to float16 rounding of ``scale`` and ``min`` (which can move
the far end of the grid by ``maxq * 2^-11`` of a step); symmetric: the grid covers ``[-max|w| -
scale/2, max|w| - scale/2]``, so again ``|w - w'| <= scale/2``. With ``zero_point="integer"`` the
grid is shifted by at most half a step to put 0 on it, so ``|w - w'| <= scale`` on ``[lo, hi]``.

Packing (:func:`pack_codes`): the codes of a row form a little-endian bitstream: code ``j`` occupies
bits ``[j b, (j + 1) b)`` of the stream, and stream bit ``t`` is bit ``t mod 8`` (least significant
first) of byte ``t div 8`` of the row. A row takes ``ceil(n b / 8)`` bytes (unused high bits are 0),
so 2/4/8-bit codes pack 4/2/1 whole values per byte (4-bit: ``byte k = c[2k] | c[2k+1] << 4``) and
3/5/6/7-bit codes pack 8 values into ``b`` bytes.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, NumericalError
from ._checks import as_matrix

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int) -> int:
    """``bits`` as an int in 2..8 (an integral float is accepted), else :class:`ConfigError`."""
    if isinstance(bits, float) and bits.is_integer():
        bits = int(bits)
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise ConfigError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    bits = int(bits)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"bits must be from {MIN_BITS} to {MAX_BITS}, got {bits}; choose a width in that range")
    return bits


def check_group_size(group_size: int, n: int) -> int:
    """The effective group size for ``n`` input columns: ``min(group_size, n)``; ``< 1`` raises."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ConfigError(f"group size must be a positive integer, got {group_size!r}")
    if group_size < 1:
        raise ConfigError(f"group size must be >= 1, got {group_size}; use e.g. 128 (or the input size for one "
                          "group per row)")
    return min(group_size, n)


def num_groups(n: int, group_size: int) -> int:
    """``ceil(n / g)`` groups along ``n`` input columns (the last one shorter when ``g`` does not divide ``n``)."""
    return -(-n // check_group_size(group_size, n))


def column_groups(n: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The group of each input column, ``j // g`` (LongTensor (n,))."""
    return torch.arange(n, device=device) // check_group_size(group_size, n)


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes of one packed row of ``n`` codes: ``ceil(n bits / 8)``."""
    return -(-n * check_bits(bits) // 8)


# ---- grids --------------------------------------------------------------------------------------


ZERO_POINTS = ("integer", "float", "exact")
GRIDS = ("minmax", "gguf")
CLIPS = ("minmax", "mse")
CLIP_RATIOS = tuple(1.0 - 0.025 * k for k in range(21))  # 1.0, 0.975, ..., 0.5


def check_grid_options(zero_point: str, clip: str, auto: bool = False, grid: str = "minmax",
                       symmetric: bool | None = None) -> None:
    """:class:`ConfigError` for an unknown ``zero_point`` / ``clip`` / ``grid`` (``auto``: ``clip="auto"``
    allowed, GPTQ), or an asymmetric ``grid="gguf"`` without Q4_1's float minimum."""
    if zero_point not in ZERO_POINTS:
        raise ConfigError(f"unknown zero_point {zero_point!r}; valid: {', '.join(ZERO_POINTS)}")
    if grid not in GRIDS:
        raise ConfigError(f"unknown grid {grid!r}; valid: {', '.join(GRIDS)} (gguf: llama.cpp's Q4_0 / Q8_0 / Q4_1 "
                          "grids)")
    if grid == "gguf" and symmetric is False and zero_point != "float":
        raise ConfigError("grid=gguf with asymmetric codes is llama.cpp's Q4_1 (a float minimum): use "
                          "zero_point=float (or symmetric codes for Q4_0 / Q8_0)")
    if auto and clip == "auto":
        return
    if clip not in CLIPS:
        raise ConfigError(f"unknown clip {clip!r}; valid: {', '.join(CLIPS)} (min/max range, or the "
                          "importance-weighted search over clipping ratios)")


def _round_up_bits(x: torch.Tensor, keep: int) -> torch.Tensor:
    """``x >= 0`` rounded up to ``keep`` significant bits (float64)."""
    mant, exp = torch.frexp(x)  # x = mant 2^exp, mant in [0.5, 1)
    return torch.ldexp(torch.ceil(mant * 2.0 ** keep) / 2.0 ** keep, exp)


def grid_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, zero_point: str = "integer",
                    grid: str = "minmax") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float16 ``(scale, min)`` (``min`` None when symmetric) of the grids for the ranges ``[lo, hi]``
    entrywise (module docstring: ``zero_point`` ``"integer"`` / ``"exact"`` put 0 on the grid, ``"float"``
    spans exactly ``[lo, hi]``; ``grid="gguf"`` takes llama.cpp's symmetric scales)."""
    maxq = 2 ** bits - 1
    lo = lo.to(torch.float64)
    hi = hi.to(torch.float64)
    if symmetric and grid == "gguf":
        if bits == 8:
            scale = torch.maximum(lo.abs(), hi.abs()) / 127.0
        else:
            scale = torch.where(lo.abs() >= hi.abs(), lo, hi) / -(2.0 ** (bits - 1))
        mn = None
    elif symmetric:
        scale, mn = 2.0 * torch.maximum(lo.abs(), hi.abs()) / maxq, None
    elif zero_point == "float":
        scale, mn = (hi - lo) / maxq, lo.to(torch.float16)
    elif zero_point == "exact":
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = _round_up_bits((hi - lo) / maxq, 11 - bits)
        z = torch.where(scale > 0, torch.round(-lo / torch.where(scale > 0, scale, 1.0)), 0.0).clamp(0, maxq)
        mn = (-z * scale.to(torch.float16).to(torch.float64)).to(torch.float16)
    else:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = ((hi - lo) / maxq).to(torch.float16).to(torch.float64)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        z = torch.round(-lo / safe).clamp(0, maxq)
        mn = torch.where(scale > 0, -z * scale, lo).to(torch.float16)
    scale = scale.to(torch.float16)
    if not bool(torch.isfinite(scale).all()) or (mn is not None and not bool(torch.isfinite(mn).all())):
        raise NumericalError("a weight group's range exceeds float16 (|w| > 65504 or a range that large); "
                             "rescale the weights before quantizing")
    return scale, mn


def _group_range(W: torch.Tensor, idx: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = W.shape[0]
    idx = idx.expand(m, -1)
    lo = W.new_zeros(m, G).scatter_reduce(1, idx, W, "amin", include_self=False)
    hi = W.new_zeros(m, G).scatter_reduce(1, idx, W, "amax", include_self=False)
    return lo, hi


def search_range(W: torch.Tensor, groups: torch.Tensor, G: int, bits: int, symmetric: bool,
                 zero_point: str = "integer", clip: str = "minmax", importance: torch.Tensor | None = None,
                 grid: str = "minmax") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float16 ``(scale, min)`` (m, G) for the columns of ``W (m, k)``, column ``j`` in group ``groups[j]``:
    min/max (``clip="minmax"``) or the clipping ratio of :data:`CLIP_RATIOS` with the smallest
    ``sum_j importance_j (w_j - q(w_j))^2`` per (row, group) (``clip="mse"``; importance 1 if None)."""
    W = W.to(torch.float64)
    lo, hi = _group_range(W, groups[None, :], G)
    if clip == "minmax":
        return grid_from_range(lo, hi, bits, symmetric, zero_point, grid)
    h = (torch.ones(W.shape[1], dtype=torch.float64, device=W.device) if importance is None
         else importance.to(device=W.device, dtype=torch.float64).clamp(min=0))
    maxq, zero = 2 ** bits - 1, (2 ** (bits - 1) if symmetric else 0)
    if grid == "gguf" and symmetric and bits < 8:
        return _gguf_scale_search(W, groups, G, bits, h, lo, hi)
    best = None
    idx = groups[None, :].expand(W.shape[0], -1)
    for r in CLIP_RATIOS:
        scale, mn = grid_from_range(lo * r, hi * r, bits, symmetric, zero_point, grid)
        s = scale.to(torch.float64)[:, groups]
        off = -(2 ** (bits - 1)) * s if mn is None else mn.to(torch.float64)[:, groups]
        q = round_to_grid(W, s, off, maxq, zero).to(torch.float64) * s + off
        err = W.new_zeros(W.shape[0], G).scatter_add_(1, idx, (W - q) ** 2 * h[None, :])
        if best is None:
            best, bs, bm = err, scale.clone(), (None if mn is None else mn.clone())
            continue
        better = err < best
        best = torch.where(better, err, best)
        bs = torch.where(better, scale, bs)
        if mn is not None:
            bm = torch.where(better, mn, bm)
    return bs, bm


#: llama.cpp's Q4_0 scale candidates under an importance matrix: ``d = m / -(2^(b-1) + 0.1 k)``.
GGUF_SCALE_STEPS = tuple(0.1 * k for k in range(-9, 10))


def _gguf_scale_search(W: torch.Tensor, groups: torch.Tensor, G: int, bits: int, h: torch.Tensor,
                       lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, None]:
    """Float16 scales (m, G) of a symmetric ``grid="gguf"`` (Q4_0-form) search, llama.cpp's imatrix rule:
    for each start ``d_k = m / -(2^(b-1) + 0.1 k)``, ``k = -9..9`` (``m`` the group's entry of largest
    magnitude, sign kept), codes ``c = clamp(round(w / d_k), -2^(b-1), 2^(b-1) - 1)``, then the weighted
    least-squares scale for those codes ``d = sum_j h_j w_j c_j / sum_j h_j c_j^2``; per (row, group) the
    candidate (the plain Q4_0 scale among them) with the smallest ``sum_j h_j (w_j - q(w_j))^2`` on the
    stored float16 grid."""
    maxq, zero = 2 ** bits - 1, 2 ** (bits - 1)
    idx = groups[None, :].expand(W.shape[0], -1)
    m = torch.where(lo.abs() >= hi.abs(), lo, hi)
    hw = W * h[None, :]

    def error(scale: torch.Tensor) -> torch.Tensor:
        s = scale.to(torch.float64)[:, groups]
        q = round_to_grid(W, s, -zero * s, maxq, zero).to(torch.float64) * s - zero * s
        return W.new_zeros(W.shape[0], G).scatter_add_(1, idx, (W - q) ** 2 * h[None, :])

    best_s, _ = grid_from_range(lo, hi, bits, True, grid="gguf")  # the plain rule is a candidate
    best = error(best_s)
    for k in GGUF_SCALE_STEPS:
        d0 = m / -(zero + k)
        safe = torch.where(d0 != 0, d0, 1.0)[:, groups]
        c = torch.round(W / safe).clamp_(-zero, zero - 1)
        num = W.new_zeros(W.shape[0], G).scatter_add_(1, idx, hw * c)
        den = W.new_zeros(W.shape[0], G).scatter_add_(1, idx, h[None, :] * c * c)
        d = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), d0).to(torch.float16)
        if not bool(torch.isfinite(d).all()):
            continue
        err = error(d)
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, d, best_s)
    return best_s, None


@dataclass
class QuantGrid:
    """Per (row, group) grids of a ``(m, n)`` matrix; see the module docstring.

    ``scales`` and ``mins`` are float16 ``(m, G)``; ``mins`` is None for a symmetric grid.
    """

    bits: int
    group_size: int
    n: int
    scales: torch.Tensor
    mins: torch.Tensor | None = None

    @property
    def symmetric(self) -> bool:
        return self.mins is None

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    @property
    def groups(self) -> torch.Tensor:
        return column_groups(self.n, self.group_size, self.scales.device)

    def columns(self, cols: torch.Tensor | slice | None = None, dtype: torch.dtype = torch.float64
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, offset)`` per entry of the selected columns (m, len(cols)): ``w' = scale * code + offset``."""
        g = self.groups if cols is None else self.groups[cols]
        scale = self.scales.to(dtype)[:, g]
        if self.mins is None:
            offset = -(2 ** (self.bits - 1)) * scale
        else:
            offset = self.mins.to(dtype)[:, g]
        return scale, offset

    def round(self, W: torch.Tensor, cols: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Nearest codes (int64) of ``W`` (m, len(cols)) on the grids of the selected columns."""
        scale, offset = self.columns(cols)
        zero = 2 ** (self.bits - 1) if self.symmetric else 0
        return round_to_grid(W, scale, offset, self.maxq, zero)

    def nbytes(self) -> int:
        """Bytes of the scales and minimums."""
        return sum(t.numel() * t.element_size() for t in (self.scales, self.mins) if t is not None)


def fit_grid(W: torch.Tensor, bits: int, group_size: int, symmetric: bool = False, *, zero_point: str = "integer",
             clip: str = "minmax", importance: torch.Tensor | None = None, grid: str = "minmax") -> QuantGrid:
    """The round-to-nearest grid of ``W (m, n)`` per (row, group): min/max or the clipping search
    (:func:`search_range`; ``importance`` weights the input columns)."""
    bits = check_bits(bits)
    check_grid_options(zero_point, clip, grid=grid, symmetric=symmetric)
    W = as_matrix(W, "W")
    m, n = W.shape
    g = check_group_size(group_size, n)
    G = -(-n // g)
    scale, mn = search_range(W, column_groups(n, g, W.device), G, bits, symmetric, zero_point, clip, importance, grid)
    return QuantGrid(bits, g, n, scale, mn)


def round_to_grid(W: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, maxq: int, zero_code: int = 0
                  ) -> torch.Tensor:
    """Nearest codes ``clamp(round((w - offset) / scale), 0, maxq)`` entrywise (int64; ``scale`` of either
    sign: a gguf grid's may be negative). Where ``scale`` is 0 (a constant group) every code gives the
    same value; ``zero_code`` is returned there (0 for the asymmetric grid, whose single point is the
    minimum; ``2^(b-1)`` for the symmetric one)."""
    W = W.to(torch.float64)
    pos = scale != 0
    inv = torch.where(pos, 1.0 / torch.where(pos, scale, torch.ones_like(scale)), torch.zeros_like(scale))
    codes = torch.round((W - offset) * inv).clamp_(0, maxq)
    codes = torch.where(pos, codes, torch.full_like(codes, float(zero_code)))
    return codes.to(torch.int64)


def quantize(W: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """Codes (uint8 (m, n)) of the nearest points of ``grid`` to ``W``."""
    W = as_matrix(W, "W")
    if W.shape != (grid.scales.shape[0], grid.n):
        raise ConfigError(f"W {tuple(W.shape)} does not match the grid's {grid.scales.shape[0]} x {grid.n}")
    return grid.round(W).to(torch.uint8)


def dequantize(codes: torch.Tensor, grid: QuantGrid, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale * code + offset`` (m, n) in ``dtype``."""
    scale, offset = grid.columns(dtype=dtype)
    return codes.to(dtype) * scale + offset


@dataclass
class QuantizedMatrix:
    """Codes (uint8 (m, n), unpacked) on a :class:`QuantGrid`; ``info`` records how they were found."""

    codes: torch.Tensor
    grid: QuantGrid
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.codes.shape[0]), int(self.codes.shape[1])

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.grid, dtype)

    def nbytes(self) -> int:
        """Stored bytes once packed: codes + scales (+ minimums)."""
        m, n = self.shape
        return m * packed_row_bytes(n, self.grid.bits) + self.grid.nbytes()


def rtn(W: torch.Tensor, bits: int, group_size: int, symmetric: bool = False, *, zero_point: str = "integer",
        clip: str = "minmax", importance: torch.Tensor | None = None, grid: str = "minmax") -> QuantizedMatrix:
    """Round-to-nearest on the grid of each (row, group) (:func:`fit_grid`); guarantee in the module doc."""
    W = as_matrix(W, "W")
    g = fit_grid(W, bits, group_size, symmetric, zero_point=zero_point, clip=clip, importance=importance, grid=grid)
    return QuantizedMatrix(quantize(W, g), g, {"solver": "rtn"})


# ---- packing ------------------------------------------------------------------------------------


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``(m, n)`` (values < 2^bits) into uint8 ``(m, ceil(n bits / 8))``; layout in the module doc.

    Eight codes make one ``8 bits``-bit integer, written as ``bits`` little-endian bytes.
    """
    bits = check_bits(bits)
    if codes.ndim != 2:
        raise ConfigError(f"codes must be a 2-D (rows, columns) tensor, got shape {tuple(codes.shape)}")
    m, n = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2 ** bits):
        raise ConfigError(f"codes must lie in 0..{2 ** bits - 1} for {bits}-bit packing")
    n8 = -(-n // 8) * 8
    c = torch.nn.functional.pad(c, (0, n8 - n)).view(m, n8 // 8, 8)
    word = (c << (torch.arange(8, device=c.device) * bits)).sum(-1)  # (m, n8/8), < 2^56: no overflow
    byte = (word[..., None] >> (torch.arange(bits, device=c.device) * 8)) & 0xFF  # (m, n8/8, bits)
    return byte.reshape(m, -1)[:, : packed_row_bytes(n, bits)].to(torch.uint8).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes ``(m, n)``."""
    bits = check_bits(bits)
    if packed.ndim != 2 or packed.shape[1] != packed_row_bytes(n, bits):
        raise ConfigError(f"packed codes must be (rows, {packed_row_bytes(n, bits)}) for {n} {bits}-bit codes, "
                          f"got {tuple(packed.shape)}")
    m = packed.shape[0]
    n8 = -(-n // 8) * 8
    p = torch.nn.functional.pad(packed.to(torch.int64), (0, n8 // 8 * bits - packed.shape[1]))
    word = (p.view(m, n8 // 8, bits) << (torch.arange(bits, device=p.device) * 8)).sum(-1)
    c = (word[..., None] >> (torch.arange(8, device=p.device) * bits)) & (2 ** bits - 1)
    return c.reshape(m, n8)[:, :n].to(torch.uint8)


__all__ = [
    "CLIPS", "CLIP_RATIOS", "GRIDS", "MAX_BITS", "MIN_BITS", "ZERO_POINTS", "QuantGrid", "QuantizedMatrix",
    "check_bits", "check_grid_options", "check_group_size", "column_groups", "search_range",
    "dequantize", "fit_grid", "grid_from_range", "num_groups", "pack_codes", "packed_row_bytes",
    "quantize", "round_to_grid", "rtn", "unpack_codes",
]
