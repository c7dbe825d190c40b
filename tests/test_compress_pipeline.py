"""The compression flow on tiny models of four families (three causal LMs and a BERT encoder)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import rankwise
from rankwise.calibration.sampling import calib_windows
from rankwise.calibration.stats import LayerStats, collect_input_stats
from rankwise.compression.allocation.budget import uniform_rank
from rankwise.compression.compress import compress
from rankwise.compression.engine.groups import dataflow_groups
from rankwise.compression.engine.runner import advance, capture_inputs
from rankwise.compression.methods import get_method
from rankwise.compression.methods.lowrank import OBJECTIVES
from rankwise.errors import ConfigError, CorpusError, NoTargetLayersError, NumericalError, UnknownMethodError
from rankwise.models.surgery import decoder_blocks, find_linears, linear_shape, linear_weight
from rankwise.models.tiny import tiny_model
from rankwise.structures.lowrank import LowRankLinear

CAL = dict(calib_options=dict(windows=6, seqlen=48), progress=False)


def lowrank(model, method="svd-llm", ratio=0.4, calib=None, targets=None, **engine):
    return compress(model, "lowrank", ratio, method=method, calib=calib, targets=targets, engine=engine, **CAL)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "bert"])
def test_cached_inputs_advanced_block_by_block_equal_every_block_input(arch, random_ids):
    """Block-0 inputs captured with stand-in blocks, advanced block by block, equal the hidden states a
    full forward feeds each block (two batch sizes: the extras are recorded per batch size)."""
    model = tiny_model(arch)
    blocks = decoder_blocks(model)
    windows = random_ids[:5 * 32].view(5, 32)
    seen = {i: [] for i in range(len(blocks))}
    hooks = [b.register_forward_pre_hook(
        lambda m, a, kw, i=i: seen[i].append((a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True)
        for i, b in enumerate(blocks)]
    with torch.no_grad():
        for s in range(0, 5, 2):
            model(input_ids=windows[s: s + 2])
    for h in hooks:
        h.remove()
    acts = capture_inputs(model, blocks, windows, 2, torch.device("cpu"))
    assert list(blocks) == list(decoder_blocks(model))  # the stand-ins were put back
    for i in range(len(blocks)):
        for got, want in zip(acts.hidden, seen[i]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        acts.hidden = advance([(i, blocks[i])], acts, torch.device("cpu"))


@pytest.mark.parametrize("arch,want", [
    ("llama", [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
    ("gpt2", [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]),
    ("bert", [["query", "key", "value"], ["attention.output.dense"], ["intermediate.dense"], ["output.dense"]]),
])
def test_dataflow_groups(arch, want, random_ids):
    model = tiny_model(arch)
    blocks = decoder_blocks(model)
    acts = capture_inputs(model, blocks, random_ids[:64].view(2, 32), 2, torch.device("cpu"))
    prefix = next(n for n, m in model.named_modules() if m is blocks) + ".1."
    mods = {n[len(prefix):]: m for n, m in find_linears(model).items() if n.startswith(prefix)}
    args, kwargs = acts.args(0, 1)
    groups = dataflow_groups(blocks[1], mods, acts.hidden[0], args, kwargs, torch.device("cpu"))
    assert [[n for n in g] for g in groups] == [[next(k for k in mods if k.endswith(w) and
                                                   (not w.endswith("output.dense") or k.count(".") == w.count(".")))
                                              for w in g] for g in want]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "bert"])
@pytest.mark.parametrize("engine", [dict(mode="one-shot"), dict(), dict(granularity="block", refit=False),
                                    dict(granularity="subgroup", refit=False), dict(granularity="block", refit=True)])
def test_every_mode_replaces_layers_at_uniform_ranks(arch, engine, random_ids):
    model = tiny_model(arch)
    shapes = {n: linear_shape(m) for n, m in find_linears(model).items()}
    x = random_ids[:64].view(2, 32)
    dense_logits = model(input_ids=x).logits
    model, rep = lowrank(model, calib=random_ids, **engine)
    seq = engine.get("mode", "sequential") == "sequential"
    assert rep.mode == engine.get("mode", "sequential") and rep.refit == engine.get("refit", seq)
    assert rep.granularity == engine.get("granularity", "subgroup" if seq else "block")
    for name, (m, n) in shapes.items():
        mod = model.get_submodule(name)
        assert isinstance(mod, LowRankLinear) and mod.rank == uniform_rank(m, n, 0.4)
    assert rep.targeted_params_before == sum(m * n for m, n in shapes.values())
    assert rep.targeted_params_after == sum(k * (m + n) for (m, n), k in zip(shapes.values(), rep.ranks.values()))
    assert rep.targeted_bytes_after == 4 * rep.targeted_params_after
    assert 0.4 <= rep.achieved_ratio < 0.45
    assert rep.model_params_before - rep.model_params_after == rep.targeted_params_before - rep.targeted_params_after
    logits = model(input_ids=x).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, dense_logits)


def test_one_shot_equals_manual_factorization(tiny_llama, random_ids):
    """One-shot = covariance of the dense model, whitened SVD, truncation: recomputed by hand."""
    ref = tiny_model("llama")
    layers = find_linears(ref)
    model, rep = lowrank(tiny_llama, calib=random_ids, mode="one-shot")
    stats = collect_input_stats(ref, calib_windows(random_ids, 6, 48, 3), list(layers))
    meth = get_method("lowrank", {"method": "svd-llm"})
    for name, mod in layers.items():
        W = linear_weight(mod).detach().float()
        st = LayerStats(stats[name])
        L, R = meth.factorize(W, st).factors(rep.ranks[name])
        torch.testing.assert_close(model.get_submodule(name).dense(), L @ R, rtol=1e-4, atol=1e-5)


def test_sequential_block0_matches_one_shot_and_later_blocks_differ(random_ids):
    one, _ = lowrank(tiny_model("llama"), calib=random_ids, mode="one-shot")
    seq, _ = lowrank(tiny_model("llama"), calib=random_ids, granularity="block", refit=False)
    a = one.get_submodule("model.layers.0.mlp.down_proj").dense()
    b = seq.get_submodule("model.layers.0.mlp.down_proj").dense()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    a = one.get_submodule("model.layers.1.mlp.down_proj").dense()
    b = seq.get_submodule("model.layers.1.mlp.down_proj").dense()
    assert (a - b).abs().max() > 1e-4  # block 1 saw the compressed block 0's outputs


def test_subgroups_calibrate_on_the_compressed_earlier_groups(random_ids):
    """Sub-groups: q/k/v of block 0 see the same inputs as block granularity (nothing compressed before
    them); o_proj then sees the compressed q/k/v's attention output, so it differs."""
    blk, _ = lowrank(tiny_model("llama"), calib=random_ids, granularity="block", refit=False)
    sub, _ = lowrank(tiny_model("llama"), calib=random_ids, granularity="subgroup", refit=False)
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    torch.testing.assert_close(blk.get_submodule(q).dense(), sub.get_submodule(q).dense(), rtol=0, atol=0)
    assert (blk.get_submodule(o).dense() - sub.get_submodule(o).dense()).abs().max() > 1e-4


