"""``rankwise generate`` / ``rankwise.generate``: greedy text equal to a hand-written greedy loop, the chat
template applied, the text streamed as decoded, the speed counted, one-line errors."""
from __future__ import annotations

import json

import pytest
import torch

import rankwise
from rankwise.cli import main
from rankwise.errors import ConfigError
from rankwise.evaluation.generation import prompt_ids
from rankwise.models.loading import load_model


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return load_model(tiny_dir)[:2]


def _greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """Reference: argmax of the full forward at every step, no cache."""
    out = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=out, use_cache=False).logits[0, -1].argmax()
            out = torch.cat([out, nxt.view(1, 1)], 1)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_text_matches_a_plain_greedy_loop_and_streams(lm):
    model, tok = lm
    pieces = []
    res = rankwise.generate(model, tok, "The quick brown", max_new_tokens=12, stream=pieces.append)
    ids, chat = prompt_ids(tok, "The quick brown")
    assert not chat and res.prompt_tokens == ids.shape[1] and res.new_tokens == 12
    ref = _greedy(model, ids, 12)
    if tok.eos_token_id in ref:  # generation stops at the end-of-sequence token
        ref = ref[: ref.index(tok.eos_token_id) + 1]
    assert res.text == tok.decode(ref, skip_special_tokens=True)
    assert "".join(pieces) == res.text
    assert res.tokens_per_second > 0 and 0 < res.first_token_seconds <= res.seconds


def test_the_chat_template_is_used_when_the_tokenizer_has_one(lm):
    from rankwise.models.tiny import tiny_tokenizer

    model = lm[0]
    chat_tok = tiny_tokenizer()  # a copy: the fixture's tokenizer keeps no template
    chat_tok.chat_template = "{% for m in messages %}<eos>{{ m['content'] }} the{% endfor %}"
    ids, used = prompt_ids(chat_tok, "fox")
    assert used and ids[0].tolist() == chat_tok("<eos>fox the")["input_ids"]
    plain, used = prompt_ids(chat_tok, "fox", chat=False)
    assert not used and plain[0].tolist() == chat_tok("fox")["input_ids"]
    res = rankwise.generate(model, chat_tok, "fox", max_new_tokens=3)
    assert res.chat_template and res.prompt_tokens == ids.shape[1]
    with pytest.raises(ConfigError, match="no chat template"):
        prompt_ids(lm[1], "fox", chat=True)


def test_sampling_is_seeded(lm):
    model, tok = lm
    a = rankwise.generate(model, tok, "The", max_new_tokens=8, temperature=1.5, seed=4)
    b = rankwise.generate(model, tok, "The", max_new_tokens=8, temperature=1.5, seed=4)
    assert a.text == b.text


def test_cli_streams_the_text_and_prints_the_speed(tiny_dir, tmp_path, capsys, monkeypatch):
    import sys
    import types

    rows = [types.SimpleNamespace(path="int4-cpu")] * 3 + [types.SimpleNamespace(path="dense")]
    fake = types.SimpleNamespace(prepare_inference=lambda model: rows)  # the kernels' runtime forms
    monkeypatch.setitem(sys.modules, "rankwise.models.runtime", fake)
    assert main(["generate", str(tiny_dir), "--prompt", "The quick brown", "-n", "6", "-q",
                 "--json", str(tmp_path / "g.json")]) == 0
    out, err = capsys.readouterr()
    saved = json.loads((tmp_path / "g.json").read_text())
    assert out.startswith(saved["text"]) and saved["new_tokens"] == 6
    assert "tokens/s decode" in err and "to the first token" in err
    assert "layers: 1 dense, 3 int4-cpu" in err and saved["layers"] == {"int4-cpu": 3, "dense": 1}


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "max-new-tokens"),
    (["-n", "100000"], "exceeds the model's 256 positions"),
    (["--dtype", "int3"], "unknown dtype"),
])
def test_cli_errors_are_one_line(tiny_dir, capsys, args, message):
    assert main(["generate", str(tiny_dir), "-q", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_models_that_are_not_causal_lms_are_refused(tmp_path, tiny_tok, capsys):
    from transformers import BertModel

    from rankwise.models.tiny import tiny_config

    rankwise.save(BertModel(tiny_config("bert")), tmp_path / "enc", tokenizer=tiny_tok)
    assert main(["generate", str(tmp_path / "enc"), "-q"]) == 2
    assert "generate needs a causal language model, but this is a BertModel" in capsys.readouterr().err
