"""``shared-basis``: the same-type layers of ``group_size`` adjacent blocks share one output basis.

Fit (:func:`rankwise.linalg.shared_basis.shared_whitened_basis`): per group, the rank-k SVD of the
stacked whitened weights ``[W_1 S_1, ..., W_g S_g]`` gives the shared ``B (out, k)`` and each
layer's ``K_i = V_i^T S_i^-1``: the exact minimizer of ``sum_i ||(W_i - B K_i) X_i||_F^2`` (each layer
whitened by its own covariance; sequential refit targets are used). With ``group_size=1`` it is the
per-layer whitened SVD (SVD-LLM). The basis is shared on the output side, the side the stacking
leaves common; Basis Sharing (Wang et al. 2024) shares the input-side factor under a whitening pooled
over the group -- a different approximation of the same idea.

Units: the engine hands :meth:`fit_unit` the layers of ``group_size`` consecutive blocks; they are
grouped by module type (the last component of the name: ``q_proj``, ``down_proj``, ...). Budget: a
group's budget is the sum of its layers' targets (``plan_layer`` records each in ``spec["target"]``);
``k`` is the largest with ``out k + k sum_i in_i`` within it. The layers hold the very same
``nn.Parameter`` as basis (:mod:`rankwise.structures.shared_basis`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ...calibration.stats import COV, LayerStats
from ...errors import ConfigError
from ...linalg.shared_basis import shared_whitened_basis
from ...structures.base import StructuredLinear
from ...structures.shared_basis import SharedBasisLinear
from .base import STRUCTURES, LayerInput, Method
from .prune import keep_fraction_text


@dataclass
class SharedBasisOptions:
    """``group_size``: consecutive blocks whose same-type layers share a basis (1 = per-layer SVD-LLM)."""

    group_size: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")


def shared_rank(out_features: int, in_features: list[int], budget: float) -> int:
    """Largest ``k <= min(out, sum in)`` with ``k (out + sum in) <= budget`` (0 if none)."""
    total = sum(in_features)
    return min(int(budget // (out_features + total)), out_features, total)


@STRUCTURES.register("shared-basis")
class SharedBasis(Method):
    """Whitened basis sharing across adjacent blocks (module docstring)."""

    name = "shared-basis"
    budget = "params"
    Options = SharedBasisOptions

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.blocks_per_unit = self.options.group_size

    def needs(self) -> set[str]:
        return {COV}

    def plan_layer(self, shape: tuple[int, int], target: float) -> dict[str, Any] | None:
        """``{"target": ..., "rank": k}``: ``k`` is the layer's rank if it were alone; :meth:`fit_unit`
        sets the group's rank from the summed targets."""
        m, n = (int(s) for s in shape)
        if target >= m * n:
            return None
        k = shared_rank(m, [n] * self.options.group_size, target * self.options.group_size)
        if k < 1:
            raise ConfigError(f"shared-basis on a {m}x{n} layer: a rank-1 basis shared by {self.options.group_size} "
                              f"layers costs {(m + n * self.options.group_size)} values for the group; "
                              f"{keep_fraction_text(target, m, n)}: use a lower ratio")
        return {"target": float(target), "rank": k}

    def fit(self, W: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats,
            spec: Mapping[str, Any]) -> StructuredLinear:
        """One layer alone: a group of one (the whitened SVD)."""
        return self.fit_unit({"layer": LayerInput(W, bias, stats, spec)})["layer"]

    def fit_unit(self, layers: Mapping[str, LayerInput]) -> dict[str, StructuredLinear]:
        groups: dict[str, list[str]] = {}
        for name in layers:
            groups.setdefault(name.rsplit(".", 1)[-1], []).append(name)
        out: dict[str, StructuredLinear] = {}
        for names in groups.values():
            out.update(self._fit_group(names, layers))
        return {name: out[name] for name in layers}

    def _fit_group(self, names: list[str], layers: Mapping[str, LayerInput]) -> dict[str, StructuredLinear]:
        items = [layers[n] for n in names]
        m = items[0].W.shape[0]
        if any(x.W.shape[0] != m for x in items):
            raise ConfigError(f"shared-basis: layers {names} have different output sizes "
                              f"{[tuple(x.W.shape) for x in items]}; a shared output basis needs equal ones")
        ins = [int(x.W.shape[1]) for x in items]
        budget = sum(float(x.spec["target"]) for x in items)
        k = shared_rank(m, ins, budget)
        if k < 1:
            raise ConfigError(f"shared-basis group {names}: a rank-1 shared basis costs {m + sum(ins)} values, the "
                              f"group's budget is {int(budget)}; use a lower ratio")
        targets = [x.stats.target(x.W).to(torch.float64) for x in items]
        fit = shared_whitened_basis(targets, k, covs=[x.stats.covariance(n) for n, x in zip(names, items)])
        basis = nn.Parameter(fit.basis.to(torch.float32))
        result: dict[str, StructuredLinear] = {}
        for i, (name, x) in enumerate(zip(names, items)):
            layer = SharedBasisLinear(ins[i], m, k, group=names[0], owner=i == 0, bias=x.bias is not None,
                                      basis=basis)
            with torch.no_grad():
                layer.coef.copy_(fit.coefs[i].to(torch.float32))
                if x.bias is not None:
                    layer.bias.copy_(x.bias.to(torch.float32))
            result[name] = layer
        return result
