"""Shared-basis layer ``y = B (K x) + b``: the basis ``B (out, k)`` is one ``nn.Parameter`` shared by
every layer of a group (:mod:`rankwise.linalg.shared_basis`), ``K (k, in)`` is the layer's own.

Spec: ``rank`` (k), ``group`` (an id shared by the group's layers: the first layer's name) and
``owner`` (True for exactly one layer of the group). The owner counts the basis in ``num_stored`` /
``nbytes``, the others do not, so per-layer counts add up to what is stored once. Every layer's
state dict still holds ``basis`` (the same tensor): a saver that deduplicates shared tensors stores it
once, and a loader rebuilds the layers, calls :func:`tie_shared_bases` on them, then loads.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..errors import ConfigError
from .base import LAYERS, StructuredLinear


@LAYERS.register("shared-basis")
class SharedBasisLinear(StructuredLinear):
    """``y = basis @ (coef @ x) + bias``; keys ``basis (out, k)`` (shared), ``coef (k, in)``, ``bias``."""

    kind = "shared-basis"

    def __init__(self, in_features: int, out_features: int, rank: int, group: str = "", owner: bool = True,
                 bias: bool = True, basis: nn.Parameter | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features)
        if rank < 1:
            raise ConfigError(f"SharedBasisLinear rank must be >= 1, got {rank}")
        if basis is None:
            basis = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        elif tuple(basis.shape) != (out_features, rank):
            raise ConfigError(f"shared basis must be ({out_features}, {rank}), got {tuple(basis.shape)}")
        self.basis = basis
        self.coef = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype or basis.dtype, device=basis.device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or basis.dtype, device=basis.device)) \
            if bias else None
        self.group, self.owner = str(group), bool(owner)

    @property
    def rank(self) -> int:
        return self.coef.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.coef.T) @ self.basis.T
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        return (self.basis @ self.coef).to(torch.float32)

    def num_stored(self) -> int:
        """``k in`` coefficients, plus ``out k`` basis values for the group's owner only."""
        return self.coef.numel() + (self.basis.numel() if self.owner else 0)

    def nbytes(self, include_bias: bool = False) -> int:
        """As the base class, with the shared basis counted by the owner only."""
        total = super().nbytes(include_bias)
        return total if self.owner else total - self.basis.numel() * self.basis.element_size()

    def spec(self) -> dict[str, Any]:
        return {"rank": self.rank, "group": self.group, "owner": self.owner}

    @classmethod
    def from_spec(cls, in_features, out_features, bias, spec, dtype=None, device="meta") -> "SharedBasisLinear":
        return cls(in_features, out_features, int(spec["rank"]), str(spec.get("group", "")),
                   bool(spec.get("owner", True)), bias=bias, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"group={self.group!r}, owner={self.owner}, bias={self.bias is not None}")


def tie_shared_bases(layers: Iterable[nn.Module]) -> int:
    """Make the shared-basis layers of each ``group`` hold their owner's ``basis`` Parameter (for loading:
    call after rebuilding the layers, before ``load_state_dict``). Returns the number of layers re-tied;
    a group without exactly one owner raises :class:`ConfigError`."""
    groups: dict[str, list[SharedBasisLinear]] = {}
    for layer in layers:
        if isinstance(layer, SharedBasisLinear):
            groups.setdefault(layer.group, []).append(layer)
    tied = 0
    for group, members in groups.items():
        owners = [m for m in members if m.owner]
        if len(owners) != 1:
            raise ConfigError(f"shared-basis group {group!r} has {len(owners)} owners, needs exactly 1; "
                              "the saved specs are inconsistent")
        for m in members:
            if m is not owners[0] and m.basis is not owners[0].basis:
                if m.basis.shape != owners[0].basis.shape:
                    raise ConfigError(f"shared-basis group {group!r}: basis shapes differ "
                                      f"({tuple(m.basis.shape)} vs {tuple(owners[0].basis.shape)})")
                m.basis = owners[0].basis
                tied += 1
    return tied
