"""The README's Python API, end to end on a tiny model, after every subpackage was imported
(importing ``rankwise.compress`` etc. must not shadow the API verbs)."""
from __future__ import annotations

import importlib

import pytest
import torch

import rankwise
from rankwise.models.tiny import TINY_TEXT


@pytest.fixture(autouse=True)
def _import_everything():
    for sub in ("compression", "analysis", "adaptation", "evaluation", "calibration", "models"):
        importlib.import_module(f"rankwise.{sub}")


def test_readme_api_round_trip(tiny_dir, tmp_path):
    model, tok, _ = rankwise.load_model(str(tiny_dir))
    text = TINY_TEXT * 40
    dense = rankwise.evaluate(model, tok, text=text, seqlen=32, windows=4).ppl
    small, report = rankwise.compress(model, method="svd-llm", ratio=0.4, calib=text, tokenizer=tok,
                                      calib_options=dict(windows=4, seqlen=32), progress=False)
    assert small is not model  # the API copies unless inplace=True
    assert rankwise.evaluate(model, tok, text=text, seqlen=32, windows=4).ppl == dense
    assert 0.55 < report.targeted_params_after / report.targeted_params_before <= 0.6
    rankwise.save(small, tmp_path / "c", tokenizer=tok, report=report)
    small2, tok2, path2 = rankwise.load(tmp_path / "c")
    assert path2 == tmp_path / "c" and tok2("a b").input_ids == tok("a b").input_ids
    ids = torch.arange(20)[None]
    with torch.no_grad():
        torch.testing.assert_close(small2(ids).logits, small(ids).logits, rtol=0, atol=0)
    res = rankwise.analyze(model, layers="mlp")
    assert len(res.layers) == 6 and "alpha" in res.summary
    tuned = rankwise.adapt(model, init="pissa", rank=4)
    assert tuned is not model and not any("lora" in n for n, _ in model.named_parameters())  # copies too
    assert rankwise.evaluate(tuned, tok, text=text, seqlen=32, windows=4).ppl == pytest.approx(dense, rel=1e-4)
