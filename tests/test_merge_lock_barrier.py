"""Locking keeps the function, breaks task-vector merging and survives permutation matching; the barrier
and the BatchNorm reset against hand computations."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from rankwise.errors import ConfigError
from rankwise.linalg.invertible import conditioned, rope_commuting
from rankwise.merging.barrier import barrier, interpolate, reset_batchnorm_
from rankwise.merging.lock import lock
from rankwise.merging.matching import match
from rankwise.merging.merge import merge
from rankwise.models.tiny import tiny_model

X = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(m):
    with torch.no_grad():
        return m(X).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_lock_keeps_the_logits_and_moves_the_weights(arch):
    model = tiny_model(arch)
    locked, rep = lock(model, seed=4)
    y, z = _logits(model), _logits(locked)
    assert float((y - z).abs().max() / y.abs().max()) < 1e-4
    q = "model.layers.0.self_attn.v_proj.weight" if arch != "gpt2" else "transformer.h.0.attn.c_attn.weight"
    a, b = model.state_dict()[q], locked.state_dict()[q]
    assert float((a - b).norm() / a.norm()) > 0.5
    assert rep.query_key == (arch != "gemma3")  # Gemma 3's per-head q/k norms: value-output only


def test_transforms_are_exact_inverses_and_commute_with_rotary_planes():
    g = torch.Generator().manual_seed(0)
    A, Ainv = conditioned(8, g, 2.0)
    assert torch.allclose(A @ Ainv, torch.eye(8, dtype=torch.float64), atol=1e-12)
    assert float(torch.linalg.cond(A)) <= 4.0 + 1e-9
    M, Minv = rope_commuting(8, g, 2.0)
    assert torch.allclose(M @ Minv, torch.eye(8, dtype=torch.float64), atol=1e-12)
    theta = torch.rand(4, generator=g, dtype=torch.float64) * 6.28
    R = torch.zeros(8, 8, dtype=torch.float64)  # a rotary position rotation, rotate_half layout
    i = torch.arange(4)
    R[i, i], R[i, i + 4], R[i + 4, i], R[i + 4, i + 4] = theta.cos(), -theta.sin(), theta.sin(), theta.cos()
    assert torch.allclose(R @ M, M @ R, atol=1e-12)


def test_merging_with_a_locked_model_collapses_and_matching_cannot_undo_it():
    base = tiny_model("llama")
    ft = copy.deepcopy(base)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.02 * torch.randn_like(p) * p.abs().mean())
    locked, _ = lock(ft, seed=1)
    plain, _ = merge(base, [ft], "task-arithmetic", options={"scale": 1.0})
    broken, _ = merge(base, [locked], "task-arithmetic", options={"scale": 0.5}, check_base=False)
    fine, _ = merge(base, [ft], "task-arithmetic", options={"scale": 0.5})
    err = lambda m: float((_logits(m) - _logits(ft)).norm() / _logits(ft).norm())  # noqa: E731
    assert err(plain) < 1e-5 and err(fine) < 0.05 and err(broken) > 10 * err(fine)
    with pytest.raises(ConfigError, match="does not look like a fine-tune"):
        merge(base, [locked], "task-arithmetic")  # the default check notices
    undone, _ = match(ft, locked)
    key = "model.layers.0.self_attn.q_proj.weight"
    a, b = ft.state_dict()[key], undone.state_dict()[key]
    assert float((a - b).norm() / a.norm()) > 0.5


def test_barrier_of_a_model_with_itself_is_zero_and_endpoints_are_the_models():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    res = barrier(m, copy.deepcopy(m), (x, y), alphas=5)
    assert res.barrier == pytest.approx(0.0, abs=1e-6) and res.accuracy_barrier == pytest.approx(0.0, abs=1e-9)
    other = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    half = interpolate(m, other, 0.5)
    assert torch.allclose(half[0].weight, (m[0].weight + other[0].weight) / 2)
    res = barrier(m, other, (x, y), alphas=[0.0, 0.5, 1.0])
    loss = lambda mm: float(nn.functional.cross_entropy(mm(x).detach(), y))  # noqa: E731
    assert res.losses[0] == pytest.approx(loss(m), rel=1e-5) and res.losses[2] == pytest.approx(loss(other), rel=1e-5)
    # the endpoints' deficit is 0, so the barrier is never negative
    assert res.barrier == pytest.approx(max(0.0, loss(half) - (loss(m) + loss(other)) / 2), rel=1e-5, abs=1e-9)


def test_batchnorm_reset_gives_the_data_statistics():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(64, 4) * 3 + 1
    reset_batchnorm_(m, x, batch_size=16)
    h = m[0](x).detach().double().numpy()
    assert np.allclose(m[1].running_mean.double().numpy(), h.mean(0), atol=1e-5)
    # each batch's unbiased variance, averaged (what a cumulative running average of batches gives)
    want = np.mean([h[i:i + 16].var(0, ddof=1) for i in range(0, 64, 16)], 0)
    assert np.allclose(m[1].running_var.double().numpy(), want, atol=1e-5)
    assert not m.training


def test_cli_lock_match_and_analyze_alignment(tiny_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from rankwise.cli import main

    locked_dir, matched_dir = tmp_path / "locked", tmp_path / "matched"
    assert main(["lock", str(tiny_dir), "--seed", "3", "--out", str(locked_dir), "-q"]) == 0
    a = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    b = AutoModelForCausalLM.from_pretrained(locked_dir).eval()
    assert float((_logits(a) - _logits(b)).abs().max() / _logits(a).abs().max()) < 1e-4
    assert "seed" not in "".join(p.read_text() for p in locked_dir.glob("*.json") if p.name != "tokenizer.json")
    assert main(["match", str(tiny_dir), str(locked_dir), "--out", str(matched_dir), "-q"]) == 0
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(matched_dir).eval()), _logits(b), atol=1e-5)
    capsys.readouterr()
    assert main(["analyze", str(matched_dir), "--compare", str(tiny_dir), "--match", "weight",
                 "--metrics", "alignment", "-q"]) == 0
    assert "singular vectors aligned" in capsys.readouterr().out
    assert main(["analyze", str(tiny_dir), "--match", "weight", "-q"]) == 2
    assert "--match needs --compare" in capsys.readouterr().err
