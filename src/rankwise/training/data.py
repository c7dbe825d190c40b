"""Training data: a byte-level tokenizer for models trained from scratch, and seeded batches.

:func:`byte_tokenizer`: the 256 bytes (GPT-2's byte-to-unicode alphabet, so any UTF-8 text round-trips)
plus ``<eos>``, no merges: a vocabulary of 257, so that a small model's embeddings do not dominate its
parameters. :func:`batch_at` draws the windows of step ``t`` from a generator seeded by ``(seed, t)``:
a resumed run sees exactly the batches the uninterrupted run would have.
"""
from __future__ import annotations

import torch

from ..errors import CorpusError


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` over raw bytes (ids 0..255) plus ``<eos>`` (id 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _BYTE_OF[ch])
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")
    tok.model_max_length = int(1e9)
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_OF = {ch: b for b, ch in _bytes_to_unicode().items()}


def batch_at(ids: torch.Tensor, step: int, batch_size: int, seqlen: int, seed: int, micro: int = 0) -> torch.Tensor:
    """``(batch_size, seqlen)`` windows of ``ids`` at random starts drawn from ``(seed, step, micro)``."""
    if ids.numel() < seqlen + 1:
        raise CorpusError(f"the training text has {ids.numel()} tokens, fewer than one window of {seqlen}; use a "
                          "longer --text-file or a smaller --seqlen")
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) * 1_009 + int(micro)) % (2 ** 62))
    starts = torch.randint(0, ids.numel() - seqlen, (batch_size,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
