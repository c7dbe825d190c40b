"""One byte budget across structures: the candidate grid (widths x group sizes, low rank, dense), the uniform
plan, the held-out windows kept out of the statistics, the validation against uniform, and the CLI's
--bits / unused-budget / infeasible-budget messages."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from rankwise.calibration.stats import collect_input_stats
from rankwise.cli import main
from rankwise.compression.allocation.bytes import byte_budget
from rankwise.compression.compress import compress, compress_low_memory
from rankwise.compression.engine import Engine, EngineOptions, ModelSource
from rankwise.compression.methods.base import CandidateGrid, LayerStats, get_method
from rankwise.compression.validation import validate_plans
from rankwise.errors import ConfigError
from rankwise.evaluation.perplexity import window_nll
from rankwise.linalg.quant import rtn
from rankwise.models.surgery import find_linears, linear_shape
from rankwise.models.tiny import TINY_TEXT, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
CAL = dict(calib_options=dict(windows=8, seqlen=48), progress=False)


def np_rel_error(W, Wp, C) -> float:
    W, Wp, C = (np.asarray(t.detach().double().numpy()) for t in (W, Wp, C))
    E = W - Wp
    return float(np.trace(E @ C @ E.T) / np.trace(W @ C @ W.T))


def packed_bytes(m: int, n: int, b: int, g: int) -> int:
    """Packed codes + float16 scales and minimums, by hand."""
    return m * math.ceil(n * b / 8) + 2 * 2 * m * math.ceil(n / g)


@pytest.fixture(scope="module")
def problem():
    model = tiny_model("llama")
    windows = torch.randint(0, 320, (8, 48), generator=torch.Generator().manual_seed(0))
    mods = find_linears(model)
    stats = collect_input_stats(model, windows, list(mods))
    return (model, windows, {n: m.weight.detach().float() for n, m in mods.items()},
            {n: LayerStats(s) for n, s in stats.items()}, {n: linear_shape(m) for n, m in mods.items()})


def test_gptq_candidates_span_widths_and_group_sizes_with_exact_bytes_and_measured_errors(problem):
    _, _, weights, stats, _ = problem
    name = "model.layers.0.mlp.down_proj"  # 64 x 128
    W, st = weights[name], stats[name]
    C = st.covariance()
    meth = get_method("gptq")
    grid = CandidateGrid(widths=(2, 3, 8), group_sizes=(16, 32, 64))
    est = {(c.spec["bits"], c.spec["group_size"]): c for c in meth.candidates(W, st, grid)}
    exact = {(c.spec["bits"], c.spec["group_size"]): c
             for c in meth.candidates(W, st, CandidateGrid((2, 3, 8), (16, 32, 64), "exact"))}
    assert set(est) == set(itertools.product((2, 3, 8), (16, 32, 64)))
    for (b, g), c in est.items():
        assert c.nbytes == packed_bytes(64, 128, b, g) == exact[b, g].nbytes
        fitted = meth.fit(W, None, st, c.spec)
        assert exact[b, g].cost == pytest.approx(np_rel_error(W, fitted.dense(), C), rel=1e-5)  # float32 products
        if g == 64 and b <= 4:  # the reference group size: GPTQ run, exact
            assert c.exact and c.cost == pytest.approx(exact[b, g].cost, rel=1e-9)
        elif b > 4:  # the round-to-nearest error: an upper bound of GPTQ's
            assert c.cost == pytest.approx(np_rel_error(W, rtn(W, b, g).dense(), C), rel=1e-5)
            assert c.cost >= exact[b, g].cost * (1 - 1e-9)
        else:  # estimated from RTN's ratio between group sizes: same order as the fit
            assert not c.exact and 0.5 < c.cost / exact[b, g].cost < 2.0
    for b in (2, 3, 8):  # smaller groups cost more bytes and fit better
        assert est[b, 16].nbytes > est[b, 32].nbytes > est[b, 64].nbytes
        assert est[b, 16].cost <= est[b, 32].cost <= est[b, 64].cost


def test_mixed_offers_gptq_lowrank_and_fits_by_the_spec(problem):
    _, _, weights, stats, _ = problem
    name = "model.layers.1.self_attn.o_proj"
    W, st = weights[name], stats[name]
    mixed = get_method("mixed")
    cands = mixed.candidates(W, st, CandidateGrid(widths=(2, 3, 5), group_sizes=(32, 64)))
    plain = [c for c in cands if "rank" not in c.spec]
    low = [c for c in cands if "rank" in c.spec]
    assert {(c.spec["bits"], c.spec["group_size"]) for c in plain} == set(itertools.product((2, 3, 5), (32, 64)))
    assert {(c.spec["bits"], c.spec["group_size"]) for c in low} == {(2, 64), (3, 64)}  # b <= 4, reference group
    spec = next(c.spec for c in low if c.spec["bits"] == 2 and c.spec["rank"] == 4)
    a = mixed.fit(W, None, st, spec).state_dict()
    b = get_method("lorc").fit(W, None, st, spec).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    q = {k: v for k, v in spec.items() if k != "rank"}
    a = mixed.fit(W, None, st, q).state_dict()
    b = get_method("gptq").fit(W, None, st, q).state_dict()
    assert "left" not in a and all(torch.equal(a[k], b[k]) for k in a)


def test_uniform_plan_is_the_largest_single_setting_within_the_budget(problem):
    _, _, _, _, shapes = problem
    meth = get_method("gptq")
    grid = CandidateGrid(widths=(2, 3, 4), group_sizes=(16, 32, 64))

    def total(b, g):
        return sum(packed_bytes(m, n, b, min(g, n)) for m, n in shapes.values())

    settings = list(itertools.product((2, 3, 4), (16, 32, 64)))
    for bpw in (2.6, 3.0, 3.7, 4.4):
        plan, info = meth.uniform_plan(shapes, bpw, grid)
        assert len({(s["bits"], s["group_size"]) for s in plan.values()}) == 1
        b, g = next(iter(plan.values()))["bits"], next(iter(plan.values()))["group_size"]
        fits = [total(*s) for s in settings if total(*s) <= byte_budget(bpw, shapes)]
        assert total(b, g) == max(fits) == info["uniform"]["planned_bytes"]
    smallest = min(total(*s) for s in settings) * 8 / sum(m * n for m, n in shapes.values())
    with pytest.raises(ConfigError, match=rf"cannot be met.*needs {smallest:.3f} bits per weight.*at least {smallest:.3f}"):
        meth.uniform_plan(shapes, 2.2, grid)


def test_dense_is_a_candidate_unless_the_width_is_fixed(problem):
    _, windows, _, _, shapes = problem
    kw = dict(allocate_options={"validate": False, "bits": [2, 3, 4]}, calib=windows, **CAL)
    _, rep = compress(tiny_model("llama"), "gptq", bits_per_weight=16, **kw)
    dense = rep.allocation["bits_greedy"]["dense_layers"]
    assert dense and all(lr.kind is None for lr in rep.layers if lr.name in dense)
    assert rep.targeted_bytes_after <= byte_budget(16, shapes)
    _, rep = compress(tiny_model("llama"), "gptq", bits_per_weight=16, options={"bits": 4}, **kw)
    assert all(lr.kind == "quant" and lr.spec["bits"] == 4 for lr in rep.layers)
    use = rep.allocation["budget"]
    assert use["unused_fraction"] > 0.5 and "largest candidate" in use["reason"]


def test_heldout_windows_never_enter_the_statistics(problem):
    """A dry (one-shot) pass with the held-out windows excluded sees exactly the statistics of the other
    windows: the last ceil(holdout / batch_size) batches (here windows 4..7)."""
    model, windows, _, _, _ = problem
    mods = find_linears(model)
    seen = {}

    def fit(items):
        for n, x in items.items():
            seen[n] = x.stats.covariance().clone()
        return {}

    opts = EngineOptions(mode="one-shot", granularity="block", refit=False, holdout=4, batch_size=4)
    engine = Engine(ModelSource(model, torch.device("cpu")), mods, {n: {} for n in mods}, fit, opts, dry=True,
                    exclude_heldout=True)
    engine.run(windows)
    assert torch.equal(engine.heldout(windows), windows[4:])
    ref = collect_input_stats(model, windows[:4], list(mods))
    for n in mods:
        assert torch.allclose(seen[n], LayerStats(ref[n]).covariance(), rtol=1e-10, atol=1e-12), n


class _Pass:
    """A fake engine pass: every target layer's weight scaled by the plan's factor."""

    def __init__(self, model, windows):
        self.model, self.windows = model, windows

    def __call__(self, plan):
        from rankwise.models.surgery import set_module

        for n, f in plan.items():
            old = self.model.get_submodule(n)
            new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
            with torch.no_grad():
                new.weight.copy_(old.weight * f)
            set_module(self.model, n, new)
        return {"plan": plan}, self

    def heldout(self, windows):
        return windows[6:]


@pytest.mark.parametrize("good", ["bits-greedy", "uniform"])
def test_validation_keeps_the_plan_with_the_lower_heldout_loss_and_its_layers(problem, good):
    model = tiny_model("llama")
    _, windows, _, _, _ = problem
    mods = dict(find_linears(model))
    dense = {n: m.weight.detach().clone() for n, m in mods.items()}
    bad = "uniform" if good == "bits-greedy" else "bits-greedy"
    plans = {"bits-greedy": None, "uniform": None}
    plans[good] = {n: 1.0 for n in mods}
    plans[bad] = {n: 40.0 for n in mods}  # blows the logits up: a far larger NLL
    chosen, reports, info = validate_plans(model, mods, plans, _Pass(model, windows), windows)
    assert chosen == good and reports == {"plan": plans[good]}
    for n in mods:  # the chosen plan's layers, each made from the dense weight (restored between passes)
        assert torch.equal(model.get_submodule(n).weight, dense[n])
    total, count = window_nll(model, windows[6:])
    assert info["nll"][good] == pytest.approx(total / count, rel=1e-12) and info["nll"][bad] > info["nll"][good]
    assert info["heldout_windows"] == 2 and info["chosen"] == good
    assert ("note" in info) == (good == "uniform")


def test_compress_validates_on_the_heldout_windows_and_records_both_losses(problem):
    _, windows, _, _, shapes = problem
    model, rep = compress(tiny_model("llama"), "gptq", bits_per_weight=3.0, allocate_options={"bits": [2, 3, 4]},
                          calib=windows, **CAL)
    val = rep.allocation["validation"]
    assert set(val["nll"]) == {"bits-greedy", "bits-greedy-loss", "uniform"} and val["heldout_windows"] == 4
    assert val["chosen"] == min(val["nll"], key=val["nll"].get)
    total, count = window_nll(model, windows[4:])
    assert val["nll"][val["chosen"]] == pytest.approx(total / count, rel=1e-9)
    assert rep.targeted_bytes_after <= byte_budget(3.0, shapes)
    specs = {(lr.spec["bits"], lr.spec["group_size"]) for lr in rep.layers}
    assert len(specs) == 1 if val["chosen"] == "uniform" else len(specs) > 1
    with pytest.raises(ConfigError, match="--low-memory cannot validate.*--no-validate"):
        compress_low_memory("/nonexistent", "/tmp/never-written", "gptq", bits_per_weight=3.0)


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TINY_TEXT * 12)
    return f


def run_cli(tiny_dir, text_file, tmp_path, *extra):
    return main(["compress", str(tiny_dir), "--text-file", str(text_file), "--calib-windows", "4",
                 "--calib-seqlen", "64", "--out", str(tmp_path / "o"), "--overwrite", *extra])


def test_cli_bits_alone_is_uniform_and_a_fixed_setting_says_why_the_budget_is_unused(tiny_dir, text_file, tmp_path,
                                                                                      capsys):
    import json

    assert run_cli(tiny_dir, text_file, tmp_path, "--bits", "3", "-q") == 0
    meta = json.loads((tmp_path / "o" / "rankwise.json").read_text())
    assert meta["structure"] == "gptq" and meta["allocate"] == "uniform"
    assert {(s["spec"]["bits"], s["spec"]["group_size"]) for s in meta["layers"].values()} == {(3, 64), (3, 128)}  # 128, capped at 64 inputs
    capsys.readouterr()
    assert run_cli(tiny_dir, text_file, tmp_path, "--structure", "gptq", "--bits", "2", "--group-size", "128",
                   "--bits-per-weight", "3") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "byte budget unused" in out and "one setting for every layer (2-bit codes" in out
    assert "--bits and --group-size are both fixed" in out


@pytest.mark.parametrize("extra,needle", [
    (["--structure", "gptq", "--bits", "3", "--bits-per-weight", "3.2"], "raise --bits-per-weight to at least 3.444"),
    (["--bits", "3", "--set", "bits=4"], "bits given twice"),
    (["--structure", "lorc", "--bits", "3"], "needs --bits-per-weight"),
    (["--bits-per-weight", "3", "--low-memory"], "--low-memory cannot validate"),
    (["--structure", "gptq", "--bits", "3", "--allocate", "bits-greedy"], "pass --bits-per-weight"),
])
def test_cli_settings_that_cannot_be_honoured_are_errors(tiny_dir, text_file, tmp_path, capsys, extra, needle):
    assert run_cli(tiny_dir, text_file, tmp_path, "-q", *extra) == 2
    assert needle in " ".join(capsys.readouterr().err.split())


def test_output_gradient_energy_matches_the_gradient_at_a_leaf_output(problem):
    """tr(G)/m from the hooks against the same gradient taken at the layer's output made a leaf tensor."""
    from rankwise.calibration.gradients import lm_loss, output_gradient_energy

    model, windows, _, _, _ = problem
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    got = output_gradient_energy(model, windows[:2], names, batch_size=2)
    for name in names:
        mod = model.get_submodule(name)
        leaf = {}

        def hook(module, args, out):
            leaf["y"] = out.detach().requires_grad_(True)
            return leaf["y"]

        h = mod.register_forward_hook(hook)
        try:
            lm_loss(model, windows[:2]).backward()
        finally:
            h.remove()
        ref = float(leaf["y"].grad.double().square().sum()) / mod.out_features
        assert got[name] == pytest.approx(ref, rel=1e-6)
    model.zero_grad(set_to_none=True)


