"""Model surgery: find the target linear layers of a model, read their weights, swap modules.

Weights are always returned in ``nn.Linear`` orientation, ``W`` of shape (out, in) with
``y = x W^T + b``; GPT-2's ``Conv1D`` stores ``W^T`` and is transposed here.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import ConfigError, NoTargetLayersError

try:  # transformers' GPT-2 style layer
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

_NEVER = ("lm_head", "embed", "wte", "wpe")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern:
    """The compiled regex of a target pattern; an invalid one is a :class:`ConfigError`."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(
            f"invalid layer pattern {pattern!r} (a --targets / --layers entry): {e}; pass layer names like "
            "q_proj,down_proj or a valid Python regex (escape special characters, e.g. \\[ or \\.)"
        ) from None


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A pattern matches a module name when it equals its last component or is a regex found in it."""
    last = name.rsplit(".", 1)[-1]
    for p in patterns:
        if p == last or _compile(p).search(name):
            return True
    return False


def find_modules(model: nn.Module, targets: Sequence[str] | str | None, predicate: Callable[[nn.Module], bool]
                 ) -> dict[str, nn.Module]:
    """``{qualified_name: module}`` of the modules satisfying ``predicate``, in model order: by default
    those inside the model's repeated blocks (:func:`decoder_blocks`); with ``targets`` (names = a
    module name's last component, or regexes searched in the qualified name; a comma-separated string
    is accepted) those matching one of them. The LM head and embeddings are never selected."""
    patterns = parse_targets(targets)
    if patterns:
        return {name: mod for name, mod in model.named_modules()
                if name and predicate(mod) and not any(n in name for n in _NEVER) and _matches(name, patterns)}
    try:
        prefix = block_prefix(model) + "."
    except NoTargetLayersError:
        return {}
    return {name: mod for name, mod in model.named_modules() if name.startswith(prefix) and predicate(mod)}


def parse_targets(targets: Sequence[str] | str | None) -> tuple[str, ...]:
    """Target patterns as a tuple (empty = the default), each checked to be a valid regex."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    patterns = tuple(targets or ())
    for p in patterns:
        _compile(p)  # an invalid regex fails even on a model with no linear layer
    return patterns


def find_linears(
    model: nn.Module, targets: Sequence[str] | str | None = None, *, required: bool = True
) -> dict[str, nn.Module]:
    """:func:`find_modules` for linear layers (``nn.Linear``, GPT-2 ``Conv1D``): by default every linear
    layer inside the model's repeated blocks, whatever the family."""
    found = find_modules(model, targets, is_linear)
    if required and not found:
        patterns = parse_targets(targets) or ("<every linear layer inside the repeated blocks>",)
        kinds = sorted({type(m).__name__ for _, m in model.named_modules() if is_linear(m)})
        raise NoTargetLayersError(
            f"no linear layer of {type(model).__name__} matches targets {list(patterns)}"
            + (f" (linear layer types present: {kinds})" if kinds else " (the model has no linear layers)")
            + "; pass --targets with layer names (e.g. q_proj,down_proj) or regexes"
        )
    return found


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in), a view (no copy) where possible."""
    if isinstance(module, nn.Linear):
        return module.weight
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.t()
    raise TypeError(f"{type(module).__name__} is not a supported linear layer")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    w = linear_weight(module)
    return int(w.shape[0]), int(w.shape[1])


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def get_modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """``{name: module}`` for qualified names; a missing one raises ConfigError naming it."""
    from ..errors import ConfigError

    out = {}
    for name in names:
        try:
            out[name] = model.get_submodule(name)
        except AttributeError as e:
            raise ConfigError(f"model has no module named {name!r}") from e
    return out


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at dotted ``name`` with ``new``; returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def to_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` equal to ``module`` (converts GPT-2 Conv1D)."""
    if isinstance(module, nn.Linear):
        return module
    w = linear_weight(module)
    b = linear_bias(module)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's repeated blocks, found from the module structure (no family names): among the
    ``nn.ModuleList`` s whose children are all of one class and each hold a linear layer, the one with
    the most parameters (Llama/Gemma ``model.layers``, GPT-2 ``transformer.h``, BERT
    ``encoder.layer``; a block stack outweighs any expert list nested inside it)."""
    best, best_size = None, -1
    for _, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(child) for child in mod}
        if len(kinds) != 1 or not all(any(is_linear(m) for m in child.modules()) for child in mod):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if size > best_size:
            best, best_size = mod, size
    if best is None:
        raise NoTargetLayersError(f"could not find the repeated blocks of {type(model).__name__} (no list of "
                                  "same-class modules holding linear layers); pass --targets")
    return best


def block_prefix(model: nn.Module) -> str:
    """Qualified name of the decoder block list, e.g. ``model.layers``."""
    blocks = decoder_blocks(model)
    for name, mod in model.named_modules():
        if mod is blocks:
            return name
    raise NoTargetLayersError("decoder blocks not found by name")  # pragma: no cover


def layer_index(name: str) -> int | None:
    """Block index parsed from a qualified name like ``model.layers.7.mlp.up_proj``."""
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def count_parameters(modules: Iterable[nn.Module] | nn.Module) -> int:
    if isinstance(modules, nn.Module):
        return sum(p.numel() for p in modules.parameters())
    return sum(p.numel() for m in modules for p in m.parameters())
