"""``rankwise compress`` and ``rankwise eval`` on a saved tiny model with a text file."""
from __future__ import annotations

import hashlib
import json

import pytest

from rankwise.cli import main
from rankwise.models.tiny import TINY_TEXT


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TINY_TEXT * 12)
    return f


def test_compress_then_eval(tiny_dir, text_file, tmp_path, capsys):
    before = _digest(tiny_dir)
    out, dense = tmp_path / "c", tmp_path / "d"
    args = ["compress", str(tiny_dir), "--method", "svd-llm", "--ratio", "0.3", "--text-file", str(text_file),
            "--calib-windows", "4", "--calib-seqlen", "64", "--mode", "one-shot", "--out", str(out),
            "--export-dense", str(dense), "--eval", "--eval-windows", "2", "--eval-seqlen", "64", "--quiet"]
    assert main(args) == 0
    assert _digest(tiny_dir) == before  # the input model directory is never modified
    meta = json.loads((out / "rankwise.json").read_text())
    assert meta["method"] == "svd-llm" and meta["calibration"]["windows"] == 4 and meta["mode"] == "one-shot"
    assert meta["perplexity"]["compressed"] > 1 and "last 10%" in meta["perplexity"]["corpus"]
    assert (dense / "config.json").is_file() and not (dense / "rankwise.json").exists()
    capsys.readouterr()
    assert main(["eval", str(out), "--text-file", str(text_file), "--windows", "2", "--seqlen", "64", "-q"]) == 0
    assert "ppl" in capsys.readouterr().out
    # refused without --overwrite, accepted with it
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("extra,needle", [
    (["--method", "nope"], "unknown low-rank objective"),
    (["--structure", "nope"], "unknown structure"),
    (["--structure", "lowrank", "--bits-per-weight", "3"], "--ratio"),
    (["--mode", "both"], "unknown mode"),
    (["--mode", "one-shot", "--refit"], "sequential"),
    (["--set", "rank"], "KEY=VALUE"),
    (["--calib-file", "x.txt"], "either --text-file"),
    (["--ratio", "0"], "ratio"),
    (["--targets", "no_such_layer"], "no linear layer"),
    (["--calib-seqlen", "250"], "too short"),
])
def test_bad_input_exits_2_with_a_message(tiny_dir, text_file, tmp_path, capsys, extra, needle):
    short = tmp_path / "short.txt"
    short.write_text(TINY_TEXT[:300])
    tf = short if "--calib-seqlen" in extra else text_file
    rc = main(["compress", str(tiny_dir), "--text-file", str(tf), "--calib-windows", "2", "--calib-seqlen", "64",
               "--out", str(tmp_path / "o"), "-q", *extra])
    assert rc == 2
    assert needle in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "o").exists()


def test_text_file_is_split_and_calib_eval_files_are_taken_whole(tmp_path):
    from rankwise.calibration.corpus import split_text
    from rankwise.errors import CorpusError

    text = "\n\n".join(f"paragraph {i} " + "word " * 50 for i in range(40))
    head, tail = split_text(text)
    assert head + "\n\n" + tail == text.rstrip()  # cut at a paragraph break, nothing lost or shared
    para = max(len(p) for p in text.split("\n\n")) + 4  # a paragraph, its break, its stripped space
    assert len(text) * 0.1 - para <= len(tail) <= len(text) * 0.1  # the first break after the 90% point
    with pytest.raises(CorpusError, match="too short"):
        split_text("one line")
