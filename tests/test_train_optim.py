"""ProjectedAdamW: the same updates as a reference GaLore (pytorch-optimizer's), each projector's
subspace against an independent reference, the state's size and format, resuming, gradient
accumulation, transformers' Trainer, and bad input."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from rankwise.errors import ConfigError, UnknownMethodError
from rankwise.linalg import projections as pj
from rankwise.optim import ProjectedAdamW, optimizer_state_bytes, projected_param_groups

X = torch.randn(48, 12, generator=torch.Generator().manual_seed(1))
Y = torch.randn(48, 7, generator=torch.Generator().manual_seed(2))
PROJECTORS = ["svd", "randomized", "dct", "random"]


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 7))   # 20x12 (m > n) and 7x20 (m < n)


def _groups(net, key="proj_type", **kw):
    return [{"params": [net[0].bias, net[2].bias]},
            {"params": [net[0].weight, net[2].weight], "rank": 3, "update_proj_gap": kw.pop("gap", 2), "scale": 0.5,
             key: "std", **kw}]


def _step(net, opt, x=X, y=Y, accumulate: int = 1):
    opt.zero_grad()
    for xs, ys in zip(x.chunk(accumulate), y.chunk(accumulate)):
        (nn.functional.mse_loss(net(xs), ys) / accumulate).backward()
    opt.step()


@pytest.mark.parametrize("gap", [1, 100])
def test_same_updates_as_reference_galore(gap):
    from pytorch_optimizer import GaLore

    a, b = _net(), _net()
    oa = ProjectedAdamW(_groups(a, gap=gap), lr=1e-2, weight_decay=0.1)
    ob = GaLore(_groups(b, key="projection_type", gap=gap), lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(6):
        _step(a, oa)
        _step(b, ob)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)
    # and the weights did move: the comparison is not between two untouched models
    assert float((a[0].weight.detach() - _net()[0].weight.detach()).abs().max()) > 1e-2


def test_projection_refreshed_every_gap_steps():
    net = _net()
    opt = ProjectedAdamW(_groups(net, gap=3), lr=1e-2)
    seen = []
    for _ in range(7):
        _step(net, opt, X + 0.3 * torch.randn_like(X), Y)
        seen.append(opt.state[net[0].weight]["proj"].clone())
    changed = [t for t in range(1, 7) if not torch.equal(seen[t], seen[t - 1])]
    assert changed == [3, 6]


@pytest.mark.parametrize("projector", PROJECTORS)
def test_adam_state_is_2_max_mn_r(projector):
    net = _net()
    opt = ProjectedAdamW(_groups(net, projector=projector), lr=1e-2)
    _step(net, opt)
    for w in (net[0].weight, net[2].weight):
        st = opt.state[w]
        assert st["exp_avg"].numel() + st["exp_avg_sq"].numel() == 2 * max(w.shape) * 3
        if projector == "dct":
            assert st["proj"].dtype == torch.int64 and st["proj"].shape == (3,)
        else:
            assert st["proj"].shape == (min(w.shape), 3)
    assert optimizer_state_bytes(opt, [net[0].weight], keys=("exp_avg", "exp_avg_sq")) == 2 * 20 * 3 * 4


def test_svd_and_randomized_bases_span_the_top_singular_subspace():
    G = torch.randn(30, 9, generator=torch.Generator().manual_seed(4)) @ torch.diag(torch.logspace(1, -1, 9))
    _, _, Vt = np.linalg.svd(G.double().numpy())
    ref = Vt[:4].T @ Vt[:4]                         # projector onto the top-4 right singular subspace
    for P in (pj.svd_basis(G, 4, "right"), pj.randomized_basis(G, 4, "right", seed=0, n_iter=4)):
        np.testing.assert_allclose((P @ P.T).double().numpy(), ref, atol=1e-4)
    U = pj.svd_basis(G.T, 4, "left")               # the left side of G^T is the right side of G
    np.testing.assert_allclose((U @ U.T).double().numpy(), ref, atol=1e-4)


def test_dct_columns_are_the_best_aligned_of_scipys_orthonormal_dct():
    from scipy.fft import dct

    G = torch.randn(16, 10, generator=torch.Generator().manual_seed(5))
    D = dct(np.eye(10), norm="ortho", axis=0).T     # columns = DCT-II basis vectors
    np.testing.assert_allclose(pj.dct_matrix(10, torch.float64).numpy(), D, atol=1e-12)
    energy = ((G.double().numpy() @ D) ** 2).sum(0)
    J = pj.dct_columns(G, 3, "right")
    assert sorted(J.tolist()) == sorted(np.argsort(-energy)[:3].tolist())
    Jl = pj.dct_columns(G.T, 3, "left")
    assert torch.equal(J, Jl)


def test_random_basis_is_orthonormal_and_seeded():
    P = pj.random_basis(50, 6, seed=3)
    torch.testing.assert_close(P.T @ P, torch.eye(6), atol=1e-6, rtol=0)
    assert torch.equal(P, pj.random_basis(50, 6, seed=3))
    assert not torch.equal(P, pj.random_basis(50, 6, seed=4))


@pytest.mark.parametrize("projector", PROJECTORS)
def test_state_dict_resumes_with_weights_only_load(projector):
    ref, net = _net(), _net()
    o_ref = ProjectedAdamW(_groups(ref, projector=projector), lr=1e-2)
    o = ProjectedAdamW(_groups(net, projector=projector), lr=1e-2)
    for _ in range(3):
        _step(ref, o_ref)
        _step(net, o)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": o.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    net2 = _net(seed=9)
    net2.load_state_dict(saved["model"])
    o2 = ProjectedAdamW(_groups(net2, projector=projector), lr=1e-2)
    o2.load_state_dict(saved["opt"])
    if projector == "dct":   # torch would cast it to the parameter's dtype
        assert o2.state[net2[0].weight]["proj"].dtype == torch.int64
    for _ in range(3):           # steps 3..5 cross a refresh (gap 2): the step counter came back too
        _step(ref, o_ref)
        _step(net2, o2)
    for pa, pb in zip(ref.parameters(), net2.parameters()):
        assert torch.equal(pa, pb)


def test_gradient_accumulation_is_one_gradient():
    a, b = _net(), _net()
    oa, ob = ProjectedAdamW(_groups(a), lr=1e-2), ProjectedAdamW(_groups(b), lr=1e-2)
    for _ in range(3):
        _step(a, oa)
        _step(b, ob, accumulate=4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4)


def test_param_groups_select_the_attention_and_mlp_linears(tiny_llama):
    groups = projected_param_groups(tiny_llama, rank=8, projector="dct")
    names = {n for n, p in tiny_llama.named_parameters() if any(p is q for q in groups[1]["params"])}
    assert names == {n for n in dict(tiny_llama.named_parameters())
                     if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                    "gate_proj.weight", "up_proj.weight", "down_proj.weight"))}
    assert groups[1]["projector"] == "dct" and groups[1]["rank"] == 8
    n_all = sum(1 for p in tiny_llama.parameters() if p.requires_grad)
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n_all
    with pytest.raises(ConfigError, match=r"k_proj.weight.*--rank <= 32"):
        projected_param_groups(tiny_llama, rank=40)     # k_proj is 32 x 64


def test_works_with_transformers_trainer(tiny_llama, tmp_path):
    from transformers import Trainer, TrainingArguments, get_constant_schedule

    ids = torch.randint(0, 320, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in ids]
    opt = ProjectedAdamW(projected_param_groups(tiny_llama, rank=4, update_proj_gap=2), lr=1e-3)
    before = tiny_llama.model.layers[0].mlp.up_proj.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    Trainer(model=tiny_llama, args=args, train_dataset=data, optimizers=(opt, get_constant_schedule(opt))).train()
    w = tiny_llama.model.layers[0].mlp.up_proj.weight
    assert opt.state[w]["step"] == 3 and opt.state[w]["exp_avg"].shape == (128, 4)
    delta = (w.detach() - before).double()
    assert float(delta.norm()) > 0
    # every update of up_proj (128x64, right side) lies in the span of the projections it used: rank <= 2 * 4
    s = torch.linalg.svdvals(delta)
    assert float(s[8] / s[0]) < 1e-3, s[:10]                # beyond rank 8: float32 rounding of W + update only


def test_bad_input_is_a_clear_error():
    net = _net()
    with pytest.raises(ConfigError, match="rank 13 is larger.*use rank <= 12"):
        ProjectedAdamW([{"params": [net[0].weight], "rank": 13}])
    with pytest.raises(ConfigError, match="update_proj_gap must be an integer >= 1"):
        ProjectedAdamW([{"params": [net[0].weight], "rank": 2, "update_proj_gap": 0}])
    with pytest.raises(ConfigError, match="projector 'svd' does not take option.*oversample.*'randomized' takes"):
        ProjectedAdamW([{"params": [net[0].weight], "rank": 2, "projector_options": {"oversample": 4}}])
    with pytest.raises(ConfigError, match="only 2-D matrices"):
        ProjectedAdamW([{"params": [net[0].bias], "rank": 2}])
    with pytest.raises(ConfigError, match="'full' two-sided projection is not supported"):
        ProjectedAdamW([{"params": [net[0].weight], "rank": 2, "proj_type": "full"}])
    with pytest.raises(UnknownMethodError, match="valid: svd, randomized, dct, random"):
        ProjectedAdamW([{"params": [net[0].weight], "rank": 2, "projector": "qr"}])
    opt = ProjectedAdamW([{"params": [net[2].bias]}])
    with pytest.raises(ConfigError):
        opt.add_param_group({"params": [net[0].weight], "rank": 99})
    assert len(opt.param_groups) == 1


def test_dct_moments_follow_their_basis_columns_across_a_refresh():
    net = _net()
    opt = ProjectedAdamW(_groups(net, projector="dct", gap=1), lr=1e-2)
    w = net[0].weight                                   # 20 x 12: right side, moments (20, 3)
    _step(net, opt)
    old, m_old = opt.state[w]["proj"].tolist(), opt.state[w]["exp_avg"].clone()
    opt.zero_grad()
    nn.functional.mse_loss(net(X.flip(1)), Y).backward()   # another gradient: the selection changes
    G = w.grad.detach().clone()
    opt.step()
    new = opt.state[w]["proj"].tolist()
    assert new != old and set(new) & set(old)
    R = G @ pj.dct_matrix(12)[:, new]                   # the projected gradient of step 2
    for i, j in enumerate(new):   # a kept column carries its moment from its old position, a new one starts at 0
        carried = m_old[:, old.index(j)] if j in old else torch.zeros(20)
        torch.testing.assert_close(opt.state[w]["exp_avg"][:, i], 0.9 * carried + 0.1 * R[:, i])
