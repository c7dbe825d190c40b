"""Where the blocks' weights come from: the model in memory, or its safetensors files on disk.

The engine asks a source to ``load(i)`` block ``i`` onto the compute device before calibrating it and
to ``release(i)`` it afterwards. In memory, loading moves the block to the device (a no-op on the CPU)
and releasing moves it back. Streamed from disk, the model is a skeleton whose parameters are on
``meta``; loading reads block ``i``'s tensors, releasing writes the (compressed) block to a shard file
(rank 0 of a distributed run only) and frees it, so at most one unit (``blocks_per_unit`` blocks) is resident.

``outside(windows)`` brackets the capture of the block-0 inputs (the only step that runs the layers
outside the blocks). Streamed, it loads the tensors outside the blocks for that step only, and of
the input embedding only the rows of the tokens in ``windows`` (a lookup table maps the ids): neither
the embeddings nor the head are resident while the blocks are compressed, and the output copies them
from the checkpoint in chunks (:class:`rankwise.models.streaming.FileTensors`).
A tensor shared by layers of several blocks (a basis shared across a unit) is written once, under the
first key, and the later keys are recorded in ``aliases`` -- as saving from memory does.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ...errors import ArtifactError
from ...models.skeleton import free, meta_parameters
from ...models.streaming import index_shapes, load_rows, load_tensors, save_shard
from ...models.surgery import block_prefix, decoder_blocks
from .spill import SpillFiles


class WeightSource:
    """Base: ``model``, its ``blocks`` and their qualified ``prefix`` (e.g. ``model.layers``).
    ``spill``: where the engine keeps its cached hidden states on disk (:mod:`.spill`), ``None``: in
    memory."""

    in_memory = True
    spill: SpillFiles | None = None

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.blocks = decoder_blocks(model)
        self.prefix = block_prefix(model)
        self.device = device

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating dtype (its layers are stored in it)."""
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    @contextlib.contextmanager
    def outside(self, windows: torch.Tensor) -> Iterator[None]:
        """The layers outside the blocks are usable inside (in memory: always)."""
        yield

    def load(self, i: int) -> nn.Module:
        return self.blocks[i]

    def release(self, i: int, write: bool = True) -> None:
        pass

    def retire(self, module: nn.Module) -> None:
        """``module`` was replaced by its compressed layer (in memory: left to its owner)."""

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

    def __init__(self, model: nn.Module, index: dict[str, Path], dtype: torch.dtype, shard_dir: Path | None,
                 device: torch.device, path: Path, spill: SpillFiles | None = None) -> None:
        super().__init__(model, device)
        self.index, self._dtype, self.shard_dir, self.path = index, dtype, shard_dir, path
        self.spill = spill
        self.shards: list[Path] = []
        #: ``{dropped key: kept key}`` of tensors shared across blocks (written once).
        self.aliases: dict[str, str] = {}
        self._written: dict[int, tuple[weakref.ref, str]] = {}  # id(tensor) -> (ref, key) of written tensors

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @contextlib.contextmanager
    def outside(self, windows: torch.Tensor) -> Iterator[None]:
        """Load the tensors outside the blocks (the input embedding: only the rows of ``windows``'
        tokens), then free them again."""
        model, prefix = self.model, self.prefix + "."
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        skip = {id(m.weight) for m in (emb, head) if m is not None}  # the head never runs in a capture
        emb_key = None
        state = model.state_dict(keep_vars=True)
        for k, t in state.items():
            if emb is not None and t is emb.weight and k in self.index:
                emb_key = k
                break
        outside = {k: t for k, t in state.items() if not k.startswith(prefix) and t.is_meta and id(t) not in skip}
        keys = [k for k in outside if k in self.index]
        left = [k for k in outside if k not in self.index]
        if left or (emb is not None and emb_key is None and emb.weight.is_meta):
            raise ArtifactError(f"{self.path}: no tensor for {(left or ['the input embedding'])[:4]} in the "
                                "safetensors files")
        handle, empty_emb = None, None if emb is None else emb.weight
        loaded = load_tensors(self.index, keys, self._dtype)
        model.load_state_dict(loaded, strict=False, assign=True)
        del loaded
        if emb_key is not None:
            rows = torch.unique(windows.reshape(-1))
            lut = torch.zeros(int(emb.weight.shape[0]), dtype=torch.long)
            lut[rows] = torch.arange(rows.numel())
            emb.weight = nn.Parameter(load_rows(self.index, emb_key, rows, self._dtype), requires_grad=False)
            handle = emb.register_forward_pre_hook(lambda m, args: (lut.to(args[0].device)[args[0]], *args[1:]))
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()
                emb.weight = empty_emb
            for name, mod in model.named_modules():
                if name == self.prefix or name.startswith(prefix):
                    continue
                for kind in ("_parameters", "_buffers"):
                    store = getattr(mod, kind)
                    for key, t in list(store.items()):
                        full = f"{name}.{key}" if name else key
                        if t is not None and not t.is_meta and full in self.index:
                            store[key] = (nn.Parameter(t.to("meta"), requires_grad=False) if kind == "_parameters"
                                          else t.to("meta"))
            if getattr(model.config, "tie_word_embeddings", False):
                model.tie_weights()

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

    def retire(self, module: nn.Module) -> None:
        """Free the replaced layer's weights now: the skeleton's module objects outlive the block (the
        caller's ``{name: module}`` of targets holds them), and each would keep its loaded weights."""
        free(module)

    def release(self, i: int, write: bool = True) -> None:
        """Write block ``i`` (compressed) to its shard unless ``write`` is off (a dry pass), then free it."""
        block = self.blocks[i]
        if write and self.shard_dir is not None:
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
