"""The default corpus: ~100 Wikipedia articles shipped in gensim's test data.

Parse the MediaWiki XML dump with the stdlib, skip redirects and non-article namespaces,
drop ``<ref>`` contents, strip markup with mwparserfromhell, keep articles over 2,000
characters. Article i goes to ``test`` if i % 10 == 0, else to ``calib``. The plain-text
splits are cached under ``<cache>/corpus/wiki/``.
"""
from __future__ import annotations

import bz2
import importlib.metadata as md
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from ..files import cache_dir
from ..errors import CorpusError

WIKI_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SPLITS = ("calib", "test")
MIN_CHARS = 2000
_CACHE_VERSION = "2"  # bump when the cleaning changes: old caches are rebuilt
_REF = re.compile(r"<ref[^>/]*?/>|<ref[^>]*?>.*?</ref>", re.S | re.I)
_BLANKS = re.compile(r"\n{3,}")
_NON_PROSE_LINKS = ("file:", "image:", "category:", "media:")
_NON_PROSE_TAGS = ("table", "gallery", "ref", "math", "timeline")


def wiki_dump_path() -> Path:
    try:
        dist = md.distribution("gensim")
    except md.PackageNotFoundError as e:  # pragma: no cover - hard dependency
        raise CorpusError("the default corpus needs gensim (`pip install gensim`)") from e
    p = Path(dist.locate_file(WIKI_FILE))
    if not p.is_file():
        raise CorpusError(f"gensim is installed but its test data {p} is missing; reinstall gensim")
    return p


def _clean(wikitext: str) -> str:
    import mwparserfromhell

    code = mwparserfromhell.parse(_REF.sub("", wikitext))
    # images, files, categories, tables and galleries are not prose: drop them whole
    drop = [t for t in code.filter_tags() if str(t.tag).strip().lower() in _NON_PROSE_TAGS]
    drop += [w for w in code.filter_wikilinks()
             if str(w.title).strip().lower().startswith(_NON_PROSE_LINKS)]
    for node in drop:
        try:
            code.remove(node)
        except ValueError:  # already removed with an enclosing node
            pass
    text = code.strip_code(normalize=True, collapse=True)
    lines = [ln.strip() for ln in text.splitlines()]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def parse_articles(path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """``[(title, plain_text)]`` of the dump's main-namespace, non-redirect articles over MIN_CHARS."""
    path = Path(path) if path else wiki_dump_path()
    out = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if not elem.tag.endswith("}page") and elem.tag != "page":
                continue
            ns = title = text = None
            redirect = False
            for child in elem.iter():
                tag = child.tag.rsplit("}", 1)[-1]
                if tag == "ns":
                    ns = (child.text or "").strip()
                elif tag == "title":
                    title = child.text or ""
                elif tag == "redirect":
                    redirect = True
                elif tag == "text":
                    text = child.text or ""
            elem.clear()
            if ns != "0" or redirect or not text or text.lstrip().lower().startswith("#redirect"):
                continue
            plain = _clean(text)
            if len(plain) > MIN_CHARS:
                out.append((title, plain))
    return out


def _corpus_dir() -> Path:
    return cache_dir() / "corpus" / f"wiki-v{_CACHE_VERSION}"


def build_wiki_corpus(dest: Path | None = None) -> Path:
    """Write ``calib.txt`` and ``test.txt`` (articles joined by blank lines) atomically."""
    from ..files import atomic_dir, write_text

    dest = dest or _corpus_dir()
    articles = parse_articles()
    with atomic_dir(dest, overwrite=True) as tmp:
        for split in SPLITS:
            keep = [t for i, (_, t) in enumerate(articles) if (i % 10 == 0) == (split == "test")]
            write_text(tmp / f"{split}.txt", "\n\n".join(keep))
    return dest


def load_corpus(split: str = "test", text_file: str | os.PathLike | None = None) -> str:
    """Text of the default corpus split (``calib`` or ``test``), or of a user's plain-text file."""
    if text_file is not None:
        p = Path(text_file).expanduser()
        if not p.is_file():
            raise CorpusError(f"text file {p} does not exist; pass a path to a plain UTF-8 text file")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CorpusError(f"cannot read text file {p} as UTF-8 text ({e}); pass a plain text file") from e
        if not text.strip():
            raise CorpusError(f"text file {p} is empty; pass a file with text in it")
        return text
    if split not in SPLITS:
        raise CorpusError(f"unknown corpus split {split!r}; use one of {SPLITS}")
    d = _corpus_dir()
    f = d / f"{split}.txt"
    if not f.is_file() or f.stat().st_size == 0:
        build_wiki_corpus(d)
    return f.read_text(encoding="utf-8")


#: Fraction of a user's ``--text-file`` held out (its tail) for evaluation after compression.
EVAL_HOLDOUT = 0.1


def split_text(text: str, holdout: float = EVAL_HOLDOUT) -> tuple[str, str]:
    """``(calibration head, evaluation tail)`` of one text: the last ``holdout`` of its characters,
    cut at the first paragraph break (else whitespace) at or after that point, so that the two parts
    never share text. Deterministic."""
    cut = int(len(text) * (1.0 - holdout))
    cut = next((j for j in (text.find(sep, cut) for sep in ("\n\n", "\n", " ")) if j != -1), -1)
    head, tail = (text[:cut], text[cut:].strip()) if cut != -1 else ("", "")
    if not head.strip() or not tail:
        raise CorpusError(f"the text ({len(text):,} characters) is too short to hold out its last {holdout:.0%} "
                          "for evaluation; pass a longer --text-file, or --calib-file and --eval-file")
    return head, tail
