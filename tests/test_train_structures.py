"""Structured layers that train: BLAST against its block formula, structurize under a budget for every
structure (forward = the dense product, gradients reach every factor, saved and reloaded), the
structure-aware init's spectral scale, the per-factor learning rates, SLTrain's fixed random support."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rankwise.errors import ConfigError
from rankwise.models.saved import load_structured, save_structured, structured_layers
from rankwise.structures.blast import BlastLinear
from rankwise.training.structured import lr_multipliers, structured_init_, structured_param_groups
from rankwise.training.structurize import BUILDERS, structure_parameters, structurize

STRUCTURES = ["lowrank", "monarch", "blockdiag-lowrank", "kronecker", "sltrain", "blast"]


def test_blast_forward_and_dense_match_the_block_formula():
    torch.manual_seed(0)
    layer = BlastLinear(12, 8, nblocks=4, rank=3)
    for p in layer.parameters():
        nn.init.normal_(p)
    W = torch.zeros(8, 12)
    for i in range(4):
        for j in range(4):   # block (i, j) = U_i diag(d_ij) V_j^T
            W[2 * i:2 * i + 2, 3 * j:3 * j + 3] = layer.U[i] @ torch.diag(layer.diag[i, j]) @ layer.V[j].T
    torch.testing.assert_close(layer.dense(), W.detach())
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), x @ W.detach().T + layer.bias.detach(), rtol=1e-5, atol=1e-5)
    assert layer.num_stored() == 3 * (8 + 12 + 16)
    with pytest.raises(ConfigError, match=r"does not divide both sides.*\[1, 2, 4\]"):
        BlastLinear(12, 8, nblocks=3, rank=2)


@pytest.fixture(scope="module")
def structurized():
    from rankwise.models.tiny import tiny_model

    dense = tiny_model("llama")
    return dense, {s: structurize(dense, s, ratio=0.5, seed=1) for s in STRUCTURES}


@pytest.mark.parametrize("structure", STRUCTURES)
def test_structurize_under_budget_trains_and_reloads(structure, structurized, tmp_path):
    dense, models = structurized
    model = models[structure]
    layers = structured_layers(model)
    assert len(layers) == 14 and all(l.kind == ("lowrank-sparse" if structure == "sltrain" else structure)
                                     for l in layers.values())
    counts = structure_parameters(model)
    assert counts["structured"] <= 0.5 * counts["dense_equivalent"]
    x = torch.randn(3, 128)
    for layer in layers.values():  # the forward is the dense matrix it stands for
        torch.testing.assert_close(layer(x[:, :layer.in_features]),
                                   x[:, :layer.in_features] @ layer.dense().T, rtol=1e-4, atol=1e-5)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if ".layers." in name and "norm" not in name:
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    save_structured(model, tmp_path / "m")
    back = load_structured(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)
    assert next(dense.model.layers[0].mlp.modules()) is not None and not structured_layers(dense)  # copy


@pytest.mark.parametrize("structure", STRUCTURES)
def test_structure_aware_init_has_the_dense_spectral_scale(structure):
    g = torch.Generator().manual_seed(0)
    for m, n in ((128, 64), (64, 128)):
        layer = structured_init_(BUILDERS.get(structure)(m, n, m * n // 2, True, g), g)
        ratio = float(torch.linalg.matrix_norm(layer.dense(), 2)) / math.sqrt(m / n)
        assert 0.3 < ratio < 3.5, (m, n, ratio)
        assert float(layer.bias.abs().max()) == 0


def test_per_factor_learning_rates_follow_fan_in(structurized):
    _, models = structurized
    mult = lr_multipliers(models["lowrank"])
    layer = models["lowrank"].model.layers[0].mlp.down_proj            # 64 x 128, rank 21
    assert mult["model.layers.0.mlp.down_proj.A.weight"] == 1.0
    assert mult["model.layers.0.mlp.down_proj.B.weight"] == 128 / layer.rank
    groups = structured_param_groups(models["monarch"], lr=1e-3)
    assert {round(g["lr"] / 1e-3, 6) for g in groups} == {1.0, *{round(v, 6) for v in lr_multipliers(models["monarch"]).values()}}
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in models["monarch"].parameters())


def test_sltrain_support_is_random_and_fixed_while_values_train():
    from rankwise.models.tiny import tiny_model

    dense = tiny_model("llama")
    a, b = structurize(dense, "sltrain", 0.5, seed=0, density=0.1), structurize(dense, "sltrain", 0.5, seed=1, density=0.1)
    la, lb = a.model.layers[0].mlp.up_proj, b.model.layers[0].mlp.up_proj
    assert la.S.nnz_per_row == round(0.1 * 64) and not torch.equal(la.S.cols, lb.S.cols)
    cols, vals = la.S.cols.clone(), la.S.values.detach().clone()
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    ids = torch.randint(0, 320, (2, 12))
    for _ in range(2):
        opt.zero_grad()
        a(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert torch.equal(la.S.cols, cols) and not torch.equal(la.S.values.detach(), vals)


def test_a_structure_that_cannot_express_a_layer_names_it():
    from rankwise.models.tiny import tiny_model

    odd = tiny_model("llama", intermediate_size=129)        # 129 x 64 and 64 x 129: no common divisor > 1
    with pytest.raises(ConfigError, match=r"layer model\.layers\.0\.mlp\.gate_proj \(129x64\) cannot be monarch"):
        structurize(odd, "monarch", 0.5)
    with pytest.raises(ConfigError, match="no rank >= 1"):
        structurize(odd, "lowrank", 0.999)
    assert not structured_layers(odd)
