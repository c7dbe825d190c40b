"""``--structure lorc``: quantized plus low-rank compensation (ZeroQuant-V2's LoRC).

``W' = (Q + L R) Q_rot^T`` with ``Q = quant(T)`` (GPTQ, or RTN with ``quantizer="rtn"``) and ``L R``
the whitened rank-k fit of the quantization error ``T - Q`` under ``C`` (exact minimizer of
``||(T - Q - L R) X||_F`` for that ``Q``, :func:`rankwise.linalg.lowrank_quant.lorc`); float16 factors
(:class:`~rankwise.structures.lowrank_quant.LowRankQuantLinear`). ``T = stats.target(W)``.

Budget split (bytes, all overhead counted): with ``bits`` and ``rank`` both None, ``bits`` is the
largest width in 8..2 whose quantized part leaves room for rank >= 1, and ``rank`` takes all the
bytes left, ``floor((target - quant bytes) / (2 (out + in)))`` (capped at ``min(out, in)``). A fixed
``bits`` keeps that width and takes the rank from what is left; a fixed ``rank`` takes the largest
width that fits with it; both fixed must fit. Otherwise :class:`ConfigError` names the layer and
the smallest size.

Candidates for the byte allocators (:func:`lowrank_quant_candidates`, shared with ``lq``): for each
code width ``b`` (at the fixed group size, else the grid's largest), ``Q = quant(T)`` once and the
whitened SVD of ``(T - Q) S`` (``S S^T = C``); the rank-k LoRC fit then has the error
``sum_{i>k} s_i^2`` exactly (before the float16 rounding of the factors), so every rank of
:func:`.candidates.rank_grid` costs nothing more. For ``lq`` this is an upper bound of its fit's error:
the alternation starts from LoRC's fit and keeps only rounds that lower it. ``--allocate uniform``:
the rule above in every layer (group size: the fixed one or 128).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ...errors import ConfigError
from ...linalg.lowrank_quant import QUANTIZERS, lq, quantize_target
from ...linalg.whitening import KINDS as WHITENINGS, make_whitener
from ...structures.lowrank_quant import LowRankQuantLinear
from ...structures.quant import QuantLinear
from .base import COV, STRUCTURES, Candidate, CandidateGrid, LayerStats, Method
from .candidates import candidate_group_sizes, candidate_specs, candidate_widths, lowrank_candidates, rank_grid
from .gptq import GPTQOptions, rotated_problem, rotation_seed
from .rtn import bit_candidates, quant_spec, too_small


@dataclass
class LowRankQuantOptions(GPTQOptions):
    """:class:`GPTQOptions` plus ``rank`` (None = from the leftover budget), ``quantizer`` ("gptq" or
    "rtn") and ``whitening`` ("cholesky" or "eigh") of the low-rank fit."""

    rank: int | None = None
    quantizer: str = "gptq"
    whitening: str = "cholesky"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ConfigError(f"rank must be an integer >= 1 (or None to fill the budget), got {self.rank!r}")
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"unknown quantizer {self.quantizer!r}; valid: {', '.join(QUANTIZERS)}")
        if self.whitening not in WHITENINGS:
            raise ConfigError(f"unknown whitening {self.whitening!r}; valid: {', '.join(WHITENINGS)}")


def plan_lowrank_quant(shape: tuple[int, int], target: float, opts: LowRankQuantOptions) -> dict[str, Any]:
    """Bits and rank within ``target`` bytes by the rule of the module docstring."""
    m, n = shape
    per_rank = LowRankQuantLinear.factor_bytes(n, m, 1)
    max_rank = min(m, n)
    if opts.rank is not None and opts.rank > max_rank:
        raise ConfigError(f"rank {opts.rank} is out of range for the ({m} x {n}) layer: use 1 <= rank <= {max_rank}")
    for b in bit_candidates(opts):
        spec = quant_spec(shape, b, opts)
        qbytes = QuantLinear.spec_nbytes(n, m, spec)
        k = opts.rank if opts.rank is not None else min(max_rank, int((target - qbytes) // per_rank))
        if k >= 1 and qbytes + k * per_rank <= target:
            return {**spec, "rank": int(k)}
    k = opts.rank or 1
    raise too_small(shape, target, qbytes + k * per_rank,
                    f"{b}-bit codes + float16 scales{'' if opts.symmetric else ' and minimums'} in groups of "
                    f"{spec['group_size']} + rank-{k} float16 factors")


def lowrank_quant_candidates(W: torch.Tensor, stats: LayerStats, opts: LowRankQuantOptions,
                             grid: CandidateGrid | None = None) -> list[Candidate]:
    """Candidates ``(bits, rank)`` with exact bytes and the LoRC fit's relative whitened error (module doc)."""
    grid = grid or CandidateGrid()
    m, n = W.shape
    ranks = [opts.rank] if opts.rank is not None else rank_grid(m, n)
    widths, g = candidate_widths(opts, grid), candidate_group_sizes(opts, grid, n)[-1]
    T, C, _ = rotated_problem(W, stats, quant_spec((m, n), widths[0], opts, g))  # the rotation does not depend on b
    whitener = make_whitener(C, opts.whitening)
    kw = opts.solver_kwargs() if opts.quantizer == "gptq" else opts.grid_kwargs()
    out = []
    for b in widths:
        spec = quant_spec((m, n), b, opts, g)
        Q = quantize_target(T, C, b, int(spec["group_size"]), bool(spec["symmetric"]), opts.quantizer, **kw)
        out += lowrank_candidates(T, C, Q.dense(torch.float64), spec, ranks, whitener=whitener)
    return out


