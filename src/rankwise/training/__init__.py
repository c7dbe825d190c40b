"""Training with matrix structure: rankwise's fourth job.

* :mod:`.optim` -- :class:`ProjectedAdamW` (GaLore-style projected moments), :func:`optimizer_state_bytes`;
  :mod:`.projectors` -- ``svd``, ``randomized``, ``dct``, ``random``; :mod:`.groups` -- param groups
  for a model's attention and MLP linears.
* :mod:`.structured` (structure-aware init, per-factor learning rates), :mod:`.structurize`,
  :mod:`.init` (``init_``), :mod:`.welore`; :mod:`.loop` (the training loop), :mod:`.checkpoint`,
  :mod:`.build`, :mod:`.data`, :mod:`.saving`.

Names are imported on first use: the optimizer alone needs torch only (no transformers).
"""
from __future__ import annotations

import importlib

_WHERE = {"ProjectedAdamW": "optim", "optimizer_state_bytes": "optim", "PROJECTORS": "projectors",
          "projected_linears": "groups", "projected_param_groups": "groups", "structurize": "structurize",
          "init_": "init", "welore_trainable_": "welore", "TrainConfig": "loop", "train": "loop"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = sorted(_WHERE)
