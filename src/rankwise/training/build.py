"""The model a training run starts from: a saved model, or a fresh one from a config file, then
optionally structurized and initialized; and the token streams it trains and evaluates on."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelNotFoundError


def model_from_config(path: str | os.PathLike, seed: int = 0, tokenizer: str | None = None):
    """``(model, tokenizer)``: a randomly initialized causal LM from a Hugging Face ``config.json``
    (a file or a directory holding one) and ``tokenizer`` (a model directory or built-in name) or,
    by default, the byte-level tokenizer (:func:`.data.byte_tokenizer`, 257 ids)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .data import byte_tokenizer

    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    try:
        d = json.loads(f.read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"config file {f} does not exist; pass a Hugging Face config.json") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{f} is not a readable JSON config ({e})") from None
    if not isinstance(d, dict) or "model_type" not in d:
        raise ConfigError(f"{f} has no 'model_type'; write a Hugging Face config (e.g. LlamaConfig().to_dict())")
    kind = d.pop("model_type")
    try:
        config = AutoConfig.for_model(kind, **d)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{f}: cannot build a {kind!r} config ({e})") from None
    if tokenizer is not None:
        from ..models.loading import load_tokenizer
        from ..models.registry import resolve_model

        tok = load_tokenizer(resolve_model(tokenizer))
    else:
        tok = byte_tokenizer()
    if config.vocab_size < len(tok):
        raise ConfigError(f"{f}: vocab_size {config.vocab_size} is smaller than the tokenizer's {len(tok)} ids; set "
                          f"vocab_size >= {len(tok)}")
    torch.manual_seed(int(seed))
    try:
        model = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise ConfigError(f"{f}: not a causal LM config ({e})") from None
    return model, tok


def token_streams(tokenizer, text_file: str | os.PathLike | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train ids, held-out ids)``: the default corpus's calib and test splits, or the first 90 % and
    the last 10 % of ``text_file``."""
    from ..calibration.corpus import load_corpus
    from ..calibration.sampling import tokenize

    if text_file is None:
        return tokenize(tokenizer, load_corpus("calib")), tokenize(tokenizer, load_corpus("test"))
    ids = tokenize(tokenizer, load_corpus("calib", text_file))
    cut = int(0.9 * ids.numel())
    return ids[:cut], ids[cut:]


def prepare(model: nn.Module, structure: str | None, ratio: float | None, init: str | None,
            init_data: torch.Tensor | None, seed: int, structure_options: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    """Structurize (in place) and initialize ``model``; returns what was done."""
    from .init import init_
    from .structurize import structure_parameters, structurize

    info: dict[str, Any] = {}
    if structure is not None:
        structurize(model, structure, 0.5 if ratio is None else ratio, seed=seed, inplace=True,
                    **(structure_options or {}))
        info["structure"] = structure_parameters(model)
    elif ratio is not None:
        raise ConfigError("--ratio sets a structure's budget: pass --structure too (lowrank, monarch, sltrain, ...)")
    if init is not None:
        rec = init_(model, init, data=init_data, seed=seed)
        info["init"] = {k: v for k, v in rec.items() if k != "variances"}
    return info
