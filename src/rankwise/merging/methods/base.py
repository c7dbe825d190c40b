"""The interface of a merge method: one tensor at a time, task vectors one at a time.

A method sees, for each tensor of the base ``theta_0``, the task vectors ``tau_t = theta_t - theta_0`` of
the models in the order given (an iterator: a method that needs only a running sum never holds two),
and returns the merged task vector ``tau``; the merged model is ``theta_0 + scale() tau``, where
``scale()`` is asked after every tensor has been merged (1 unless the method rescales globally, as
OPCM does). ``matrix`` says whether the tensor is a linear layer's weight.
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterator

import torch

from ...registry import Registry

MERGE_METHODS: Registry[type["MergeMethod"]] = Registry("merge method", package="rankwise.merging.methods")


class MergeMethod:
    """Base class; subclasses set ``Options`` (a dataclass) and implement :meth:`merge_tensor`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type]
    #: Whether :meth:`scale` can differ from 1 (the merged task vectors are then staged before writing).
    rescales: ClassVar[bool] = False

    def __init__(self, options: Any, n_models: int) -> None:
        self.options = options
        self.n_models = n_models

    def merge_tensor(self, key: str, base: torch.Tensor, taus: Iterator[torch.Tensor], matrix: bool) -> torch.Tensor:
        raise NotImplementedError

    def scale(self) -> float:
        return 1.0
