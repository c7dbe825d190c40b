"""Rank allocators: turn a parameter budget into a :data:`~rankwise.compression.allocation.types.RankPlan`.

``ALLOCATORS.get(name).fn(request) -> plan``. An allocator with ``needs="spectra"`` gets the
full factorization of every targeted layer (with ``.spectrum``) under the compression method's
objective, computed once; the pipeline then truncates each factorization to the planned rank.

Allocators (see :mod:`.solvers` for the math):

* ``uniform``      every layer keeps ``k = floor(m n (1 - R) / (m + n))``;
* ``spectrum``     one global greedy over the relative whitened truncation errors (no extra passes);
* ``spectrum-typed`` the same greedy within each module type, each type removing ``ratio``;
* ``spectrum-band`` the same greedy with every rank within ``band`` (fraction) of the uniform rank;
* ``sensitivity``  measured LM-loss increase per layer at a few ranks, then the same budgeted choice;
* ``svd-llm-v2``   SVD-LLM v2's per-type ratios from each matrix's theoretical truncation loss;
* ``sensitivity-band`` ``spectrum-band`` with each layer's error weighted by its measured loss increase
  at the uniform rank (one loss evaluation per layer; best measured at 40%, see BENCHMARKS.md);
* ``search``       the uniform plan and the rank profiles of :mod:`.profiles` (per-type tilts, protected end
  blocks), each run through the sequential engine and scored on held-out calibration windows; the
  lowest held-out loss is kept (:mod:`..validation`; one engine pass per candidate).

Options: :class:`.types.AllocateOptions`. What an allocator decided beyond the ranks (speed caps,
dense reasons, measured tables, seconds) goes into ``request.info``.
"""
from __future__ import annotations

from ...errors import ConfigError
from .budget import uniform_rank
from .measure import (allocate_sensitivity_band_request, allocate_sensitivity_request, record_dense,
                      speed_caps_for)
from .profiles import profile_plans
from .solvers import (allocate_spectrum, allocate_spectrum_banded, allocate_spectrum_by_type,
                      allocate_svd_llm_v2, uniform_speed_aware)
from .types import AllocationRequest, RankPlan, register


@register("uniform", description="same parameter fraction removed from every layer")
def uniform(req: AllocationRequest) -> RankPlan:
    """Every layer ``m x n`` keeps ``k = floor(m n (1 - R) / (m + n))`` (:func:`.budget.rank_for_ratio`); ``None`` (dense) if that saves nothing.

    Speed-aware: a layer whose uniform rank exceeds its break-even rank stays dense, and the other
    layers share its budget at one common raised ratio (see :func:`.solvers.uniform_speed_aware`).
    """
    caps = speed_caps_for(req)
    if caps is None:
        return {name: uniform_rank(m, n, req.ratio) for name, (m, n) in req.shapes.items()}
    return uniform_speed_aware(req.ratio, req.shapes, caps, info=req.info)


@register("spectrum", "spectra", "global greedy over relative whitened truncation error per parameter saved")
def spectrum(req: AllocationRequest) -> RankPlan:
    """Global greedy on relative whitened truncation errors ``tail_l(k) / sum sigma_l^2``."""
    spectra = req.spectra()
    plan = allocate_spectrum(req.ratio, req.shapes, spectra, req.options.min_rank,
                             speed_caps_for(req))
    record_dense(req, plan)
    return plan


@register("spectrum-typed", "spectra", "spectrum greedy within each module type (q, k, ..., down), same ratio per type")
def spectrum_typed(req: AllocationRequest) -> RankPlan:
    """``spectrum`` within each module type, every type removing ``ratio`` of its parameters."""
    spectra = req.spectra()
    plan = allocate_spectrum_by_type(req.ratio, req.shapes, spectra, req.options.min_rank,
                                     speed_caps_for(req))
    record_dense(req, plan)
    return plan


@register("spectrum-band", "spectra", "spectrum greedy with each rank within +-band of the uniform rank, no layer dense")
def spectrum_band(req: AllocationRequest) -> RankPlan:
    """``spectrum`` with ranks within ``options.band`` of the uniform rank, none dense."""
    spectra = req.spectra()
    plan = allocate_spectrum_banded(req.ratio, req.shapes, spectra, req.options.band,
                                    req.options.min_rank, speed_caps_for(req))
    record_dense(req, plan)
    return plan


@register("sensitivity", "factors", "measured LM-loss increase per layer at a few ranks + budgeted choice (slower)",
          whole_model=True)
def sensitivity(req: AllocationRequest) -> RankPlan:
    """Measured loss increase when each layer alone is truncated (few windows), then the budgeted choice."""
    plan = allocate_sensitivity_request(req, speed_caps_for(req))
    record_dense(req, plan)
    return plan


@register("sensitivity-band", "factors", "spectrum-band weighted by the measured loss increase of each layer at its uniform rank",
          whole_model=True)
def sensitivity_band(req: AllocationRequest) -> RankPlan:
    """``spectrum-band`` weighted per layer by the measured loss increase at its uniform rank."""
    plan = allocate_sensitivity_band_request(req, speed_caps_for(req))
    record_dense(req, plan)
    return plan


@register("svd-llm-v2", "spectra", "SVD-LLM v2: ratio per matrix within each weight type from its theoretical truncation loss")
def svd_llm_v2(req: AllocationRequest) -> RankPlan:
    """:func:`.solvers.allocate_svd_llm_v2` (speed caps and minimum rank are not part of the method)."""
    plan, ratios = allocate_svd_llm_v2(req.ratio, req.shapes, req.spectra())
    req.info["svd_llm_v2_ratios"] = ratios
    record_dense(req, plan)
    return plan


#: Where :func:`search` leaves its candidate plans for the validation (popped by the pipeline).
CANDIDATES = "candidate_plans"


@register("search", description="uniform and rank profiles (per-type tilts, protected end blocks), each compressed "
          "and scored on held-out calibration windows; the best is kept (one engine pass per candidate)",
          whole_model=True)
def search(req: AllocationRequest) -> RankPlan:
    """The uniform plan; the profiles' plans go to ``req.info[CANDIDATES]`` for the validated passes."""
    if req.options.speed_aware:
        raise ConfigError("--allocate search does not combine with --speed-aware: use --allocate uniform "
                          "--speed-aware")
    req.info[CANDIDATES] = profile_plans(req.ratio, req.shapes, req.options.min_rank)
    return uniform(req)
