"""Paired statistics for the sequential refit: the same layers run on the dense model's inputs ``X``
and on the compressed prefix's inputs ``X'``.

Per layer, ``C' = sum x' x'^T`` (as :class:`InputStats`) and the cross moment ``M = sum x x'^T``
(in, in), float64, so that a fit can target the DENSE model's outputs from the compressed inputs:
``argmin ||W X - W' X'||`` (:meth:`LayerStats.target`). The engine's held-out windows, which choose
the refit's ridge, are scored through ``on_pair`` and added to the same sums afterwards.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from ..errors import NumericalError
from .stats import InputStats, first_tensor, row_chunks


def _flat(x: torch.Tensor, device) -> torch.Tensor:
    """(tokens, in) rows of ``x`` on ``device`` in ``x``'s dtype (cast to float64 chunk by chunk)."""
    return x.detach().reshape(-1, x.shape[-1]).to(device=device)


class PairedAccumulator:
    """Context manager: pre-hooks on ``dense`` modules record each input ``x``; pre-hooks on ``current``
    modules (same names) add ``x'`` to ``C'`` and ``x x'^T`` to ``M``: ``sums[name] = [InputStats, M]``
    (``sums``: the caller's, added to in place, or new).

    The dense forward of a batch must run before the current forward of the same batch. ``on_pair(name,
    x, x')`` (optional) sees each pair of (tokens, in) inputs before they are added.
    """

    def __init__(self, dense: Mapping[str, nn.Module], current: Mapping[str, nn.Module], cov: bool = True,
                 device: torch.device | str | None = None,
                 on_pair: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
                 sums: dict[str, list] | None = None) -> None:
        if set(dense) != set(current):
            raise ValueError("dense and current modules must have the same names")
        self.dense, self.current, self.cov, self.device = dict(dense), dict(current), cov, device
        self.on_pair = on_pair
        self.sums: dict[str, list] = {} if sums is None else sums
        self._recorded: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _check(self, name: str, x: torch.Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise NumericalError(f"non-finite activations (nan/inf) entering layer {name!r} during calibration; "
                                 "check the model weights or run in float32")

    def _record(self, name: str):
        def hook(module, args, kwargs):
            x = first_tensor(args, kwargs)
            self._check(name, x)
            self._recorded[name] = _flat(x, self.device or x.device)
        return hook

    def _pair(self, name: str):
        def hook(module, args, kwargs):
            x = first_tensor(args, kwargs)
            self._check(name, x)
            dev = self.device or x.device
            xd = self._recorded.pop(name, None)
            if xd is None:
                raise RuntimeError(f"layer {name}: no dense input recorded for this batch")
            xc = _flat(x, dev)
            if xd.shape != xc.shape:
                raise NumericalError(f"layer {name}: dense and compressed inputs differ in shape "
                                     f"{tuple(xd.shape)} vs {tuple(xc.shape)}")
            if self.on_pair is not None:
                self.on_pair(name, xd, xc)
            if name not in self.sums:
                n = xc.shape[1]
                self.sums[name] = [InputStats.zeros(n, device=dev, cov=self.cov),
                                   torch.zeros(n, n, dtype=torch.float64, device=dev)]
            st, M = self.sums[name]
            st.add_(xc)
            for a, c in zip(row_chunks(xd, dev), row_chunks(xc, dev)):
                M.addmm_(a.T, c)
        return hook

    def __enter__(self) -> "PairedAccumulator":
        for name in self.dense:
            self._handles.append(self.dense[name].register_forward_pre_hook(self._record(name), with_kwargs=True))
            self._handles.append(self.current[name].register_forward_pre_hook(self._pair(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._recorded.clear()
