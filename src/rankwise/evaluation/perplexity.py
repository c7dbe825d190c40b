"""Perplexity: ppl = exp( sum_w sum_t NLL(x_{w,t+1} | x_{w,<=t}) / sum_w (L - 1) ).

Each window of L tokens is scored independently (no context carried across windows);
the first token of every window is context only.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calibration.sampling import (
    DEFAULT_EVAL_WINDOWS, DEFAULT_SEQLEN, check_seqlen, eval_windows, tokenize,
)
from ..errors import ConfigError, NumericalError
from ..models.architecture import check_language_model


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> tuple[float, int]:
    """Summed next-token NLL (float64) and the number of scored tokens over (w, L) windows."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    it = range(0, windows.shape[0], batch_size)
    for i in tqdm(it, desc="perplexity", disable=not progress, leave=False):
        batch = windows[i: i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
        total += float(nll.double().sum())
        count += nll.numel()
    return total, count


def perplexity(
    model,
    tokenizer=None,
    text: str | None = None,
    ids: torch.Tensor | None = None,
    seqlen: int = DEFAULT_SEQLEN,
    windows: int | None = DEFAULT_EVAL_WINDOWS,
    batch_size: int = 4,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on the first ``windows`` non-overlapping ``seqlen`` windows.

    Pass token ``ids`` directly, or ``text`` + ``tokenizer``; with neither, the default
    corpus's test split is used. ``windows=None`` scores every full window.
    """
    check_language_model(model, "perplexity")
    if windows is not None and windows < 1:
        raise ConfigError(f"windows must be a positive number of windows (or None for all), got {windows!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive number of windows per forward pass, got {batch_size!r}")
    if ids is None:
        if tokenizer is None:
            raise ConfigError("perplexity() needs token ids or a tokenizer: pass ids=<LongTensor> or "
                              "tokenizer=<the model's tokenizer> (with text=..., or none for the default corpus)")
        if text is None:
            from ..calibration.corpus import load_corpus

            text = load_corpus("test")
        ids = tokenize(tokenizer, text)
    check_seqlen(model, seqlen)
    win = eval_windows(ids, seqlen, windows)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    total, count = window_nll(model, win, batch_size=batch_size, progress=progress)
    model.train(was_training)
    nll = total / count
    if not math.isfinite(nll):
        raise NumericalError("the model produced non-finite log-likelihoods; its weights may contain NaN/Inf")
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=win.shape[0],
                            seqlen=seqlen, seconds=time.perf_counter() - t0)
