"""Default corpus parsing and split rule, user text files, window sampling."""
from __future__ import annotations

import pytest
import torch

from rankwise.calibration import corpus, sampling
from rankwise.errors import CorpusError


@pytest.fixture(scope="module")
def articles():
    return corpus.parse_articles()


def test_articles_are_clean_long_main_namespace(articles):
    assert 80 <= len(articles) <= 110
    total = sum(len(t) for _, t in articles)
    assert 2_500_000 < total < 4_000_000
    for title, text in articles:
        assert len(text) > corpus.MIN_CHARS
        assert not title.startswith(("Talk:", "User:", "Wikipedia:", "Template:", "Category:"))
    joined = "\n".join(t for _, t in articles)
    for markup in ("{{", "}}", "<ref", "</ref>", "[[Category:"):
        assert markup not in joined, markup
    # a few malformed links/captions in the dump survive; they must stay rare
    assert joined.count("[[") <= 10 and joined.count("thumb|") <= 5


def test_split_rule_every_tenth_article_is_test(articles, tmp_path, monkeypatch):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))
    test = corpus.load_corpus("test")
    calib = corpus.load_corpus("calib")
    expect_test = [t for i, (_, t) in enumerate(articles) if i % 10 == 0]
    assert test == "\n\n".join(expect_test)
    assert len(calib) > 5 * len(test)
    assert articles[1][1] in calib and articles[1][1] not in test
    # cached: the second call reads the file
    assert (tmp_path / "corpus").is_dir()
    assert corpus.load_corpus("test") == test


def test_unknown_split():
    with pytest.raises(CorpusError, match="calib"):
        corpus.load_corpus("train")


def test_text_file_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        corpus.load_corpus(text_file=tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CorpusError, match="empty"):
        corpus.load_corpus(text_file=empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81abc")
    with pytest.raises(CorpusError, match="UTF-8"):
        corpus.load_corpus(text_file=binary)
    ok = tmp_path / "ok.txt"
    ok.write_text("hello world")
    assert corpus.load_corpus(text_file=ok) == "hello world"


def test_eval_windows_are_consecutive_and_non_overlapping():
    ids = torch.arange(1000)
    w = sampling.eval_windows(ids, seqlen=100, n=4)
    assert w.shape == (4, 100)
    assert torch.equal(w.flatten(), torch.arange(400))
    assert sampling.eval_windows(ids, seqlen=100, n=None).shape == (10, 100)
    assert sampling.eval_windows(ids, seqlen=300, n=64).shape == (3, 300)
    with pytest.raises(CorpusError, match="fewer than one window"):
        sampling.eval_windows(torch.arange(50), seqlen=100)


def test_calib_windows_seeded_and_in_range():
    ids = torch.arange(10_000)
    a = sampling.calib_windows(ids, n=8, seqlen=64, seed=3)
    b = sampling.calib_windows(ids, n=8, seqlen=64, seed=3)
    c = sampling.calib_windows(ids, n=8, seqlen=64, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (8, 64)
    # each window is a contiguous slice of the text
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=torch.long))
    with pytest.raises(CorpusError, match="too short"):
        sampling.calib_windows(torch.arange(10), n=2, seqlen=64)
