"""The compression report: what was factorized, at which ranks, and what it cost."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]            # (out, in)
    rank: int | None                  # None: kept dense
    params_before: int                # weight parameters
    params_after: int
    damping: float = 0.0              # ridge added to the covariance's diagonal (whitening), absolute


@dataclass
class CompressionReport:
    method: str
    ratio: float
    refit: bool
    allocate: str
    mode: str                          # "sequential" | "one-shot"
    calibration: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    targeted_params_before: int = 0
    targeted_params_after: int = 0
    model_params_before: int = 0
    model_params_after: int = 0
    seconds: float = 0.0
    perplexity: dict[str, Any] | None = None
    allocation: dict[str, Any] | None = None  # allocator decisions: speed caps, dense reasons, tables

    @property
    def ranks(self) -> dict[str, int | None]:
        return {lr.name: lr.rank for lr in self.layers}

    @property
    def achieved_ratio(self) -> float:
        """Fraction of the targeted weight parameters actually removed."""
        b = self.targeted_params_before
        return 0.0 if b == 0 else 1.0 - self.targeted_params_after / b

    @property
    def damped_layers(self) -> list[str]:
        return [lr.name for lr in self.layers if lr.damping > 0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["achieved_ratio"] = self.achieved_ratio
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompressionReport":
        d = dict(d)
        d.pop("achieved_ratio", None)
        layers = [LayerReport(**{**lr, "shape": tuple(lr["shape"])}) for lr in d.pop("layers", [])]
        return cls(layers=layers, **{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
