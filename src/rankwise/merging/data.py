"""The data that matching and barriers run on: token windows of a language model, or inputs (with
targets) of any other module.

* a LongTensor ``(N, T)`` is ``N`` token windows: the model is called as ``model(input_ids=...)`` and its
  loss is the mean next-token NLL;
* a floating tensor is ``N`` inputs; a pair ``(inputs, targets)`` adds class targets (the loss is the
  cross entropy, and the accuracy is reported);
* any other iterable yields ready batches of one of these forms (e.g. a ``DataLoader``).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


def _is_tokens(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in (torch.long, torch.int) and x.ndim == 2


def batches(data, batch_size: int = 8) -> Iterator:
    """Batches of ``data`` (module docstring)."""
    if isinstance(data, torch.Tensor):
        for i in range(0, data.shape[0], batch_size):
            yield data[i: i + batch_size]
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ConfigError(f"inputs and targets differ in length ({x.shape[0]} vs {y.shape[0]})")
        for i in range(0, x.shape[0], batch_size):
            yield x[i: i + batch_size], y[i: i + batch_size]
    elif data is None:
        raise ConfigError("no data given; pass token windows, inputs, or (inputs, targets)")
    else:
        yield from data


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def forward(model: nn.Module, batch) -> torch.Tensor:
    """The model's output (logits) on one batch."""
    dev = _device(model)
    if _is_tokens(batch):
        return model(input_ids=batch.to(dev), use_cache=False).logits
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    out = model(x.to(dev))
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def loss_and_accuracy(model: nn.Module, data, batch_size: int = 8) -> tuple[float, float | None]:
    """Mean loss over ``data`` (next-token NLL for token windows, cross entropy for ``(inputs, targets)``)
    and the accuracy (None for token windows)."""
    total, count, correct = 0.0, 0, 0
    classify = None
    for batch in batches(data, batch_size):
        logits = forward(model, batch)
        if _is_tokens(batch):
            classify = False
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten().to(logits.device),
                                  reduction="sum")
            total += float(nll)
            count += batch[:, 1:].numel()
        elif isinstance(batch, (tuple, list)):
            classify = True
            y = batch[1].to(logits.device)
            total += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            count += y.numel()
        else:
            raise ConfigError("a loss needs targets: pass token windows or (inputs, targets)")
    if count == 0:
        raise ConfigError("the data set is empty")
    return total / count, (correct / count if classify else None)
