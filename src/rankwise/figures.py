"""Figures without pyplot: matplotlib's object-oriented API, so rankwise never picks a backend.

``Figure`` objects are not registered with pyplot (nothing to close, nothing shown); ``savefig`` on
them renders PNG with Agg for that call only. Every PNG is written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .files import atomic_path


def new_figure(figsize: tuple[float, float]) -> Any:
    """A ``matplotlib.figure.Figure`` of ``figsize`` inches (make axes with ``fig.subplots``)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def colormap(name: str) -> Any:
    """A registered matplotlib colormap (e.g. ``"tab10"``), without pyplot."""
    import matplotlib

    return matplotlib.colormaps[name]


def save_png(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Render ``fig`` to ``path`` as PNG, atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(path)
