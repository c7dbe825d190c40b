"""Run a decoder model block by block on cached hidden states (the GPTQ / SVD-LLM trick).

:func:`capture_block_inputs` runs the embedding part of the model once per batch and stops it at
block 0 with a sentinel exception raised from a forward pre-hook, keeping the hidden states that
enter block 0. The other arguments each block receives (attention masks, rotary
``position_embeddings``, ...) are recorded once per batch size from a pass that stops at the last
block, because they can differ per block (Gemma 3 alternates sliding and global attention).
:meth:`BlockRunner.run` then feeds the cached states through block ``i`` and returns its outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibration.stats import run_model


class _Stop(Exception):
    """Sentinel raised inside a pre-hook to stop the forward pass early."""


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


@dataclass
class BlockRunner:
    """Cached hidden states entering the current block (one tensor per batch, on CPU) and the
    per-block extra arguments keyed by batch size."""

    blocks: nn.ModuleList
    hidden: list[torch.Tensor]
    extras: dict[int, list[tuple[tuple, dict]]] = field(default_factory=dict)

    @torch.no_grad()
    def run(self, i: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Outputs of block ``i`` for every cached batch (the cache itself is not changed)."""
        block = self.blocks[i]
        outs = []
        for h in self.hidden:
            args, kwargs = self.extras[h.shape[0]][i]
            out = block(h.to(device), *args, **kwargs)
            if isinstance(out, (tuple, list)):
                out = out[0]
            outs.append(out.detach().to("cpu"))
        return outs

    def advance(self, i: int, device: torch.device | str = "cpu") -> None:
        """Replace the cache by block ``i``'s outputs: the inputs of block ``i + 1``."""
        self.hidden = self.run(i, device)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor,
                         batch_size: int = 4) -> BlockRunner:
    """Hidden states entering block 0 for all ``windows`` (n, L), and each block's extra arguments."""
    device = next(model.parameters()).device
    hidden: list[torch.Tensor] = []
    extras: dict[int, list[tuple[tuple, dict]]] = {}
    last = len(blocks) - 1

    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start: start + batch_size].to(device)
        b = int(batch.shape[0])
        record = b not in extras
        seen: list[tuple[tuple, dict]] = []
        stop_at = last if record else 0
        handles = []

        def make_hook(idx: int):
            def hook(module, args, kwargs):
                h, rest, kw = _split_hidden(args, kwargs)
                if idx == 0:
                    hidden.append(h.detach().to("cpu"))
                if record:
                    seen.append((rest, kw))
                if idx == stop_at:
                    raise _Stop
            return hook

        for idx in range(stop_at + 1):
            handles.append(blocks[idx].register_forward_pre_hook(make_hook(idx), with_kwargs=True))
        try:
            run_model(model, batch)
        except _Stop:
            pass
        finally:
            for hd in handles:
                hd.remove()
        if record:
            extras[b] = seen
    return BlockRunner(blocks, hidden, extras)


