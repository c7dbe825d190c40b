"""Tiny randomly initialized causal LMs and a byte-level tokenizer, built in-process.

Used by the unit tests and by anyone who wants to try rankwise without the real model.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Matrices have singular values, "
    "and low rank structure appears in trained weights. " * 4
)


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on a fixed sentence (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator([TINY_TEXT], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")
    tok.model_max_length = int(1e9)
    return tok


def tiny_config(arch: str = "llama", vocab_size: int = 320, **overrides):
    """Config of a 2-layer model of the given family: ``llama``, ``gpt2``, ``gemma3`` (causal LMs) or
    ``bert`` (an encoder with a masked-LM head)."""
    from transformers import BertConfig, Gemma3TextConfig, GPT2Config, LlamaConfig

    if arch == "llama":
        kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True)
        cls = LlamaConfig
    elif arch == "gpt2":
        kw = dict(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                  bos_token_id=0, eos_token_id=0)
        cls = GPT2Config
    elif arch == "gemma3":
        kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                  max_position_embeddings=256, sliding_window=32)
        cls = Gemma3TextConfig
    elif arch == "bert":
        kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
        cls = BertConfig
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}: llama, gpt2, gemma3, bert")
    kw.update(overrides)
    return cls(**kw)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A randomly initialized tiny model (float32, eval mode): a causal LM, or for ``bert`` a masked LM."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if arch == "bert" else AutoModelForCausalLM
    model = auto.from_config(tiny_config(arch, **overrides))
    return model.eval()


def save_tiny(dest: str | os.PathLike, arch: str = "llama", seed: int = 0) -> Path:
    """Write a tiny model + tokenizer as a normal HF directory; returns its path."""
    from ..files import atomic_dir

    dest = Path(dest)
    model = tiny_model(arch, seed)
    tok = tiny_tokenizer(model.config.vocab_size)
    with atomic_dir(dest, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return dest
