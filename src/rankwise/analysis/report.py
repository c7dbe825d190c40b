"""``--report DIR``: PNG plots of an :class:`AnalysisResult` and one self-contained HTML page.

Plots: ESD on log-log axes with the fitted power law (chosen layers); alpha / FARMS alpha and
stable rank by layer index and module type; energy-at-rank curves; plain vs whitened spectra
(with calibration); intruder counts (with a compared model). The HTML embeds every PNG as base64.
"""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..figures import colormap, new_figure, save_png
from ..files import atomic_dir, write_text
from .run import AnalysisResult


def _colors(types: Sequence[str]) -> dict[str, tuple]:
    cmap = colormap("tab10")
    return {t: cmap(i % 10) for i, t in enumerate(dict.fromkeys(types))}


def pick_layers(result: AnalysisResult, n: int = 4) -> list[str]:
    """Layers shown in per-layer plots: smallest and largest alpha, then the first and last layers."""
    recs = result.layers
    chosen: list[str] = []
    fitted = [r for r in recs if r.get("alpha") is not None]
    if fitted:
        chosen += [min(fitted, key=lambda r: r["alpha"])["name"], max(fitted, key=lambda r: r["alpha"])["name"]]
    for r in (recs[:1] + recs[-1:] + recs[1:]):
        if len(dict.fromkeys(chosen)) >= n:
            break
        chosen.append(r["name"])
    return list(dict.fromkeys(chosen))[:n]


