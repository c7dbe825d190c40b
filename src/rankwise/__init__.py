"""rankwise: the matrix structure of neural-network weights — compress, adapt, analyze.

Python API (lazy imports keep ``import rankwise`` fast)::

    model, tok, path = rankwise.load_model("smollm2-135m-instruct")
    rankwise.evaluate(model, tok)                      # perplexity on the default corpus
"""
from __future__ import annotations

import os as _os

_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"

from .errors import RankwiseError  # noqa: E402

_LAZY = {
    "load_model": ("rankwise.models.loading", "load_model"),
    "evaluate": ("rankwise.evaluate.perplexity", "perplexity"),
    "perplexity": ("rankwise.evaluate.perplexity", "perplexity"),
    "load_corpus": ("rankwise.calibration.corpus", "load_corpus"),
    "compress": ("rankwise.compress.api", "compress"),
    "load": ("rankwise.compress.api", "load"),
    "compress_low_memory": ("rankwise.compress.lowmem", "compress_low_memory"),
    "analyze": ("rankwise.analyze.run", "analyze"),
    "adapt": ("rankwise.adapt.attach", "adapt"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'rankwise' has no attribute {name!r}")


__all__ = ["RankwiseError", "__version__", *_LAZY]
