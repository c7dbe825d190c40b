"""Per-layer table (structure and spec) and, for low rank, the rank plot (rank by block index)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from ..figures import new_figure, save_png
from ..files import write_text
from ..models.surgery import layer_index, module_type


def plot_ranks(series: Mapping[str, Mapping[str, int | None]], shapes: Mapping[str, tuple[int, int]],
               path: str | os.PathLike, title: str = "rank by layer") -> Path:
    """PNG of the kept rank by block index, one subplot per module type, one line per plan in
    ``series`` (label -> ranks); dense layers are drawn at ``min(m, n)`` with an open marker.
    Written atomically (temp file + rename)."""
    types = list(dict.fromkeys(module_type(n) for n in shapes))
    fig = new_figure((3.2 * len(types), 3.2))
    axes = fig.subplots(1, len(types), squeeze=False, sharey=False)
    for ax, t in zip(axes[0], types):
        for label, ranks in series.items():
            names = [n for n in shapes if module_type(n) == t]
            xs = [layer_index(n) or 0 for n in names]
            ys = [ranks.get(n) if ranks.get(n) is not None else min(shapes[n]) for n in names]
            line = ax.plot(xs, ys, "-", lw=1, label=label)[0]
            dx = [x for x, n in zip(xs, names) if ranks.get(n) is None]
            dy = [min(shapes[n]) for n in names if ranks.get(n) is None]
            if dx:
                ax.plot(dx, dy, "o", mfc="none", color=line.get_color(), ms=4)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("block")
    axes[0][0].set_ylabel("rank (o = dense)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def write_rank_report(report, out_dir: str | os.PathLike) -> tuple[Path, Path | None]:
    """``ranks.md`` (per-layer table with dense reasons) and, for low rank, ``ranks.png`` in ``out_dir``."""
    from ..files import write_text

    out_dir = Path(out_dir)
    ranks = {lr.name: lr.rank for lr in report.layers}
    shapes = {lr.name: tuple(lr.shape) for lr in report.layers}
    reasons = (report.allocation or {}).get("dense", {})
    budget = ", ".join(f"{k} {v:g}" for k, v in report.budget.items())
    md = write_text(out_dir / "ranks.md",
                    f"# Layers: {report.structure} ({report.method}), allocator {report.allocate}, {budget} "
                    f"(removed {report.achieved_ratio:.3f}, {report.bits_per_weight:.2f} bits/weight)\n\n"
                    + layer_markdown(report.layers, reasons))
    if not any(k is not None for k in ranks.values()):
        return md, None
    png = plot_ranks({report.allocate: ranks}, shapes, out_dir / "ranks.png",
                     f"{report.structure} {report.method}, {report.allocate}, {budget}")
    return md, png


def layer_markdown(layers, dense_reasons: Mapping[str, str] | None = None) -> str:
    """The per-layer table (structure and its spec) as Markdown."""
    lines = ["| layer | block | type | shape | structure | spec | bytes | note |", "|---|---|---|---|---|---|---|---|"]
    for lr in layers:
        m, n = lr.shape
        spec = ", ".join(f"{k}={v}" for k, v in (lr.spec or {}).items())
        note = (dense_reasons or {}).get(lr.name, "") if lr.kind is None else ""
        lines.append(f"| {lr.name} | {layer_index(lr.name)} | {module_type(lr.name)} | {m} x {n} | "
                     f"{lr.kind or 'dense'} | {spec} | {lr.bytes_after} | {note} |")
    return "\n".join(lines) + "\n"
