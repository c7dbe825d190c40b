"""``average``: the mean of the models, ``theta_0 + (1/T) sum_t tau_t`` (= ``(1/T) sum_t theta_t``)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import MERGE_METHODS, MergeMethod


@dataclass
class AverageOptions:
    pass


@MERGE_METHODS.register("average")
class Average(MergeMethod):
    name = "average"
    Options = AverageOptions

    def merge_tensor(self, key, base, taus, matrix):
        total = None
        for t in taus:
            total = t.clone() if total is None else total.add_(t)
        return total / self.n_models
