"""Structured pruning: the flow shared by the structures that rewrite the architecture (``depth``,
``width``, ``slice``) instead of replacing layers by structured ones.

``--ratio R`` is the fraction of the targeted block weights removed: the q/k/v/o and FFN weights of
every block (the linear layers :func:`rankwise.models.surgery.find_linears` finds by default). What
comes out is a plain model of the same family with a smaller config (fewer blocks, fewer heads /
channels, a smaller ``hidden_size``), whose report records what was removed and why
(``report.pruning``, saved in ``rankwise.json``).

A pruning method (:class:`PruningMethod`, one file each in :mod:`.methods`, registered like every
structure) implements :meth:`PruningMethod.check` (feasibility, before any model work) and
:meth:`PruningMethod.prune` (the scores, the fits and the surgery, through :mod:`rankwise.models`);
width pruning's refit runs on the one engine (:mod:`.engine`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..models.surgery import count_parameters, find_linears, linear_shape
from .engine import EngineOptions
from .methods.base import Method
from .report import CompressionReport, LayerReport


@dataclass
class PruneContext:
    """What a pruning method gets besides the model and the calibration windows."""

    ratio: float
    engine: EngineOptions
    device: torch.device
    progress: bool = False


@dataclass
class PruneOutcome:
    """What a pruning method did: ``record`` (what was removed and why: JSON-able, saved as
    ``rankwise.json["pruning"]``), ``renames`` (each originally targeted layer's name now, ``None``
    if it is gone), the report's method label, and how the engine ran (``None``: not used)."""

    record: dict[str, Any]
    renames: dict[str, str | None] = field(default_factory=dict)
    label: str = ""
    granularity: str = "-"
    refit: bool = False


class PruningMethod(Method):
    """A structure that removes parts of the model (see the module docstring)."""

    rewrites_architecture: ClassVar[bool] = True
    budget = "params"

    def plan_layer(self, shape, target):
        raise ConfigError(f"--structure {self.name} removes parts of the model as a whole; it has no per-layer plan")

    def check(self, model: nn.Module, ratio: float) -> None:
        """:class:`ConfigError` when ``ratio`` cannot be reached on ``model`` (naming the largest
        feasible ratio) or the model's config cannot express the result (naming the option that can)."""

    def prune(self, model: nn.Module, windows: torch.Tensor, ctx: PruneContext) -> PruneOutcome:
        raise NotImplementedError

    def plain_output(self) -> str | None:
        """``None`` when the pruned model fits a plain config.json, else why not and what can hold it."""
        return None


def is_pruning(method: Method) -> bool:
    return bool(getattr(method, "rewrites_architecture", False))


def largest_ratio_text(r: float) -> str:
    return f"{r:.4f}".rstrip("0").rstrip(".")


def prune_model(model: nn.Module, method: PruningMethod, cfg, windows: torch.Tensor, device: torch.device,
                source_desc: Mapping[str, Any], progress: bool = True) -> CompressionReport:
    """Prune ``model`` in place with ``method`` at ``cfg.ratio``; the report lists every originally
    targeted layer with its weights before and after."""
    t0 = time.perf_counter()
    if cfg.targets:
        raise ConfigError(f"--structure {method.name} removes whole blocks, heads, channels or hidden dimensions; "
                          "--targets does not apply (drop it)")
    if cfg.allocate != "uniform":
        raise ConfigError(f"--allocate {cfg.allocate} shares a budget among layers; --structure {method.name} takes "
                          "--allocate uniform (width pruning's per-block widths: --set widths=per-block)")
    before = {n: linear_shape(m) for n, m in find_linears(model).items()}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    elem = torch.empty((), dtype=dtype).element_size()
    params_before = count_parameters(model)
    method.check(model, cfg.ratio)
    was_training = model.training
    model.eval()
    outcome = method.prune(model, windows, PruneContext(cfg.ratio, cfg.engine, device, progress))
    model.train(was_training)
    layers = []
    for name, (m, k) in before.items():
        now = outcome.renames.get(name, name)
        if now is None:
            layers.append(LayerReport(name, (m, k), method.name, {"removed": True}, m * k, 0, m * k * elem, 0))
            continue
        m2, k2 = linear_shape(model.get_submodule(now))
        kind = method.name if (m2, k2) != (m, k) or now != name else None
        spec = {"shape": [m2, k2], **({"now": now} if now != name else {})} if kind else None
        layers.append(LayerReport(name, (m, k), kind, spec, m * k, m2 * k2, m * k * elem, m2 * k2 * elem))
    report = CompressionReport(
        structure=method.name, method=outcome.label or method.name, budget={"ratio": cfg.ratio}, allocate="uniform",
        mode="-", granularity=outcome.granularity, refit=outcome.refit, calibration=dict(source_desc),
        layers=layers, model_params_before=params_before, model_params_after=count_parameters(model),
        seconds=time.perf_counter() - t0, config=cfg.to_dict())
    report.pruning = outcome.record
    return report


def pruning_summary(record: Mapping[str, Any]) -> str:
    """One line saying what a pruning record removed."""
    kind = record.get("structure")
    if kind == "depth":
        return (f"{len(record['removed_blocks'])} of {record['blocks_before']} blocks removed "
                f"({record['removed_blocks']}) by {record['criterion']}")
    if kind == "slice":
        extra = f", LM head untied (+{record['untied_params']:,} values)" if record.get("untied_head") else ""
        return (f"hidden size {record['hidden_before']} -> {record['hidden_after']}, "
                f"{100 * record['energy_kept']:.1f}% of the calibration stream energy kept{extra}")
    if kind == "width":
        b, a = record["before"], record["after"]
        if isinstance(a, list):
            return f"per-block widths, heads {[w['heads'] for w in a]}, channels {[w['channels'] for w in a]}"
        return (f"heads {b['heads']} -> {a['heads']}, KV heads {b['kv_heads']} -> {a['kv_heads']}, FFN channels "
                f"{b['channels']} -> {a['channels']} in every block")
    return str(kind)
