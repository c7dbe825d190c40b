"""`rankwise analyze` on a tiny saved model: table, --json, --csv, --report, --compare."""
import csv
import json

import pytest
import torch

from rankwise.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")



def test_cli_outputs(tiny_dir, tmp_path):
    j, c, rep = tmp_path / "a.json", tmp_path / "a.csv", tmp_path / "rep"
    rc = main(["analyze", str(tiny_dir), "--json", str(j), "--csv", str(c), "--report", str(rep),
               "--compare", str(tiny_dir), "--quiet"])
    assert rc == 0
    data = json.loads(j.read_text())
    assert set(data) == {"layers", "summary"} and len(data["layers"]) == 14
    assert {"name", "shape", "alpha", "stable_rank", "farms_alpha", "intruders"} <= set(data["layers"][0])
    rows = list(csv.DictReader(c.open()))
    assert len(rows) == 14 and rows[0]["name"] == data["layers"][0]["name"]
    html = (rep / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert {p.name for p in rep.glob("*.png")} == {"esd.png", "by_layer.png", "energy.png", "intruders.png"}


def test_cli_errors(tiny_dir, tmp_path, capsys):
    assert main(["analyze", str(tiny_dir), "--layers", "nosuchlayer", "--quiet"]) == 2
    assert "no linear layer" in capsys.readouterr().err
    assert main(["analyze", str(tiny_dir), "--metrics", "intruders", "--quiet"]) == 2
    assert "--compare" in capsys.readouterr().err


@pytest.mark.integration
def test_real_model_few_layers_agree_with_weightwatcher(real_model):
    ww_powerlaw = pytest.importorskip("weightwatcher.WW_powerlaw")
    import numpy as np

    from rankwise.analysis.run import analyze
    from rankwise.models.surgery import linear_weight

    model = real_model[0]
    res = analyze(model, layers=r"layers\.0\.")
    assert len(res.layers) == 7
    for r in res.layers:
        w = linear_weight(model.get_submodule(r["name"])).detach().double().numpy()
        ev = np.linalg.svd(w, compute_uv=False) ** 2
        assert abs(r["alpha"] - ww_powerlaw.WWFit(ev[ev > 1e-5]).alpha) <= 1e-6
        assert r["farms_alpha"] is not None and r["farms_alpha"] > 1
