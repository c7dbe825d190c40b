"""Structured-matrix layers: stored form, ``dense()``, forward, byte count, save/load spec.

* :mod:`.base` -- :class:`StructuredLinear` (the interface) and :data:`LAYERS` (kind -> class).
* :mod:`.lowrank` -- :class:`LowRankLinear` (``y = B(Ax) + b``), :func:`lowrank_saves`.
* :mod:`.quant` -- :class:`QuantLinear` (packed integer codes + float16 scales, optional rotation).
* :mod:`.lowrank_quant` -- :class:`LowRankQuantLinear` (quantized matrix + low-rank factors).
* :mod:`.blast` -- :class:`BlastLinear` (``W'_ij = U_i diag(d_ij) V_j^T``, trained from scratch).
"""
from .base import LAYERS, StructuredLinear, build_layer
from .lowrank import LowRankLinear, lowrank_saves, max_saving_rank
from .lowrank_quant import LowRankQuantLinear
from .quant import QuantLinear
from . import blockdiag, kronecker, monarch, shared_basis, sparse  # noqa: F401  layer kinds (issue 13)
from . import blast  # noqa: F401,E402  layer kind (issue 21)
from . import columns  # noqa: F401  input-column subsets (width pruning, issue 20)

__all__ = ["LAYERS", "LowRankLinear", "LowRankQuantLinear", "QuantLinear", "StructuredLinear", "build_layer",
           "lowrank_saves", "max_saving_rank"]
