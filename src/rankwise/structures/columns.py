"""A layer that reads only some of its inputs: ``y = W'_K x_K + b`` (input channels pruned).

``W' = [W'_K placed at the columns K, zeros elsewhere]``: ``weight (out, k)`` and the kept column
indices ``index (k,)`` (ascending, int64). Width pruning fits it to the layer that reads pruned heads
or channels (``o_proj`` after heads, ``down_proj`` after FFN channels) before the model surgery
shrinks the layers that write them; it is also a valid saved structure on its own (the unread inputs
cost nothing).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from .base import LAYERS, StructuredLinear


@LAYERS.register("columns")
class ColumnSubsetLinear(StructuredLinear):
    """``y = W'_K x[..., K] + bias`` (see module doc)."""

    kind = "columns"
    fixed_dtype_keys: ClassVar[tuple[str, ...]] = ("index",)

    def __init__(self, in_features: int, out_features: int, kept: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features)
        if not 1 <= kept <= in_features:
            raise ConfigError(f"a column subset keeps 1 to {in_features} inputs, got {kept}")
        self.weight_k = nn.Parameter(torch.zeros(out_features, kept, dtype=dtype, device=device))
        self.register_buffer("index", torch.arange(kept, dtype=torch.int64, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_weight(cls, W_K: torch.Tensor, index: torch.Tensor, in_features: int,
                    bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> "ColumnSubsetLinear":
        """The layer with kept columns ``index`` (ascending) holding ``W_K`` (out, k)."""
        index = torch.as_tensor(index, dtype=torch.int64).flatten()
        if W_K.ndim != 2 or W_K.shape[1] != index.numel():
            raise ConfigError(f"W_K must be (out, {index.numel()}), got {tuple(W_K.shape)}")
        if index.numel() and (bool((index[1:] <= index[:-1]).any()) or int(index.min()) < 0
                              or int(index.max()) >= in_features):
            raise ConfigError(f"kept columns must be ascending indices < {in_features}")
        dtype = dtype or W_K.dtype
        layer = cls(in_features, W_K.shape[0], index.numel(), bias=bias is not None, dtype=dtype, device=W_K.device)
        with torch.no_grad():
            layer.weight_k.copy_(W_K.to(dtype))
            layer.index.copy_(index.to(W_K.device))
            if bias is not None:
                layer.bias.copy_(bias.to(dtype))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.index_select(-1, self.index), self.weight_k, self.bias)

    def dense(self) -> torch.Tensor:
        W = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self.weight_k.device)
        W[:, self.index] = self.weight_k.detach().float()
        return W

    def spec(self) -> dict[str, Any]:
        return {"kept": int(self.index.numel())}

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any],
                  dtype: torch.dtype | None = None, device: torch.device | str | None = "meta"
                  ) -> "ColumnSubsetLinear":
        return cls(in_features, out_features, int(spec["kept"]), bias=bias, dtype=dtype, device=device)

    def num_stored(self) -> int:
        return self.weight_k.numel()
