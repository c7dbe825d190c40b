"""Tokenize text and cut it into windows: the evaluation and calibration protocols.

* evaluation: non-overlapping ``seqlen`` windows from the start, the first ``n`` of them;
* calibration: ``n`` windows of ``seqlen`` tokens at seeded uniform random starts.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CorpusError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads the defaults below without it
    import torch

DEFAULT_SEQLEN = 512
DEFAULT_EVAL_WINDOWS = 64
DEFAULT_CALIB_WINDOWS = 64
DEFAULT_SEED = 3


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D LongTensor of the token ids of ``text`` (no special tokens)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(ids: torch.Tensor, seqlen: int = DEFAULT_SEQLEN, n: int | None = DEFAULT_EVAL_WINDOWS) -> torch.Tensor:
    """(w, seqlen) non-overlapping windows from the start; ``n=None`` takes all of them."""
    if seqlen < 2:
        raise CorpusError(f"seqlen must be at least 2 tokens, got {seqlen}")
    total = ids.numel() // seqlen
    if total == 0:
        raise CorpusError(
            f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
            "use a longer text or a smaller --seqlen"
        )
    w = total if n is None else min(n, total)
    return ids[: w * seqlen].view(w, seqlen)


def calib_windows(ids: torch.Tensor, n: int = DEFAULT_CALIB_WINDOWS, seqlen: int = DEFAULT_SEQLEN,
                  seed: int = DEFAULT_SEED) -> torch.Tensor:
    """(n, seqlen) windows at random starts drawn with ``torch.Generator().manual_seed(seed)``."""
    if n < 1 or seqlen < 2:
        raise CorpusError(f"need at least one window of at least 2 tokens (got n={n}, seqlen={seqlen})")
    if ids.numel() < seqlen + 1:
        raise CorpusError(
            f"calibration text has {ids.numel()} tokens, too short for windows of {seqlen}; "
            "use a longer --text-file or a smaller --calib-seqlen"
        )
    import torch

    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n,), generator=g)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])


def model_context(model) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    return None


def check_seqlen(model, seqlen: int) -> None:
    ctx = model_context(model)
    if ctx is not None and seqlen > ctx:
        raise CorpusError(f"seqlen {seqlen} is longer than the model's context of {ctx} tokens; use --seqlen <= {ctx}")