def _esd(result, names, path):
    recs = {r["name"]: r for r in result.layers}
    cols = min(2, len(names))
    rows = (len(names) + cols - 1) // cols
    fig = new_figure((5.5 * cols, 4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, n in zip(axes.flat, names):
        ev = (result.spectra[n].numpy() ** 2)
        ev = ev[ev > 1e-5]
        r = recs[n]
        if ev.size < 2:
            ax.set_title(f"{n}\n(spectrum too short)", fontsize=8)
            continue
        bins = np.logspace(np.log10(ev.min()), np.log10(ev.max()), 40)
        ax.hist(ev, bins=bins, density=True, color="#7aa6d6", label="ESD")
        a, xmin = r.get("alpha"), r.get("alpha_xmin")
        if a is not None and xmin:
            frac = r["alpha_num_tail"] / ev.size
            xs = np.logspace(np.log10(xmin), np.log10(ev.max()), 50)
            ax.plot(xs, frac * (a - 1) / xmin * (xs / xmin) ** (-a), "r--", lw=2, label=f"power law alpha={a:.2f}")
            ax.axvline(xmin, color="k", lw=0.8, ls=":", label=f"xmin={xmin:.3g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("eigenvalue of W^T W")
        ax.set_ylabel("density")
        ax.set_title(n, fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    save_png(fig, path, dpi=80)


def _by_layer(result, path):
    recs = result.layers
    colors = _colors([r["type"] for r in recs])
    has_farms = any(r.get("farms_alpha") is not None for r in recs)
    panels = [("alpha", "alpha (ESD power law)")] + ([("farms_alpha", "FARMS alpha")] if has_farms else []) + \
             [("stable_rank", "stable rank")]
    fig = new_figure((10, 3 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], panels):
        for t, c in colors.items():
            pts = [(r["index"] if r["index"] is not None else i, r.get(key)) for i, r in enumerate(recs)
                   if r["type"] == t and r.get(key) is not None]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, "o-", color=c, label=t, ms=4, lw=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("layer (block) index")
    axes[0, 0].legend(fontsize=7, ncol=min(7, len(colors)), loc="upper right")
    fig.tight_layout()
    save_png(fig, path, dpi=80)


def _energy(result, path):
    recs = result.layers
    colors = _colors([r["type"] for r in recs])
    fig = new_figure((7, 4.5))
    ax = fig.subplots()
    seen = set()
    for r in recs:
        s = result.spectra[r["name"]].numpy()
        e = np.cumsum(s**2) / max((s**2).sum(), 1e-300)
        k = np.arange(1, s.size + 1) / s.size
        lab = r["type"] if r["type"] not in seen else None
        seen.add(r["type"])
        ax.plot(k, e, color=colors[r["type"]], alpha=0.5, lw=1, label=lab)
    for q in (0.9, 0.95, 0.99):
        ax.axhline(q, color="gray", lw=0.6, ls=":")
    ax.set_xlabel("rank k / min(out, in)")
    ax.set_ylabel("energy kept  sum_{i<=k} s_i^2 / ||W||_F^2")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=80)


def _whitened(result, names, path):
    fig = new_figure((7, 4.5))
    ax = fig.subplots()
    cmap = colormap("tab10")
    for i, n in enumerate(names):
        s, sw = result.spectra[n].numpy(), result.white_spectra[n].numpy()
        ax.plot(np.arange(1, s.size + 1), s / s[0], color=cmap(i), lw=1.2, label=f"{n} (W)")
        ax.plot(np.arange(1, sw.size + 1), sw / sw[0], color=cmap(i), lw=1.2, ls="--", label=f"{n} (W S)")
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("s_i / s_1")
    ax.set_title("plain (solid) vs activation-whitened (dashed) spectra", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=80)


def _intruders(result, path):
    recs = result.layers
    colors = _colors([r["type"] for r in recs])
    fig = new_figure((10, 3.5))
    ax = fig.subplots()
    ax.bar(range(len(recs)), [r.get("intruders", 0) for r in recs], color=[colors[r["type"]] for r in recs])
    for t, c in colors.items():
        ax.bar([0], [0], color=c, label=t)
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("intruder dimensions")
    ax.legend(fontsize=7, ncol=min(7, len(colors)))
    fig.tight_layout()
    save_png(fig, path, dpi=80)


def _fmt(v) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "x".join(map(str, v))
    return html.escape(str(v))


_TABLE_KEYS = ("name", "shape", "alpha", "alpha_weighted", "farms_alpha", "stable_rank", "effective_rank",
               "rank90", "rank99", "w_rank90", "w_rank99", "intruders", "relative_change")


def _html(result: AnalysisResult, images: list[tuple[str, str, Path]], title: str) -> str:
    keys = [k for k in _TABLE_KEYS if any(k in r for r in result.layers)]
    head = "".join(f"<th>{k}</th>" for k in keys)
    rows = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in keys) + "</tr>" for r in result.layers)
    s = result.summary
    facts = [f"{s['layers']} layers analyzed"]
    if "alpha" in s:
        facts.append(f"alpha mean {s['alpha']['mean']:.3g}, median {s['alpha']['median']:.3g}; "
                     f"{s['alpha_in_2_6']:.0%} of layers in [2, 6]; {s.get('alpha_missing', 0)} without a fit")
    if "farms_alpha" in s:
        facts.append(f"FARMS alpha mean {s['farms_alpha']['mean']:.3g}")
    if "stable_rank" in s:
        facts.append(f"stable rank mean {s['stable_rank']['mean']:.3g}")
    if "intruders_total" in s:
        facts.append(f"{s['intruders_total']} intruder dimensions in total")
    for sk in s.get("skipped", []):
        facts.append(f"skipped {html.escape(sk['name'])}: {html.escape(sk['reason'])}")
    figs = []
    for caption, alt, p in images:
        data = base64.b64encode(p.read_bytes()).decode()
        figs.append(f"<figure><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 16px; margin-top: 28px; }}
figure {{ margin: 12px 0; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ font-size: 12px; color: #555; }}
table {{ border-collapse: collapse; font-size: 11px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
td:first-child {{ text-align: left; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<ul>{''.join(f'<li>{f}</li>' for f in facts)}</ul>
<h2>Plots</h2>
{''.join(figs)}
<h2>Per-layer metrics</h2>
<table><tr>{head}</tr>{rows}</table>
</body></html>
"""


def write_report(result: AnalysisResult, out_dir: str | os.PathLike, title: str = "rankwise analyze",
                 layers: Sequence[str] | None = None, overwrite: bool = False) -> Path:
    """Write ``out_dir/index.html`` (self-contained) and the PNGs; returns the HTML path."""
    names = list(layers) if layers else pick_layers(result)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        imgs: list[tuple[str, str, Path]] = []
        if result.layers:
            _esd(result, names, tmp / "esd.png")
            imgs.append(("ESD (eigenvalues of W^T W) on log-log axes with the fitted power law and xmin",
                         "ESD", tmp / "esd.png"))
            _by_layer(result, tmp / "by_layer.png")
            imgs.append(("alpha, FARMS alpha and stable rank by block index and module type", "by layer",
                         tmp / "by_layer.png"))
            _energy(result, tmp / "energy.png")
            imgs.append(("energy kept at each relative rank, one curve per layer", "energy", tmp / "energy.png"))
            if result.white_spectra:
                wn = [n for n in names if n in result.white_spectra]
                _whitened(result, wn, tmp / "whitened.png")
                imgs.append(("plain vs activation-whitened singular values (normalized)", "whitened",
                             tmp / "whitened.png"))
            if any("intruders" in r for r in result.layers):
                _intruders(result, tmp / "intruders.png")
                imgs.append(("intruder dimensions per layer", "intruders", tmp / "intruders.png"))
        write_text(tmp / "index.html", _html(result, [(c, a, tmp / p.name) for c, a, p in imgs], title))
        result.write_json(tmp / "analysis.json")
    return out_dir / "index.html"
