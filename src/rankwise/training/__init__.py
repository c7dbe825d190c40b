"""Training with matrix structure: rankwise's fourth job.

* :mod:`.optim` -- :class:`ProjectedAdamW` (GaLore-style projected moments) and
  :func:`optimizer_state_bytes`; :mod:`.projectors` -- ``svd``, ``randomized``, ``dct``, ``random``;
  :mod:`.groups` -- param groups for a model's attention and MLP linears.
"""
from .groups import projected_linears, projected_param_groups
from .optim import ProjectedAdamW, optimizer_state_bytes
from .projectors import PROJECTORS

__all__ = ["PROJECTORS", "ProjectedAdamW", "optimizer_state_bytes", "projected_linears", "projected_param_groups"]