def uniform_lowrank_quant_plan(shapes, bits_per_weight: float | None, opts: LowRankQuantOptions):
    """``({layer: spec}, {})``: :func:`plan_lowrank_quant` in every layer (needs ``--bits-per-weight``)."""
    if bits_per_weight is None:
        if opts.bits is None or opts.rank is None:
            raise ConfigError("a quantized + low-rank structure needs --bits-per-weight B (stored bits per weight, "
                              "all overhead counted): the rank takes what the codes leave")
        return {name: {**quant_spec(s, opts.bits, opts), "rank": min(opts.rank, *s)} for name, s in shapes.items()}, {}
    plan = {}
    for name, shape in shapes.items():
        try:
            plan[name] = plan_lowrank_quant(shape, bits_per_weight * shape[0] * shape[1] / 8.0, opts)
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
    return plan, {}


def fit_lowrank_quant(W: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats, spec: Mapping[str, Any],
                      opts: LowRankQuantOptions, iters: int, init: str) -> LowRankQuantLinear:
    """The fitted :class:`LowRankQuantLinear` (LoRC: ``iters=0, init="lorc"``); ``layer.fit_info`` holds the
    objective history."""
    T, C, rot = rotated_problem(W, stats, spec)
    kw = opts.solver_kwargs() if opts.quantizer == "gptq" else opts.grid_kwargs()
    res = lq(T, C, int(spec["bits"]), int(spec["group_size"]), int(spec["rank"]), bool(spec["symmetric"]),
             iters=iters, init=init, quantizer=opts.quantizer, whitening=opts.whitening, **kw)
    layer = LowRankQuantLinear.from_lowrank_quant(res, bias, rot, seed=rotation_seed(spec), dtype=torch.float32)
    layer.fit_info = {**res.info, "history": list(res.history), "quant_info": dict(res.quant.info)}
    return layer


@STRUCTURES.register("lorc")
class LoRC(Method):
    """Quantization + whitened low-rank compensation; see the module docstring."""

    name = "lorc"
    budget = "bytes"
    Options = LowRankQuantOptions

    def needs(self) -> set[str]:
        return {COV}

    def plan_layer(self, shape: tuple[int, int], target: float) -> dict[str, Any]:
        return plan_lowrank_quant(shape, target, self.options)

    def candidates(self, W: torch.Tensor, stats: LayerStats, grid: CandidateGrid | None = None) -> list[Candidate]:
        return lowrank_quant_candidates(W, stats, self.options, grid)

    def uniform_plan(self, shapes, bits_per_weight: float | None, grid: CandidateGrid | None = None):
        return uniform_lowrank_quant_plan(shapes, bits_per_weight, self.options)

    def candidate_specs(self, shape: tuple[int, int], grid: CandidateGrid) -> list[dict[str, Any]]:
        return candidate_specs(shape, self.options, grid, [self.options.rank or 1])

    def fit(self, W: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats,
            spec: Mapping[str, Any]) -> LowRankQuantLinear:
        return fit_lowrank_quant(W, bias, stats, spec, self.options, iters=0, init="lorc")
