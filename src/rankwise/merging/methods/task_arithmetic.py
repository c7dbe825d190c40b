"""``task-arithmetic`` (Ilharco et al., 2023): ``theta_0 + lambda sum_t tau_t``.

``scale`` (lambda) defaults to 0.3, the value the task-arithmetic paper found best for merging several
tasks on held-out data; ``scale = 1/T`` is averaging."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from .base import MERGE_METHODS, MergeMethod


@dataclass
class TaskArithmeticOptions:
    scale: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 < float(self.scale) <= 10.0:
            raise ConfigError(f"task-arithmetic scale must be in (0, 10], got {self.scale}")


@MERGE_METHODS.register("task-arithmetic")
class TaskArithmetic(MergeMethod):
    name = "task-arithmetic"
    Options = TaskArithmeticOptions

    def merge_tensor(self, key, base, taus, matrix):
        total = None
        for t in taus:
            total = t.clone() if total is None else total.add_(t)
        return total * float(self.options.scale)
