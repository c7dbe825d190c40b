"""Paired statistics for the sequential refit: the same layers run on the dense model's inputs ``X``
and on the compressed prefix's inputs ``X'``.

Per layer, ``C' = sum x' x'^T`` (as :class:`InputStats`) and the cross moment ``M = sum x x'^T``
(in, in), summed in float64 (each batch's product in float32, :mod:`.stats`), so that a fit can
target the DENSE model's outputs from the compressed inputs: ``argmin ||W X - W' X'||``
(:meth:`LayerStats.target`). The engine's held-out windows, which choose
the refit's ridge, are scored through ``on_pair`` and added to the same sums afterwards.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from ..errors import NumericalError
from .stats import InputStats, add_products_, all_finite, first_tensor, row_chunks


def _flat(x: torch.Tensor, device) -> torch.Tensor:
    """(tokens, in) rows of ``x`` on ``device`` in ``x``'s dtype (a view when it is there already)."""
    return x.detach().reshape(-1, x.shape[-1]).to(device=device)


class PairedAccumulator:
    """Context manager: pre-hooks on ``current`` modules add each input ``x'`` to ``C'`` and ``x x'^T`` to
    ``M`` (``sums[name] = [InputStats, M]``; ``sums``: the caller's, added to in place, or new), where
    ``x`` is the same layer's input in the dense model: recorded by pre-hooks on ``dense`` modules (same
    names), or given with :meth:`record` (``dense=None``). A batch's dense inputs must be recorded
    before its current forward.

    ``share`` maps a layer to the layer whose sums it shares (q/k/v, gate/up: the same dense and
    compressed inputs): the follower's sums are its leader's, computed once; its inputs must be the very
    tensors its leader got in that batch. ``on_pair(name, x, x')`` (optional) sees every layer's pair of
    (tokens, in) inputs before they are added.
    """

    def __init__(self, dense: Mapping[str, nn.Module] | None, current: Mapping[str, nn.Module], cov: bool = True,
                 device: torch.device | str | None = None,
                 on_pair: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
                 sums: dict[str, list] | None = None, share: Mapping[str, str] | None = None) -> None:
        if dense is not None and set(dense) != set(current):
            raise ValueError("dense and current modules must have the same names")
        self.dense, self.current, self.cov, self.device = dict(dense or {}), dict(current), cov, device
        self.on_pair = on_pair
        self.sums: dict[str, list] = {} if sums is None else sums
        self.share = {n: lead for n, lead in (share or {}).items() if lead != n}
        self._recorded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (dense input, its rows)
        self._seen: dict[str, tuple] = {}  # leader -> (current input, dense input) of this batch
        self._checked: tuple | None = None
        self._handles: list = []

    def _check(self, name: str, x: torch.Tensor) -> None:
        if self._checked is not None and self._checked[0] is x and self._checked[1] == x._version:
            return  # a tensor read by several layers in a row is checked once
        if not all_finite(x):
            raise NumericalError(f"non-finite activations (nan/inf) entering layer {name!r} during calibration; "
                                 "check the model weights or run in float32")
        self._checked = (x, x._version)

    def record(self, name: str, x: torch.Tensor) -> None:
        """``x``: layer ``name``'s input in the dense model for the next batch."""
        self._seen.clear()  # the last batch's inputs: not kept alive through this batch's forward
        self._check(name, x)
        self._recorded[name] = (x, _flat(x, self.device or x.device))

    def _record(self, name: str):
        def hook(module, args, kwargs):
            self.record(name, first_tensor(args, kwargs))
        return hook

    def _pair(self, name: str):
        def hook(module, args, kwargs):
            x = first_tensor(args, kwargs)
            dev = self.device or x.device
            got = self._recorded.pop(name, None)
            if got is None:
                raise RuntimeError(f"layer {name}: no dense input recorded for this batch")
            raw, xd = got
            lead = self.share.get(name)
            if lead is not None:
                seen = self._seen.get(lead)
                if seen is None or seen[0] is not x or seen[1] is not raw:
                    raise RuntimeError(f"layer {name} shares the sums of {lead} but not its inputs")
                if self.on_pair is not None:
                    self.on_pair(name, xd, _flat(x, dev))
                self.sums[name] = self.sums[lead]
                return
            self._check(name, x)
            xc = _flat(x, dev)
            if xd.shape != xc.shape:
                raise NumericalError(f"layer {name}: dense and compressed inputs differ in shape "
                                     f"{tuple(xd.shape)} vs {tuple(xc.shape)}")
            self._seen[name] = (x, raw)
            if self.on_pair is not None:
                self.on_pair(name, xd, xc)
            if name not in self.sums:
                n = xc.shape[1]
                self.sums[name] = [InputStats.zeros(n, device=dev, cov=self.cov),
                                   torch.zeros(n, n, dtype=torch.float64, device=dev)]
            st, M = self.sums[name]
            st.add_(xc)
            for a, c in zip(row_chunks(xd, dev), row_chunks(xc, dev)):
                add_products_(M, a, c)
        return hook

    def __enter__(self) -> "PairedAccumulator":
        for name in self.dense:
            self._handles.append(self.dense[name].register_forward_pre_hook(self._record(name), with_kwargs=True))
        for name in self.current:
            self._handles.append(self.current[name].register_forward_pre_hook(self._pair(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._recorded.clear()
        self._seen.clear()
        self._checked = None
