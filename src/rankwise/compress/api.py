"""The two API verbs: ``rankwise.compress(model, ...)`` and ``rankwise.load(path)``."""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from .pipeline import compress as compress_inplace
from .report import CompressionReport


def compress(model: nn.Module, method: str | None = None, ratio: float = 0.4, calib=None, tokenizer=None,
             inplace: bool = False, **kwargs) -> tuple[nn.Module, CompressionReport]:
    """Low-rank compress ``model``: returns ``(compressed_model, report)``.

    The model is deep-copied first unless ``inplace=True``. ``method`` defaults to the best one
    measured (``pipeline.DEFAULT_METHOD``); every other option is passed to
    :func:`rankwise.compress.pipeline.compress` (``refit``, ``targets``, ``allocate``, ``calib_windows``,
    ``calib_seqlen``, ``seed``, ``sequential``, ``progress``, ...).

    >>> small, report = rankwise.compress(model, method="svd-llm", ratio=0.4, calib=texts, tokenizer=tok)
    """
    from .pipeline import DEFAULT_METHOD

    target = model if inplace else copy.deepcopy(model)
    return compress_inplace(target, method or DEFAULT_METHOD, ratio, calib=calib, tokenizer=tokenizer, **kwargs)


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from a directory written by ``rankwise compress`` (factorized layers
    rebuilt), a plain Hugging Face directory, or a built-in model name."""
    from ..models.loading import load_model

    model, tok, _ = load_model(path, dtype=dtype, device=device)
    return model, tok
