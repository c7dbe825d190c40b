"""The Python API: one verb per job, each a thin call into its package.

Mutation is uniform: ``compress`` and ``adapt`` return a modified **copy** of the model unless
``inplace=True``. ``load`` reverses ``save``; both take any model rankwise can write (compressed
directories, plain Hugging Face directories, built-in names).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn


def load(name_or_path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu"):
    """``(model, tokenizer, path)`` for a built-in model name, a local Hugging Face directory, or a
    directory written by :func:`save` / ``rankwise compress`` (its structured layers rebuilt)."""
    from .models.loading import load_model as _load

    return _load(name_or_path, dtype=dtype, device=device)


#: The same loader under its descriptive name (same arguments, same ``(model, tokenizer, path)``).
load_model = load


def save(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, report=None, overwrite: bool = False,
         extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``out_dir`` atomically (safetensors + JSON); :func:`load` reads it back.

    A model with structured layers (low rank, quantized, ...) is written in rankwise's format with a
    ``rankwise.json`` manifest; a plain model is written as an ordinary Hugging Face checkpoint.
    """
    from .compression.saving import save_model

    return save_model(model, out_dir, tokenizer=tokenizer, report=report, overwrite=overwrite, extra=extra)


def compress(model: nn.Module, structure: str | None = None, ratio: float | None = None, *,
             method: str | None = None, calib=None, tokenizer=None, inplace: bool = False, heal=None, **options):
    """Compress ``model``'s linear layers; returns ``(compressed_model, report)``.

    A deep copy is compressed unless ``inplace=True``. ``structure`` defaults to low rank, ``ratio``
    (fraction of the targeted weight values removed) to 0.4; ``method`` picks the low-rank objective.
    See :func:`rankwise.compression.compress.compress` for every option (``bits_per_weight``,
    ``options``, ``allocate``, ``mode``, ``granularity``, ``refit``, ``calib_options``, ``device``, ...).
    ``heal``: :class:`rankwise.healing.HealOptions` (or a dict, e.g. ``{"steps": 100}``) trains low-rank
    corrections of the factors on the calibration windows and merges them back (same size); a pruned
    model (``depth``, ``width``, ``slice``) is distilled from the dense model instead (KL on the logits,
    corrections of every linear layer); the report's ``healing`` records it.
    """
    from .compression.compress import calibration_windows, compress as _compress
    from .options import make_options
    from .healing import HealOptions, heal as _heal

    heal_opts = make_options(HealOptions, heal, {}, "healing")
    target = model if inplace else copy.deepcopy(model)
    teacher = None  # pruned models heal by distillation from the dense model
    if heal_opts.steps and _rewrites_architecture(structure):
        teacher = copy.deepcopy(model) if inplace else model
    if heal_opts.steps and not (isinstance(calib, torch.Tensor) and calib.ndim == 2):
        co = dict(options.get("calib_options") or {})
        calib, _ = calibration_windows(target, calib, tokenizer, co.get("windows", 64), co.get("seqlen", 512),
                                       co.get("seed", 3))
    target, report = _compress(target, structure, ratio, method=method, calib=calib, tokenizer=tokenizer, **options)
    if heal_opts.steps:
        report.healing = _heal(target, calib, heal_opts, progress=options.get("progress", True), teacher=teacher)
    return target, report


def _rewrites_architecture(structure: str | None) -> bool:
    """Whether ``structure`` prunes the architecture (depth, width, slice) rather than replacing layers."""
    from .compression.compress import DEFAULT_STRUCTURE
    from .compression.methods.base import STRUCTURES

    return bool(getattr(STRUCTURES.get(structure or DEFAULT_STRUCTURE), "rewrites_architecture", False))


def compress_low_memory(model: str | os.PathLike | None, out_dir: str | os.PathLike, **options):
    """Compress the checkpoint at ``model`` block by block from disk into ``out_dir``; returns the report."""
    from .compression.compress import compress_low_memory as _compress_low_memory

    return _compress_low_memory(model, out_dir, **options)


def evaluate(model: nn.Module, tokenizer, **options):
    """Perplexity on the default protocol (or ``text=``); returns a :class:`PerplexityResult`."""
    from .evaluation.perplexity import perplexity as _perplexity

    return _perplexity(model, tokenizer, **options)


perplexity = evaluate


def analyze(model: nn.Module, **options):
    """Per-layer spectral diagnostics; returns an :class:`~rankwise.analysis.run.AnalysisResult`."""
    from .analysis.run import analyze as _analyze

    return _analyze(model, **options)


def adapt(model: nn.Module, init: str = "pissa", rank: int = 16, inplace: bool = False, **options) -> nn.Module:
    """Attach ``init``-initialized rank-``rank`` adapters; returns the adapted model (a copy unless
    ``inplace=True``). See :func:`rankwise.adaptation.attach.adapt` for the options."""
    from .adaptation.attach import adapt as _adapt

    target = model if inplace else copy.deepcopy(model)
    return _adapt(target, init=init, rank=rank, **options)


def load_corpus(split: str = "test", text_file: str | os.PathLike | None = None) -> str:
    """The default corpus's ``calib`` / ``test`` split, or the text of ``text_file``."""
    from .calibration.corpus import load_corpus as _load_corpus

    return _load_corpus(split, text_file)
