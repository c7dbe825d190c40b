"""Rank allocators: turn a parameter budget into a :data:`~rankwise.compression.budget.RankPlan`.

``ALLOCATORS[name].fn(request) -> plan``. An allocator that sets ``needs_factorizations`` gets the
full factorization of every targeted layer (with ``.spectrum``) under the compression method's
objective, computed once; the pipeline then truncates each factorization to the planned rank.

Allocators (see :mod:`.allocators_global` for the math):

* ``uniform``      every layer keeps ``k = floor(m n (1 - R) / (m + n))``;
* ``spectrum``     one global greedy over the relative whitened truncation errors (no extra passes);
* ``spectrum-typed`` the same greedy within each module type, each type removing ``ratio``;
* ``spectrum-band`` the same greedy with every rank within ``band`` (fraction) of the uniform rank;
* ``sensitivity``  measured LM-loss increase per layer at a few ranks, then the same budgeted choice;
* ``sensitivity-band`` ``spectrum-band`` with each layer's error weighted by its measured loss increase
  at the uniform rank (one loss evaluation per layer; best measured at 40%, see BENCHMARKS.md).

``context`` keys read here: ``min_rank`` (int, default 1), ``speed_aware`` (bool), ``speed_profile``
(path or None), ``model`` and ``windows`` (for speed measurement and sensitivity),
``sensitivity_windows`` / ``sensitivity_seqlen`` / ``sensitivity_points``, ``band`` (spectrum-band,
default 0.5). What an allocator decided
beyond the ranks (speed caps, dense reasons, measured tables, seconds) goes into ``request.info``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import UnknownMethodError
from .allocators_global import (allocate_spectrum, allocate_spectrum_banded, allocate_spectrum_by_type,
                                uniform_speed_aware)
from .allocate_context import (_record_dense, allocate_sensitivity_band_request, allocate_sensitivity_request,
                               speed_caps_for)
from .budget import RankPlan, uniform_rank


@dataclass
class AllocationRequest:
    """Everything an allocator may use.

    ``ratio``: fraction of the targeted weight parameters to remove. ``shapes``: ``{name: (out, in)}``
    in model order. ``factorizations``: ``{name: Factorization}`` (empty unless the allocator
    ``needs_factorizations``). ``context``: extra inputs the pipeline passes (model, calibration
    windows, method, ...), for allocators that measure.
    """

    ratio: float
    shapes: Mapping[str, tuple[int, int]]
    factorizations: Mapping[str, Any] = field(default_factory=dict)
    context: Mapping[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def spectra(self):
        """``{name: singular values}`` (float64 numpy, descending) of every targeted layer."""
        return {n: self.factorizations[n].spectrum.double().cpu().numpy() for n in self.shapes}


@dataclass(frozen=True)
class Allocator:
    name: str
    fn: Callable[[AllocationRequest], RankPlan] = field(repr=False)
    needs_factorizations: bool = False
    description: str = ""


def uniform(req: AllocationRequest) -> RankPlan:
    """Every layer ``m x n`` keeps ``k = floor(m n (1 - R) / (m + n))``; ``None`` (dense) if that saves nothing.

    Speed-aware: a layer whose uniform rank exceeds its break-even rank stays dense, and the other
    layers share its budget at one common raised ratio (see :func:`.allocators_global.uniform_speed_aware`).
    """
    caps = speed_caps_for(req)
    if caps is None:
        return {name: uniform_rank(m, n, req.ratio) for name, (m, n) in req.shapes.items()}
    return uniform_speed_aware(req.ratio, req.shapes, caps, info=req.info)


def spectrum(req: AllocationRequest) -> RankPlan:
    """Global greedy on relative whitened truncation errors ``tail_l(k) / sum sigma_l^2``."""
    spectra = req.spectra()
    plan = allocate_spectrum(req.ratio, req.shapes, spectra, int(req.context.get("min_rank", 1)),
                             speed_caps_for(req))
    _record_dense(req, plan)
    return plan


def spectrum_typed(req: AllocationRequest) -> RankPlan:
    """``spectrum`` within each module type, every type removing ``ratio`` of its parameters."""
    spectra = req.spectra()
    plan = allocate_spectrum_by_type(req.ratio, req.shapes, spectra, int(req.context.get("min_rank", 1)),
                                     speed_caps_for(req))
    _record_dense(req, plan)
    return plan


def spectrum_band(req: AllocationRequest) -> RankPlan:
    """``spectrum`` with ranks within ``context['band']`` (default 0.5) of the uniform rank, none dense."""
    spectra = req.spectra()
    plan = allocate_spectrum_banded(req.ratio, req.shapes, spectra, float(req.context.get("band", 0.5)),
                                    int(req.context.get("min_rank", 1)), speed_caps_for(req))
    _record_dense(req, plan)
    return plan


def sensitivity(req: AllocationRequest) -> RankPlan:
    """Measured loss increase when each layer alone is truncated (few windows), then the budgeted choice."""
    plan = allocate_sensitivity_request(req, speed_caps_for(req))
    _record_dense(req, plan)
    return plan


def sensitivity_band(req: AllocationRequest) -> RankPlan:
    """``spectrum-band`` weighted per layer by the measured loss increase at its uniform rank."""
    plan = allocate_sensitivity_band_request(req, speed_caps_for(req))
    _record_dense(req, plan)
    return plan


ALLOCATORS: dict[str, Allocator] = {
    "uniform": Allocator("uniform", uniform, False, "same parameter fraction removed from every layer"),
    "spectrum": Allocator("spectrum", spectrum, True,
                          "global greedy over relative whitened truncation error per parameter saved"),
    "spectrum-typed": Allocator("spectrum-typed", spectrum_typed, True,
                                "spectrum greedy within each module type (q, k, ..., down), same ratio per type"),
    "spectrum-band": Allocator("spectrum-band", spectrum_band, True,
                               "spectrum greedy with each rank within +-50% of the uniform rank, no layer dense"),
    "sensitivity-band": Allocator("sensitivity-band", sensitivity_band, True,
                                  "spectrum-band weighted by the measured loss increase of each layer at its "
                                  "uniform rank (one loss evaluation per layer)"),
    "sensitivity": Allocator("sensitivity", sensitivity, True,
                             "measured LM-loss increase per layer at a few ranks + budgeted choice (slower)"),
}


def get_allocator(name: str) -> Allocator:
    try:
        return ALLOCATORS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown allocator {name!r}; valid allocators: {', '.join(ALLOCATORS)}") from None
