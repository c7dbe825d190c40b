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


#: Characters per tokenizer call when a long text is tokenized piece by piece (:func:`tokenize`).
CHUNK_CHARS = 1 << 16
#: Characters of context on each side of a cut that the local check tokenizes.
CUT_CONTEXT = 512


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _cut_points(text: str, lo: int, hi: int):
    """Positions ``p`` in ``[lo, hi)`` of a single space between two letters or digits (``"ab| cd"``):
    a word boundary that no whitespace rule of a pre-tokenizer looks across."""
    p = text.find(" ", max(lo, 1))
    while 0 <= p < min(hi, len(text) - 1):
        if text[p - 1].isalnum() and text[p + 1].isalnum():
            yield p
        p = text.find(" ", p + 1)


def _is_cut(tokenizer, text: str, p: int) -> bool:
    """Whether tokenizing ``text[p - CUT_CONTEXT : p + CUT_CONTEXT]`` in two pieces cut at ``p`` gives
    the ids of one call."""
    a, b = max(0, p - CUT_CONTEXT), min(len(text), p + CUT_CONTEXT)
    return _ids(tokenizer, text[a:p]) + _ids(tokenizer, text[p:b]) == _ids(tokenizer, text[a:b])


def tokenize(tokenizer, text: str, chunk_chars: int = CHUNK_CHARS) -> torch.Tensor:
    """1-D LongTensor of the token ids of ``text`` (no special tokens): the ids of one tokenizer call.

    A long text is tokenized in pieces of about ``chunk_chars`` characters (one call on a 2.6 M
    character corpus holds ~350 MB of tokenizer state). Pieces are cut only before a single space
    between two letters or digits (:func:`_cut_points`), a boundary that pre-tokenizing tokenizers
    (byte-level BPE regexes, Metaspace) never merge across, and only where a local check around the
    cut reproduces the ids of one call (:func:`_is_cut`); otherwise the next such space is tried.
    (A cut after a newline is not safe: a text ending in ``"\\n\\n"`` pre-tokenizes that run as one
    piece, the same run followed by a word as two.) The equality with one call is tested on the
    bundled models' tokenizers and corpus.
    """
    import torch

    if len(text) <= chunk_chars + CUT_CONTEXT:
        return torch.tensor(_ids(tokenizer, text), dtype=torch.long)
    parts: list[torch.Tensor] = []
    start = 0
    while start < len(text):
        cut = len(text)
        if len(text) - start > chunk_chars + CUT_CONTEXT:
            cut = next((p for p in _cut_points(text, start + chunk_chars, len(text)) if _is_cut(tokenizer, text, p)),
                       len(text))
        parts.append(torch.tensor(_ids(tokenizer, text[start:cut]), dtype=torch.long))
        start = cut
    return torch.cat(parts)


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
