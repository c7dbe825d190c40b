"""The registry of per-layer metrics. Each metric maps a :class:`LayerData` to a flat dict of fields.

Names and what they need:

* ``spectrum``  -- singular values of W: spectral norm, condition number, stable rank, entropy
  effective rank, ranks for 90/95/99% of ``||W||_F^2``.
* ``powerlaw``  -- WeightWatcher-style power-law fit of the ESD ``eig(W^T W) = sigma^2``.
* ``farms``     -- the same fit on the FARMS pooled ESD of fixed-aspect-ratio windows.
* ``whitened``  -- (needs calibration) singular values of ``W S``, ``S S^T = C``: the spectrum that
  activation-aware compression truncates; ranks for 90/95/99% of ``||W X||_F^2``.
* ``intruders`` -- (needs a compared model) intruder dimensions and the update's size and rank.
* ``alignment`` -- (needs a compared model) how well the top-k singular vectors of the two weights line
  up (Ito et al.; permutation matching raises it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..registry import Registry
from ..linalg.assignment import singular_alignment
from ..linalg.spectrum import condition_number, effective_rank, rank_for_energy, stable_rank
from .farms import farms_fit
from .intruders import INTRUDER_EPS, INTRUDER_K, intruder_dimensions, update_stats
from .powerlaw import fit_power_law

ENERGY_LEVELS = (0.90, 0.95, 0.99)


@dataclass
class LayerData:
    """Everything a metric may read about one layer. ``s``/``s_white`` are descending float64."""

    name: str
    weight: torch.Tensor                      # (out, in), float32 or float64, CPU or GPU
    s: torch.Tensor                           # singular values of weight
    s_white: torch.Tensor | None = None       # singular values of W S (calibration)
    base_weight: torch.Tensor | None = None   # the compared model's weight, same shape
    options: dict = field(default_factory=dict)


Metric = Callable[[LayerData], dict]
#: name -> metric (one registry pattern for every named thing: :class:`rankwise.registry.Registry`).
METRICS: Registry[Metric] = Registry("metric")
#: Metrics that need extra inputs, and which.
REQUIRES = {"whitened": "calibration data (--calib)", "intruders": "a model to compare with (--compare)",
            "alignment": "a model to compare with (--compare)"}


def register(name: str) -> Callable[[Metric], Metric]:
    return METRICS.register(name)


def _energy_ranks(s: torch.Tensor, prefix: str) -> dict:
    return {f"{prefix}rank{int(round(f * 100))}": rank_for_energy(s, f) for f in ENERGY_LEVELS}


@register("spectrum")
def spectrum_metrics(d: LayerData) -> dict:
    """``||W||_2 = sigma_1``, ``kappa = sigma_1/sigma_p``, stable rank ``sum sigma^2 / sigma_1^2``,
    entropy effective rank ``exp(H(sigma/sum sigma))``, ``rank_q = min{k: sum_{i<=k} sigma_i^2 >= q ||W||_F^2}``."""
    s = d.s
    return {
        "spectral_norm": float(s[0]),
        "frobenius_norm": float((s**2).sum().sqrt()),
        "condition_number": condition_number(s),
        "stable_rank": stable_rank(s),
        "effective_rank": effective_rank(s),
        **_energy_ranks(s, ""),
    }


@register("powerlaw")
def powerlaw_metrics(d: LayerData) -> dict:
    """ESD ``lambda = sigma^2``; ``alpha`` by the KS-optimal-xmin MLE (see ``powerlaw``);
    ``alpha_weighted = alpha log10(lambda_max)``."""
    f = fit_power_law((d.s**2).cpu().numpy(), xmin=d.options.get("xmin", "ks"))
    return {"alpha": f.alpha, "alpha_xmin": f.xmin, "alpha_D": f.D, "alpha_sigma": f.sigma,
            "alpha_num_tail": f.num_tail, "alpha_weighted": f.alpha_weighted,
            "lambda_max": f.lambda_max, "alpha_missing_reason": f.reason}


@register("farms")
def farms_metrics(d: LayerData) -> dict:
    """Power-law alpha of the FARMS pooled ESD of fixed-aspect-ratio windows (see ``farms``; window
    spectra in float32)."""
    o = d.options
    f = farms_fit(d.weight.detach().cpu(), xmin=o.get("farms_xmin", "mid"),
                  sampling=o.get("farms_sampling", "grid"), seed=o.get("seed", 0))
    return {"farms_alpha": f.alpha, "farms_D": f.D, "farms_num_evals": f.num_evals,
            "farms_missing_reason": f.reason}


@register("whitened")
def whitened_metrics(d: LayerData) -> dict:
    """Spectrum of ``W S`` (``S S^T`` = mean input second moment): ranks for 90/95/99% of the
    activation-weighted energy ``||W X||_F^2``, its stable and effective rank."""
    if d.s_white is None:
        return {}
    s = d.s_white
    return {"w_stable_rank": stable_rank(s), "w_effective_rank": effective_rank(s),
            **_energy_ranks(s, "w_")}


@register("intruders")
def intruder_metrics(d: LayerData) -> dict:
    """Intruder dimensions of this (tuned) weight against the compared base weight, plus
    ``||W1 - W0||_F / ||W0||_F`` and the update's stable / effective rank."""
    if d.base_weight is None:
        return {}
    k = d.options.get("intruder_k", INTRUDER_K)
    eps = d.options.get("intruder_eps", INTRUDER_EPS)
    r = intruder_dimensions(d.base_weight, d.weight, k=k, eps=eps)
    return {"intruders": r.count, "intruder_min_cos": min(r.max_cos) if r.max_cos else math.nan,
            **update_stats(d.base_weight, d.weight)}


@register("alignment")
def alignment_metrics(d: LayerData) -> dict:
    """Alignment of the top-k singular vectors with the compared weight's (k = ``intruder_k``): mean
    ``|<u_i, u'_i>|`` and ``|<v_i, v'_i>|``, and the subspace overlaps ``||U_k^T U'_k||_F^2 / k``."""
    if d.base_weight is None:
        return {}
    a = singular_alignment(d.base_weight, d.weight, d.options.get("intruder_k", INTRUDER_K))
    return {"align_u_mean": a["u_mean"], "align_v_mean": a["v_mean"], "align_u_overlap": a["u_overlap"],
            "align_v_overlap": a["v_overlap"]}
