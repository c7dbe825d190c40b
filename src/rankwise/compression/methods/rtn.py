"""``--structure rtn``: round-to-nearest group quantization (:class:`~rankwise.structures.quant.QuantLinear`).

``W' = dequant(rtn(W Q)) Q^T`` (``Q`` the optional randomized Hadamard rotation, ``rotate=True``):
every weight rounded to the nearest point of its (row, group) grid spanning the group's range, so
``|w - w'| <= scale / 2`` entrywise (:func:`rankwise.linalg.quant.rtn`). Needs no statistics.

Budget (``budget = "bytes"``): a layer's ``target`` is the bytes allowed for its weights, all
overhead counted (packed codes, float16 scales and minimums, rotation signs; the bias is not
counted, a dense layer keeps it too). ``bits=None`` takes the largest width in 8..2 whose layer
fits; a fixed ``bits`` must fit. When nothing fits, :class:`ConfigError` names the layer, the bytes
of the smallest form and the options to change. The options (shared by ``gptq``, ``lorc``, ``lq``)
are validated when the method is built.

Candidates for the byte allocators (:func:`quant_candidates`, shared with ``gptq``): one per code
width, the layer fitted at that width; its cost is the relative whitened error
``tr((T - W') C (T - W')^T) / tr(T C T^T)`` of that very fit (exact, not estimated).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ...errors import ConfigError
from ...linalg.hadamard import HadamardRotation
from ...linalg.gptq import quant_objective
from ...linalg.quant import MAX_BITS, MIN_BITS, check_bits, check_grid, check_group_size, rtn
from ...structures.quant import QuantLinear, rotation_spec
from .base import STRUCTURES, Candidate, LayerStats, Method


@dataclass
class QuantOptions:
    """``bits``: code width 2..8 (None = the largest that fits the budget); ``group_size``: input columns
    per scale (a ragged last group when it does not divide the input size); ``symmetric``: no
    minimums; ``rotate``: randomized Hadamard rotation of the inputs, signs drawn from ``seed``;
    ``grid``: how each group's grid is set, for the runtime the model goes to (``rankwise export``):
    ``minmax`` (default), ``gguf`` (llama.cpp's Q4_0 / Q8_0 / Q4_1 grids), ``zero-point`` (integer zero
    points: asymmetric layers exactly in compressed-tensors / GPTQ); see :mod:`rankwise.linalg.quant`."""

    bits: int | None = None
    group_size: int = 128
    symmetric: bool = False
    rotate: bool = False
    seed: int = 0
    grid: str = "minmax"

    def __post_init__(self) -> None:
        check_grid(self.grid)
        if self.bits is not None:
            self.bits = check_bits(self.bits)
        check_group_size(self.group_size, 1)  # type and >= 1; the layer's input size caps it later
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")


def quant_spec(shape: tuple[int, int], bits: int, opts: QuantOptions) -> dict[str, Any]:
    """The :class:`QuantLinear` spec of an (out, in) layer with ``bits``-bit codes and ``opts``."""
    m, n = shape
    rot = rotation_spec({"kind": "auto", "seed": opts.seed}, n, m) if opts.rotate else None
    return {"bits": bits, "group_size": check_group_size(opts.group_size, n), "symmetric": bool(opts.symmetric),
            "rotation": rot}


def bit_candidates(opts: QuantOptions) -> list[int]:
    """Widths to try, widest first: the fixed ``bits``, or 8..2."""
    return [opts.bits] if opts.bits is not None else list(range(MAX_BITS, MIN_BITS - 1, -1))


def candidate_widths(opts: QuantOptions, bits: list[int] | None = None) -> list[int]:
    """Code widths a byte allocator may choose, narrowest first: ``bits`` (default 2..8), or the fixed width."""
    if opts.bits is not None:
        return [opts.bits]
    widths = sorted({check_bits(b) for b in bits}) if bits else list(range(MIN_BITS, MAX_BITS + 1))
    if not widths:
        raise ConfigError("the list of candidate widths is empty; give at least one of 2..8")
    return widths


def relative_error(T: torch.Tensor, Wp: torch.Tensor, C: torch.Tensor) -> float:
    """``tr((T - W') C (T - W')^T) / tr(T C T^T)`` (0 when the denominator is 0)."""
    den = quant_objective(T, torch.zeros_like(T), C)
    return 0.0 if den <= 0 else quant_objective(T, Wp, C) / den


def quant_candidates(meth: Method, W: torch.Tensor, stats: LayerStats, bits: list[int] | None = None
                     ) -> list[Candidate]:
    """One :class:`Candidate` per width of :func:`candidate_widths`: ``meth.fit`` at that width, its
    bytes and its relative whitened error under ``stats.covariance()`` (see the module docstring)."""
    T, C = stats.target(W).double(), stats.covariance()
    out = []
    for b in candidate_widths(meth.options, bits):
        spec = quant_spec(tuple(W.shape), b, meth.options)
        layer = meth.fit(W, None, stats, spec)
        out.append(Candidate(spec, layer.nbytes(), relative_error(T, layer.dense().double(), C)))
    return out


def too_small(shape: tuple[int, int], target: float, need: int, what: str) -> ConfigError:
    m, n = shape
    bpw = lambda b: 8.0 * b / (m * n)  # noqa: E731
    return ConfigError(
        f"layer ({m} x {n}): the budget of {target:.0f} bytes ({bpw(target):.3f} bits/weight) is below the smallest "
        f"representable size, {what} = {need} bytes ({bpw(need):.3f} bits/weight); raise --bits-per-weight to at "
        f"least {bpw(need):.3f}, or use a larger --group-size / fewer fixed bits or rank")


def plan_quant(shape: tuple[int, int], target: float, opts: QuantOptions) -> dict[str, Any]:
    """The widest quantized spec within ``target`` bytes; :class:`ConfigError` when even the narrowest is over."""
    m, n = shape
    for b in bit_candidates(opts):
        spec = quant_spec(shape, b, opts)
        need = QuantLinear.spec_nbytes(n, m, spec)
        if need <= target:
            return spec
    raise too_small(shape, target, need, f"{b}-bit codes + float16 scales{'' if opts.symmetric else ' and minimums'} "
                    f"in groups of {spec['group_size']}")


def rotation_for(spec: Mapping[str, Any], n: int) -> HadamardRotation | None:
    """The rotation a spec asks for (signs from its seed), or None."""
    rot = spec.get("rotation")
    return None if rot is None else HadamardRotation.make(n, int(rot["seed"]), str(rot["kind"]))


@STRUCTURES.register("rtn")
class RTN(Method):
    """Round-to-nearest group quantization; see the module docstring."""

    name = "rtn"
    budget = "bytes"
    Options = QuantOptions

    def needs(self) -> set[str]:
        return set()

    def plan_layer(self, shape: tuple[int, int], target: float) -> dict[str, Any]:
        return plan_quant(shape, target, self.options)

    def candidates(self, W: torch.Tensor, stats: LayerStats, bits: list[int] | None = None) -> list[Candidate]:
        return quant_candidates(self, W, stats, bits)

    def fit(self, W: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None,
            spec: Mapping[str, Any]) -> QuantLinear:
        rot = rotation_for(spec, W.shape[1])
        Wr = W if rot is None else rot.rotate(W.double())
        qm = rtn(Wr, int(spec["bits"]), int(spec["group_size"]), bool(spec["symmetric"]), self.options.grid)
        layer = QuantLinear.from_quantized(qm, bias, rot, seed=int((spec.get("rotation") or {}).get("seed", 0)),
                                           dtype=torch.float32)
        layer.fit_info = dict(qm.info)
        return layer