def _inputs(model, name, windows):
    """The inputs X (in, tokens) the layer ``name`` sees on ``windows`` (float64)."""
    xs = []
    h = model.get_submodule(name).register_forward_pre_hook(
        lambda m, a: xs.append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        for s in range(0, windows.shape[0], 4):
            model(input_ids=windows[s:s + 4])
    h.remove()
    return torch.cat(xs).T


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"])
def test_refit_lowers_the_sequential_objective(name, random_ids):
    """With the compressed model's inputs X' recomputed independently, the refit's layer has a lower
    ||W X - W' X'|| than the plain sequential fit (which only sees X'), and with a vanishing ridge it
    is the exact rank-k minimizer: the objective equals the whitened tail of W M C'^-1 under C'.
    Sub-group granularity makes the X' of calibration the X' of the final model (with whole blocks,
    down_proj is calibrated on the outputs of the still dense gate/up of its own block)."""
    dense = tiny_model("llama")
    W = linear_weight(dense.get_submodule(name)).detach().double()
    win = calib_windows(random_ids, 6, 48, 3)
    X = _inputs(dense, name, win)
    plain, _ = lowrank(tiny_model("llama"), calib=random_ids, granularity="subgroup", refit=False)
    refit, rep = lowrank(tiny_model("llama"), calib=random_ids, granularity="subgroup", refit=True, refit_ridge=1e-9)
    assert {lr.ridge for lr in rep.layers} == {1e-9}

    def objective(model):
        Xp = _inputs(model, name, win)
        Wp = model.get_submodule(name).dense().detach().double()
        return float((W @ X - Wp @ Xp).norm()), Xp

    got_plain, _ = objective(plain)
    got_refit, Xp = objective(refit)
    assert got_refit < 0.98 * got_plain
    # closed form of the optimum: ||W X - W' X'||^2 = ||W X||^2 - ||W M C'^-1 S'||^2 + tail_k^2
    C, M = Xp @ Xp.T, X @ Xp.T
    T = W @ M @ torch.linalg.inv(C)
    S = torch.linalg.cholesky(C)
    s = torch.linalg.svdvals(T @ S)
    k = refit.get_submodule(name).rank
    best = (W @ X).square().sum() - (T @ S).square().sum() + s[k:].square().sum()
    assert got_refit == pytest.approx(float(best.clamp_min(0).sqrt()), rel=1e-3)


def test_ridge_is_chosen_on_held_out_windows(random_ids):
    from rankwise.compression.engine.loop import RIDGE_CANDIDATES

    _, rep = compress(tiny_model("llama"), "lowrank", 0.4, calib=random_ids, engine=dict(refit=True),
                      calib_options=dict(windows=16, seqlen=48), progress=False)
    assert all(lr.ridge in RIDGE_CANDIDATES for lr in rep.layers)


def test_heldout_errors_match_numpy_and_the_moment_identity():
    """The score of candidate ridges: ``||W X - W' X'||^2`` from the (tokens, in) inputs, in row chunks
    (more tokens than one chunk), equal to numpy's float64 and to the moment form
    ``tr(W' C' W'^T) - 2 tr(W M W'^T) + ||W X||^2`` (``C' = X' X'^T``, ``M = X X'^T``) within float32
    products' rounding; it ranks two candidates as float64 does; a low-rank candidate layer (scored
    through its factors, its bias excluded) scores as its dense matrix."""
    from rankwise.calibration.stats import CHUNK_BYTES
    from rankwise.compression.engine.loop import heldout_errors

    g = torch.Generator().manual_seed(0)
    d, t = 6, CHUNK_BYTES // (4 * 4) + 37  # 4 outputs: more rows than one chunk
    X, Xp = torch.randn(t, d, generator=g), torch.randn(t, d, generator=g)
    W, Wp = torch.randn(4, d, generator=g), torch.randn(4, d, generator=g)
    Wq = Wp + 1e-3 * torch.randn(4, d, generator=g)  # a candidate 0.1 % away: still told apart
    L, R = torch.randn(4, 2, generator=g), torch.randn(2, d, generator=g)
    low = LowRankLinear.from_factors(L, R, torch.randn(4, generator=g))
    got, gotq, gotl = heldout_errors(W, [Wp, Wq, low], X, Xp)
    Xn, Xpn, Wn, Wpn = (a.double().numpy() for a in (X, Xp, W, Wp))
    ref = float(np.square(Xn @ Wn.T - Xpn @ Wpn.T).sum())
    assert got == pytest.approx(ref, rel=1e-5)
    C, M = Xpn.T @ Xpn, Xn.T @ Xpn
    moments = np.trace(Wpn @ C @ Wpn.T) - 2 * np.trace(Wn @ M @ Wpn.T) + np.square(Xn @ Wn.T).sum()
    assert got == pytest.approx(float(moments), rel=1e-5)
    refq = float(np.square(Xn @ Wn.T - Xpn @ Wq.double().numpy().T).sum())
    assert (gotq < got) == (refq < ref)
    refl = float(np.square(Xn @ Wn.T - Xpn @ (L @ R).double().numpy().T).sum())
    assert gotl == pytest.approx(refl, rel=1e-5)


@pytest.mark.parametrize("method", list(OBJECTIVES))
def test_every_objective_runs_with_and_without_refit_and_lstsq(method, random_ids):
    for refit, lstsq in ((False, False), (True, False), (False, True)):
        model, rep = compress(tiny_model("gpt2"), "lowrank", 0.3, options=dict(method=method, lstsq=lstsq),
                              calib=random_ids, engine=dict(refit=refit, refit_ridge=1e-3), **CAL)
        assert rep.method == method and rep.refit == refit and rep.config["options"]["lstsq"] == lstsq
        assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in rep.ranks)
        assert torch.isfinite(model(input_ids=random_ids[:32].view(1, 32)).logits).all()


