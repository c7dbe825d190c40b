"""``--structure rtn``: round-to-nearest group quantization (:class:`~rankwise.structures.quant.QuantLinear`).

``W' = dequant(rtn(W Q)) Q^T`` (``Q`` the optional per-layer randomized Hadamard rotation, ``rotate="layer"``;
``rotate="stream"`` instead rotates the whole residual stream before anything is fitted):
every weight rounded to the nearest point of its (row, group) grid spanning the group's range, so
``|w - w'| <= scale / 2`` entrywise (:func:`rankwise.linalg.quant.rtn`). Needs no statistics.

Budget (``budget = "bytes"``): a layer's ``target`` is the bytes allowed for its weights, all
overhead counted (packed codes, float16 scales and minimums, rotation signs; the bias is not
counted, a dense layer keeps it too). Without a budget (``--bits B`` alone) every layer takes ``B``-bit
codes in groups of ``group_size`` (default 128). Under ``--bits-per-weight`` the byte allocators choose
per layer among the candidates of :mod:`.candidates` (widths and group sizes, the fixed ones only
when ``bits`` / ``group_size`` are given); ``--allocate uniform`` takes one setting for every layer
(:func:`.candidates.uniform_quant_plan`). When nothing fits, :class:`ConfigError` names the smallest
feasible budget and the options to change. The options (shared by ``gptq``, ``lorc``, ``lq``,
``mixed``) are validated when the method is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ...errors import ConfigError
from ...linalg.hadamard import HadamardRotation
from ...linalg.quant import MAX_BITS, MIN_BITS, check_bits, check_grid_options, check_group_size, rtn
from ...structures.quant import QuantLinear, rotation_spec
from .base import STRUCTURES, Candidate, CandidateGrid, LayerStats, Method


ROTATIONS = ("stream", "layer")


@dataclass
class QuantOptions:
    """``bits``: code width 2..8 (None = chosen under the byte budget); ``group_size``: input columns
    per scale (a ragged last group when it does not divide the input size; None = chosen under the byte
    budget, :data:`DEFAULT_GROUP_SIZE` without one); ``symmetric``: no minimums; ``zero_point``:
    ``"integer"`` (0 on every grid, the GPTQ / compressed-tensors form; the default), ``"exact"`` (the
    same with the scale rounded so that compressed-tensors / GPTQ checkpoints hold it exactly) or
    ``"float"`` (the grid spans exactly [min, max], llama.cpp's Q4_1 form; the default under
    ``grid="gguf"``); ``grid``: ``"minmax"`` or ``"gguf"`` (llama.cpp's Q4_0 / Q8_0 / Q4_1 grids, for
    ``rankwise export --format gguf``); see :mod:`rankwise.linalg.quant`; ``clip``: ``"minmax"`` or
    ``"mse"`` (each group's range shrunk by the ratio with the smallest importance-weighted error,
    :func:`rankwise.linalg.quant.search_range`), and for GPTQ ``"auto"`` (both, the lower objective); ``rotate``: ``"stream"`` (``True``) folds the norms and
    rotates the residual stream by a random Hadamard matrix before quantizing
    (:mod:`rankwise.models.stream`; fused into the weights, no op at inference, the head untied when
    the model ties it), ``"layer"`` a randomized Hadamard rotation of each layer's inputs applied at run
    time (:class:`~rankwise.structures.quant.QuantLinear`'s ``rotation_signs``), None off; signs drawn
    from ``seed``."""

    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = False
    zero_point: str | None = None
    clip: str = "minmax"
    rotate: str | bool | None = None
    seed: int = 0
    grid: str = "minmax"

    def __post_init__(self) -> None:
        if self.bits is not None:
            self.bits = check_bits(self.bits)
        if self.group_size is not None:
            check_group_size(self.group_size, 1)  # type and >= 1; the layer's input size caps it later
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.zero_point is None:  # llama.cpp's asymmetric grid (Q4_1) has a float minimum
            self.zero_point = "float" if self.grid == "gguf" else "integer"
        check_grid_options(self.zero_point, self.clip, auto=type(self) is not QuantOptions,  # auto: GPTQ only
                           grid=self.grid, symmetric=bool(self.symmetric))
        if self.rotate is True:
            self.rotate = "stream"
        elif self.rotate is False or self.rotate in ("none", ""):
            self.rotate = None
        if self.rotate is not None and self.rotate not in ROTATIONS:
            raise ConfigError(f"unknown rotate {self.rotate!r}; valid: stream (the residual stream, fused into the "
                              "weights), layer (each layer's inputs, at run time), none")

    def grid_kwargs(self) -> dict[str, Any]:
        return {"zero_point": self.zero_point, "clip": self.clip, "grid": self.grid}


#: The group size of a quantized layer when neither ``--group-size`` nor a byte allocator chooses one.
DEFAULT_GROUP_SIZE = 128


def quant_spec(shape: tuple[int, int], bits: int, opts: QuantOptions, group_size: int | None = None
               ) -> dict[str, Any]:
    """The :class:`QuantLinear` spec of an (out, in) layer with ``bits``-bit codes and ``opts`` (groups of
    ``group_size``, default ``opts.group_size`` or :data:`DEFAULT_GROUP_SIZE`; capped at ``in``)."""
    m, n = shape
    rot = rotation_spec({"kind": "auto", "seed": opts.seed}, n, m) if opts.rotate == "layer" else None
    g = group_size or opts.group_size or DEFAULT_GROUP_SIZE
    return {"bits": bits, "group_size": check_group_size(g, n), "symmetric": bool(opts.symmetric), "rotation": rot}


def bit_candidates(opts: QuantOptions) -> list[int]:
    """Widths to try, widest first: the fixed ``bits``, or 8..2."""
    return [opts.bits] if opts.bits is not None else list(range(MAX_BITS, MIN_BITS - 1, -1))


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

    def candidates(self, W: torch.Tensor, stats: LayerStats, grid: CandidateGrid | None = None) -> list[Candidate]:
        from .candidates import quant_candidates

        return quant_candidates(self, W, stats, grid or CandidateGrid())

    def candidate_specs(self, shape: tuple[int, int], grid: CandidateGrid) -> list[dict[str, Any]]:
        from .candidates import candidate_specs

        return candidate_specs(shape, self.options, grid)

    def uniform_plan(self, shapes, bits_per_weight: float | None, grid: CandidateGrid | None = None):
        from .candidates import uniform_quant_plan

        return uniform_quant_plan(shapes, bits_per_weight, self.options, grid or CandidateGrid())

    def fit(self, W: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats | None,
            spec: Mapping[str, Any]) -> QuantLinear:
        rot = rotation_for(spec, W.shape[1])
        Wr = W if rot is None else rot.rotate(W.double())
        qm = rtn(Wr, int(spec["bits"]), int(spec["group_size"]), bool(spec["symmetric"]),
                 **self.options.grid_kwargs())
        layer = QuantLinear.from_quantized(qm, bias, rot, seed=int((spec.get("rotation") or {}).get("seed", 0)),
                                           dtype=torch.float32)
        layer.fit_info = dict(qm.info)
        return layer
