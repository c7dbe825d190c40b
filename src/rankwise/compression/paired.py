"""Paired statistics for the sequential refit: the same block run on the dense model's hidden states
(inputs ``X``) and on the compressed prefix's hidden states (inputs ``X'``).

Per layer, ``C' = sum x' x'^T`` (as :class:`InputStats`) and the cross moment ``M = sum x x'^T``
(in, in), float64, so that the left refit can target the DENSE model's outputs from the
compressed inputs: ``L = argmin ||W X - L R X'||_F = W M R^T (R C' R^T)^-1``
(:func:`rankwise.linalg.refit_left` with ``cross=M``). Error introduced by blocks ``0..i-1`` is
thereby partly compensated in block ``i``.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..calibration.stats import InputStats, _first_tensor
from ..errors import NumericalError
from .blocks import BlockRunner


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).to(torch.float64)


@torch.no_grad()
def paired_block_stats(i: int, modules: Mapping[str, nn.Module], dense: BlockRunner, comp: BlockRunner,
                       want_cov: bool = True, device: torch.device | str = "cpu"
                       ) -> tuple[dict[str, InputStats], dict[str, torch.Tensor], list[torch.Tensor]]:
    """``(stats of X', cross M = X X'^T, dense outputs of block i)`` over all cached batches.

    ``dense`` and ``comp`` hold the same batches in the same order; block ``i`` must still be dense.
    """
    block = dense.blocks[i]
    stats: dict[str, InputStats] = {}
    cross: dict[str, torch.Tensor] = {}
    dense_out: list[torch.Tensor] = []
    recorded: dict[str, torch.Tensor] = {}
    phase = ["record"]

    def make_hook(name: str):
        def hook(module, args, kwargs):
            x = _flat(_first_tensor(args, kwargs))
            if not bool(torch.isfinite(x).all()):
                raise NumericalError(f"non-finite activations (nan/inf) entering layer {name!r} during calibration")
            if phase[0] == "record":
                recorded[name] = x
                return
            st = stats.get(name)
            if st is None:
                st = stats[name] = InputStats.zeros(x.shape[1], device="cpu", cov=want_cov)
                cross[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            st.add_(x)
            cross[name].addmm_(recorded.pop(name).T.cpu(), x.cpu())
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        for hd, hc in zip(dense.hidden, comp.hidden):
            phase[0] = "record"
            args, kwargs = dense.extras[hd.shape[0]][i]
            out = block(hd.to(device), *args, **kwargs)
            dense_out.append((out[0] if isinstance(out, (tuple, list)) else out).detach().to("cpu"))
            phase[0] = "pair"
            block(hc.to(device), *args, **kwargs)
            recorded.clear()
    finally:
        for h in handles:
            h.remove()
    return stats, cross, dense_out