def test_eigh_whitening_is_an_option_of_svd_llm(random_ids):
    a, _ = compress(tiny_model("llama"), "lowrank", 0.4, options=dict(whitening="eigh"), calib=random_ids, **CAL)
    b, _ = lowrank(tiny_model("llama"), calib=random_ids)
    n = "model.layers.1.mlp.up_proj"
    torch.testing.assert_close(a.get_submodule(n).dense(), b.get_submodule(n).dense(), rtol=1e-3, atol=1e-4)


def test_default_targets_are_every_linear_inside_the_blocks():
    bert = tiny_model("bert")
    names = list(find_linears(bert))
    assert len(names) == 12 and all(n.startswith("bert.encoder.layer.") for n in names)
    assert "cls.predictions.transform.dense" not in names  # outside the repeated blocks
    assert len(find_linears(tiny_model("llama"))) == 14 and len(find_linears(tiny_model("gpt2"))) == 8


def test_targets_select_layers(tiny_llama, random_ids):
    model, rep = lowrank(tiny_llama, "svd", targets="down_proj", calib=random_ids)
    assert list(rep.ranks) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert not isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), LowRankLinear)


def test_api_copies_unless_inplace(tiny_llama, tiny_tok):
    import rankwise.compression.compress  # noqa: F401  importing the package never shadows the verb

    text = "some calibration text about matrices and their singular values. " * 60
    small, rep = rankwise.compress(tiny_llama, method="svd-llm", ratio=0.4, calib=text, tokenizer=tiny_tok, **CAL)
    assert small is not tiny_llama and not any(isinstance(m, LowRankLinear) for m in tiny_llama.modules())
    same, _ = rankwise.compress(tiny_llama, ratio=0.4, calib=text, tokenizer=tiny_tok, inplace=True, **CAL)
    assert same is tiny_llama and isinstance(tiny_llama.get_submodule(next(iter(rep.ranks))), LowRankLinear)


