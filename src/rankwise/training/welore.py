"""WeLore fine-tuning (Jaiswal et al. 2024): train a compressed model's low-rank factors, keep every
layer whose spectrum did not compress (left dense by the allocator) and everything else frozen.

Compress with the ``welore`` allocator (:mod:`rankwise.compression.allocation.welore`: one global
threshold on normalized singular values), then :func:`welore_trainable_` marks the ``A`` and ``B``
factors of each :class:`LowRankLinear` trainable and freezes the rest; any optimizer over
``[p for p in model.parameters() if p.requires_grad]`` then fine-tunes exactly WeLore's low-rank
components.
"""
from __future__ import annotations

from torch import nn

from ..errors import NoTargetLayersError
from ..structures.lowrank import LowRankLinear


def welore_trainable_(model: nn.Module, train_bias: bool = False) -> dict[str, list[str]]:
    """Freeze everything but the low-rank factors (and their biases with ``train_bias``); returns
    ``{"trainable": layer names, "frozen_dense": names of the linear layers left dense}``."""
    lowrank = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not lowrank:
        raise NoTargetLayersError("the model has no low-rank layers: compress it first (e.g. rankwise.compress("
                                  "model, allocate='welore', ratio=0.5))")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lowrank.values():
        layer.A.weight.requires_grad_(True)
        layer.B.weight.requires_grad_(True)
        if train_bias and layer.B.bias is not None:
            layer.B.bias.requires_grad_(True)
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and not any(n.startswith(k + ".") for k in lowrank) and "lm_head" not in n]
    return {"trainable": list(lowrank), "frozen_dense": dense}
