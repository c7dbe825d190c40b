"""Prepare a loaded model for inference and say how every linear layer runs.

:func:`prepare_inference` walks the model once: every structured layer with a runtime form
(:mod:`rankwise.structures.kernels`: packed int4/int8 kernels, de-quantized caches, sparse layers
merged to dense) builds it now, for the model's dtype, instead of at its first forward; every other
linear layer is reported as it runs. It returns one :class:`LayerRuntime` row per layer (kernel
path, stored bytes, the extra bytes the runtime form holds), which :func:`runtime_table` prints and
:func:`runtime_summary` totals; ``rankwise generate``, evaluations and the demo can print them.

Paths: ``int4-cpu``, ``int8-cpu``, ``int4-cuda``, ``dense-cache``, ``merged-dense``,
``sparse-native`` (see :mod:`rankwise.structures.kernels`), ``native`` (a structured layer that
runs its stored form: low rank, Monarch, ...) and ``dense`` (a plain ``nn.Linear``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..structures.base import StructuredLinear
from .surgery import is_linear


@dataclass
class LayerRuntime:
    """How one linear layer runs: ``path``, ``stored_bytes`` (weights as stored, bias excluded) and
    ``runtime_bytes`` (memory its runtime form holds besides them); ``note`` says why."""

    name: str
    kind: str
    shape: tuple[int, int]
    path: str
    stored_bytes: int
    runtime_bytes: int
    note: str = ""

    def to_json(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its input embeddings', else its first floating parameter's."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.is_floating_point():
        return emb.weight.dtype
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _row(name: str, mod: nn.Module, dtype: torch.dtype) -> LayerRuntime:
    if isinstance(mod, StructuredLinear):
        shape = (mod.out_features, mod.in_features)
        prepare = getattr(mod, "prepare", None)
        info = prepare(dtype) if callable(prepare) else {"path": "native", "runtime_bytes": 0, "note": ""}
        return LayerRuntime(name, mod.kind, shape, info["path"], mod.nbytes(), int(info["runtime_bytes"]),
                            info.get("note", ""))
    w = mod.weight
    shape = (int(w.shape[0]), int(w.shape[1]))
    return LayerRuntime(name, "linear", shape, "dense", w.numel() * w.element_size(), 0)


def prepare_inference(model: nn.Module, dtype: torch.dtype | None = None) -> list[LayerRuntime]:
    """Build every structured layer's runtime form for inputs of ``dtype`` (default :func:`model_dtype`)
    and return one row per linear layer (structured or ``nn.Linear``), in model order.

    Safe to call again (forms already built are kept); forms rebuild by themselves when weights
    change, so nothing has to be called after ``load_state_dict`` or ``.to(device)``."""
    dtype = dtype or model_dtype(model)
    rows: list[LayerRuntime] = []
    inside: list[str] = []  # structured layers: their own sub-modules are not rows
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(mod, StructuredLinear):
            inside.append(name)
            rows.append(_row(name, mod, dtype))
        elif is_linear(mod) and getattr(mod, "weight", None) is not None:
            rows.append(_row(name, mod, dtype))
    return rows


def runtime_summary(rows: list[LayerRuntime]) -> dict:
    """Totals: layers per path, stored and runtime bytes, and the names of the merged / cached layers."""
    return {
        "layers": len(rows),
        "paths": dict(Counter(r.path for r in rows)),
        "stored_bytes": sum(r.stored_bytes for r in rows),
        "runtime_bytes": sum(r.runtime_bytes for r in rows),
        "merged": [r.name for r in rows if r.path == "merged-dense"],
        "cached": [r.name for r in rows if r.path == "dense-cache"],
    }


def runtime_table(rows: list[LayerRuntime], per_layer: bool = False) -> str:
    """A plain-text table: one line per (kind, shape, path, note) with its layer count and bytes, or one per
    layer with ``per_layer``; then the totals."""
    lines = [f"{'layers':>6}  {'kind':<15} {'shape':<11} {'path':<13} {'stored MB':>9} {'runtime MB':>10}  note"]
    if per_layer:
        groups = [([r], r.name) for r in rows]
    else:
        keyed: dict[tuple, list[LayerRuntime]] = {}
        for r in rows:
            keyed.setdefault((r.kind, r.shape, r.path, r.note), []).append(r)
        groups = [(rs, "") for rs in keyed.values()]
    for rs, name in groups:
        r = rs[0]
        shape = f"{r.shape[0]}x{r.shape[1]}"
        stored = sum(x.stored_bytes for x in rs) / 1e6
        runtime = sum(x.runtime_bytes for x in rs) / 1e6
        label = name or r.note
        if name and r.note:
            label = f"{name}: {r.note}"
        lines.append(f"{len(rs):>6}  {r.kind:<15} {shape:<11} {r.path:<13} {stored:>9.2f} {runtime:>10.2f}  {label}")
    s = runtime_summary(rows)
    paths = ", ".join(f"{k} {v}" for k, v in s["paths"].items())
    lines.append(f"total: {s['layers']} layers ({paths}); stored {s['stored_bytes'] / 1e6:.2f} MB, runtime forms "
                 f"{s['runtime_bytes'] / 1e6:.2f} MB")
    if s["merged"]:
        lines.append(f"merged to dense: {len(s['merged'])} sparse layers (no faster CPU kernel)")
    return "\n".join(lines)


__all__ = ["LayerRuntime", "model_dtype", "prepare_inference", "runtime_summary", "runtime_table"]
