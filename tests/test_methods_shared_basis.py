import numpy as np
import pytest
import torch

from rankwise.calibration.stats import InputStats, LayerStats
from rankwise.compression.methods.base import STRUCTURES, LayerInput, get_method
from rankwise.errors import ConfigError
from rankwise.linalg import whitened_svd
from rankwise.structures.shared_basis import SharedBasisLinear


def _stats(n, tokens=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.3, 3.0, n, dtype=torch.float64)
    return X, LayerStats(InputStats(X.T @ X, X.abs().sum(0), (X * X).sum(0), tokens))


def _unit(method, blocks, ratio=0.5):
    """q (6x8) and down (8x10) layers of ``blocks`` consecutive blocks, in model order."""
    layers, xs = {}, {}
    for blk in range(blocks):
        for typ, shape in (("q_proj", (6, 8)), ("down_proj", (8, 10))):
            name = f"model.layers.{blk}.{typ}"
            W = torch.randn(*shape, generator=torch.Generator().manual_seed(10 * blk + len(typ)))
            X, st = _stats(shape[1], seed=blk * 7 + len(typ))
            layers[name] = LayerInput(W, torch.zeros(shape[0]), st, method.plan_layer(shape, (1 - ratio) * shape[0] * shape[1]))
            xs[name] = X
    return layers, xs


def test_registered_and_units():
    assert "shared-basis" in STRUCTURES.names()
    assert get_method("shared-basis").blocks_per_unit == 2
    assert get_method("shared-basis", group_size=3).blocks_per_unit == 3
    with pytest.raises(ConfigError, match="group_size"):
        get_method("shared-basis", group_size=0)


def test_group_of_one_is_per_layer_whitened_svd():
    m = get_method("shared-basis", group_size=1)
    layers, _ = _unit(m, 1)
    out = m.fit_unit(layers)
    for name, x in layers.items():
        k = int(x.spec["target"] // sum(x.W.shape))
        assert out[name].rank == k and out[name].spec()["owner"]
        ref = whitened_svd(x.W, x.stats.covariance(), dtype=torch.float64).dense(k)
        torch.testing.assert_close(out[name].weight, ref, rtol=1e-4, atol=1e-4)


def test_groups_share_one_basis_within_budget():
    m = get_method("shared-basis")
    layers, xs = _unit(m, 2)
    out = m.fit_unit(layers)
    assert list(out) == list(layers)
    q0, q1 = out["model.layers.0.q_proj"], out["model.layers.1.q_proj"]
    d0, d1 = out["model.layers.0.down_proj"], out["model.layers.1.down_proj"]
    assert isinstance(q0, SharedBasisLinear) and q0.basis is q1.basis and d0.basis is d1.basis
    assert q0.basis is not d0.basis and q0.owner and not q1.owner and q1.group == "model.layers.0.q_proj"
    for a, b in (("model.layers.0.q_proj", "model.layers.1.q_proj"), ("model.layers.0.down_proj",
                                                                       "model.layers.1.down_proj")):
        stored = out[a].num_stored() + out[b].num_stored()
        assert stored <= layers[a].spec["target"] + layers[b].spec["target"]
        unique = {id(p): p.numel() for n in (a, b) for p in out[n].parameters() if p.ndim == 2}
        assert sum(unique.values()) == stored
    # the joint whitened error equals the tail of the stacked spectrum (independent numpy check)
    names = ["model.layers.0.q_proj", "model.layers.1.q_proj"]
    Ss = [np.linalg.cholesky(layers[n].stats.covariance().numpy()) for n in names]
    s = np.linalg.svd(np.hstack([layers[n].W.double().numpy() @ S for n, S in zip(names, Ss)]), compute_uv=False)
    joint = sum(np.linalg.norm((layers[n].W.double() - out[n].weight.double()).numpy() @ xs[n].numpy().T) ** 2
                for n in names)
    assert np.isclose(joint, np.sum(s[q0.rank:] ** 2), rtol=1e-4)


def test_budget_errors():
    with pytest.raises(ConfigError, match="rank-1 basis shared by 2 layers"):
        get_method("shared-basis").plan_layer((6, 8), 5)
