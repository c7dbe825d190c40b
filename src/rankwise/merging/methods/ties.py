"""``ties`` (Yadav et al., 2023): trim, elect sign, disjoint mean (:func:`rankwise.linalg.task_vectors.ties`),
then ``theta_0 + lambda tau``. Trimming keeps each task vector's ``density`` largest-magnitude entries
per tensor (mergekit's convention; the paper trims the whole flattened vector)."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ...linalg.task_vectors import ties
from .base import MERGE_METHODS, MergeMethod


@dataclass
class TiesOptions:
    density: float = 0.2
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < float(self.density) <= 1.0:
            raise ConfigError(f"ties density must be in (0, 1], got {self.density}")
        if not 0.0 < float(self.scale) <= 10.0:
            raise ConfigError(f"ties scale must be in (0, 10], got {self.scale}")


@MERGE_METHODS.register("ties")
class Ties(MergeMethod):
    name = "ties"
    Options = TiesOptions

    def merge_tensor(self, key, base, taus, matrix):
        return ties(list(taus), float(self.options.density)) * float(self.options.scale)
