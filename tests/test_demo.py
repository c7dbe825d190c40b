"""``rankwise demo`` end to end on a tiny model (the real run is measured in BENCHMARKS.md): every step runs,
the exports load, the report holds the numbers."""
from __future__ import annotations

import json

import torch

import rankwise
from rankwise.cli import main
from rankwise.models.tiny import TINY_TEXT
from rankwise.structures.kernels import exact


def test_demo_runs_every_step_on_a_tiny_model(tmp_path, tiny_dir, monkeypatch):
    import rankwise.calibration.corpus as corpus
    import rankwise.models.loading as loading

    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda name=None, **kw: real(name or tiny_dir, **kw))
    monkeypatch.setattr(corpus, "load_corpus", lambda split="test", text_file=None: TINY_TEXT * 60)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--windows", "2", "--calib-windows", "2", "--seqlen", "64", "--max-new-tokens", "3",
                 "-q"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["dense"]["windows"] == 2 and r["compressed"]["generation"]["new_tokens"] == 3
    assert r["compressed"]["bytes"] < r["dense"]["bytes"] / 2  # 4-bit codes + scales against float32
    assert {e["format"] for e in r["exports"]} == {"compressed-tensors", "gguf"}
    assert (out / "gguf" / "model.gguf").is_file() and (out / "compressed-tensors" / "config.json").is_file()
    assert set(r["timings"]) == {"load", "dense_eval", "compress", "compressed_eval", "save_export"}
    report = (out / "report.md").read_text()
    assert f"{r['compressed']['ppl']:.2f}" in report and r["compressed"]["generation"]["text"].strip() in report
    again, _, _ = rankwise.load(out / "model")
    assert type(again).__name__ == "LlamaForCausalLM"
    gguf, _, path = rankwise.load(out / "gguf")  # what `rankwise generate demo-out/gguf` runs
    ids = torch.arange(3, 40)[None]
    with torch.no_grad(), exact():  # the Q4_0 layers are bit-exact; the embeddings and norms are stored as float16
        torch.testing.assert_close(gguf(input_ids=ids).logits, again(input_ids=ids).logits, rtol=1e-3, atol=2e-3)
    assert path == out / "gguf" / "model.gguf"


def test_demo_options_are_checked_before_any_work(capsys):
    assert main(["demo", "--quantizer", "hqq", "-q"]) == 2
    assert "--quantizer must be gptq or rtn" in capsys.readouterr().err
