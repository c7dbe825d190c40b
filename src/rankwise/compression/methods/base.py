"""What a compression method is, and the registry of them (``--structure NAME``).

A method turns one dense layer ``y = W x + b`` (``W`` (out, in)) into a :class:`StructuredLinear`
under a per-layer budget, fitted to the calibration statistics the engine gathered for that layer.
The engine (:mod:`rankwise.compression.engine`) owns everything else: walking the model, calibration
(sequential or one-shot, block or sub-group), the global budget, replacement, the report.

Adding a method is one file in this package::

    @STRUCTURES.register("my-structure")
    class MyStructure(Method):
        budget = "params"                     # "params" (--ratio) or "bytes" (--bits-per-weight)
        Options = MyOptions                   # a dataclass; its fields are the method's options

        def needs(self): return {COV}         # statistics: COV, ABS_MEAN, FISHER
        def plan_layer(self, shape, target): return {"rank": ...}   # spec meeting the layer's budget
        def fit(self, W, bias, stats, spec): return MyLayer(...)     # the fitted layer

and one test. Optional: ``factorize(W, stats)`` (a full factorization: the rank allocators read its
spectrum), ``candidates(W, stats, grid)`` (every setting of a :class:`CandidateGrid` the layer could
take, each a :class:`Candidate` with its spec, exact bytes and whitened error: the byte allocators
choose among them) and ``uniform_plan(shapes, bits_per_weight, grid)`` (one setting for every layer
within the byte budget: ``--allocate uniform`` and the baseline a byte allocation is validated against). The budget of a layer (``target``) is a number of stored weight values (``budget =
"params"``: ``(1 - ratio) * out * in`` under the uniform allocator) or of bytes (``budget =
"bytes"``: ``bits_per_weight * out * in / 8``). ``plan_layer`` returns the layer's hyperparameters
(its ``spec``, JSON-able) or ``None`` to keep the layer dense; it raises :class:`ConfigError` naming
the binding constraint when no setting fits. ``fit`` gets ``W`` in float32 (on the compute device),
the bias (or ``None``), the layer's :class:`LayerStats` and the spec, and returns the new layer in
float32; the engine casts it to the model's dtype.

Sequential calibration with a refit records the cross moment ``M = X X'^T`` between the dense
model's inputs ``X`` and the compressed prefix's inputs ``X'``; :meth:`LayerStats.target` then gives
the corrected target ``W M C'^-1`` whose fit under ``C'`` minimizes ``||W X - W' X'||``: a method
that fits ``stats.target(W)`` under ``stats.covariance()`` gets the refit for free.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from ...calibration.stats import ABS_MEAN, COV, FISHER, LayerStats
from ...errors import ConfigError
from ...options import make_options
from ...registry import Registry
from ...structures.base import StructuredLinear

#: name -> Method subclass; filled by the modules of this package.
STRUCTURES: Registry[type["Method"]] = Registry("structure", package="rankwise.compression.methods")


@dataclass
class LayerInput:
    """One layer handed to :meth:`Method.fit_unit`: float32 weight (out, in), bias, statistics, spec."""

    W: torch.Tensor
    bias: torch.Tensor | None
    stats: LayerStats
    spec: Mapping[str, Any]


@dataclass(frozen=True)
class Candidate:
    """One setting a layer could take under a byte budget: its ``spec``, the bytes the layer would
    store (``nbytes``, all overhead counted) and its ``cost``, the relative whitened error
    ``tr((W - W') C (W - W')^T) / tr(W C W^T)`` of the fit with that spec (``C`` the input covariance);
    ``exact``: the cost is that of the very fit (else an estimate, see :mod:`.candidates`)."""

    spec: Mapping[str, Any] = field(compare=False)
    nbytes: int
    cost: float
    exact: bool = field(default=True, compare=False)


#: Code widths and group sizes a byte allocator chooses among when ``--bits`` / ``--group-size`` are not fixed.
DEFAULT_WIDTHS = (2, 3, 4, 8)
DEFAULT_GROUP_SIZES = (32, 64, 128)
#: How candidate errors are measured: every candidate fitted, or the cheap estimate of :mod:`.candidates`.
MEASURES = ("estimate", "exact")


@dataclass(frozen=True)
class CandidateGrid:
    """The settings a byte allocator may choose among, beyond what the method's options fix: code
    ``widths`` (None: :data:`DEFAULT_WIDTHS`), ``group_sizes`` (None: :data:`DEFAULT_GROUP_SIZES`) and how the errors
    are measured (``measure`` in :data:`MEASURES`)."""

    widths: tuple[int, ...] | None = None
    group_sizes: tuple[int, ...] | None = None
    measure: str = "estimate"

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise ConfigError(f"unknown candidate measurement {self.measure!r}; valid: {', '.join(MEASURES)}")


@dataclass
class NoOptions:
    """A method without options."""


class Method:
    """Base class of a compression method; see the module docstring."""

    name: ClassVar[str] = ""
    budget: ClassVar[str] = "params"
    Options: ClassVar[type] = NoOptions
    #: Layers fitted jointly: consecutive blocks per unit (shared-basis methods set this > 1).
    blocks_per_unit: int = 1

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        self.options = make_options(self.Options, options, kwargs, self.name)

    # -- to implement -------------------------------------------------------------------------
    def needs(self) -> set[str]:
        """Statistics the fit reads: a subset of {COV, ABS_MEAN, FISHER}."""
        return set()

    def engine_defaults(self) -> dict[str, Any]:
        """The engine's ``granularity`` / ``refit`` in sequential mode when the user gives none: the
        setting measured best for this method (BENCHMARKS.md); block granularity without refit unless
        a method overrides this."""
        return {}

    def plan_layer(self, shape: tuple[int, int], target: float) -> dict[str, Any] | None:
        """The spec of an (out, in) layer within ``target`` (values or bytes); ``None`` = keep dense."""
        raise NotImplementedError

    def fit(self, W: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats,
            spec: Mapping[str, Any]) -> StructuredLinear:
        raise NotImplementedError

    def prepare_model(self, model: torch.nn.Module) -> dict[str, Any] | None:
        """A function-preserving model-level transform applied in place before calibration (e.g. the
        quantizers' rotation of the residual stream, ``rotate="stream"``); returns what it did for the
        report, or None."""
        if getattr(self.options, "rotate", None) != "stream":
            return None
        from ...models.stream import fold_and_rotate

        return {"rotation": "stream", **fold_and_rotate(model, seed=int(getattr(self.options, "seed", 0))).to_dict()}

    def fit_unit(self, layers: Mapping[str, LayerInput]) -> dict[str, StructuredLinear]:
        """Fit every planned layer of one unit (``blocks_per_unit`` consecutive blocks, in model order).

        The default fits each layer alone; a method that shares tensors across layers (a basis
        shared by the same-type layers of adjacent blocks) overrides this. Shared tensors must be
        the very same ``nn.Parameter`` objects in every layer: saving stores them once.
        """
        return {name: self.fit(x.W, x.bias, x.stats, x.spec) for name, x in layers.items()}

    # -- provided -----------------------------------------------------------------------------
    def dense_cost(self, shape: tuple[int, int], bytes_per_value: int = 4) -> float:
        """What keeping the layer dense costs in this method's budget unit."""
        m, n = shape
        return float(m * n) if self.budget == "params" else float(m * n * bytes_per_value)

    def describe(self) -> dict[str, Any]:
        return {"structure": self.name, "budget": self.budget, "options": dataclasses.asdict(self.options)}


def get_method(name: str, options: Any = None, **kwargs: Any) -> Method:
    """An instance of the registered method ``name`` with its options."""
    return STRUCTURES.get(name)(options, **kwargs)


__all__ = ["ABS_MEAN", "COV", "DEFAULT_GROUP_SIZES", "DEFAULT_WIDTHS", "FISHER", "Candidate", "CandidateGrid", "LayerInput", "LayerStats", "Method", "NoOptions", "STRUCTURES", "get_method",
           "make_options"]
