"""Param groups for :class:`~rankwise.training.optim.ProjectedAdamW`: the attention and MLP linears of
any model projected, everything else plain AdamW (galore-torch's recipe, found from the module
structure rather than from name lists)."""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..errors import ConfigError, NoTargetLayersError
from ..models.saved import structured_layers
from ..models.surgery import find_linears


def projected_linears(model: nn.Module, targets: Sequence[str] | str | None = None) -> dict[str, nn.Module]:
    """``{name: linear}`` whose weights are projected: by default every linear layer inside the model's
    repeated blocks (attention and MLP projections of a transformer, whatever the family); a model
    without repeated blocks (a plain MLP) gets every linear layer except an LM head / embedding. The
    linears inside a structured layer (its factors) are never projected."""
    found = find_linears(model, targets, required=targets is not None)
    if not found and targets is None:
        found = find_linears(model, [".*"], required=False)
    structured = structured_layers(model)      # the factors of a structured layer are not projected
    found = {n: m for n, m in found.items() if not any(n.startswith(s + ".") for s in structured)}
    if not found:
        if structured:
            raise NoTargetLayersError(f"every selected linear layer of {type(model).__name__} is structured (e.g. "
                                      f"{next(iter(structured))}); projected optimizers project dense matrices: use "
                                      "--optim adamw (per-factor learning rates) for a structured model")
        raise NoTargetLayersError(f"{type(model).__name__} has no linear layer to project; pass targets= with "
                                  "layer names or regexes")
    return found


def projected_param_groups(model: nn.Module, rank: int, update_proj_gap: int = 200, scale: float = 0.25,
                           proj_type: str = "std", projector: str = "svd",
                           projector_options: dict[str, Any] | None = None,
                           targets: Sequence[str] | str | None = None, weight_decay: float | None = None,
                           ) -> list[dict[str, Any]]:
    """``[{"params": the rest}, {"params": linear weights, "rank": ..., ...}]`` for ``model``'s trainable
    parameters; a weight whose matrix is smaller than ``rank`` is a :class:`ConfigError` naming it."""
    layers = projected_linears(model, targets)
    chosen = {id(m.weight) for m in layers.values()}
    proj, proj_names, rest, rest_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in chosen and p.ndim == 2:
            if rank > min(p.shape):
                raise ConfigError(f"projection rank {rank} is larger than layer {name}'s {p.shape[0]}x{p.shape[1]} "
                                  f"weight allows: use --rank <= {min(p.shape)} or leave the layer out (targets)")
            proj.append(p)
            proj_names.append(name)
        else:
            rest.append(p)
            rest_names.append(name)
    if not proj:
        raise NoTargetLayersError("none of the selected linear layers has a trainable 2-D weight to project")
    extra = {} if weight_decay is None else {"weight_decay": weight_decay}
    groups = [{"params": proj, "rank": int(rank), "update_proj_gap": update_proj_gap, "scale": scale,
               "proj_type": proj_type, "projector": projector, "projector_options": dict(projector_options or {}),
               **extra}]
    if rest:
        groups.insert(0, {"params": rest, **extra})
    return groups


def group_names(model: nn.Module, groups: list[dict[str, Any]]) -> list[list[str]]:
    """The parameter names of each group (for logs and error messages)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names.get(id(p), "?") for p in g["params"]] for g in groups]
