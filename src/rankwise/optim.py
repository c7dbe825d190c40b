"""``rankwise.optim``: the projected-gradient optimizer and its helpers (imported on first use).

    from rankwise.optim import ProjectedAdamW, projected_param_groups
    opt = ProjectedAdamW(projected_param_groups(model, rank=64, projector="dct"), lr=1e-3)
"""
from __future__ import annotations

_NAMES = ("ProjectedAdamW", "PROJECTORS", "optimizer_state_bytes", "projected_linears", "projected_param_groups")


def __getattr__(name: str):
    if name in _NAMES:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'rankwise.optim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES])


__all__ = list(_NAMES)