def test_loss_objective_weights_each_layers_errors(problem):
    _, windows, _, _, shapes = problem
    model, rep = compress(tiny_model("llama"), "gptq", bits_per_weight=3.5, calib=windows,
                          allocate_options={"objective": "loss", "validate": False, "bits": [2, 3, 4]}, **CAL)
    info = rep.allocation["bits_greedy"]
    assert info["objective"] == "loss" and rep.targeted_bytes_after <= byte_budget(3.5, shapes)
    with pytest.raises(ConfigError, match="objective"):
        compress(tiny_model("llama"), "gptq", bits_per_weight=3.5, calib=windows,
                 allocate_options={"objective": "kl"}, **CAL)


def test_uniform_says_why_it_leaves_the_budget_unused(problem, caplog):
    _, windows, _, _, _ = problem
    with caplog.at_level("WARNING", logger="rankwise"):
        _, rep = compress(tiny_model("llama"), "gptq", bits_per_weight=3.0, options={"group_size": 128},
                          allocate="uniform", calib=windows, **CAL)
    use = rep.allocation["budget"]
    assert use["unused_fraction"] > 0.05 and use["plan"] == "uniform"
    assert "the next larger, 3-bit codes" in use["reason"] and "bits-greedy" in use["reason"]
    assert any("byte budget unused" in r.getMessage() for r in caplog.records)
