"""Glue between an :class:`~rankwise.compression.allocate.AllocationRequest` and the pure allocators:
speed caps from the measured speed model, the sensitivity loss callback, and dense reasons."""
from __future__ import annotations

import math
import time
import torch

from ...errors import ConfigError
from ...models.surgery import linear_weight
from ...structures.lowrank import max_saving_rank
from .budget import uniform_rank
from .solvers import LayerLoss, allocate_sensitivity, allocate_spectrum_banded, relative_tail
from .types import AllocationRequest

def speed_caps_for(req: AllocationRequest) -> dict[str, int] | None:
    """``{layer: break-even rank}`` when ``options.speed_aware``, else ``None`` (measured once, cached)."""
    if not req.options.speed_aware:
        return None
    if "speed" in req.info:
        return req.info["speed"]["caps"]
    from .speed import REGIMES, load_speed_profile

    model = req.context.model
    p = next(model.parameters()) if model is not None else torch.zeros(())
    profile = load_speed_profile(list(req.shapes.values()), p.device, p.dtype,
                                 profile_file=req.options.speed_profile)
    caps = {name: profile.cap(m, n) for name, (m, n) in req.shapes.items()}
    req.info["speed"] = {"fingerprint": profile.fingerprint, "regimes": dict(REGIMES),
                         "break_even": profile.break_even, "caps": caps}
    return caps


def record_dense(req: AllocationRequest, plan: dict) -> None:
    """``info['dense'] = {layer: why it stays dense}``."""
    min_rank = req.options.min_rank
    caps = (req.info.get("speed") or {}).get("caps", {})
    why = {}
    for name, k in plan.items():
        if k is not None:
            continue
        m, n = req.shapes[name]
        if max_saving_rank(m, n) < min_rank:
            why[name] = f"no rank >= min rank {min_rank} saves parameters"
        elif name in caps and caps[name] < min_rank:
            why[name] = f"factorized form not faster than dense (break-even rank {caps[name]})"
        else:
            why[name] = "allocator: keeping it dense was cheapest per parameter"
    req.info["dense"] = why


def make_layer_loss(model, windows: torch.Tensor, factorizations) -> tuple[LayerLoss, float]:
    """``(loss(name, k), base_loss)``: mean next-token NLL on ``windows`` with only layer ``name``
    replaced by its rank-``k`` truncation ``fac.dense(k)`` (restored afterwards)."""
    from ...evaluation.perplexity import window_nll

    def mean_nll() -> float:
        total, count = window_nll(model, windows, batch_size=max(1, windows.shape[0]))
        return total / count

    @torch.no_grad()
    def loss(name: str, k: int) -> float:
        W = linear_weight(model.get_submodule(name))
        saved = W.detach().clone()
        try:
            W.copy_(factorizations[name].dense(k).to(W.dtype))
            return mean_nll()
        finally:
            W.copy_(saved)

    with torch.no_grad():
        base = mean_nll()
    return loss, base


def _measured_loss(req: AllocationRequest, allocator: str):
    """``(spectra, loss(name, k), base_loss)`` for the measured-sensitivity allocators.

    ``context.layer_loss`` (with ``context.base_loss``) replaces the measurement; otherwise
    each call truncates one layer and evaluates the LM loss on the first calibration windows.
    """
    ctx, opts = req.context, req.options
    spectra = req.spectra()
    if ctx.layer_loss is not None:
        return spectra, ctx.layer_loss, float(ctx.base_loss)
    if ctx.model is None or ctx.windows is None:
        raise ConfigError(f"the {allocator} allocator needs the model and calibration windows")
    loss, base = make_layer_loss(ctx.model, ctx.windows[:opts.sensitivity_windows, :opts.sensitivity_seqlen],
                                 req.factorizations)
    return spectra, loss, base


def allocate_sensitivity_request(req: AllocationRequest, caps: dict[str, int] | None) -> dict:
    """Run :func:`allocate_sensitivity` with the pipeline's model and calibration windows.

    A ``context.layer_loss`` callable (with ``context.base_loss``) replaces the measurement;
    a ``context.sensitivity_cache`` dict memoizes it across runs on the same model and windows
    (e.g. one benchmark at several ratios).
    """
    ctx = req.context
    t0 = time.perf_counter()
    spectra, loss, base = _measured_loss(req, "sensitivity")
    calls = [0]
    cache = ctx.sensitivity_cache  # dict shared by runs on the same model + windows
    if cache is not None:
        base = cache.setdefault("base", base)

    def counted(name: str, k: int) -> float:
        if cache is not None and (name, k) in cache:
            return cache[(name, k)]
        calls[0] += 1
        v = loss(name, k)
        if cache is not None:
            cache[(name, k)] = v
        return v

    plan, table = allocate_sensitivity(req.ratio, req.shapes, spectra, counted, base,
                                       req.options.min_rank, caps, req.options.sensitivity_points,
                                       progress=ctx.progress)
    req.info["sensitivity"] = {"base_loss": base, "loss_evaluations": calls[0],
                               "seconds": time.perf_counter() - t0,
                               "table": {n: {str(k): v for k, v in t.items()} for n, t in table.items()}}
    return plan


def allocate_sensitivity_band_request(req: AllocationRequest, caps: dict[str, int] | None) -> dict:
    """``spectrum-band`` (band ``options.band``) with per-layer weights

        w_l = (loss(layer l alone at its uniform rank u_l) - base_loss) / e_l(u_l)

    (one loss evaluation per layer on ``sensitivity_windows`` x ``sensitivity_seqlen`` calibration
    tokens), so the greedy trades measured loss, linearized in the relative whitened error."""
    t0 = time.perf_counter()
    spectra, loss, base = _measured_loss(req, "sensitivity-band")
    weights, table = {}, {}
    for name, (m, n) in req.shapes.items():
        u = uniform_rank(m, n, req.ratio)
        if caps is not None and u is not None:
            u = min(u, caps.get(name, u))
        if u is None or u < 1:
            continue
        table[name] = {u: float(loss(name, u))}
        if not math.isfinite(table[name][u]):
            raise ConfigError(f"non-finite calibration loss when truncating {name}; check the model and data")
        e_u = float(relative_tail(spectra[name])[u])
        weights[name] = max(table[name][u] - base, 1e-6) / max(e_u, 1e-12)
    plan = allocate_spectrum_banded(req.ratio, req.shapes, spectra, req.options.band, req.options.min_rank,
                                    caps, weights)
    req.info["sensitivity"] = {"base_loss": base, "loss_evaluations": len(table),
                               "seconds": time.perf_counter() - t0, "weights": weights,
                               "table": {n: {str(k): v for k, v in t.items()} for n, t in table.items()}}
    return plan
