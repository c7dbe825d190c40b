import numpy as np
import pytest
import torch

from rankwise.errors import ConfigError
from rankwise.linalg.nystrom import nystrom


def _lowrank(m, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)


def test_exact_on_rank_r_matrix():
    W = _lowrank(30, 20, 5)
    C, M, R = nystrom(W, 5, seed=1)
    assert C.shape == (30, 5) and M.shape == (5, 5) and R.shape == (5, 20)
    np.testing.assert_allclose((C @ M @ R).numpy(), W.numpy(), atol=1e-8 * float(W.abs().max()))


def test_close_to_best_rank_r_on_decaying_spectrum():
    g = torch.Generator().manual_seed(2)
    U, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    s = 0.5 ** torch.arange(30, dtype=torch.float64)
    W = U[:, :30] * s @ V.T
    C, M, R = nystrom(W, 8, seed=0)
    err = float(torch.linalg.norm(W - C @ M @ R))
    best = float(s[8:].norm())  # Eckart-Young
    assert best <= err < 50 * best


def test_seeded_and_validated():
    W = _lowrank(12, 10, 3)
    a = nystrom(W, 3, seed=4)
    b = nystrom(W, 3, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ConfigError):
        nystrom(W, 11)
    with pytest.raises(ConfigError):
        nystrom(W, 0)


def test_balanced_factors_reproduce_product_and_match_svd_split():
    from rankwise.linalg.nystrom import balanced_factors

    W = _lowrank(20, 15, 4, seed=3)
    C, M, R = nystrom(W, 4, seed=2)
    B, A = balanced_factors(C, M, R)
    np.testing.assert_allclose((B @ A).numpy(), W.numpy(), atol=1e-8 * float(W.abs().max()))
    # for an exact rank-r W the split is PiSSA's: B^T B = A A^T = diag(S_r)
    S = np.linalg.svd(W.numpy(), compute_uv=False)[:4]
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh((B.T @ B).numpy())), np.sort(S), rtol=1e-6)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh((A @ A.T).numpy())), np.sort(S), rtol=1e-6)
