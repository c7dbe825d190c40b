"""Load a causal LM and its tokenizer from a built-in name or a local directory."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..errors import ModelNotFoundError
from .offline import hub_offline
from .registry import resolve_model
from .saved import is_structured_dir, load_structured

log = logging.getLogger(__name__)


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    with hub_offline():
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tok.model_max_length = int(1e9)  # we cut windows ourselves; silence length warnings
    return tok


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Return ``(model, tokenizer, path)`` for a built-in name or a local HF directory.

    A directory written by ``rankwise compress`` (it holds ``rankwise.json``) is rebuilt
    with its factorized layers.
    """
    path = resolve_model(name_or_path)
    if is_structured_dir(path):
        model = load_structured(path, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        try:
            with hub_offline():
                model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelNotFoundError(
                f"could not load a causal LM from {path}: {e}. Pass a directory written by "
                "save_pretrained (config.json + safetensors weights) or a built-in model name."
            ) from e
    model.to(device).eval()
    try:
        tok = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(
            f"{path} has no usable tokenizer ({e}); save the tokenizer next to the model "
            "(tokenizer.save_pretrained(dir))."
        ) from e
    return model, tok, Path(path)
