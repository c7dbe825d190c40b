"""Permutation matching: specs derived from module structure keep the function, weight and activation
matching recover a planted permutation, the assignment and the scores agree with brute force / numpy."""
from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from rankwise.errors import ConfigError
from rankwise.linalg.assignment import best_permutation, singular_alignment, unit_correlation, unit_similarity
from rankwise.merging.matching import match, weight_matching
from rankwise.models.permutation import permutation_spec, permute_model_, permute_state
from rankwise.models.tiny import tiny_model


class SmallCNN(nn.Module):
    """Conv + BatchNorm, a residual add, pooling, flatten into a linear: every rule of the tracer."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc, self.out = nn.Linear(6 * 4 * 4, 12), nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = x + torch.relu(self.b2(self.c2(x)))
        x = nn.functional.max_pool2d(x, 2).flatten(1)
        return self.out(torch.relu(self.fc(x)))


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)).eval()


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = SmallCNN().eval()
    for b in (m.b1, m.b2):
        b.running_mean.normal_()
        b.running_var.uniform_(0.5, 2.0)
    return m


def _random_perms(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randperm(n, generator=g) for p, n in spec.sizes.items()}


def _inputs(model):
    g = torch.Generator().manual_seed(1)
    if isinstance(model, SmallCNN):
        return torch.randn(4, 1, 8, 8, generator=g)
    if isinstance(model, nn.Sequential):
        return torch.randn(6, 16, generator=g)
    return torch.randint(0, 320, (2, 12), generator=g)


def _out(model, x):
    with torch.no_grad():
        y = model(x)
    return y.logits if hasattr(y, "logits") else y


MODELS = {"mlp": _mlp, "cnn": _cnn, "llama": lambda s=0: tiny_model("llama", s), "gpt2": lambda s=0: tiny_model("gpt2", s),
          "gemma3": lambda s=0: tiny_model("gemma3", s)}


@pytest.mark.parametrize("kind", list(MODELS))
def test_random_permutations_of_the_derived_spec_keep_the_function(kind):
    model = MODELS[kind]()
    spec = permutation_spec(model)
    assert spec.sizes, "no permutation found"
    moved = permute_model_(copy.deepcopy(model), spec, _random_perms(spec))
    x = _inputs(model)
    y, z = _out(model, x), _out(moved, x)
    assert torch.allclose(y, z, atol=1e-5, rtol=1e-5)
    changed = sum(int(not torch.equal(a, b)) for a, b in zip(model.state_dict().values(), moved.state_dict().values()))
    assert changed > 0


def test_specs_come_from_the_structure():
    cnn = permutation_spec(_cnn())
    # c1 and c2 share one permutation (the residual add); fc reads it through the flatten, 16 positions a channel
    assert cnn.sizes == {"c1": 6, "fc": 12}
    assert ("fc.weight", 1, 16) in {(a.key, a.axis, a.block) for a in cnn.axes["c1"]}
    assert {"b2.running_var", "c2.weight"} <= {a.key for a in cnn.axes["c1"]}
    llama = permutation_spec(tiny_model("llama"))
    assert llama.sizes["residual"] == 64 and llama.sizes["ffn.0"] == 128 and llama.sizes["heads.0"] == 2
    heads = {a.key.rsplit(".", 2)[-2]: a.block for a in llama.axes["heads.1"]}
    assert heads == {"o_proj": 32, "q_proj": 32, "k_proj": 16, "v_proj": 16}  # 2 query heads of 16 per KV group
    gpt2 = permutation_spec(tiny_model("gpt2"))
    assert any(a.sections == 3 for a in gpt2.axes["heads.0"])  # fused q, k, v


@pytest.mark.parametrize("kind", ["mlp", "cnn", "llama", "gpt2"])
def test_weight_and_activation_matching_recover_a_planted_permutation(kind):
    a = MODELS[kind]()
    spec = permutation_spec(a)
    b = permute_model_(copy.deepcopy(a), spec, _random_perms(spec, seed=3))
    for data in (None, _inputs(a)):
        if data is not None and kind == "cnn":
            data = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
        m, res = match(a, b, data=data)
        for (k, x), y in zip(a.state_dict().items(), m.state_dict().values()):
            assert torch.allclose(x, y), k
        assert res.objective_after >= res.objective_before


def test_matching_two_models_keeps_b_function_and_raises_the_objective():
    a, b = tiny_model("llama", 0), tiny_model("llama", 1)
    m, res = match(a, b)
    x = _inputs(a)
    assert torch.allclose(_out(b, x), _out(m, x), atol=1e-5)
    assert res.objective_after > res.objective_before


def test_weight_matching_finds_the_brute_force_optimum_on_one_hidden_layer():
    torch.manual_seed(5)
    a = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    b = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    spec = permutation_spec(a)
    sa, sb = a.state_dict(), b.state_dict()
    perms, _ = weight_matching(sa, sb, spec)

    def score(p):
        pb = permute_state(sb, spec, {"0": torch.tensor(p)})
        return sum(float((sa[k] * pb[k]).sum()) for k in sa)

    best = max(itertools.permutations(range(5)), key=score)
    assert score(perms["0"].tolist()) == pytest.approx(score(best))


def test_best_permutation_against_brute_force():
    S = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    p = best_permutation(S)
    best = max(itertools.permutations(range(6)), key=lambda q: float(S[torch.arange(6), torch.tensor(q)].sum()))
    assert float(S[torch.arange(6), p].sum()) == pytest.approx(float(S[torch.arange(6), torch.tensor(best)].sum()))


def test_unit_scores_against_numpy():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 3, 4, generator=g), torch.randn(6, 3, 4, generator=g)
    S = unit_similarity(A, B, axis=0, n=3, block=2, sections=1)  # axis 0: 3 units of 2 rows
    ref = np.einsum("ibk,jbk->ij", A.numpy().reshape(3, 2, 12).astype(np.float64),
                    B.numpy().reshape(3, 2, 12).astype(np.float64))
    assert np.allclose(S.numpy(), ref)
    Xa, Xb = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randn(50, 6, generator=g, dtype=torch.float64)
    C = np.corrcoef(Xa.numpy().T, Xb.numpy().T)[:6, 6:]
    want = C.reshape(3, 2, 3, 2).diagonal(axis1=1, axis2=3).sum(-1)
    assert np.allclose(unit_correlation(Xa, Xb, 3, 2).numpy(), want)


def test_singular_alignment_is_one_for_the_same_matrix_and_low_for_unrelated():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, 12, generator=g) * torch.logspace(0, -1, 12)
    same = singular_alignment(W, W.clone(), k=4)
    assert same["u_mean"] == pytest.approx(1.0) and same["v_overlap"] == pytest.approx(1.0)
    other = singular_alignment(W, torch.randn(20, 12, generator=g), k=4)
    assert other["u_mean"] < 0.6


def test_bad_input_names_the_problem():
    with pytest.raises(ConfigError, match="first mismatching layer"):
        match(tiny_model("llama"), tiny_model("llama", intermediate_size=96))
    with pytest.raises(ConfigError, match="needs data"):
        match(_mlp(), _mlp(1), method="activation")
    with pytest.raises(ConfigError, match="cannot match"):
        match(_mlp(), tiny_model("llama"))
