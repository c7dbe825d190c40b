"""The dense model's inputs of a unit's target layers, recorded in one forward per batch (the refit).

The sequential refit pairs each layer's input in the compressed model ``x'`` with its input in the
DENSE model ``x`` (:mod:`rankwise.calibration.paired`). The dense inputs do not change while the
unit's groups are compressed one after another, so instead of running the dense unit again up to
each group (for Llama's four sub-groups ``q/k/v -> o -> gate/up -> down`` about 2.2 unit forwards per
batch, attention four times) and once more to advance the dense cache, :func:`record_dense_inputs`
runs the dense unit once per batch: pre-hooks keep every distinct input (layers that read the very
same tensor, q/k/v or gate/up, share one *slot*) and the unit's output replaces the batch in the
dense cache (the advance). The values are the same tensors the partial forwards computed.

Memory: every slot for every batch, ``sum_slots in_s * T * e`` bytes (SmolLM2, 64 x 512 tokens,
float32: (3 * 576 + 1536) * 32768 * 4 B = 428 MB) in memory; with ``spill`` (the low-memory path)
they go to files like the cached hidden states (:mod:`.spill`) and one batch is read back at a time.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ...calibration.stats import first_tensor
from ...errors import NumericalError
from .runner import Activations, run_block
from .spill import SpilledBatches, SpillFiles


class DenseInputs:
    """``slots[name]``: the slot of each layer; ``store[slot][b]``: that slot's (tokens, in) rows of
    batch ``b`` (a list in memory, or :class:`SpilledBatches`)."""

    def __init__(self, slots: Mapping[str, int], store: list) -> None:
        self.slots, self.store = dict(slots), store

    def batch(self, b: int, names) -> dict[str, torch.Tensor]:
        """``{name: its dense input rows}`` of batch ``b`` for the layers ``names``: each slot read once,
        so the layers of a slot get the very same tensor."""
        rows = {s: self.store[s][b] for s in {self.slots[n] for n in names}}
        return {n: rows[self.slots[n]] for n in names}

    def leaders(self, names) -> dict[str, str]:
        """``{layer: the first of names in its slot}``: layers whose paired sums are shared."""
        first: dict[int, str] = {}
        return {n: first.setdefault(self.slots[n], n) for n in names}

    def close(self) -> None:
        for st in self.store:
            if isinstance(st, SpilledBatches):
                st.close()
        self.store = []


@torch.no_grad()
def record_dense_inputs(chain: list[tuple[int, nn.Module]], acts: Activations, modules: Mapping[str, nn.Module],
                        device: torch.device, spill: SpillFiles | None = None) -> DenseInputs:
    """Run every cached batch of ``acts`` through the dense ``chain`` (its blocks' ``(index, module)``),
    keep the inputs of ``modules`` (name -> layer inside the chain) per slot (on the CPU in their dtype,
    or in ``spill``'s files) and replace each batch of ``acts`` by the chain's output (see module doc)."""
    slots: dict[str, int] = {}
    store: list = []
    for b in range(len(acts.hidden)):
        held: list[tuple[torch.Tensor, int]] = []  # this batch's distinct inputs (kept alive: ids stay unique)
        got: dict[str, int] = {}

        def make(name: str):
            def hook(module, args, kwargs):
                x = first_tensor(args, kwargs)
                slot = next((s for t, s in held if t is x), None)
                if slot is None:
                    slot = len(held)
                    held.append((x, slot))
                    rows = x.detach().reshape(-1, x.shape[-1])
                    if b == 0:
                        store.append([] if spill is None else SpilledBatches(spill))
                    if slot >= len(store):
                        raise NumericalError("the dense block's layers read a different number of distinct inputs "
                                             "from one calibration batch to the next")
                    if spill is None:
                        store[slot].append(rows.to("cpu", copy=True))
                    else:
                        store[slot].append(rows)
                got[name] = slot
            return hook

        handles = [m.register_forward_pre_hook(make(n), with_kwargs=True) for n, m in modules.items()]
        try:
            x = h = acts.hidden[b]
            for i, block in chain:
                args, kwargs = acts.args(b, i)
                x = run_block(block, x, args, kwargs, device)
            acts.hidden[b] = x.detach().to("cpu", dtype=h.dtype)
        finally:
            for hd in handles:
                hd.remove()
        missing = set(modules) - set(got)
        if missing:
            raise NumericalError(f"layers never called during calibration: {sorted(missing)[:5]}")
        if b == 0:
            slots = got
        elif got != slots:
            raise NumericalError("the dense block's layers read their inputs in a different order from one "
                                 "calibration batch to the next")
        del held, x
    return DenseInputs(slots, store)