def test_bad_inputs(random_ids, tiny_tok):
    with pytest.raises(NoTargetLayersError, match="no linear layer"):
        lowrank(tiny_model("llama"), "svd", targets="nothing_like_this", calib=random_ids)
    with pytest.raises(ConfigError, match="invalid layer pattern"):
        lowrank(tiny_model("llama"), "svd", targets="q_proj(", calib=random_ids)
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="up_proj"):
        lowrank(m, calib=random_ids)
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[0].input_layernorm.weight.fill_(float("inf"))
    with pytest.raises(NumericalError, match="non-finite activations"):
        lowrank(m, calib=random_ids, mode="one-shot")
    with pytest.raises(CorpusError, match="too short"):
        compress(tiny_model("llama"), calib="tiny text", tokenizer=tiny_tok, **CAL)
    with pytest.raises(ConfigError, match="ratio"):
        lowrank(tiny_model("llama"), ratio=1.0, calib=random_ids)
    with pytest.raises(UnknownMethodError, match="svd-llm"):
        lowrank(tiny_model("llama"), "pca", calib=random_ids)
    with pytest.raises(UnknownMethodError, match="lowrank"):
        compress(tiny_model("llama"), "nothing", 0.4, calib=random_ids, **CAL)
    with pytest.raises(ConfigError, match="one-shot"):
        lowrank(tiny_model("llama"), calib=random_ids, mode="one-shot", refit=True)
    with pytest.raises(ConfigError, match="one-shot"):
        lowrank(tiny_model("llama"), calib=random_ids, mode="one-shot", granularity="subgroup")
    with pytest.raises(ConfigError, match="granularity"):
        lowrank(tiny_model("llama"), calib=random_ids, granularity="layer")
    with pytest.raises(ConfigError, match="bits-per-weight"):
        compress(tiny_model("llama"), "lowrank", bits_per_weight=3, calib=random_ids, **CAL)
    with pytest.raises(ConfigError, match="unknown option"):
        compress(tiny_model("llama"), "lowrank", 0.4, options=dict(rank=3), calib=random_ids, **CAL)


def test_engine_defaults_are_the_measured_best_per_method():
    """Unset granularity / refit resolve to the method's measured best in sequential mode (sub-groups +
    refit for the whitened low-rank objectives), to block / no refit otherwise; explicit values win."""
    from rankwise.compression.compress import build_config

    def eng(*a, **kw):
        e = build_config(*a, **kw)[0].engine
        return e.granularity, e.refit

    assert eng(None, 0.4) == ("subgroup", True)
    assert eng(None, 0.4, method="svd-llm-v2") == ("subgroup", True)
    assert eng(None, 0.4, method="svd") == ("block", False)
    assert eng(None, 0.4, method="asvd") == ("block", False)
    assert eng(None, 0.4, engine={"mode": "one-shot"}) == ("block", False)
    assert eng(None, 0.4, engine={"refit": False}) == ("subgroup", False)
    assert eng(None, 0.4, engine={"granularity": "block"}) == ("block", True)
    assert eng("rtn", None, 3.0, options={"bits": 3}) == ("block", False)
    with pytest.raises(ConfigError, match="one-shot"):
        build_config(None, 0.4, engine={"mode": "one-shot", "refit": True})


def test_width_fixes_its_refit_ridge_unless_the_user_sets_one():
    """Width pruning refits at relative ridge 1.0 by default (the held-out choice was unstable across
    calibration seeds, BENCHMARKS.md); an explicit --refit-ridge wins; low rank keeps the held-out choice."""
    from rankwise.compression.compress import build_config

    def ridge(*a, **kw):
        return build_config(*a, **kw)[0].engine.refit_ridge

    assert ridge("width", 0.2) == 1.0
    assert ridge("width", 0.2, engine={"refit_ridge": 0.01}) == 0.01
    assert ridge(None, 0.4) is None
