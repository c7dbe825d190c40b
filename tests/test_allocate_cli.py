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
