"""The compression pipeline on tiny models of the three families, one-shot and sequential."""
from __future__ import annotations

import pytest
import torch

import rankwise
from rankwise.calibration.stats import collect_input_stats
from rankwise.compression.blocks import capture_block_inputs
from rankwise.compression.budget import uniform_rank
from rankwise.compression.methods import METHODS, LayerStats, truncate
from rankwise.compression.pipeline import compress
from rankwise.errors import CorpusError, NoTargetLayersError, NumericalError
from rankwise.models.surgery import decoder_blocks, find_linears, linear_shape, linear_weight
from rankwise.models.tiny import tiny_model
from rankwise.structures.lowrank import LowRankLinear

KW = dict(calib_windows=6, calib_seqlen=48, progress=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_block_runner_reproduces_every_block_input(arch, random_ids):
    """Cached block-0 inputs advanced block by block equal the hidden states a full forward feeds each block."""
    model = tiny_model(arch)
    blocks = decoder_blocks(model)
    windows = random_ids[:5 * 32].view(5, 32)  # batches of 2, 2, 1: two batch sizes
    seen = {i: [] for i in range(len(blocks))}
    hooks = [b.register_forward_pre_hook(
        lambda m, a, kw, i=i: seen[i].append((a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True)
        for i, b in enumerate(blocks)]
    with torch.no_grad():
        for s in range(0, 5, 2):
            model(input_ids=windows[s: s + 2], use_cache=False)
    for h in hooks:
        h.remove()
    runner = capture_block_inputs(model, blocks, windows, batch_size=2)
    for i in range(len(blocks)):
        for got, want in zip(runner.hidden, seen[i]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        runner.advance(i)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("sequential", [False, True])
def test_pipeline_replaces_layers_at_uniform_ranks(arch, sequential, random_ids):
    model = tiny_model(arch)
    shapes = {n: linear_shape(m) for n, m in find_linears(model).items()}
    x = random_ids[:64].view(2, 32)
    dense_logits = model(input_ids=x).logits
    model, rep = compress(model, "svd-llm", 0.4, calib=random_ids, sequential=sequential, **KW)
    assert rep.mode == ("sequential" if sequential else "one-shot")
    for name, (m, n) in shapes.items():
        k = uniform_rank(m, n, 0.4)
        mod = model.get_submodule(name)
        assert isinstance(mod, LowRankLinear) and mod.rank == k and (mod.out_features, mod.in_features) == (m, n)
    assert rep.ranks == {n: uniform_rank(m, k, 0.4) for n, (m, k) in shapes.items()}
    assert rep.targeted_params_before == sum(m * n for m, n in shapes.values())
    assert rep.targeted_params_after == sum(k * (m + n) for (m, n), k in zip(shapes.values(), rep.ranks.values()))
    assert 0.4 <= rep.achieved_ratio < 0.45
    assert rep.model_params_before - rep.model_params_after == rep.targeted_params_before - rep.targeted_params_after
    logits = model(input_ids=x).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, dense_logits)


def test_one_shot_equals_manual_factorization(tiny_llama, random_ids):
    """One-shot = covariance of the dense model, whitened SVD, truncation: recomputed by hand."""
    ref = tiny_model("llama")
    layers = find_linears(ref)
    model, rep = compress(tiny_llama, "svd-llm", 0.4, calib=random_ids, sequential=False, **KW)
    from rankwise.calibration.sampling import calib_windows

    win = calib_windows(random_ids, 6, 48, 3)
    stats = collect_input_stats(ref, win, list(layers))
    for name, mod in layers.items():
        W = linear_weight(mod).detach().float()
        st = LayerStats(stats[name])
        L, R = truncate(W, METHODS["svd-llm"].factorize(W, st), rep.ranks[name], st)
        torch.testing.assert_close(model.get_submodule(name).dense(), L @ R, rtol=1e-4, atol=1e-5)


def test_sequential_block0_matches_one_shot_and_later_blocks_differ(random_ids):
    one, _ = compress(tiny_model("llama"), "svd-llm", 0.4, calib=random_ids, sequential=False, **KW)
    seq, _ = compress(tiny_model("llama"), "svd-llm", 0.4, calib=random_ids, sequential=True, **KW)
    a = one.get_submodule("model.layers.0.mlp.down_proj").dense()
    b = seq.get_submodule("model.layers.0.mlp.down_proj").dense()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    a = one.get_submodule("model.layers.1.mlp.down_proj").dense()
    b = seq.get_submodule("model.layers.1.mlp.down_proj").dense()
    assert (a - b).abs().max() > 1e-4  # block 1 saw the compressed block 0's outputs


def test_sequential_refit_uses_the_cross_moment(random_ids):
    """Refit in sequential mode targets the dense outputs W X from the compressed inputs X'.
    In block 0 X' = X, so it coincides with the plain refit; in block 1 it must differ."""
    plain, _ = compress(tiny_model("llama"), "svd", 0.5, calib=random_ids, sequential=False, refit=True, **KW)
    seq, _ = compress(tiny_model("llama"), "svd", 0.5, calib=random_ids, sequential=True, refit=True, **KW)
    n0, n1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(plain.get_submodule(n0).dense(), seq.get_submodule(n0).dense(), rtol=1e-4, atol=1e-5)
    assert (plain.get_submodule(n1).dense() - seq.get_submodule(n1).dense()).abs().max() > 1e-4


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_with_and_without_refit(method, random_ids):
    for refit in (False, True):
        model, rep = compress(tiny_model("gpt2"), method, 0.3, calib=random_ids, refit=refit, **KW)
        assert rep.method == method and rep.refit == refit
        assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in rep.ranks)
        assert torch.isfinite(model(input_ids=random_ids[:32].view(1, 32)).logits).all()


def test_targets_select_layers(tiny_llama, random_ids):
    model, rep = compress(tiny_llama, "svd", 0.4, targets="down_proj", **KW)
    assert list(rep.ranks) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert not isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), LowRankLinear)


