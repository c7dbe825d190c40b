"""Run a decoder model block by block on cached hidden states (the GPTQ / SVD-LLM trick).

:func:`capture_inputs` runs the model once per batch with every block replaced by a stand-in that
returns its input, and keeps the hidden states entering block 0 plus the other arguments each block
receives (attention masks, rotary ``position_embeddings``, ...), recorded once per batch size because
they can differ per block (Gemma 3 alternates sliding and global attention). The stand-ins make the
capture cost only the embeddings, whatever the depth, and work on a skeleton whose blocks are not
loaded (low-memory mode). The capture runs where the model's weights live (its home: the CPU), so
that neither the embeddings nor the head visit the compute device; the recorded extras are then
moved to the compute device and the hidden states are kept on the CPU in the model's dtype.
:func:`run_block` then feeds a cached batch through a real block on the compute device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ...calibration.stats import run_model
from ...models.pruning import Passthrough
from .spill import SpilledBatches


class Stop(Exception):
    """Raised inside a hook to stop a forward pass early."""


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


@dataclass
class Activations:
    """Hidden states entering the current unit (one tensor per batch, on the CPU) and the per-block
    extra arguments keyed by batch size: ``extras[batch][i] = (args, kwargs)`` of block ``i``.
    ``ids``: the global index of each cached batch (a rank of a distributed run caches its shard)."""

    hidden: list[torch.Tensor] | SpilledBatches
    extras: dict[int, list[tuple[tuple, dict]]] = field(default_factory=dict)
    ids: list[int] | None = None
    sizes: list[int] | None = None  # the batch size of each cached batch

    def __post_init__(self) -> None:
        if self.ids is None:
            self.ids = list(range(len(self.hidden)))
        if self.sizes is None:
            self.sizes = [int(h.shape[0]) for h in self.hidden]

    def args(self, b: int, i: int) -> tuple[tuple, dict]:
        return self.extras[self.sizes[b]][i]

    def copy(self) -> "Activations":
        """A new list of the same tensors (advancing one in place leaves the other as it was; spilled
        batches share their files until one side replaces a batch)."""
        return Activations(self.hidden.copy(), self.extras, list(self.ids), list(self.sizes))

    def close(self) -> None:
        """Drop spilled batches' files now (a list in memory is left to the garbage collector)."""
        if isinstance(self.hidden, SpilledBatches):
            self.hidden.close()


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def home_device(model: nn.Module) -> torch.device:
    """Where the model's loaded (non-meta) weights live."""
    for t in model.parameters():
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, batch_size: int,
                   device: torch.device, store_dtype: torch.dtype | None = None,
                   batches: list[int] | None = None, store: SpilledBatches | None = None) -> Activations:
    """Hidden states entering block 0 for the ``windows`` (n, L) of ``batches`` (global batch indices,
    default all) and each block's extra arguments.

    Runs on the model's home device (see the module doc). Hidden states are kept on the CPU in
    ``store_dtype`` (default: as produced, the model's dtype), in a list or appended to ``store`` (on
    disk); extras are moved to ``device``.
    """
    home = home_device(model)
    nb = -(-windows.shape[0] // batch_size)
    ids = list(range(nb)) if batches is None else list(batches)
    real = list(blocks)
    for i, b in enumerate(real):
        blocks[i] = Passthrough(b)
    hidden: list[torch.Tensor] | SpilledBatches = [] if store is None else store
    sizes: list[int] = []
    extras: dict[int, list[tuple[tuple, dict]]] = {}
    try:
        for gb in ids:
            start = gb * batch_size
            batch = windows[start: start + batch_size].to(home)
            b = int(batch.shape[0])
            sizes.append(b)
            record = b not in extras
            seen: list[tuple[tuple, dict]] = []
            stop_at = len(blocks) - 1 if record else 0
            handles = []

            def make_hook(idx: int):
                def hook(module, args, kwargs):
                    h, rest, kw = _split_hidden(args, kwargs)
                    if idx == 0:
                        hidden.append(h.detach().to("cpu", dtype=store_dtype or h.dtype))
                    if record:
                        seen.append(_to((rest, kw), device))
                    if idx == stop_at:
                        raise Stop
                return hook

            for idx in range(stop_at + 1):
                handles.append(blocks[idx].register_forward_pre_hook(make_hook(idx), with_kwargs=True))
            try:
                run_model(model, batch)
            except Stop:
                pass
            finally:
                for hd in handles:
                    hd.remove()
            if record:
                extras[b] = seen
    finally:
        for i, b in enumerate(real):
            blocks[i] = b
    return Activations(hidden, extras, ids, sizes)


def run_block(block: nn.Module, h: torch.Tensor, args: tuple, kwargs: dict, device: torch.device) -> torch.Tensor:
    """``block(h, *args, **kwargs)``'s hidden-state output (the first element of a tuple output)."""
    param = next(block.parameters(), None)
    dtype = param.dtype if param is not None else h.dtype
    out = block(h.to(device=device, dtype=dtype), *args, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


@torch.no_grad()
def advance(blocks: list[tuple[int, nn.Module]], acts: Activations, device: torch.device,
            on_batch: Callable[[int], None] | None = None, inplace: bool = False) -> list[torch.Tensor]:
    """Outputs of the chain of ``blocks`` (``(index, module)``) for every cached batch, on the CPU in
    the cache's dtype. ``inplace`` replaces each cached batch by its output as soon as it is computed
    (the cache never exists twice) and returns ``acts.hidden``; otherwise the cache is unchanged."""
    outs = acts.hidden if inplace else []
    for b in range(len(acts.hidden)):
        x = h = acts.hidden[b]
        for i, block in blocks:
            args, kwargs = acts.args(b, i)
            x = run_block(block, x, args, kwargs, device)
        out = x.detach().to("cpu", dtype=h.dtype)
        del x
        if inplace:
            outs[b] = out
        else:
            outs.append(out)
        if on_batch is not None:
            on_batch(b)
    return outs
