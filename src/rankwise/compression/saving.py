"""Save a compressed model with its report: the format itself is :mod:`rankwise.models.saved`.

``rankwise.json`` gets the compression configuration and report next to the layer descriptions;
``ranks.md`` and ``ranks.png`` (per-layer table and plot) are written inside the same atomic output.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from ..files import atomic_dir
from ..models.saved import save_plain, save_structured, structured_layers
from .report import CompressionReport


def manifest_extra(report: CompressionReport) -> dict[str, Any]:
    """What ``rankwise.json`` records of a compression beyond the layers."""
    return {"structure": report.structure, "method": report.method, "budget": report.budget,
            "allocate": report.allocate, "mode": report.mode, "granularity": report.granularity,
            "refit": report.refit, "calibration": report.calibration, "perplexity": report.perplexity,
            "healing": report.healing, **({"pruning": report.pruning} if report.pruning else {}),
            "config": report.config, "report": report.to_dict()}


def save_compressed(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: CompressionReport | None = None,
                    overwrite: bool = False, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (with its structured layers), the report and the rank table/plot atomically; a
    pruned model (no structured layers, ``report.pruning``) as a plain Hugging Face directory."""
    from .rankplot import write_rank_report

    meta = {**(manifest_extra(report) if report is not None else {}), **(extra or {})}
    after = (lambda tmp: write_rank_report(report, tmp)) if report is not None else None
    if not structured_layers(model) and report is not None and report.pruning:  # pruned: a plain directory
        return save_plain(model, out_dir, tokenizer, overwrite=overwrite, extra=meta, after=after)
    return save_structured(model, out_dir, tokenizer, overwrite=overwrite, extra=meta, after=after)


def record_perplexity(out_dir: str | os.PathLike, report: CompressionReport) -> Path:
    """Rewrite ``out_dir``'s ``rankwise.json`` with what ``report`` now records (its perplexity),
    atomically: a low-memory run writes the directory before it evaluates the model it wrote."""
    import json

    from ..files import write_json
    from ..models.saved import MANIFEST

    path = Path(out_dir) / MANIFEST
    meta = json.loads(path.read_text())
    meta.update(manifest_extra(report))
    return write_json(path, meta)


def save_model(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, report: CompressionReport | None = None,
               overwrite: bool = False, extra: Mapping[str, Any] | None = None) -> Path:
    """:func:`save_compressed` for a model with structured layers, else an atomic ``save_pretrained``."""
    if structured_layers(model) or (report is not None and report.pruning):
        return save_compressed(model, tokenizer, out_dir, report, overwrite=overwrite, extra=extra)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
