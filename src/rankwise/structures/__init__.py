"""Structured-matrix layers: parameter count, ``dense()``, forward, state dict.

* :mod:`.lowrank` — :class:`LowRankLinear` (``y = B(Ax) + b``), :func:`lowrank_saves`.
"""
from .lowrank import LowRankLinear, lowrank_saves, max_saving_rank
from .lowrank_quant import LowRankQuantLinear, QuantLinear  # noqa: F401  (QuantLinear from .quant)

__all__ = ["LowRankLinear", "lowrank_saves", "max_saving_rank"]
