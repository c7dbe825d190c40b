import numpy as np
import pytest
import scipy.linalg
import torch

from rankwise.errors import ConfigError, NumericalError
from rankwise.linalg import (
    asvd_scales, eigh_whitener, fisher_row_weights, plain_svd, row_weighted_svd, scaled_svd, whitened_svd,
)


def _data(m=12, n=9, T=40, seed=0):
    """W and inputs X with strongly correlated, unevenly scaled features (float64 numpy)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n))
    X = (rng.standard_normal((n, n)) * np.logspace(0, 2, n)) @ rng.standard_normal((n, T))
    return W, X


def _truncate(A, k):
    U, s, Vh = scipy.linalg.svd(A, full_matrices=False)
    return (U[:, :k] * s[:k]) @ Vh[:k], s


def test_plain_svd_matches_scipy_and_balances_factors():
    W, _ = _data()
    f = plain_svd(torch.from_numpy(W), dtype=torch.float64)
    ref, s = _truncate(W, 4)
    np.testing.assert_allclose(f.spectrum.numpy(), s, rtol=1e-12)
    L, R = f.factors(4, dtype=torch.float64)
    np.testing.assert_allclose((L @ R).numpy(), ref, atol=1e-10)
    np.testing.assert_allclose((L.T @ L).numpy(), (R @ R.T).numpy(), atol=1e-10)  # sqrt(s) split evenly
    assert f.error(4) == pytest.approx(np.linalg.norm(W - ref), rel=1e-10)
    errs = f.errors().numpy()
    assert len(errs) == f.max_rank + 1 and errs[-1] == 0
    np.testing.assert_allclose(errs[:3], [np.linalg.norm(W), np.sqrt((s[1:] ** 2).sum()), np.sqrt((s[2:] ** 2).sum())])
    assert f.factors(4)[0].dtype == torch.float32


@pytest.mark.parametrize("kind", ["cholesky", "eigh"])
def test_whitened_svd_is_the_activation_optimum(kind):
    W, X = _data()
    C = torch.from_numpy(X @ X.T)
    f = whitened_svd(torch.from_numpy(W), C, kind=kind, dtype=torch.float64)
    assert f.info["damping"] == 0.0
    # singular values of W S equal those of W X (W S S^T W^T = W X X^T W^T)
    np.testing.assert_allclose(f.spectrum.numpy(), scipy.linalg.svdvals(W @ X)[: f.max_rank], rtol=1e-8)
    plain = plain_svd(torch.from_numpy(W), dtype=torch.float64)
    for k in (1, 3, 6):
        Wk = f.dense(k, dtype=torch.float64).numpy()
        # brute force: (W') X is the best rank-k approximation of W X (X has full row rank)
        best, s = _truncate(W @ X, k)
        np.testing.assert_allclose(Wk @ X, best, rtol=1e-6, atol=1e-6 * np.abs(best).max())
        act = np.linalg.norm((W - Wk) @ X)
        assert act == pytest.approx(f.error(k), rel=1e-8)
        assert act == pytest.approx(np.sqrt((s[k:] ** 2).sum()), rel=1e-8)
        act_plain = np.linalg.norm((W - plain.dense(k, dtype=torch.float64).numpy()) @ X)
        assert act < act_plain


def test_whitened_shared_whitener_and_damping_info():
    W, X = _data(T=5)  # rank-deficient covariance: cholesky needs damping
    C = torch.from_numpy(X @ X.T)
    f = whitened_svd(torch.from_numpy(W), C)
    assert f.info["damping"] > 0 and f.info["damping_rel"] >= 1e-6
    w = eigh_whitener(C)
    g = whitened_svd(torch.from_numpy(W).float(), whitener=w)
    assert g.right is w and g.info["clamped"] > 0
    L, R = g.factors(3)
    assert torch.isfinite(L).all() and torch.isfinite(R).all()
    with pytest.raises(ConfigError, match="covariance"):
        whitened_svd(torch.from_numpy(W))
    with pytest.raises(ConfigError):
        whitened_svd(torch.from_numpy(W), torch.eye(4))


def test_scaled_svd_asvd():
    W, X = _data()
    s_t = asvd_scales(torch.from_numpy(np.abs(X).mean(1)), alpha=0.5)
    np.testing.assert_allclose(s_t.numpy(), np.abs(X).mean(1) ** 0.5)
    s = s_t.numpy()
    f = scaled_svd(torch.from_numpy(W), s_t, dtype=torch.float64)
    ref, _ = _truncate(W * s, 3)
    Wk = f.dense(3, dtype=torch.float64).numpy()
    np.testing.assert_allclose(Wk, ref / s, atol=1e-9)
    assert f.error(3) == pytest.approx(np.linalg.norm((W - Wk) * s), rel=1e-10)
    assert np.linalg.norm((W - Wk) * s) < np.linalg.norm((W - plain_svd(torch.from_numpy(W)).dense(3).double().numpy()) * s)
    assert float(asvd_scales(torch.tensor([0.0, 4.0])).min()) > 0
    with pytest.raises(ConfigError):
        scaled_svd(torch.from_numpy(W), torch.zeros(W.shape[1]))


def test_row_weighted_svd_fwsvd():
    W, _ = _data()
    rng = np.random.default_rng(5)
    fisher = rng.random(W.shape) ** 4
    w = fisher_row_weights(torch.from_numpy(fisher)).numpy()
    np.testing.assert_allclose(w, fisher.sum(1))
    f = row_weighted_svd(torch.from_numpy(W), torch.from_numpy(w), dtype=torch.float64)
    for k in (2, 5):
        Wk = f.dense(k, dtype=torch.float64).numpy()
        obj = np.sqrt((w[:, None] * (W - Wk) ** 2).sum())
        assert obj == pytest.approx(f.error(k), rel=1e-9)
        ref, _ = _truncate(np.sqrt(w)[:, None] * W, k)
        np.testing.assert_allclose(Wk, ref / np.sqrt(w)[:, None], atol=1e-9)
        Wp = plain_svd(torch.from_numpy(W), dtype=torch.float64).dense(k, dtype=torch.float64).numpy()
        assert obj < np.sqrt((w[:, None] * (W - Wp) ** 2).sum())
    w0 = w.copy()
    w0[0] = 0.0
    L, R = row_weighted_svd(torch.from_numpy(W), torch.from_numpy(w0)).factors(3)
    assert torch.isfinite(L).all()


def test_bad_ranks_and_inputs():
    f = plain_svd(torch.randn(5, 4))
    for k in (0, 5):
        with pytest.raises(ConfigError, match="out of range"):
            f.factors(k)
    with pytest.raises(ConfigError):
        f.error(6)
    assert f.error(4) == pytest.approx(0.0, abs=1e-6)
    bad = torch.randn(5, 4)
    bad[0, 0] = float("inf")
    with pytest.raises(NumericalError, match="non-finite"):
        plain_svd(bad)
    with pytest.raises(ConfigError):
        row_weighted_svd(torch.randn(5, 4), torch.ones(4))


@pytest.mark.parametrize("m,n", [(12, 9), (9, 12), (9, 9)])
def test_top_rank_whitened_svd_equals_the_full_one(m, n):
    """``whitened_svd(..., rank=k)`` (top-k triplets from the smaller Gram matrix's eigendecomposition)
    gives the full factorization's rank-j truncations for every j <= k, its singular values and
    errors; a rank-deficient target drops its zero directions with finite (zero) factors."""
    from rankwise.linalg.factorization import top_svd

    W, X = _data(m, n)
    C = torch.from_numpy(X @ X.T)
    full = whitened_svd(torch.from_numpy(W), C, dtype=torch.float64)
    k = 5
    top = whitened_svd(torch.from_numpy(W), C, dtype=torch.float64, rank=k)
    assert top.max_rank == k and top.info == full.info
    np.testing.assert_allclose(top.spectrum.numpy(), full.spectrum[:k].numpy(), rtol=1e-10)
    for j in range(k + 1):
        assert top.error(j) == pytest.approx(full.error(j), rel=1e-8, abs=1e-9 * full.error(0))
        if j:
            a, b = top.dense(j, dtype=torch.float64), full.dense(j, dtype=torch.float64)
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-8 * float(b.abs().max()))
    with pytest.raises(ConfigError):
        top.factors(k + 1)
    G = torch.from_numpy(W[:, :3] @ np.random.default_rng(1).standard_normal((3, n)))  # rank 3
    U, s, Vh, tail = top_svd(G, 5, dtype=torch.float64)
    assert bool((s[3:] == 0).all()) and bool(torch.isfinite(Vh).all()) and tail == pytest.approx(0, abs=1e-8)
    np.testing.assert_allclose(((U * s) @ Vh).numpy(), G.numpy(), atol=1e-10 * float(G.abs().max()))
