"""rankwise: the matrix structure of neural-network weights -- compress, adapt, analyze.

The API is a handful of verbs, imported lazily so that ``import rankwise`` stays fast and has no
side effects (no environment variable is set, no plotting backend chosen)::

    model, tok, path = rankwise.load_model("smollm2-135m-instruct")
    small, report = rankwise.compress(model, ratio=0.4, tokenizer=tok)   # returns a compressed copy
    rankwise.save(small, "out/smollm2-40", tokenizer=tok, report=report)
    small, tok, path = rankwise.load("out/smollm2-40")
    rankwise.evaluate(small, tok).ppl
    rankwise.analyze(model)                                             # per-layer spectra
    tuned, info = rankwise.adapt(model, init="pissa", rank=16)          # returns an adapted copy
    slim = rankwise.structurize(model, "sltrain", ratio=0.5)            # trainable structured layers
    rankwise.train(slim, tok, optim="galore", rank=32, steps=100)       # in place; rankwise.optim for the optimizer

The verbs live in :mod:`rankwise.api`; the job packages are :mod:`rankwise.compression`,
:mod:`rankwise.adaptation`, :mod:`rankwise.analysis` and :mod:`rankwise.evaluation`.
"""
from __future__ import annotations

__version__ = "0.2.0"

from .errors import RankwiseError

_API = ("compress", "compress_low_memory", "load", "load_model", "save", "evaluate", "perplexity",
        "analyze", "adapt", "load_corpus", "match", "barrier", "merge", "lock", "export", "structurize", "init_",
        "train", "prepare_inference", "generate")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'rankwise' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["RankwiseError", "__version__", *_API]
