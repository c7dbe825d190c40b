"""The validated rank-allocation search (``--allocate search``): the rank profiles meet the uniform budget with
the designed tilts, and the pipeline keeps the candidate with the lowest held-out calibration loss, measured
again here on the compressed model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rankwise.compression.allocation.budget import uniform_rank
from rankwise.compression.allocation.profiles import PROFILES, is_attention, profile_plans, profile_ratios
from rankwise.compression.compress import compress, compress_low_memory
from rankwise.errors import ConfigError
from rankwise.evaluation.perplexity import window_nll
from rankwise.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

#: SmolLM2-135M's targeted shapes (30 blocks): the profiles' arithmetic on the real sizes.
SMOL = {f"model.layers.{b}.{p}": s for b in range(30) for p, s in [
    ("self_attn.q_proj", (576, 576)), ("self_attn.k_proj", (192, 576)), ("self_attn.v_proj", (192, 576)),
    ("self_attn.o_proj", (576, 576)), ("mlp.gate_proj", (1536, 576)), ("mlp.up_proj", (1536, 576)),
    ("mlp.down_proj", (576, 1536))]}


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_every_profile_meets_the_uniform_budget_with_its_designed_tilt(ratio):
    total = sum(m * n for m, n in SMOL.values())
    plans = profile_plans(ratio, SMOL)
    assert set(plans) == set(PROFILES)
    for label, plan in plans.items():
        kept = sum(m * n if plan[k] is None else plan[k] * (m + n) for k, (m, n) in SMOL.items())
        assert kept <= (1 - ratio) * total  # the same budget as uniform
        assert kept >= (1 - ratio) * total - sum(m + n for m, n in SMOL.values())  # short by rounding only
    uni = {k: uniform_rank(m, n, ratio) for k, (m, n) in SMOL.items()}
    q, down, first_q, mid_q = ("model.layers.7.self_attn.q_proj", "model.layers.7.mlp.down_proj",
                               "model.layers.0.self_attn.q_proj", "model.layers.14.self_attn.q_proj")
    assert plans["attention-less"][q] > uni[q] and plans["attention-less"][down] < uni[down]
    assert plans["mlp-less"][q] < uni[q] and plans["mlp-less"][down] > uni[down]
    assert plans["ends-protected"][first_q] > uni[first_q] and plans["ends-protected"][mid_q] < uni[mid_q]
    r = profile_ratios(ratio, SMOL, {k: 0.75 if is_attention(k) else 1.0 for k in SMOL})
    assert r[q] / r[down] == pytest.approx(0.75)  # uncapped: removal proportional to the weights
    sizes = np.array([m * n for m, n in SMOL.values()], dtype=float)
    assert float(np.dot([r[k] for k in SMOL], sizes) / sizes.sum()) == pytest.approx(ratio, rel=1e-9)


def test_a_profile_that_equals_uniform_is_not_a_candidate():
    two_blocks = {k: v for k, v in SMOL.items() if k.startswith(("model.layers.0.", "model.layers.1."))}
    assert set(profile_plans(0.4, two_blocks)) == {"attention-less", "mlp-less"}  # both blocks are ends
    mlp_only = {k: v for k, v in SMOL.items() if ".mlp." in k}
    assert set(profile_plans(0.4, mlp_only)) == {"ends-protected"}


def test_a_capped_layer_hands_its_share_to_the_others():
    shapes = {"a.0.x": (8, 8), "a.1.x": (64, 64)}
    r = profile_ratios(0.8, shapes, {"a.0.x": 10.0, "a.1.x": 1.0})
    assert r["a.0.x"] == pytest.approx(1 - 16 / 64)  # rank 1 of 8 x 8: the cap
    assert (r["a.0.x"] * 64 + r["a.1.x"] * 4096) / (64 + 4096) == pytest.approx(0.8)
    with pytest.raises(ConfigError, match="no room"):
        profile_ratios(0.99, shapes, {"a.0.x": 1.0, "a.1.x": 1.0})


def test_search_keeps_the_candidate_with_the_lowest_heldout_loss():
    windows = torch.randint(0, 320, (8, 48), generator=torch.Generator().manual_seed(1))
    model, rep = compress(tiny_model("llama", num_hidden_layers=3), "lowrank", ratio=0.4, allocate="search", calib=windows,
                          calib_options=dict(windows=8, seqlen=48), progress=False)
    val = rep.allocation["validation"]
    assert set(val["nll"]) == {"uniform", *PROFILES} and val["heldout_windows"] == 4
    assert val["chosen"] == min(val["nll"], key=lambda k: (val["nll"][k], k != "uniform"))
    total, count = window_nll(model, windows[4:])  # the kept model, scored again
    assert val["nll"][val["chosen"]] == pytest.approx(total / count, rel=1e-9)
    shapes = {lr.name: tuple(lr.shape) for lr in rep.layers}  # the targeted layers, as the pipeline saw them
    plan = (profile_plans(0.4, shapes)[val["chosen"]] if val["chosen"] != "uniform"
            else {n: uniform_rank(*s, 0.4) for n, s in shapes.items()})
    assert {lr.name: lr.rank for lr in rep.layers} == plan
    with pytest.raises(ConfigError, match="--low-memory cannot use --allocate search"):
        compress_low_memory("/nonexistent", "/tmp/never-written", "lowrank", ratio=0.4, allocate="search")


def test_search_refuses_speed_aware_with_the_option_that_can():
    windows = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ConfigError, match="--allocate search does not combine with --speed-aware: use --allocate uniform"):
        compress(tiny_model("llama"), "lowrank", ratio=0.4, allocate="search", allocate_options={"speed_aware": True},
                 calib=windows, calib_options=dict(windows=4, seqlen=32), progress=False)
