"""Every init: output at step 0 equals the base model's, residual + adapter reproduces W, shapes and counts."""
import numpy as np
import pytest
import torch

from rankwise.adaptation import INITS, adapt, adapter_layers, count_trainable
from rankwise.adaptation.layers import base_dense
from rankwise.errors import ConfigError, NoTargetLayersError, UnknownMethodError
from rankwise.models.surgery import find_linears, linear_weight
from rankwise.models.tiny import tiny_model

R = 4


def _ids(n=2, L=24, seed=0):
    return torch.randint(0, 320, (n, L), generator=torch.Generator().manual_seed(seed))


def _expected_trainable(init: str, m: int, n: int, r: int) -> int:
    return {
        "lora": r * (m + n), "pissa": r * (m + n), "milora": r * (m + n), "olora": r * (m + n),
        "lora-ga": r * (m + n), "eva": None, "lora-sb": r * r, "nlora": r * (m + n) + r * r,
        "nlora-inttune": r * r, "loldu": r, "salt": 2 * r + r * (m + n), "singlora": max(m, n) * r,
    }[init]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("init", sorted(n for n in INITS if not INITS[n].quantized))  # quantized: test_adapt_quant
def test_step0_equals_base_and_counts(arch, init):
    model = tiny_model(arch)
    ids = _ids()
    originals = {n: linear_weight(mod).detach().clone() for n, mod in find_linears(model).items()}
    with torch.no_grad():
        ref = model(ids).logits
    adapt(model, init, rank=R, calib=_ids(4, 32, 1), seed=0)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    layers = adapter_layers(model)
    assert layers and set(layers) <= set(originals)
    total = 0
    for name, a in layers.items():
        # W_res + Delta W_0 == W (residual inits); W unchanged otherwise
        torch.testing.assert_close(base_dense(a.base) + a.delta().detach(), originals[name], atol=2e-5, rtol=1e-4)
        if not INITS[init].residual:
            assert torch.equal(linear_weight(a.base), originals[name])
        m, n = originals[name].shape
        exp = _expected_trainable(init, m, n, R)
        got = sum(p.numel() for p in a.trainable_parameters())
        if exp is not None:
            assert got == exp, (name, got, exp)
        total += got
    assert count_trainable(model) == total
    trainable = {id(p) for a in layers.values() for p in a.trainable_parameters()}
    assert all(p.requires_grad == (id(p) in trainable) for p in model.parameters())


def test_pissa_and_milora_factors_match_numpy_svd():
    torch.manual_seed(0)
    for init, sl in (("pissa", slice(0, R)), ("milora", slice(-R, None))):
        model = tiny_model("llama")
        name = "model.layers.0.self_attn.q_proj"
        W = linear_weight(model.get_submodule(name)).detach().double().numpy()
        adapt(model, init, rank=R, alpha=2 * R, targets=[name])
        a = adapter_layers(model)[name]
        U, S, Vt = np.linalg.svd(W)
        BA = (a.scaling * a.lora_B @ a.lora_A).detach().double().numpy()
        np.testing.assert_allclose(BA, (U[:, sl] * S[sl]) @ Vt[sl], atol=1e-5)
        assert a.scaling == 2.0


def test_olora_is_qr_and_randomized_pissa_is_close():
    model = tiny_model("llama")
    name = "model.layers.0.mlp.up_proj"
    W = linear_weight(model.get_submodule(name)).detach().double()
    adapt(model, "olora", rank=R, targets=[name])
    a = adapter_layers(model)[name]
    Q, Rm = np.linalg.qr(W.numpy())
    np.testing.assert_allclose(np.abs(a.lora_B.detach().numpy()), np.abs(Q[:, :R]), atol=1e-5)
    model2 = tiny_model("llama")
    adapt(model2, "pissa", rank=R, targets=[name], svd="randomized", svd_niter=8)
    S = np.linalg.svd(W.numpy(), compute_uv=False)
    got = torch.linalg.svdvals(adapter_layers(model2)[name].delta().detach().double()).numpy()[:R]
    np.testing.assert_allclose(got, S[:R], rtol=1e-3)


