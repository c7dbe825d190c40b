"""What an allocator gets and returns.

An allocator turns the global budget (``ratio`` = fraction of the targeted weight parameters to
remove) into a per-layer plan ``{name: rank or None}`` (``None`` keeps the layer dense). Allocators
that set ``needs_spectra`` get every targeted layer's full factorization under the method's
objective (``factorizations``), computed once on the dense model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ...registry import Registry

#: ``{layer_name: rank}``; ``None`` keeps the layer dense.
RankPlan = dict[str, "int | None"]


@dataclass
class AllocateOptions:
    """The allocators' options (serialized into ``rankwise.json``)."""

    min_rank: int = 1                  # smallest rank a factorized layer may keep
    speed_aware: bool = False          # keep layers dense whose factorized form is not faster (measured)
    speed_profile: str | None = None   # speed profile JSON instead of the machine cache
    band: float = 0.5                  # spectrum-band / sensitivity-band: ranks within +-band of uniform
    sensitivity_windows: int = 2       # calibration windows per measured loss
    sensitivity_seqlen: int = 256      # tokens per window of a measured loss
    sensitivity_points: int = 3        # candidate ranks measured per layer (sensitivity)


@dataclass
class AllocationContext:
    """Run-time inputs of the measuring allocators (not serialized).

    ``layer_loss(name, k)`` with ``base_loss`` replaces the loss measurement (tests, benchmarks);
    ``sensitivity_cache`` memoizes measured losses across runs on the same model and windows.
    """

    model: torch.nn.Module | None = None
    windows: torch.Tensor | None = None
    progress: bool = False
    layer_loss: Callable[[str, int], float] | None = None
    base_loss: float | None = None
    sensitivity_cache: dict | None = None


@dataclass
class AllocationRequest:
    """Everything an allocator may use; what it decided beyond the ranks goes into ``info``."""

    ratio: float
    shapes: Mapping[str, tuple[int, int]]
    factorizations: Mapping[str, Any] = field(default_factory=dict)
    options: AllocateOptions = field(default_factory=AllocateOptions)
    context: AllocationContext = field(default_factory=AllocationContext)
    info: dict[str, Any] = field(default_factory=dict)

    def spectra(self):
        """``{name: singular values}`` (float64 numpy, descending) of every targeted layer."""
        return {n: self.factorizations[n].spectrum.double().cpu().numpy() for n in self.shapes}


@dataclass(frozen=True)
class Allocator:
    name: str
    fn: Callable[[AllocationRequest], RankPlan] = field(repr=False)
    needs_spectra: bool = False
    description: str = ""


#: name -> Allocator; filled by :mod:`.allocators`.
ALLOCATORS: Registry[Allocator] = Registry("allocator", package="rankwise.compression.allocation")


def register(name: str, needs_spectra: bool = False, description: str = ""):
    """Decorator: register ``fn(request) -> plan`` as allocator ``name``."""
    def deco(fn):
        ALLOCATORS.register(name, Allocator(name, fn, needs_spectra, description or (fn.__doc__ or "").split("\n")[0]))
        return fn
    return deco


def get_allocator(name: str) -> Allocator:
    return ALLOCATORS.get(name)
