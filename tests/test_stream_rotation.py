"""Fold-and-rotate of the residual stream (rankwise.models.stream): the rotated model computes the same
logits (1e-4 relative), stays a plain architecture (saves and reloads with transformers), slices
exactly when the stream lives in the kept subspace, and refuses what it cannot fold."""
from __future__ import annotations

import copy

import pytest
import torch

from rankwise.errors import ConfigError, UnsupportedArchitectureError
from rankwise.linalg.orthogonal import align_mean, hadamard_matrix, random_orthogonal, stream_rotation
from rankwise.models.stream import fold_and_rotate, fold_norms, rotate_stream, stream_layout
from rankwise.models.tiny import tiny_model

IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(2))


def _gemma(**kw):
    from transformers import AutoModelForCausalLM, GemmaConfig

    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256, **kw)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _perturbed(model):
    """Random norm gains and biases, so that folding has something to do."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if "norm" in type(mod).__name__.lower():
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
    return model


MODELS = {"llama": lambda **kw: tiny_model("llama", **kw), "gpt2": lambda **kw: tiny_model("gpt2", **kw),
          "gemma": _gemma}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    model = _perturbed(MODELS[request.param]())
    with torch.no_grad():
        ref = model(IDS).logits.double()
    return request.param, model, ref


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def test_hadamard_orders_and_rotations():
    for n in (12, 20, 28, 36, 64, 576, 640, 768):
        H = hadamard_matrix(n)
        assert H is not None and torch.equal(H.abs(), torch.ones(n, n))
        assert torch.allclose(H @ H.T, n * torch.eye(n, dtype=torch.float64))
    assert hadamard_matrix(6) is None and hadamard_matrix(3) is None
    Q, kind = stream_rotation(576, seed=1)
    assert kind == "hadamard" and torch.allclose(Q.T @ Q, torch.eye(576, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q.abs(), torch.full_like(Q, 576 ** -0.5))  # a Hadamard: every entry +-1/sqrt(n)
    Q, kind = stream_rotation(50, seed=1)
    assert kind == "orthogonal" and torch.allclose(Q.T @ Q, torch.eye(50, dtype=torch.float64), atol=1e-12)
    A = align_mean(Q)
    u = torch.full((50,), 50 ** -0.5, dtype=torch.float64)
    assert torch.allclose(u @ A, u, atol=1e-12) and torch.allclose(A.T @ A, torch.eye(50, dtype=torch.float64))


def test_rotated_model_has_the_same_logits_and_reloads(case, tmp_path):
    name, model, ref = case
    m = copy.deepcopy(model)
    info = fold_and_rotate(m, seed=3)
    assert info.kind == "hadamard" and info.untied and info.untied_params == 320 * 64
    with torch.no_grad():
        out = m(IDS).logits
    assert _rel(out, ref) < 1e-4
    # the rotation really changed the weights (the test could not pass with an identity Q)
    lay = stream_layout(m)
    r = lay.readers()[0]
    assert not torch.allclose(m.get_submodule(r).weight, model.get_submodule(r).weight, atol=1e-3)
    # still the plain architecture: transformers saves and reloads it with the same logits
    from transformers import AutoModelForCausalLM

    m.save_pretrained(tmp_path / name)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
    with torch.no_grad():
        assert _rel(back(IDS).logits, ref) < 1e-4


def test_layout_lists_readers_writers_norms(case):
    name, model, _ = case
    lay = stream_layout(model)
    assert len(lay.blocks) == 2 and lay.head == "lm_head"
    if name == "gpt2":
        assert lay.embeddings == ["transformer.wte", "transformer.wpe"] and lay.norm_kind == "layer"
        assert lay.writers() == [f"transformer.h.{i}.{w}" for i in range(2) for w in ("attn.c_proj", "mlp.c_proj")]
    else:
        assert lay.embeddings == ["model.embed_tokens"] and lay.norm_kind == "rms"
        assert lay.readers()[:3] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
        assert lay.norms()[-1] == "model.norm"


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_slicing_is_exact_when_the_stream_lives_in_the_kept_subspace(name):
    """Project every write into a 40-dim subspace S: slicing with Q = a basis of S must not change the logits
    (norm eps made negligible: a sliced norm's eps is relative to d', documented)."""
    model = _perturbed(MODELS[name](rms_norm_eps=1e-12))
    S = random_orthogonal(64, seed=7)[:, :40]
    P = S @ S.T
    lay = stream_layout(model)
    with torch.no_grad():
        emb = model.get_submodule(lay.embeddings[0])
        emb.weight.copy_((emb.weight.double() @ P).float())
        for w in lay.writers():
            mod = model.get_submodule(w)
            mod.weight.copy_((P @ mod.weight.double()).float())
        ref = model(IDS).logits.double()
    m = copy.deepcopy(model)
    fold_norms(m)
    rotate_stream(m, S)
    assert m.config.hidden_size == 40 and m.get_submodule(lay.embeddings[0]).weight.shape == (320, 40)
    with torch.no_grad():
        assert _rel(m(IDS).logits, ref) < 1e-4
    # and dropping directions the stream does use changes the output
    m2 = copy.deepcopy(model)
    fold_norms(m2)
    rotate_stream(m2, random_orthogonal(64, seed=8)[:, :40])
    with torch.no_grad():
        assert _rel(m2(IDS).logits, ref) > 1e-2


def test_bad_inputs_get_clear_errors():
    with pytest.raises(UnsupportedArchitectureError, match="sandwich norms"):
        fold_and_rotate(tiny_model("gemma3"))
    with pytest.raises(UnsupportedArchitectureError, match="not of a supported pre-norm form"):
        fold_and_rotate(tiny_model("bert"))
    m = tiny_model("llama")
    with pytest.raises(ConfigError, match="fold the norms first"):
        rotate_stream(_perturbed(m), random_orthogonal(64))
    fold_norms(m)
    with pytest.raises(ConfigError, match="not orthonormal"):
        rotate_stream(m, torch.randn(64, 64))
    with pytest.raises(ConfigError, match=r"\(hidden, k\)"):
        rotate_stream(m, torch.eye(65))
    g = tiny_model("gpt2")
    fold_norms(g)
    with pytest.raises(ConfigError, match="all-ones direction"):
        rotate_stream(g, random_orthogonal(64))
    with pytest.raises(UnsupportedArchitectureError, match="GPT-2"):
        rotate_stream(g, _aligned_slice(64, 32))


def _aligned_slice(d: int, k: int) -> torch.Tensor:
    u = torch.full((d, 1), d ** -0.5, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.cat([u, random_orthogonal(d, 3)[:, :k - 1]], 1))
    return align_mean(Q)


def test_compressed_layers_are_refused():
    from rankwise.linalg.quant import rtn
    from rankwise.models.surgery import set_module
    from rankwise.structures.quant import QuantLinear

    m = tiny_model("llama")
    name = "model.layers.0.mlp.up_proj"
    set_module(m, name, QuantLinear.from_quantized(rtn(m.get_submodule(name).weight, 4, 32)))
    with pytest.raises(UnsupportedArchitectureError, match="before any layer is replaced"):
        fold_and_rotate(m)


def test_compress_with_rotate_untied_saves_and_reloads(tmp_path):
    """``compress(..., rotate=True)``: the stream rotated before calibration, the head untied (and said in
    the report), the saved directory reloads to the same logits."""
    from rankwise.compression.compress import compress
    from rankwise.compression.saving import save_compressed
    from rankwise.models.saved import load_structured
    from rankwise.models.tiny import tiny_tokenizer

    model = _perturbed(tiny_model("llama"))
    before = sum(p.numel() for p in model.parameters())
    windows = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    model, rep = compress(model, "gptq", bits_per_weight=5.0, options={"group_size": 32, "bits": 4, "rotate": True},
                          calib=windows, calib_options={"windows": 4, "seqlen": 32}, progress=False)
    mt = rep.model_transform
    assert mt["rotation"] == "stream" and mt["untied"] and mt["untied_params"] == 320 * 64
    assert rep.model_params_before == before and model.lm_head.weight is not model.model.embed_tokens.weight
    with torch.no_grad():
        out = model(IDS).logits
    save_compressed(model, tiny_tokenizer(), tmp_path / "c", rep)
    back = load_structured(tmp_path / "c").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, out, rtol=1e-5, atol=1e-5)


def test_compress_rotate_on_gemma3_is_a_clear_error_before_any_work():
    from rankwise.compression.compress import compress

    with pytest.raises(UnsupportedArchitectureError, match="sandwich norms.*without --rotate"):
        compress(tiny_model("gemma3"), "rtn", bits_per_weight=5.0, options={"group_size": 32, "rotate": True},
                 calib=torch.zeros(2, 16, dtype=torch.long), progress=False)