def test_eva_uses_input_covariance_eigenvectors_and_redistributes():
    model = tiny_model("llama")
    calib = _ids(4, 32, 3)
    name = "model.layers.1.mlp.down_proj"
    seen = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach().double()))
    with torch.no_grad():
        model(calib)
    h.remove()
    X = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).numpy()
    _, _, Vt = np.linalg.svd(X, full_matrices=False)   # right singular vectors of the activations
    adapt(model, "eva", rank=R, calib=calib)
    layers = adapter_layers(model)
    ranks = model._rankwise_adapt["ranks"]
    assert sum(ranks.values()) == R * len(find_linears(tiny_model("llama")))   # budget kept
    assert len(set(ranks.values())) > 1 or len(ranks) < 14                      # redistributed
    a = layers[name]
    k = a.rank
    A = a.lora_A.detach().double().numpy()
    np.testing.assert_allclose(np.abs(A @ Vt[:k].T), np.eye(k), atol=1e-4)
    assert float(a.lora_B.abs().max()) == 0.0


def _mean_weight_gradient(model, windows, name):
    """Independent reference: mean over windows of d CE(next token) / d W of layer ``name``, by plain autograd."""
    W = dict(model.named_modules())[name].weight
    grads = []
    for w in windows:
        logits = model(input_ids=w[None], use_cache=False).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, w[1:])
        grads.append(torch.autograd.grad(loss, W)[0].double())
    return torch.stack(grads).mean(0).numpy()


def test_lora_ga_factors_are_the_gradient_svd():
    model = tiny_model("llama")
    calib = _ids(2, 32, 4)
    name = "model.layers.0.self_attn.v_proj"
    W0 = linear_weight(dict(model.named_modules())[name]).detach().double().numpy().copy()
    G = _mean_weight_gradient(tiny_model("llama"), calib, name)  # same seed: the same weights
    U, S, Vt = np.linalg.svd(G)
    r, gamma = 2, 4.0
    assert np.all(S[: 2 * r] - S[1: 2 * r + 1] > 1e-3 * S[0])  # distinct: singular vectors unique up to sign
    adapt(model, "lora-ga", rank=r, calib=calib, targets=[name], gamma=gamma)
    a = adapter_layers(model)[name]
    B, A = a.lora_B.detach().double().numpy(), a.lora_A.detach().double().numpy()
    c = a.out_features ** 0.25 / gamma ** 0.5
    # B = c U[:, :r] and A = c V[:, r:2r]^T, each vector up to its sign
    np.testing.assert_allclose(np.abs(U[:, :r].T @ B), c * np.eye(r), atol=1e-4 * c)
    np.testing.assert_allclose(np.abs(A @ Vt[r: 2 * r].T), c * np.eye(r), atol=1e-4 * c)
    np.testing.assert_allclose(np.abs(B), c * np.abs(U[:, :r]), atol=1e-4 * c)
    np.testing.assert_allclose(np.abs(A), c * np.abs(Vt[r: 2 * r]), atol=1e-4 * c)
    # the frozen base is the residual W - s B A
    W_res = base_dense(a.base).detach().double().numpy()
    np.testing.assert_allclose(W_res, W0 - a.scaling * B @ A, atol=1e-5)


def test_singlora_shapes_square_and_rectangular():
    model = tiny_model("llama")
    adapt(model, "singlora", rank=R, targets=["q_proj", "up_proj"])
    for name, a in adapter_layers(model).items():
        m, n = a.out_features, a.in_features
        assert a.A.shape == (max(m, n), R)
        a.ramp.fill_(1.0)
        D = a.delta().detach()
        if m == n:
            torch.testing.assert_close(D, D.T)


def test_bad_input():
    model = tiny_model("llama")
    with pytest.raises(UnknownMethodError, match="valid: .*pissa"):
        adapt(model, "bogus")
    with pytest.raises(ConfigError, match="larger than min"):
        adapt(model, "lora", rank=1000)
    with pytest.raises(NoTargetLayersError):
        adapt(model, "lora", targets=["nothing_like_this"])
    for init in ("eva", "lora-ga", "lora-sb"):
        with pytest.raises(ConfigError, match="needs calibration data"):
            adapt(tiny_model("llama"), init, rank=2)
    with pytest.raises(ConfigError, match="2\\*rank"):
        adapt(tiny_model("llama"), "lora-ga", rank=20, calib=_ids(1, 16), targets=["v_proj"])
    adapt(model, "lora", rank=2)
    with pytest.raises(ConfigError, match="already has adapters"):
        adapt(model, "lora", rank=2)
