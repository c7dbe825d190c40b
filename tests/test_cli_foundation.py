"""CLI: models listing, eval on a local model directory and text file, error exit codes."""
from __future__ import annotations

import json

import pytest

from rankwise.cli import main
from rankwise.models.tiny import TINY_TEXT


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(TINY_TEXT * 20)
    return f


def test_models_lists_builtins(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "gemma3-270m" in out


def test_eval_local_dir_with_text_file(tiny_dir, text_file, tmp_path, capsys):
    out_json = tmp_path / "ppl.json"
    rc = main(["eval", str(tiny_dir), "--text-file", str(text_file), "--seqlen", "32",
               "--windows", "3", "--json", str(out_json), "--quiet"])
    assert rc == 0
    res = json.loads(out_json.read_text())
    assert res["windows"] == 3 and res["tokens"] == 3 * 31 and res["ppl"] > 1
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "no-such-model"], "unknown model"),
        (["eval", "{tmp}"], "not a model directory"),
        (["eval", "{tiny}", "--text-file", "{tmp}/missing.txt"], "does not exist"),
        (["eval", "{tiny}", "--text-file", "{short}", "--seqlen", "64"], "fewer than one window"),
        (["eval", "{tiny}", "--text-file", "{text}", "--seqlen", "4096"], "longer than the model's context"),
    ],
)
def test_errors_are_one_clear_line(args, message, tiny_dir, text_file, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    subs = dict(tmp=str(tmp_path), tiny=str(tiny_dir), short=str(short), text=str(text_file))
    rc = main([a.format(**subs) for a in args] + ["--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in " ".join(err.split()) and "Traceback" not in err
