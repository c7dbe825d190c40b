"""``opcm``: continual merging by orthogonal projection (Tang et al., 2025).

The models arrive one at a time. Per linear weight, the merged sum ``M`` grows as
``M <- M + orthogonal_update(M, tau_t, alpha)`` (the new task vector with its components in the subspace
``M`` already uses removed; :func:`rankwise.linalg.task_vectors.orthogonal_update`); other tensors
add ``tau_t`` as it is. At the end the whole merged task vector is rescaled to the mean task-vector
norm: ``theta = theta_0 + (mean_t ||tau_t|| / ||M||) M`` (norms over all tensors). Memory is constant in
the number of models (per tensor: the base, ``M`` and one task vector); the result depends on the order
only through the projections.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import ConfigError
from ...linalg.task_vectors import orthogonal_update
from .base import MERGE_METHODS, MergeMethod


@dataclass
class OpcmOptions:
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(f"opcm alpha (the energy fraction of the merged subspace kept clear) must be in [0, 1], "
                              f"got {self.alpha}")


@MERGE_METHODS.register("opcm")
class Opcm(MergeMethod):
    name = "opcm"
    Options = OpcmOptions
    rescales = True

    def __init__(self, options, n_models):
        super().__init__(options, n_models)
        self.task_sq = [0.0] * n_models
        self.merged_sq = 0.0

    def merge_tensor(self, key, base, taus, matrix):
        merged = None
        for i, t in enumerate(taus):
            self.task_sq[i] += float(t.double().pow(2).sum())
            if merged is None:
                merged = t.clone()
            elif matrix and t.ndim == 2:
                merged += orthogonal_update(merged, t, float(self.options.alpha))
            else:
                merged += t
        self.merged_sq += float(merged.double().pow(2).sum())
        return merged

    def scale(self) -> float:
        if self.merged_sq <= 0.0:
            return 1.0
        mean_norm = sum(math.sqrt(s) for s in self.task_sq) / len(self.task_sq)
        return mean_norm / math.sqrt(self.merged_sq)
