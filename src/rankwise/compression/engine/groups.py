"""Sub-groups of a block's target layers in data-flow order (true-sequential granularity, as GPTQ).

Running one batch through the block with a pre-hook on every target layer gives the order in which
they are called and the tensor each one reads. Layers called one after another on the very same
input tensor form a group: in a Llama block ``[q, k, v] -> [o] -> [gate, up] -> [down]``, in GPT-2
``[c_attn] -> [attn.c_proj] -> [mlp.c_fc] -> [mlp.c_proj]``. Each group is then calibrated on the
outputs of the groups already compressed. Found from the module structure, for any architecture.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ...calibration.stats import first_tensor
from ...errors import NumericalError
from .runner import Stop, run_block


@torch.no_grad()
def dataflow_groups(block: nn.Module, modules: Mapping[str, nn.Module], h: torch.Tensor, args: tuple,
                    kwargs: dict, device: torch.device) -> list[list[str]]:
    """``modules`` (name -> layer inside ``block``) grouped and ordered by data flow (see module doc)."""
    order: list[tuple[str, int, int]] = []
    keep: list[torch.Tensor] = []  # hold inputs so that their ids are not reused during the pass
    left = set(modules)

    def make_hook(name: str):
        def hook(module, a, kw):
            if name in left:
                x = first_tensor(a, kw)
                keep.append(x)
                order.append((name, id(x), x._version))
                left.discard(name)
                if not left:
                    raise Stop
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        run_block(block, h, args, kwargs, device)
    except Stop:
        pass
    finally:
        for hd in handles:
            hd.remove()
    if left:
        raise NumericalError(f"layers never called by their block during calibration: {sorted(left)[:5]}")
    groups: list[list[str]] = []
    last = None
    for name, ident, version in order:
        if groups and (ident, version) == last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = (ident, version)
    return groups
