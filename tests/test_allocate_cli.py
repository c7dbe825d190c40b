"""`rankwise compress` with --allocate / --speed-aware / --low-memory on a tiny saved model."""
from __future__ import annotations

import json

import pytest

from rankwise.cli import main


@pytest.mark.parametrize("extra", [["--allocate", "spectrum", "--min-rank", "2"], ["--low-memory"],
                                   ["--low-memory", "--allocate", "spectrum-band", "--granularity", "subgroup",
                                    "--refit"]])
def test_cli_allocate_and_low_memory(tiny_dir, tmp_path, extra):
    out = tmp_path / "out"
    rc = main(["compress", str(tiny_dir), "--ratio", "0.4", "--calib-windows", "8", "--calib-seqlen", "64",
               "--out", str(out), "--quiet", *extra])
    assert rc == 0
    meta = json.loads((out / "rankwise.json").read_text())
    assert meta["report"]["achieved_ratio"] >= 0.4
    assert (out / "ranks.png").stat().st_size > 0 and "| layer |" in (out / "ranks.md").read_text()
    if "spectrum" in extra:
        assert meta["allocate"] == "spectrum" and "dense" in meta["report"]["allocation"]
        assert all(v["spec"]["rank"] >= 2 for v in meta["layers"].values())


def test_cli_infeasible_budget_is_a_clear_error(tiny_dir, tmp_path, capsys):
    rc = main(["compress", str(tiny_dir), "--ratio", "0.95", "--allocate", "spectrum", "--min-rank", "8",
               "--calib-windows", "2", "--calib-seqlen", "64", "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    assert "cannot be met" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_low_memory_needs_out(tiny_dir):
    assert main(["compress", str(tiny_dir), "--low-memory", "--calib-windows", "2", "--calib-seqlen", "64",
                 "--quiet"]) == 2


def test_cli_low_memory_eval_records_the_perplexity_it_measured(tiny_dir, tmp_path, capsys):
    from rankwise.models.tiny import TINY_TEXT

    text = tmp_path / "t.txt"
    text.write_text(TINY_TEXT * 12)
    ppl = {}
    for mode in ("memory", "low"):  # the same tensors either way (test_lowmem): the same perplexity
        out = tmp_path / mode
        assert main(["compress", str(tiny_dir), "--ratio", "0.4", "--text-file", str(text), "--calib-windows", "4",
                     "--calib-seqlen", "64", "--eval", "--eval-windows", "2", "--eval-seqlen", "64", "--out", str(out),
                     *(["--low-memory"] if mode == "low" else [])]) == 0
        printed = capsys.readouterr().out
        meta = json.loads((out / "rankwise.json").read_text())
        ppl[mode] = meta["perplexity"]["compressed"]
        assert meta["report"]["perplexity"]["compressed"] == ppl[mode] and meta["layers"]  # the manifest is whole
        assert f"{ppl[mode]:.2f}"[:4] in printed  # the number the table showed
    assert ppl["low"] == pytest.approx(ppl["memory"], rel=1e-5)


def test_cli_search_prints_its_validation(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(tiny_dir), "--ratio", "0.4", "--allocate", "search", "--calib-windows", "8",
                 "--calib-seqlen", "64", "--out", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "validated on 4 held-out calibration windows" in text and "uniform" in text
    meta = json.loads((out / "rankwise.json").read_text())
    assert meta["allocate"] == "search" and meta["report"]["allocation"]["validation"]["chosen"] in text
