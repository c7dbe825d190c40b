"""``--structure mixed``: per layer GPTQ, GPTQ plus a low-rank correction, or the dense layer, under one byte budget.

The structure ``--bits-per-weight B`` takes when no ``--structure`` is given. Every layer's candidates
(:mod:`.candidates`): GPTQ codes at every width x group size of the grid (default widths 2, 3, 4, 8, group
sizes 32, 64, 128), GPTQ + low-rank compensation at each width up to 4 bits (group size: the grid's
largest) and every rank of :func:`.candidates.rank_grid`, and the dense layer; the byte allocator
(``bits-greedy``) chooses one per layer by the measured relative whitened errors under the total byte
budget, and the plan is validated against uniform GPTQ at the same budget (:mod:`..validation`).

Fit: a spec without ``rank`` is GPTQ's (:mod:`.gptq`: ``W' = dequant(gptq(T, C))``, or RTN with
``quantizer="rtn"``); a spec with ``rank`` is LoRC's (``lowrank="lorc"``: ``W' = Q + L R`` with ``L R``
the whitened rank-k fit of ``T - Q``) or the alternating fit's (``lowrank="lq"``, ``iters`` rounds,
never above LoRC's objective), :mod:`.lorc` / :mod:`.lq`. ``T = stats.target(W)``, ``C = stats.covariance()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ...errors import ConfigError
from ...structures.base import StructuredLinear
from .base import COV, STRUCTURES, Candidate, CandidateGrid, LayerStats, Method
from .candidates import (GPTQ_MEASURED_MAX_BITS, candidate_specs, lowrank_candidates, quant_candidates, rank_grid,
                         uniform_quant_plan)
from .gptq import GPTQ, rotated_problem
from .lorc import fit_lowrank_quant
from .lq import LQOptions
from .rtn import RTN, plan_quant

LOWRANK_FITS = ("lorc", "lq")


@dataclass
class MixedOptions(LQOptions):
    """:class:`~.lq.LQOptions` (GPTQ's, ``rank``, ``quantizer``, ``whitening``, ``iters``, ``init``) plus
    ``lowrank``: the fit of the specs with a rank ("lorc" or "lq"), and ``lowrank_candidates``: offer
    quantized + low-rank candidates at all (False: GPTQ widths and group sizes, and dense, only)."""

    lowrank: str = "lorc"
    lowrank_candidates: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lowrank not in LOWRANK_FITS:
            raise ConfigError(f"unknown low-rank fit {self.lowrank!r}; valid: {', '.join(LOWRANK_FITS)}")
        if not isinstance(self.lowrank_candidates, bool):
            raise ConfigError(f"lowrank_candidates must be true or false, got {self.lowrank_candidates!r}")


@STRUCTURES.register("mixed")
class Mixed(Method):
    """GPTQ, GPTQ + low rank or dense, chosen per layer; see the module docstring."""

    name = "mixed"
    budget = "bytes"
    Options = MixedOptions

    def needs(self) -> set[str]:
        return {COV}

    def plan_layer(self, shape: tuple[int, int], target: float) -> dict[str, Any]:
        return plan_quant(shape, target, self.options)

    def uniform_plan(self, shapes, bits_per_weight: float | None, grid: CandidateGrid | None = None):
        """Uniform GPTQ (no low-rank part): the baseline the allocation is validated against."""
        return uniform_quant_plan(shapes, bits_per_weight, self.options, grid or CandidateGrid())

    def candidate_specs(self, shape: tuple[int, int], grid: CandidateGrid) -> list[dict[str, Any]]:
        return candidate_specs(shape, self.options, grid)

    def candidates(self, W: torch.Tensor, stats: LayerStats, grid: CandidateGrid | None = None) -> list[Candidate]:
        grid = grid or CandidateGrid()
        out, kept = quant_candidates(self, W, stats, grid, keep=True)
        if not self.options.lowrank_candidates:
            return out
        m, n = W.shape
        ranks = [self.options.rank] if self.options.rank is not None else rank_grid(m, n)
        T = C = None
        for b, (spec, Qd) in sorted(kept.items()):
            if b > GPTQ_MEASURED_MAX_BITS:
                continue
            if T is None:
                T, C, _ = rotated_problem(W, stats, spec)
            out += lowrank_candidates(T, C, Qd, spec, ranks, self.options.whitening)
        return out

    def fit(self, W: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats,
            spec: Mapping[str, Any]) -> StructuredLinear:
        if spec.get("rank") is None:
            plain = RTN if self.options.quantizer == "rtn" else GPTQ
            return plain.fit(self, W, bias, stats, spec)  # the options are a superset of theirs
        lq = self.options.lowrank == "lq"
        return fit_lowrank_quant(W, bias, stats, spec, self.options, iters=self.options.iters if lq else 0,
                                 init=self.options.init if lq else "lorc")
