"""The compression report: what was replaced, by which structure, and what it cost (values and bytes)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]            # (out, in)
    kind: str | None                  # structure layer kind ("lowrank", ...); None: kept dense
    spec: dict[str, Any] | None       # the structure's hyperparameters (rank, bits, ...)
    params_before: int                # stored weight values
    params_after: int
    bytes_before: int                 # bytes of the weight as stored (all overhead counted after)
    bytes_after: int
    damping: float = 0.0              # ridge added to the covariance's diagonal (whitening), absolute
    ridge: float | None = None        # the sequential refit's relative ridge (inf: no cross moment)
    note: str | None = None           # a per-layer fallback the structure took (e.g. 1 block on a prime side)

    @property
    def rank(self) -> int | None:
        return None if self.spec is None else self.spec.get("rank")


@dataclass
class CompressionReport:
    structure: str
    method: str                        # the structure's objective / variant label
    budget: dict[str, Any]             # {"ratio": R} or {"bits_per_weight": B}
    allocate: str
    mode: str                          # "sequential" | "one-shot"
    granularity: str
    refit: bool
    calibration: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    seconds: float = 0.0
    perplexity: dict[str, Any] | None = None
    allocation: dict[str, Any] | None = None  # allocator decisions: speed caps, dense reasons, tables
    config: dict[str, Any] | None = None      # the full configuration (options of every part)
    healing: dict[str, Any] | None = None     # healing steps after compression (options, losses)
    model_transform: dict[str, Any] | None = None  # a model-level transform before fitting (stream rotation)

    @property
    def ratio(self) -> float | None:
        return self.budget.get("ratio")

    @property
    def ranks(self) -> dict[str, int | None]:
        return {lr.name: lr.rank for lr in self.layers}

    @property
    def targeted_params_before(self) -> int:
        return sum(lr.params_before for lr in self.layers)

    @property
    def targeted_params_after(self) -> int:
        return sum(lr.params_after for lr in self.layers)

    @property
    def targeted_bytes_before(self) -> int:
        return sum(lr.bytes_before for lr in self.layers)

    @property
    def targeted_bytes_after(self) -> int:
        return sum(lr.bytes_after for lr in self.layers)

    @property
    def achieved_ratio(self) -> float:
        """Fraction of the targeted weight values actually removed."""
        b = self.targeted_params_before
        return 0.0 if b == 0 else 1.0 - self.targeted_params_after / b

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per targeted weight, all overhead counted."""
        b = self.targeted_params_before
        return 0.0 if b == 0 else 8.0 * self.targeted_bytes_after / b

    @property
    def damped_layers(self) -> list[str]:
        return [lr.name for lr in self.layers if lr.damping > 0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(achieved_ratio=self.achieved_ratio, bits_per_weight=self.bits_per_weight,
                 targeted_params_before=self.targeted_params_before,
                 targeted_params_after=self.targeted_params_after,
                 targeted_bytes_before=self.targeted_bytes_before, targeted_bytes_after=self.targeted_bytes_after)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompressionReport":
        d = dict(d)
        layers = [LayerReport(**{**lr, "shape": tuple(lr["shape"])}) for lr in d.pop("layers", [])]
        return cls(layers=layers, **{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
