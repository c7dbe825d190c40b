"""Write a trained model like any rankwise model: structured layers in rankwise's format
(:func:`rankwise.models.saved.save_structured`), a plain model as a Hugging Face checkpoint; the
tokenizer, ``train_log.json`` and ``loss.png`` inside the same atomic output directory."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..files import atomic_dir, write_json
from ..models.saved import save_structured, structured_layers


def plot_loss(curves: dict[str, list[float]], path, title: str = "training loss") -> None:
    from ..figures import new_figure, save_png

    fig = new_figure((7, 4.5))
    ax = fig.subplots()
    for label, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=label, lw=1.3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def save_trained(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, log: dict[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    log = dict(log or {})

    def extra(tmp: Path) -> None:
        write_json(tmp / "train_log.json", log)
        if log.get("losses"):
            plot_loss({log.get("optim", "loss"): log["losses"]}, tmp / "loss.png",
                      title=f"rankwise train: {log.get('optim', '')}")

    if structured_layers(model):
        return save_structured(model, out_dir, tokenizer, overwrite=overwrite, extra={"training": {
            k: v for k, v in log.items() if k != "losses"}}, after=extra)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        extra(tmp)
    return Path(out_dir)
