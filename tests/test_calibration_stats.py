import numpy as np
import pytest
import torch

from rankwise.calibration.gradients import accumulate_gradients
from rankwise.calibration.stats import InputStats, StatsAccumulator, collect_input_stats, compute_dtype
from rankwise.errors import ConfigError, NumericalError
from rankwise.models.surgery import Conv1D, find_linears, linear_weight
from rankwise.models.tiny import tiny_model


def _windows(n=3, L=16, seed=0):
    return torch.randint(0, 320, (n, L), generator=torch.Generator().manual_seed(seed))


def _captured_inputs(model, names, windows, batch_size):
    """Brute force: keep every input tensor each layer sees."""
    seen = {n: [] for n in names}
    hs = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double().numpy()))
        for n in names]
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[i:i + batch_size], use_cache=False)
    for h in hs:
        h.remove()
    return {n: np.concatenate(v) for n, v in seen.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_input_stats_match_brute_force(arch, monkeypatch):
    import rankwise.calibration.stats as mod

    calls = []
    real = mod.batch_sums
    monkeypatch.setattr(mod, "batch_sums", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_model(arch)
    names = list(find_linears(model))
    win = _windows()
    stats = collect_input_stats(model, win, names, batch_size=2)
    # llama: q/k/v share one input and gate/up another, so 4 distinct inputs per block per batch
    per_block = {"llama": 4, "gpt2": 4}[arch]
    assert len(calls) == 2 * per_block * 2  # blocks x inputs x batches
    ref = _captured_inputs(model, names, win, 2)
    assert list(stats) == names
    for n in names:
        X = ref[n]
        s = stats[n]
        assert s.n == X.shape[0] == 3 * 16
        assert s.in_features == linear_weight(model.get_submodule(n)).shape[1]
        # float32 activations: each batch's sums in float32 (relative ~1e-6), added in float64
        scale = (X ** 2).sum(0).max()
        np.testing.assert_allclose(s.cov.numpy(), X.T @ X, rtol=2e-6, atol=2e-6 * scale)
        np.testing.assert_allclose(s.abs_sum.numpy(), np.abs(X).sum(0), rtol=2e-6)
        np.testing.assert_allclose(s.sq_sum.numpy(), (X ** 2).sum(0), rtol=2e-6)
        np.testing.assert_allclose(s.mean_abs.numpy(), np.abs(X).mean(0), rtol=2e-6)
        np.testing.assert_allclose(s.covariance_mean.numpy(), X.T @ X / X.shape[0], rtol=2e-6,
                                   atol=2e-6 * scale / X.shape[0])
        assert s.cov.dtype == torch.float64
    # hooks are gone afterwards
    assert all(not model.get_submodule(n)._forward_pre_hooks for n in names)


@pytest.mark.parametrize("dtype,n,tol", [(torch.float64, 300, 1e-12), (torch.float32, 300, 2e-6),
                                         (torch.bfloat16, 7, 2e-6)])
def test_products_match_brute_force_in_their_precision(dtype, n, tol):
    """``add_products_``: ``a^T a`` over several row tiles (upper part computed, mirrored: exactly
    symmetric) and ``a^T c``, added to float64 sums; float64 rows in float64, others in float32 (bfloat16
    batches converted in several chunks by ``row_chunks``); ``all_finite`` sees nan and inf."""
    from rankwise.calibration.stats import CHUNK_BYTES, add_products_, all_finite, row_chunks

    g = torch.Generator().manual_seed(3)
    rows = 2 * CHUNK_BYTES // (4 * n) + 5 if dtype == torch.bfloat16 else 500
    a, c = torch.randn(rows, n, generator=g).to(dtype), torch.randn(rows, n, generator=g).to(dtype)
    A, Cm = a.double().numpy(), c.double().numpy()
    chunks = list(row_chunks(a))
    assert (len(chunks) > 1) == (dtype == torch.bfloat16) and all(ch.dtype == compute_dtype(dtype) for ch in chunks)
    start = torch.eye(n, dtype=torch.float64)
    sym, cross = start.clone(), torch.zeros(n, n, dtype=torch.float64)
    for ca, cc in zip(row_chunks(a), row_chunks(c)):
        add_products_(sym, ca)
        add_products_(cross, ca, cc)
    scale = (A ** 2).sum(0).max()
    np.testing.assert_allclose(sym.numpy(), A.T @ A + np.eye(n), rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(cross.numpy(), A.T @ Cm, rtol=tol, atol=tol * scale)
    assert torch.equal(sym, sym.T)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = a.clone()
        x[rows // 2, 1] = bad
        assert all_finite(a) and not all_finite(x)


def test_merge_equals_single_pass():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(5, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    a = InputStats.zeros(4).add_(x1)
    b = InputStats.zeros(4).add_(x2)
    both = InputStats.zeros(4).add_(x1).add_(x2)
    m = a.merge(b)
    assert m.n == both.n == 11
    for f in ("cov", "abs_sum", "sq_sum"):
        torch.testing.assert_close(getattr(m, f), getattr(both, f))
    with pytest.raises(ConfigError):
        a.add_(torch.randn(3, 5))
    with pytest.raises(NumericalError):
        InputStats.zeros(4).mean_abs


def test_accumulator_without_cov_and_removal_on_error():
    model = tiny_model("llama")
    names = list(find_linears(model))[:2]
    mods = {n: model.get_submodule(n) for n in names}
    with pytest.raises(RuntimeError):
        with StatsAccumulator(mods, cov=False) as acc:
            with torch.no_grad():
                model(input_ids=_windows(1, 8), use_cache=False)
            raise RuntimeError("boom")
    assert acc.stats[names[0]].cov is None and acc.stats[names[0]].n == 8
    assert all(not m._forward_pre_hooks for m in mods.values())


def test_shared_input_sums_reused_but_not_after_inplace_change():
    """q/k/v-style layers reading one tensor share its sums; an in-place edit in between is seen."""
    from torch import nn

    a, b, c = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 2)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    with StatsAccumulator({"a": a, "b": b, "c": c}) as acc:
        a(x)
        b(x)
        x.mul_(2.0)  # bumps the version counter
        c(x)
    X = x.double() / 2
    close = dict(rtol=1e-6, atol=1e-6)  # float32 products (module doc of rankwise.calibration.stats)
    torch.testing.assert_close(acc.stats["a"].cov, X.T @ X, **close)
    torch.testing.assert_close(acc.stats["b"].cov, X.T @ X, **close)
    torch.testing.assert_close(acc.stats["c"].cov, 4 * X.T @ X, **close)
    assert acc.stats["a"].cov is not acc.stats["b"].cov and acc._last is None


def test_nonfinite_activation_names_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[0] = float("nan")
    names = list(find_linears(model))
    with pytest.raises(NumericalError, match=r"model\.layers\.1\.self_attn\.q_proj"):
        collect_input_stats(model, _windows(1, 8), names)
    assert all(not model.get_submodule(n)._forward_pre_hooks for n in names)


def test_bad_names_and_windows():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="no module"):
        collect_input_stats(model, _windows(1, 8), ["model.nope"])
    with pytest.raises(ConfigError):
        collect_input_stats(model, torch.zeros(8, dtype=torch.long), ["model.layers.0.mlp.up_proj"])


# ---- gradients ------------------------------------------------------------------------------

def _brute_force_grads(model, names, win, batch_size, squared):
    """Reference: HF's own loss (labels=ids), .backward() with every parameter trainable."""
    out = {n: 0.0 for n in names}
    for i in range(0, win.shape[0], batch_size):
        model.zero_grad()
        ids = win[i:i + batch_size]
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        for n in names:
            mod = model.get_submodule(n)
            g = mod.weight.grad.double().numpy()
            if isinstance(mod, Conv1D):  # stores W^T
                g = g.T
            out[n] = out[n] + (g * g if squared else g)
    model.zero_grad()
    return out


@pytest.mark.parametrize("arch,squared", [("llama", False), ("gpt2", True)])
def test_gradients_match_brute_force(arch, squared):
    model = tiny_model(arch)
    names = list(find_linears(model))
    win = _windows(4, 12)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = accumulate_gradients(model, win, names, batch_size=2, squared=squared)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    ref = _brute_force_grads(model, names, win, 2, squared)
    for n in names:
        assert got[n].dtype == torch.float64
        assert got[n].shape == linear_weight(model.get_submodule(n)).shape
        np.testing.assert_allclose(got[n].numpy(), ref[n], rtol=1e-4, atol=1e-7)
        assert np.abs(ref[n]).max() > 0


def test_gradient_finite_difference():
    # GPT-2 (LayerNorm computes in the model dtype, unlike Llama's float32 RMSNorm) in float64;
    # its Conv1D stores W^T, so this also checks the (out, in) orientation.
    model = tiny_model("gpt2").double()
    name = "transformer.h.0.mlp.c_proj"
    win = _windows(2, 10)
    g = accumulate_gradients(model, win, [name], batch_size=2)[name]
    i, j = np.unravel_index(int(g.abs().argmax()), tuple(g.shape))
    W = model.get_submodule(name).weight.T  # view in (out, in)
    eps = 1e-6

    def loss():
        with torch.no_grad():
            logits = model(input_ids=win, use_cache=False).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), win[:, 1:].flatten()).item()

    with torch.no_grad():
        W[i, j] += eps
    lp = loss()
    with torch.no_grad():
        W[i, j] -= 2 * eps
    lm = loss()
    with torch.no_grad():
        W[i, j] += eps
    assert abs((lp - lm) / (2 * eps) - g[i, j].item()) < 1e-5 * abs(g[i, j].item())


# ---- real model --------------------------------------------------------------------------------

@pytest.mark.integration
def test_real_model_stats_drive_whitened_svd(real_model, real_calib_ids):
    """On SmolLM2: the hooks see real activations; whitening by their covariance gives the predicted
    activation error, and (for q_proj, whose 576 inputs are fewer than the 1024 fitting tokens) beats
    plain SVD on held-out windows. down_proj's 1536 inputs exceed the tokens: C is singular, damped."""
    from rankwise.calibration.sampling import calib_windows
    from rankwise.linalg import activation_error, plain_svd, whitened_svd

    model = real_model[0]
    names = ["model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj"]
    win = calib_windows(real_calib_ids, n=12, seqlen=128, seed=0)
    fit = collect_input_stats(model, win[:8], names, batch_size=4)
    held = collect_input_stats(model, win[8:], names, batch_size=4)
    for n in names:
        st = fit[n]
        W = linear_weight(model.get_submodule(n)).detach()
        assert st.n == 8 * 128 and st.cov.shape == (W.shape[1], W.shape[1])
        torch.testing.assert_close(torch.diagonal(st.cov), st.sq_sum, rtol=2e-6, atol=0)  # two float32 sums
        k = min(W.shape) // 4
        fw, fp = whitened_svd(W, st.cov, kind="cholesky"), plain_svd(W)
        assert (fw.info["damping"] > 0) == (W.shape[1] > st.n)
        Ww, Wp = fw.dense(k), fp.dense(k)
        assert activation_error(W, Ww, st.cov) == pytest.approx(fw.error(k), rel=1e-3)
        assert fw.error(k) < activation_error(W, Wp, st.cov)
        if n.endswith("q_proj"):
            assert activation_error(W, Ww, held[n].cov) < 0.8 * activation_error(W, Wp, held[n].cov)
