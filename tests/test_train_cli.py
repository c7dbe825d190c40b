"""``rankwise train``: from a config with a projected optimizer, checkpoints that resume to the
uninterrupted run's weights, structured + initialized training saved as a rankwise model, and bad
input (one line, exit 2, nothing written)."""
from __future__ import annotations

import json

import pytest
import torch

from rankwise.cli import main
from rankwise.models.tiny import TINY_TEXT

CONFIG = {"model_type": "llama", "vocab_size": 257, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
          "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "text.txt").write_text(TINY_TEXT * 12)
    return d


def _args(files, out, *extra):
    return ["train", "--from-config", str(files / "config.json"), "--text-file", str(files / "text.txt"),
            "--steps", "6", "--seqlen", "32", "--batch-size", "2", "--warmup", "2", "--eval-windows", "2", "--quiet",
            "--out", str(out), *extra]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_projected_training_from_config_resumes_exactly(files, capsys):
    a, b = files / "a", files / "b"
    opts = ["--optim", "dct", "--rank", "4", "--update-proj-gap", "2", "--checkpoint-every", "4"]
    assert main(_args(files, a, *opts)) == 0
    log = json.loads((a / "train_log.json").read_text())
    assert len(log["losses"]) == 6 and log["eval_loss"] > 0 and log["config"]["optim"] == "dct"
    assert json.loads((files / "a.ckpt" / "trainer.json").read_text())["step"] == 4
    # a second run resumes from a's step-4 checkpoint and must end where a ended
    assert main(_args(files, b, *opts, "--resume", "--checkpoint-dir", str(files / "a.ckpt"))) == 0
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((b / "train_log.json").read_text())["resumed_from"] == 4
    import rankwise

    model, tok, _ = rankwise.load(a)
    assert len(tok) == 257 and model.config.hidden_size == 32
    # another configuration does not resume: the difference is named, nothing is written
    capsys.readouterr()
    assert main(_args(files, files / "c", "--optim", "dct", "--rank", "2", "--update-proj-gap", "2", "--resume",
                      "--checkpoint-dir", str(files / "a.ckpt"))) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "rank: checkpoint 4, this run 2" in err and len(err.splitlines()) == 1
    assert not (files / "c").exists()


def test_structured_initialized_training_saves_a_rankwise_model(files):
    out = files / "s"
    assert main(_args(files, out, "--structure", "sltrain", "--ratio", "0.5", "--init", "lsuv")) == 0
    meta = json.loads((out / "rankwise.json").read_text())
    assert {d["kind"] for d in meta["layers"].values()} == {"lowrank-sparse"} and len(meta["layers"]) == 14
    assert meta["training"]["structure"]["structured"] <= 0.5 * meta["training"]["structure"]["dense_equivalent"]
    import rankwise

    model, _, _ = rankwise.load(out)
    saved = _weights(out)
    assert torch.equal(model.model.layers[0].mlp.up_proj.S.cols, saved["model.layers.0.mlp.up_proj.S.cols"])


@pytest.mark.parametrize("extra, message", [
    (["--optim", "galore", "--rank", "20"], "rank 20 is larger than layer model.layers.0.self_attn.k_proj.weight"),
    (["--optim", "galore", "--rank", "4", "--update-proj-gap", "0"], "--update-proj-gap must be >= 1"),
    (["--optim", "dct", "--rank", "4", "--oversample", "5"], "--oversample / --n-iter are options of the randomized"),
    (["--optim", "galore"], "--optim galore projects gradients: pass --rank"),
    (["--structure", "blast", "--ratio", "0.5"], None),   # works: checked by the next case's contrast
    (["--structure", "monarch", "--ratio", "0.99"], "layer model.layers.0.self_attn.q_proj (32x32) cannot be monarch"),
])
def test_bad_input_is_one_line_and_writes_nothing(files, capsys, extra, message):
    out = files / "bad"
    code = main(_args(files, out, *extra, "--steps", "1"))
    err = capsys.readouterr().err
    if message is None:
        assert code == 0
        import shutil

        shutil.rmtree(out)
        return
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not any(p.name.startswith(".bad") for p in files.iterdir())
