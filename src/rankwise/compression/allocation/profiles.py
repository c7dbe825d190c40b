"""Candidate rank profiles for the validated allocation search (``--allocate search``).

A profile gives every targeted layer ``l`` (``m_l x n_l``) a weight ``s_l > 0``; its removal ratio is

    r_l = min(r_max_l, c s_l),   c chosen so that  sum_l r_l m_l n_l = R sum_l m_l n_l,

(``r_max_l`` keeps at least ``min_rank``; ``c`` by bisection, so layers at their cap hand their share to
the others), and its rank ``k_l = floor(m_l n_l (1 - r_l) / (m_l + n_l))`` (:func:`.budget.rank_for_ratio`).
Each layer keeps at most ``(1 - r_l) m_l n_l`` parameters, so every profile meets the same budget as the
uniform plan (``s_l = 1``).

The profiles are the ones the rank-allocation literature reports as helping after an update step (Swift-SVD,
EvoPress): a per-type tilt (attention matrices compressed less or more than the MLP, by ``1 +- TILT``)
and protection of the first and last blocks (``s = PROTECT`` there). None of them is trusted: the
search runs each through the sequential engine with its refit and keeps the one with the lowest
held-out calibration loss (:mod:`..validation`), the uniform plan winning ties.
"""
from __future__ import annotations

from typing import Callable, Mapping

from ...errors import ConfigError
from ...models.surgery import layer_index
from ...structures.lowrank import lowrank_saves
from .budget import rank_for_ratio

#: Relative tilt of the per-type profiles: one kind of matrix takes weight ``1 - TILT``, the other ``1``.
TILT = 0.25
#: Weight of the first and last blocks' layers in the ``ends`` profile.
PROTECT = 0.5


def is_attention(name: str) -> bool:
    """An attention projection (``self_attn``, GPT-2's ``attn``, BERT's ``attention``) rather than an MLP one."""
    parts = name.lower().split(".")
    return any("attn" in p or "attention" in p for p in parts)


def _attention_less(names, blocks):
    return {n: 1.0 - TILT if is_attention(n) else 1.0 for n in names}


def _mlp_less(names, blocks):
    return {n: 1.0 if is_attention(n) else 1.0 - TILT for n in names}


def _ends(names, blocks):
    ends = {min(blocks.values()), max(blocks.values())} if blocks else set()
    return {n: PROTECT if blocks.get(n) in ends else 1.0 for n in names}


#: label -> ``weights(names, {name: block index}) -> {name: s_l}``.
PROFILES: dict[str, Callable] = {
    "attention-less": _attention_less,
    "mlp-less": _mlp_less,
    "ends-protected": _ends,
}


def profile_ratios(ratio: float, shapes: Mapping[str, tuple[int, int]], weights: Mapping[str, float],
                   min_rank: int = 1) -> dict[str, float]:
    """``{name: r_l}`` of the module docstring: removal ratios proportional to ``weights`` (capped) whose
    parameter-weighted mean is ``ratio``."""
    size = {n: m * k for n, (m, k) in shapes.items()}
    cap = {n: max(0.0, 1.0 - min_rank * (m + k) / (m * k)) for n, (m, k) in shapes.items()}
    target = ratio * sum(size.values())
    if target > sum(cap[n] * size[n] for n in shapes) + 1e-9:
        raise ConfigError(f"--ratio {ratio:g} leaves no room for a rank profile (every layer at rank {min_rank})")

    def removed(c: float) -> float:
        return sum(min(cap[n], c * weights[n]) * size[n] for n in shapes)

    lo, hi = 0.0, 1.0
    while removed(hi) < target and hi < 1e6:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if removed(mid) < target else (lo, mid)
    return {n: min(cap[n], hi * weights[n]) for n in shapes}


def profile_plan(ratio: float, shapes: Mapping[str, tuple[int, int]], weights: Mapping[str, float],
                 min_rank: int = 1) -> dict[str, int | None]:
    """The rank plan of one profile (``None``: a layer whose rank would save nothing stays dense)."""
    plan: dict[str, int | None] = {}
    for n, r in profile_ratios(ratio, shapes, weights, min_rank).items():
        m, k = shapes[n]
        rank = max(min_rank, rank_for_ratio(m, k, r))
        plan[n] = rank if lowrank_saves(m, k, rank) else None
    return plan


def profile_plans(ratio: float, shapes: Mapping[str, tuple[int, int]], min_rank: int = 1) -> dict[str, dict]:
    """``{label: rank plan}`` of every profile of :data:`PROFILES` that differs from uniform on these layers
    (a model without attention layers, or with one block, has fewer)."""
    names = list(shapes)
    blocks = {n: b for n in names if (b := layer_index(n)) is not None}
    plans = {}
    for label, fn in PROFILES.items():
        w = fn(names, blocks)
        if len(set(w.values())) > 1:
            plans[label] = profile_plan(ratio, shapes, w, min_rank)
    return plans
