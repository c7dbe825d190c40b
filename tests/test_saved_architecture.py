"""Every saved model reloads as the class it was: base encoders, classifiers, causal LMs and seq2seq LMs
(rankwise.json records ``model_class``; a name resolves only to a transformers model class)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import rankwise
from rankwise.errors import ArtifactError, ConfigError
from rankwise.models.saved import load_structured
from rankwise.models.surgery import set_module
from rankwise.models.tiny import tiny_config, tiny_model
from rankwise.structures.lowrank import LowRankLinear

IDS = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def _bert(cls_name: str, **kw):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, cls_name)(tiny_config("bert", **kw)).eval()


def _seq2seq(family: str):
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if family == "t5":
        cfg = T5Config(vocab_size=320, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return T5ForConditionalGeneration(cfg).eval()
    cfg = BartConfig(vocab_size=320, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64)
    return BartForConditionalGeneration(cfg).eval()


def _factorize(model, pattern: str, rank: int = 8):
    """Replace every ``nn.Linear`` whose name contains ``pattern`` by its rank-``rank`` SVD truncation."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern in n]
    assert names
    for n in names:
        W = model.get_submodule(n).weight.detach()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        set_module(model, n, LowRankLinear.from_factors(U[:, :rank] * S[:rank], Vh[:rank], model.get_submodule(n).bias))
    return model


@pytest.fixture(scope="module")
def saved_encoder(tmp_path_factory):
    from rankwise.models.tiny import tiny_tokenizer

    out = tmp_path_factory.mktemp("enc") / "bert"
    return rankwise.save(_factorize(_bert("BertModel"), "intermediate"), out, tokenizer=tiny_tokenizer())


def _outputs(model):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            out = model(input_ids=IDS, decoder_input_ids=IDS[:, :5])
        else:
            out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _round_trip(model, path, tok):
    rankwise.save(model, path, tokenizer=tok)
    meta = json.loads((path / "rankwise.json").read_text())
    assert meta["model_class"] == type(model).__name__
    assert json.loads((path / "config.json").read_text())["architectures"] == [type(model).__name__]
    again, _, _ = rankwise.load(path)
    assert type(again) is type(model)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(_outputs(again), _outputs(model), rtol=0, atol=0)
    return again


def test_base_encoder_compresses_without_targets_and_reloads_as_itself(tmp_path, tiny_tok):
    """The issue's report: a BertModel (no LM head) compressed by rankwise.compress, saved, loaded."""
    bert = _bert("BertModel")
    small, rep = rankwise.compress(bert, ratio=0.4, method="svd-llm", calib=torch.randint(0, 320, (800,)),
                                   calib_options={"windows": 2, "seqlen": 16}, progress=False)
    assert len(rep.ranks) == 12 and all(n.startswith("encoder.layer.") for n in rep.ranks)
    again = _round_trip(small, tmp_path / "enc", tiny_tok)
    assert isinstance(again.get_submodule("encoder.layer.0.attention.self.query"), LowRankLinear)


@pytest.mark.parametrize("kind", ["classifier", "causal", "t5", "bart"])
def test_each_model_kind_reloads_as_its_class(kind, tmp_path, tiny_tok):
    if kind == "classifier":
        model = _factorize(_bert("BertForSequenceClassification", num_labels=3), "intermediate")
    elif kind == "causal":
        model = _factorize(tiny_model("llama"), "mlp")
    else:
        model = _factorize(_seq2seq(kind), "decoder")
    again = _round_trip(model, tmp_path / kind, tiny_tok)
    if kind in ("t5", "bart"):  # the tied embeddings stay one tensor
        assert again.get_input_embeddings().weight is again.get_decoder().embed_tokens.weight


def test_plain_directories_load_as_their_architecture(tmp_path, tiny_tok):
    enc = _bert("BertForSequenceClassification", num_labels=2)
    rankwise.save(enc, tmp_path / "plain", tokenizer=tiny_tok)
    again, _, _ = rankwise.load(tmp_path / "plain")
    assert type(again).__name__ == "BertForSequenceClassification"
    torch.testing.assert_close(_outputs(again), _outputs(enc), rtol=0, atol=0)


def test_directories_without_the_record_load_as_causal_lms(tmp_path, tiny_tok):
    model = _factorize(tiny_model("llama"), "mlp")
    out = rankwise.save(model, tmp_path / "old", tokenizer=tiny_tok)
    meta = json.loads((out / "rankwise.json").read_text())
    del meta["model_class"]
    (out / "rankwise.json").write_text(json.dumps(meta))
    cfg = json.loads((out / "config.json").read_text())
    del cfg["architectures"]
    (out / "config.json").write_text(json.dumps(cfg))
    again = load_structured(out)
    assert type(again).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_outputs(again), _outputs(model), rtol=0, atol=0)


@pytest.mark.parametrize("name, match", [
    ("os", "cannot rebuild"),                      # not a class name: nothing is imported
    ("AutoModel", "cannot rebuild"),               # a transformers name, but not a model class
    ("PreTrainedModel", "cannot rebuild"),         # the base class, defined outside transformers.models
    ("LlamaForCausalLM", "needs a LlamaConfig"),   # a model class that does not fit config.json
])
def test_only_fitting_transformers_model_classes_are_rebuilt(name, match, tmp_path, saved_encoder):
    out = tmp_path / "x"
    shutil.copytree(saved_encoder, out)
    meta = json.loads((out / "rankwise.json").read_text())
    meta["model_class"] = name
    (out / "rankwise.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=match):
        load_structured(out)


def test_perplexity_refuses_models_that_are_not_causal_lms():
    from rankwise.evaluation.perplexity import perplexity

    with pytest.raises(ConfigError, match="needs a causal language model.*BertModel"):
        perplexity(_bert("BertModel"), ids=torch.arange(100), seqlen=16, windows=2)
