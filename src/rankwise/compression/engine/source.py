"""Where the blocks' weights come from: the model in memory, or its safetensors files on disk.

The engine asks a source to ``load(i)`` block ``i`` onto the compute device before calibrating it and
to ``release(i)`` it afterwards. In memory, loading moves the block to the device (a no-op on the CPU)
and releasing moves it back. Streamed from disk, the model is a skeleton whose parameters are on
``meta`` except those outside the blocks; loading reads block ``i``'s tensors, releasing writes the
(compressed) block to a shard file and frees it, so at most one unit (``blocks_per_unit`` blocks) is
resident. A tensor shared by layers of several blocks (a basis shared across a unit) is written once,
under the first key, and the later keys are recorded in ``aliases`` -- as saving from memory does.
"""
from __future__ import annotations

import copy
import weakref
from pathlib import Path

import torch
from torch import nn

from ...errors import ArtifactError
from ...models.skeleton import free, meta_parameters
from ...models.streaming import index_shapes, load_tensors, save_shard
from ...models.surgery import block_prefix, decoder_blocks


class WeightSource:
    """Base: ``model``, its ``blocks`` and their qualified ``prefix`` (e.g. ``model.layers``)."""

    in_memory = True

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.blocks = decoder_blocks(model)
        self.prefix = block_prefix(model)
        self.device = device

    def load(self, i: int) -> nn.Module:
        return self.blocks[i]

    def release(self, i: int, write: bool = True) -> None:
        pass

    def dense_copy(self, i: int) -> nn.Module:
        """A copy of block ``i`` as loaded (call before its layers are replaced)."""
        return copy.deepcopy(self.blocks[i])


class ModelSource(WeightSource):
    """The whole model is in memory; blocks visit the compute device one at a time."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__(model, device)
        p = next(model.parameters())
        self.home = p.device

    def load(self, i: int) -> nn.Module:
        if self.device != self.home:
            self.blocks[i].to(self.device)
        return self.blocks[i]

    def release(self, i: int, write: bool = True) -> None:
        if self.device != self.home:
            self.blocks[i].to(self.home)


class StreamedSource(WeightSource):
    """Blocks read from safetensors one at a time; each finished block is written to ``shard_dir``."""

    in_memory = False

    def __init__(self, model: nn.Module, index: dict[str, Path], dtype: torch.dtype, shard_dir: Path,
                 device: torch.device, path: Path) -> None:
        super().__init__(model, device)
        self.index, self.dtype, self.shard_dir, self.path = index, dtype, shard_dir, path
        self.shards: list[Path] = []
        #: ``{dropped key: kept key}`` of tensors shared across blocks (written once).
        self.aliases: dict[str, str] = {}
        self._written: dict[int, tuple[weakref.ref, str]] = {}  # id(tensor) -> (ref, key) of written tensors

    def key(self, i: int) -> str:
        return f"{self.prefix}.{i}."

    def load(self, i: int) -> nn.Module:
        key = self.key(i)
        block = self.blocks[i]
        state = load_tensors(self.index, [k for k in self.index if k.startswith(key)], self.dtype)
        block.load_state_dict({k[len(key):]: v for k, v in state.items()}, strict=False, assign=True)
        del state
        left = meta_parameters(block)
        if left:
            raise ArtifactError(f"{self.path}: block {i} has no tensor for {left[:4]} in the safetensors files")
        return block.to(self.device)

    def release(self, i: int, write: bool = True) -> None:
        """Write block ``i`` (compressed) to its shard unless ``write`` is off (a dry pass), then free it."""
        block = self.blocks[i]
        if write:
            shard = self.shard_dir / f"{i:05d}.safetensors"
            state = {}
            for k, t in block.state_dict(keep_vars=True).items():
                key = self.key(i) + k
                seen = self._written.get(id(t))
                if seen is not None and seen[0]() is t:  # alive and the same object: shared with an earlier block
                    self.aliases[key] = seen[1]
                    continue
                self._written[id(t)] = (weakref.ref(t), key)
                state[key] = t.detach().to("cpu")
            save_shard(state, shard)
            self.shards.append(shard)
        free(block)

    def parameter_count(self) -> int:
        """Parameters of the checkpoint, from the headers."""
        total = 0
        for shape in index_shapes(self.index).values():
            total += int(torch.Size(shape).numel())
        return total
