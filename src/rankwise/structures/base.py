"""The base of every structured layer, and the registry that save/load uses to rebuild them.

A structured layer computes ``y = W' x + b`` with ``W'`` (out, in) stored in a compact form (two
factors, packed integers plus scales, sparse values plus indices, block-diagonal factors, ...).
Every subclass:

* sets ``kind`` and registers itself: ``@LAYERS.register("lowrank")``;
* holds all its data as parameters or buffers (so ``state_dict`` is the whole storage, written to
  safetensors; integer codes live in integer buffers);
* implements ``forward`` (never through ``dense()`` when the compact form is cheaper), ``dense()``
  (the (out, in) matrix in float32) and ``spec()`` / ``from_spec`` (the JSON-able hyperparameters
  that fix every tensor's shape and dtype, so a saved layer is rebuilt empty and filled strictly).

The base gives ``weight`` (read-only dense view), ``num_stored`` (stored weight values, the unit of a
parameter budget), ``nbytes`` (bytes of everything stored, all overhead counted: the unit of a byte
budget) and ``to_linear``.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..registry import Registry

#: kind -> StructuredLinear subclass; filled by the modules of :mod:`rankwise.structures`.
LAYERS: Registry[type["StructuredLinear"]] = Registry("structure layer", package="rankwise.structures")


class StructuredLinear(nn.Module):
    """``y = W' x + bias`` with ``W'`` (out_features, in_features) stored in a structured form."""

    kind: ClassVar[str] = ""
    #: State-dict keys (relative to the layer) stored in a fixed dtype that loading never casts.
    fixed_dtype_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)

    # -- to implement -------------------------------------------------------------------------
    def dense(self) -> torch.Tensor:
        """The (out, in) matrix ``W'`` as a new float32 tensor (bias excluded)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """JSON-able hyperparameters that, with the shape and bias flag, fix every stored tensor."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any],
                  dtype: torch.dtype | None = None, device: torch.device | str | None = "meta"
                  ) -> "StructuredLinear":
        """An empty layer (on ``device``, ``meta`` by default) whose state dict has the saved shapes."""
        raise NotImplementedError

    def num_stored(self) -> int:
        """Stored weight values: the unit of a parameter budget (bias excluded; indices and
        quantization scales are overhead, counted in :meth:`nbytes` only)."""
        raise NotImplementedError

    def factor_dims(self) -> dict[str, Any]:
        """For training from scratch: each trainable factor (a parameter name, relative to the layer) as
        the dense map it is, ``(d_in, d_out)`` or ``(d_in, d_out, gain)`` (a gain < 1 for each of the
        parts a layer sums), which sets its structure-aware init and learning rate
        (:mod:`rankwise.training.structured`). A layer without trainable factors returns ``{}``."""
        return {}

    # -- provided -----------------------------------------------------------------------------
    @property
    def has_bias(self) -> bool:
        return getattr(self, "bias", None) is not None

    def nbytes(self, include_bias: bool = False) -> int:
        """Bytes of every stored tensor (parameters and buffers), all overhead counted; the bias only
        with ``include_bias`` (a dense layer keeps it too)."""
        bias = getattr(self, "bias", None)
        total = 0
        for t in self.state_dict(keep_vars=True).values():
            if t is None or (bias is not None and t is bias and not include_bias):
                continue
            total += t.numel() * t.element_size()
        return total

    @property
    def weight(self) -> torch.Tensor:
        """Read-only dense weight (out, in), computed on access (for code that inspects ``.weight``)."""
        with torch.no_grad():
            return self.dense()

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with weight ``dense()`` and the same bias."""
        bias = getattr(self, "bias", None)
        dtype = bias.dtype if bias is not None else self.compute_dtype()
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, dtype=dtype,
                        device=self.device())
        with torch.no_grad():
            lin.weight.copy_(self.dense())
            if bias is not None:
                lin.bias.copy_(bias)
        return lin

    def compute_dtype(self) -> torch.dtype:
        """The floating dtype the layer computes in: its first floating tensor's, storage kept in a fixed
        dtype (``fixed_dtype_keys``, e.g. float16 quantization scales) aside; float32 if none."""
        fixed = set(self.fixed_dtype_keys)
        for k, t in self.state_dict().items():
            if t.is_floating_point() and k not in fixed:
                return t.dtype
        return torch.float32

    def device(self) -> torch.device:
        for t in self.state_dict().values():
            return t.device
        return torch.device("cpu")

    def cast_(self, dtype: torch.dtype, memo: dict | None = None) -> "StructuredLinear":
        """Cast floating parameters and buffers to ``dtype`` in place, except ``fixed_dtype_keys``.

        ``memo`` (``{id(old tensor): new tensor}``) keeps tensors shared between layers shared."""
        fixed = set(self.fixed_dtype_keys)
        memo = {} if memo is None else memo
        for mod_name, mod in self.named_modules():
            for kind in ("_parameters", "_buffers"):
                store = getattr(mod, kind)
                for key, t in list(store.items()):
                    full = f"{mod_name}.{key}" if mod_name else key
                    if t is None or not t.is_floating_point() or full in fixed or t.dtype == dtype:
                        continue
                    if id(t) not in memo:
                        memo[id(t)] = (torch.nn.Parameter(t.detach().to(dtype), requires_grad=t.requires_grad)
                                       if kind == "_parameters" else t.to(dtype))
                    store[key] = memo[id(t)]
        return self

    def describe(self) -> dict[str, Any]:
        """What the save format records per layer: kind, shape, bias, spec."""
        return {"kind": self.kind, "shape": [self.out_features, self.in_features], "bias": self.has_bias,
                "spec": self.spec()}


def build_layer(desc: dict[str, Any], dtype: torch.dtype | None = None,
                device: torch.device | str | None = "meta") -> StructuredLinear:
    """The empty layer described by :meth:`StructuredLinear.describe` (for loading)."""
    cls = LAYERS.get(desc["kind"])
    out_f, in_f = (int(x) for x in desc["shape"])
    return cls.from_spec(in_f, out_f, bool(desc.get("bias", False)), dict(desc.get("spec") or {}), dtype=dtype,
                         device=device)