def test_api_copies_unless_inplace(tiny_llama, tiny_tok):
    import rankwise.compression.pipeline  # noqa: F401  importing the package never shadows the verb

    text = "some calibration text about matrices and their singular values. " * 60
    small, rep = rankwise.compress(tiny_llama, method="svd-llm", ratio=0.4, calib=text, tokenizer=tiny_tok, **KW)
    assert small is not tiny_llama and not any(isinstance(m, LowRankLinear) for m in tiny_llama.modules())
    same, _ = rankwise.compress(tiny_llama, ratio=0.4, calib=text, tokenizer=tiny_tok, inplace=True, **KW)
    assert same is tiny_llama and isinstance(tiny_llama.get_submodule(next(iter(rep.ranks))), LowRankLinear)


def test_bad_inputs(random_ids, tiny_tok):
    with pytest.raises(NoTargetLayersError, match="no linear layer"):
        compress(tiny_model("llama"), "svd", 0.4, targets="nothing_like_this", **KW)
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="up_proj"):
        compress(m, "svd-llm", 0.4, calib=random_ids, **KW)
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[0].input_layernorm.weight.fill_(float("inf"))
    with pytest.raises(NumericalError, match="non-finite activations"):
        compress(m, "svd-llm", 0.4, calib=random_ids, sequential=False, **KW)
    with pytest.raises(CorpusError, match="too short"):
        compress(tiny_model("llama"), "svd-llm", 0.4, calib="tiny text", tokenizer=tiny_tok, **KW)
    with pytest.raises(rankwise.errors.ConfigError, match="ratio"):
        compress(tiny_model("llama"), "svd-llm", 1.0, calib=random_ids, **KW)
    with pytest.raises(rankwise.errors.UnknownMethodError, match="svd-llm-v2"):
        compress(tiny_model("llama"), "pca", 0.4, calib=random_ids, **KW)
