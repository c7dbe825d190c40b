"""Permutation matching: bring model B into model A's basis without changing B's function.

Both methods return one permutation per entry of the models' :class:`PermutationSpec`
(:mod:`rankwise.models.permutation`), applied to B with :func:`permute_model_`.

* **Weight matching** (Ainsworth, Hayase, Srinivasa, "Git Re-Basin", 2023): maximize
  ``sum_l <W_a,l, P_l W_b,l P_{l-1}^T>_F`` over the permutations by coordinate descent. For one
  permutation ``P`` with the others fixed the objective is linear in ``P``:
  ``sum_i S[i, P(i)]`` with ``S = sum over the tensors P touches of units(W_a) units(W_b')^T`` (``W_b'``
  = B's tensor with every other permutation applied), a linear assignment problem solved exactly
  (:func:`rankwise.linalg.assignment.best_permutation`). Sweeps over the permutations in random order
  (seeded) stop when none changes. Ito et al. show the matched layers' top singular vectors align
  (:func:`rankwise.linalg.assignment.singular_alignment`).
* **Activation matching** (same paper; Li et al. 2016): with data, each permutation maximizes the summed
  correlation of the two models' units at its probes (e.g. the inputs of the layers that read the
  units), ``S[i, j] = sum_probes sum_d corr(a_{i,d}, b_{j,d})``, also one assignment each. The moments
  are accumulated over batches, so the activations are never stored.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..linalg.assignment import best_permutation, unit_similarity
from ..models.permutation import Axis, PermutationSpec, permutation_spec, permute_model_, permute_tensor
from .data import batches, forward


@dataclass
class MatchResult:
    method: str
    perms: dict[str, torch.Tensor]
    sweeps: int = 0
    objective_before: float = 0.0
    objective_after: float = 0.0
    moved: dict[str, int] = field(default_factory=dict)   # units each permutation moved

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "sweeps": self.sweeps, "objective_before": self.objective_before,
                "objective_after": self.objective_after, "moved": dict(self.moved),
                "permutations": len(self.perms)}


def _check_pair(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], spec: PermutationSpec
                ) -> None:
    for key in spec.by_key():
        if key not in state_a or key not in state_b:
            raise ConfigError(f"tensor {key} is missing from one of the models; match two models of one architecture")
        if state_a[key].shape != state_b[key].shape:
            raise ConfigError(f"tensor {key} has shape {tuple(state_a[key].shape)} in model A but "
                              f"{tuple(state_b[key].shape)} in model B (the first mismatching layer); match two models "
                              "of one architecture and size")


def _objective(state_a, state_b, spec: PermutationSpec, perms) -> float:
    """``sum over permuted tensors <W_a, P(W_b)>``."""
    total = 0.0
    for key, acting in spec.by_key().items():
        wb = permute_tensor(state_b[key], [(perms[p], a) for p, a in acting])
        total += float((state_a[key].to(torch.float64) * wb.to(torch.float64)).sum())
    return total


def weight_matching(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], spec: PermutationSpec,
                    max_sweeps: int = 100, seed: int = 0) -> tuple[dict[str, torch.Tensor], int]:
    """Coordinate descent over the permutations (module docstring); returns ``(perms, sweeps)``."""
    _check_pair(state_a, state_b, spec)
    perms = spec.identity()
    names = list(spec.sizes)
    by_key = spec.by_key()
    g = torch.Generator().manual_seed(seed)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        changed = False
        for idx in torch.randperm(len(names), generator=g).tolist():
            p = names[idx]
            n = spec.sizes[p]
            S = torch.zeros(n, n, dtype=torch.float64)
            for a in spec.axes[p]:
                others: list[tuple[torch.Tensor, Axis]] = [(perms[q], e) for q, e in by_key[a.key]
                                                           if not (q == p and e == a)]
                wb = permute_tensor(state_b[a.key], others)
                S += unit_similarity(state_a[a.key], wb, a.axis, n, a.block, a.sections)
            new = best_permutation(S)
            ar = torch.arange(n)
            if float(S[ar, new].sum()) > float(S[ar, perms[p]].sum()) + 1e-12 * max(1.0, float(S.abs().max())):
                perms[p] = new
                changed = True
        if not changed:
            break
    return perms, sweeps


class _Moments:
    """Running sums for the correlation of two sets of features (float64)."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.sa = torch.zeros(dim, dtype=torch.float64)
        self.sb = torch.zeros(dim, dtype=torch.float64)
        self.saa = torch.zeros(dim, dtype=torch.float64)
        self.sbb = torch.zeros(dim, dtype=torch.float64)
        self.sab = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.to(torch.float64), b.to(torch.float64)
        self.n += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += a.T @ b

    def unit_scores(self, n: int, block: int) -> torch.Tensor:
        """``S[i, j] = sum_d corr(a_{i,d}, b_{j,d})``."""
        ma, mb = self.sa / self.n, self.sb / self.n
        va = (self.saa / self.n - ma * ma).clamp(min=0).sqrt()
        vb = (self.sbb / self.n - mb * mb).clamp(min=0).sqrt()
        cov = self.sab / self.n - torch.outer(ma, mb)
        sa = torch.where(va > 0, va, torch.ones_like(va))
        sb = torch.where(vb > 0, vb, torch.ones_like(vb))
        corr = cov / torch.outer(sa, sb)
        corr = corr * torch.outer((va > 0).double(), (vb > 0).double())
        return corr.reshape(n, block, n, block).diagonal(dim1=1, dim2=3).sum(-1)


