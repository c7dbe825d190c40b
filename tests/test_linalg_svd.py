import numpy as np
import pytest
import torch

from rankwise.errors import ConfigError, NumericalError, UnknownMethodError
from rankwise.linalg import truncated_svd


def _with_spectrum(m, n, s, seed=0):
    """Random orthogonal U, V and prescribed singular values s (float64)."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((m, len(s))))[0]
    V = np.linalg.qr(rng.standard_normal((n, len(s))))[0]
    return torch.from_numpy((U * s) @ V.T)


def _err(W, U, S, Vh):
    return np.linalg.norm(W.double().numpy() - ((U.double() * S.double()) @ Vh.double()).numpy())


@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])
def test_exact_matches_numpy(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    U, S, Vh = truncated_svd(W, 5)
    assert U.shape == (shape[0], 5) and S.shape == (5,) and Vh.shape == (5, shape[1])
    assert U.dtype == torch.float32
    Un, Sn, Vhn = np.linalg.svd(W.double().numpy(), full_matrices=False)
    np.testing.assert_allclose(S.numpy(), Sn[:5], rtol=1e-5)
    ref = (Un[:, :5] * Sn[:5]) @ Vhn[:5]
    np.testing.assert_allclose(((U * S) @ Vh).numpy(), ref, atol=1e-5)
    assert _err(W, U, S, Vh) == pytest.approx(np.sqrt((Sn[5:] ** 2).sum()), rel=1e-5)


@pytest.mark.parametrize("shape", [(60, 40), (40, 60)])
def test_randomized_close_to_optimal_on_decaying_spectrum(shape):
    s = 0.8 ** np.arange(40)
    W = _with_spectrum(*shape, s, seed=2)
    k = 8
    opt = np.sqrt((s[k:] ** 2).sum())
    U, S, Vh = truncated_svd(W, k, method="randomized", seed=0, dtype=torch.float64)
    assert _err(W, U, S, Vh) <= 1.01 * opt
    np.testing.assert_allclose(S.numpy(), s[:k], rtol=1e-4)


def test_randomized_within_hmt_factor_on_flat_spectrum():
    W = torch.randn(80, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    k = 10
    Sn = np.linalg.svd(W.numpy(), compute_uv=False)
    opt = np.sqrt((Sn[k:] ** 2).sum())
    # no power iteration: HMT's expectation bound sqrt(1 + k/(p-1)) times the optimal tail
    U, S, Vh = truncated_svd(W, k, method="randomized", n_iter=0, oversample=10, seed=0)
    assert opt <= _err(W, U, S, Vh) <= np.sqrt(1 + k / 9) * opt
    # power iterations bring it within a few percent
    U, S, Vh = truncated_svd(W, k, method="randomized", n_iter=4, seed=0)
    assert _err(W, U, S, Vh) <= 1.05 * opt


def test_randomized_is_seeded():
    W = torch.randn(40, 30, generator=torch.Generator().manual_seed(4))
    a = truncated_svd(W, 5, method="randomized", n_iter=0, oversample=2, seed=7)
    b = truncated_svd(W, 5, method="randomized", n_iter=0, oversample=2, seed=7)
    c = truncated_svd(W, 5, method="randomized", n_iter=0, oversample=2, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])


def test_bad_input():
    W = torch.randn(6, 4)
    for k in (0, 5, -1):
        with pytest.raises(ConfigError, match="out of range"):
            truncated_svd(W, k)
    with pytest.raises(UnknownMethodError, match="exact, randomized"):
        truncated_svd(W, 2, method="lanczos")
    bad = W.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(NumericalError, match="non-finite"):
        truncated_svd(bad, 2)
    with pytest.raises(ConfigError):
        truncated_svd(torch.randn(5), 1)
