"""Per-layer rank table and plot (rank by block index, one line per module type)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from ..figures import new_figure, save_png
from ..files import write_text
from ..models.surgery import layer_index, module_type


def rank_rows(ranks: Mapping[str, int | None], shapes: Mapping[str, tuple[int, int]],
              dense_reasons: Mapping[str, str] | None = None) -> list[list]:
    """``[layer, block, type, shape, rank or 'dense', why dense]`` rows in model order."""
    rows = []
    for name, k in ranks.items():
        m, n = shapes[name]
        rows.append([name, layer_index(name), module_type(name), f"{m} x {n}", "dense" if k is None else k,
                     (dense_reasons or {}).get(name, "") if k is None else ""])
    return rows


def rank_markdown(ranks: Mapping[str, int | None], shapes: Mapping[str, tuple[int, int]],
                  dense_reasons: Mapping[str, str] | None = None) -> str:
    """The per-layer table as Markdown."""
    lines = ["| layer | block | type | shape | rank | note |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |"
              for r in rank_rows(ranks, shapes, dense_reasons)]
    return "\n".join(lines) + "\n"


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


def write_rank_report(report, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``ranks.md`` (per-layer table with dense reasons) and ``ranks.png`` next to a saved model."""
    out_dir = Path(out_dir)
    ranks = {lr.name: lr.rank for lr in report.layers}
    shapes = {lr.name: tuple(lr.shape) for lr in report.layers}
    reasons = (report.allocation or {}).get("dense", {})
    md = write_text(out_dir / "ranks.md",
                    f"# Ranks: {report.method}, allocator {report.allocate}, ratio {report.ratio:g} "
                    f"(removed {report.achieved_ratio:.3f})\n\n" + rank_markdown(ranks, shapes, reasons))
    png = plot_ranks({report.allocate: ranks}, shapes, out_dir / "ranks.png",
                     f"{report.method}, {report.allocate}, {report.ratio:g} removed")
    return md, png
