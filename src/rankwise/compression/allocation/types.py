"""What an allocator gets and returns.

An allocator shares one global budget out among the targeted layers. A *params* allocator turns
``ratio`` (fraction of the targeted weight parameters to remove) into ``{name: rank or None}``
(``None`` keeps the layer dense); a *bytes* allocator turns ``bits_per_weight`` (stored bits per
targeted weight, all overhead counted) into ``{name: spec}`` (the structure's hyperparameters).

What an allocator reads per layer is measured once on the dense model by a dry pass, as its
``needs`` says: ``"spectra"`` -- every layer's factorization under the method's objective, spectrum
only (``request.factorizations``); ``"factors"`` -- the same with the singular vectors kept (the
allocators that measure the loss of truncated layers); ``"costs"`` -- every layer's candidate settings with their exact bytes
and whitened errors (``request.costs``, from the method's ``candidates``); ``"none"`` -- nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

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
    bits: list[int] | None = None      # bits-greedy: candidate code widths (None: 2, 3, 4, 8, or the fixed bits)
    group_sizes: list[int] | None = None  # bits-greedy: candidate group sizes (None: 32, 64, 128, or the fixed one)
    measure: str = "estimate"          # bits-greedy: GPTQ candidate errors "estimate"d (3 fits a layer) or "exact"
    dense: bool = True                 # bits-greedy: keeping a layer dense is a candidate (not with a fixed --bits)
    validate: bool = True              # bits-greedy: keep the plan only if it beats uniform on held-out windows
    objective: str = "auto"            # bits-greedy: "relative" (summed relative whitened errors), "loss" (each
                                       # layer's error weighted by its output-gradient energy, HAWQ-style), or
                                       # "auto": both plans validated against uniform (relative without validation)


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
    output_energy: dict[str, float] | None = None  # {layer: tr(G)/m of its output gradients} (objective "loss")
    weights: dict[str, float] | None = None        # {layer: w_l} the byte allocator weights its errors by


@dataclass
class AllocationRequest:
    """Everything an allocator may use; what it decided beyond the plan goes into ``info``.

    The budget is ``ratio`` (params allocators) or ``bits_per_weight`` (bytes allocators)."""

    ratio: float | None
    shapes: Mapping[str, tuple[int, int]]
    factorizations: Mapping[str, Any] = field(default_factory=dict)
    options: AllocateOptions = field(default_factory=AllocateOptions)
    context: AllocationContext = field(default_factory=AllocationContext)
    info: dict[str, Any] = field(default_factory=dict)
    bits_per_weight: float | None = None
    costs: Mapping[str, Sequence[Any]] = field(default_factory=dict)  # {name: [Candidate]} (needs="costs")
    dense_bytes: Mapping[str, int] | None = None  # {name: bytes of the layer kept dense}: a candidate when given
    weights: Mapping[str, float] | None = None    # {name: w_l}: bits-greedy minimizes sum_l w_l e_l (objective "loss")

    def spectra(self):
        """``{name: singular values}`` (float64 numpy, descending) of every targeted layer."""
        return {n: self.factorizations[n].spectrum.double().cpu().numpy() for n in self.shapes}


#: What a dry pass can measure per layer for an allocator: nothing, each layer's spectrum, its full
#: factorization (spectrum and singular vectors: the allocators that truncate layers to measure the
#: loss), or its candidate settings with bytes and errors.
NEEDS = ("none", "spectra", "factors", "costs")
#: The budgets an allocator can share out: ``--ratio`` (values) or ``--bits-per-weight`` (bytes).
BUDGETS = ("params", "bytes")


@dataclass(frozen=True)
class Allocator:
    name: str
    fn: Callable[[AllocationRequest], dict] = field(repr=False)
    needs: str = "none"        # one of NEEDS
    budget: str = "params"     # one of BUDGETS
    description: str = ""
    whole_model: bool = False  # measures the LM loss of the whole model (no --low-memory)

    @property
    def needs_spectra(self) -> bool:
        return self.needs in ("spectra", "factors")


#: name -> Allocator; filled by :mod:`.allocators`.
ALLOCATORS: Registry[Allocator] = Registry("allocator", package="rankwise.compression.allocation")


def register(name: str, needs: str = "none", description: str = "", budget: str = "params",
             whole_model: bool = False):
    """Decorator: register ``fn(request) -> plan`` as allocator ``name`` (``needs`` in :data:`NEEDS`,
    ``budget`` in :data:`BUDGETS`; ``whole_model``: it evaluates the whole model, so a run that holds
    one block at a time cannot use it)."""
    if needs not in NEEDS or budget not in BUDGETS:
        raise ValueError(f"allocator {name}: needs must be one of {NEEDS} and budget one of {BUDGETS}")

    def deco(fn):
        ALLOCATORS.register(name, Allocator(name, fn, needs, budget,
                                            description or (fn.__doc__ or "").split("\n")[0], whole_model))
        return fn
    return deco


def get_allocator(name: str) -> Allocator:
    return ALLOCATORS.get(name)