def _probe_features(x: torch.Tensor, channels: bool) -> torch.Tensor:
    """Module input -> ``(samples, features)``: units on the last axis, or on axis 1 for a convolution (its
    positions become samples)."""
    if channels and x.ndim > 2:
        x = x.movedim(1, -1)
    return x.reshape(-1, x.shape[-1])


def activation_matching(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, data,
                        batch_size: int = 8) -> dict[str, torch.Tensor]:
    """One assignment per permutation on the correlation of the models' units (module docstring)."""
    probes = {(p, pr.module): pr for p, prs in spec.probes.items() for pr in prs}
    modules = {pr.module for pr in probes.values()}
    acts: dict[str, dict[str, torch.Tensor]] = {"a": {}, "b": {}}

    def hook_for(side: str, name: str):
        def hook(_mod, args, kwargs=None):
            x = args[0] if args else next(iter((kwargs or {}).values()))
            acts[side][name] = x.detach()
        return hook

    handles = []
    for side, model in (("a", model_a), ("b", model_b)):
        for name in modules:
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise ConfigError(f"model {side.upper()} has no module {name}; match two models of one "
                                  "architecture") from None
            handles.append(mod.register_forward_pre_hook(hook_for(side, name)))
    moments: dict[tuple[str, str], _Moments] = {}
    try:
        with torch.no_grad():
            for batch in batches(data, batch_size):
                forward(model_a, batch)
                forward(model_b, batch)
                for (p, name), pr in probes.items():
                    xa = _probe_features(acts["a"][name], pr.channels)
                    xb = _probe_features(acts["b"][name], pr.channels)
                    m = moments.get((p, name))
                    if m is None:
                        m = moments[(p, name)] = _Moments(xa.shape[1])
                    m.add(xa, xb)
                acts["a"].clear()
                acts["b"].clear()
    finally:
        for h in handles:
            h.remove()
    if not moments:
        raise ConfigError("activation matching saw no data; pass a non-empty data set")
    perms = {}
    for p, n in spec.sizes.items():
        S = torch.zeros(n, n, dtype=torch.float64)
        for pr in spec.probes[p]:
            S += moments[(p, pr.module)].unit_scores(n, pr.block)
        perms[p] = best_permutation(S)
    return perms


def match(model_a: nn.Module, model_b: nn.Module, data=None, method: str | None = None, *, max_sweeps: int = 100,
          seed: int = 0, batch_size: int = 8) -> tuple[nn.Module, MatchResult]:
    """``model_b`` permuted into ``model_a``'s basis (a copy; same function as ``model_b``) and the result.

    ``method``: ``"weight"`` (weight matching; the default without data) or ``"activation"`` (the default
    with ``data``: token windows ``(N, T)`` for a language model, or inputs / ``(inputs, targets)`` for
    any other module)."""
    method = method or ("activation" if data is not None else "weight")
    if method not in ("weight", "activation"):
        raise ConfigError(f"unknown matching method {method!r}; valid: weight, activation")
    if method == "activation" and data is None:
        raise ConfigError("activation matching needs data (token windows or inputs); pass data= or use method='weight'")
    if type(model_a) is not type(model_b):
        raise ConfigError(f"cannot match a {type(model_a).__name__} with a {type(model_b).__name__}; match two "
                          "models of one architecture")
    spec = permutation_spec(model_a)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    _check_pair(state_a, state_b, spec)
    sweeps = 0
    if method == "weight":
        perms, sweeps = weight_matching(state_a, state_b, spec, max_sweeps=max_sweeps, seed=seed)
    else:
        perms = activation_matching(model_a, model_b, spec, data, batch_size=batch_size)
    before = _objective(state_a, state_b, spec, spec.identity())
    after = _objective(state_a, state_b, spec, perms)
    out = permute_model_(copy.deepcopy(model_b), spec, perms)
    moved = {p: int((perm != torch.arange(perm.numel())).sum()) for p, perm in perms.items()}
    return out, MatchResult(method, perms, sweeps, before, after, moved)


__all__ = ["MatchResult", "activation_matching", "match", "weight_matching"]
