"""Each low-rank objective's guarantee, checked against an independent numpy reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rankwise.calibration.stats import InputStats
from rankwise.calibration.stats import LayerStats
from rankwise.compression.methods import STRUCTURES, get_method
from rankwise.compression.methods.lowrank import OBJECTIVES
from rankwise.errors import ConfigError, UnknownMethodError

M, N, T, K = 12, 9, 60, 3


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(M, N, generator=g, dtype=torch.float64)
    # correlated, anisotropic inputs (T tokens, N features)
    X = torch.randn(T, N, generator=g, dtype=torch.float64) @ torch.randn(N, N, generator=g, dtype=torch.float64)
    X = X * torch.linspace(0.1, 3.0, N, dtype=torch.float64)
    F = torch.rand(M, N, generator=g, dtype=torch.float64) * torch.linspace(0.01, 5.0, M, dtype=torch.float64)[:, None]
    st = InputStats.zeros(N).add_(X)
    return W, X, F, LayerStats(st, F)


def _act_err(W, Wp, X):
    return float(np.linalg.norm((W - Wp) @ X.T))


def _svd_k(A, k):
    U, s, Vt = np.linalg.svd(A, full_matrices=False)
    return (U[:, :k] * s[:k]) @ Vt[:k]


def _method(name, lstsq=False, whitening="cholesky"):
    return get_method("lowrank", {"method": name, "lstsq": lstsq, "whitening": whitening})


def _dense(W, name, stats, refit=False, whitening="cholesky"):
    layer = _method(name, refit, whitening).fit(W.float(), None, stats, {"rank": K})
    return layer.dense().double().detach().numpy()


def test_registry_names_and_unknown():
    assert set(OBJECTIVES) == {"svd", "asvd", "fwsvd", "svd-llm", "svd-llm-v2"}
    assert "lowrank" in STRUCTURES
    with pytest.raises(UnknownMethodError) as e:
        _method("svd-lm")
    for name in OBJECTIVES:
        assert name in str(e.value)
    with pytest.raises(ConfigError, match="whitening"):
        _method("svd-llm", whitening="qr")


def test_needs_adds_covariance_for_lstsq():
    assert _method("svd").needs() == set()
    assert _method("svd", lstsq=True).needs() == {"cov"}
    assert _method("asvd", lstsq=True).needs() == {"abs_mean", "cov"}
    assert _method("fwsvd").needs() == {"fisher"}


def test_plan_layer_is_the_uniform_rank():
    meth = _method("svd-llm")
    assert meth.plan_layer((576, 1536), 0.6 * 576 * 1536) == {"rank": int(0.6 * 576 * 1536 // (576 + 1536))}
    assert meth.plan_layer((4, 4), 0.4 * 16) is None  # below one rank-1 factor pair (8 values)
    assert meth.plan_layer((4, 4), 0.99 * 16) == {"rank": 1}  # rank 2 (16 values) would not save


def test_svd_is_eckart_young(problem):
    W, X, F, st = problem
    np.testing.assert_allclose(_dense(W, "svd", st), _svd_k(W.numpy(), K), atol=1e-4)


@pytest.mark.parametrize("whitening", ["cholesky", "eigh"])
def test_whitened_methods_are_the_activation_optimum(problem, whitening):
    """min_{rank k} ||(W - W') X^T||: W' = SVD_k(W X^T) pinv(X^T) (X has full column rank)."""
    W, X, F, st = problem
    Wn, Xn = W.numpy(), X.numpy()
    ref = _svd_k(Wn @ Xn.T, K) @ np.linalg.pinv(Xn.T)
    got = _dense(W, "svd-llm", st, whitening=whitening)
    assert _act_err(Wn, got, Xn) == pytest.approx(_act_err(Wn, ref, Xn), rel=1e-4)
    assert _act_err(Wn, got, Xn) < _act_err(Wn, _dense(W, "svd", st), Xn)


def test_asvd_is_scaled_svd(problem):
    W, X, F, st = problem
    s = np.abs(X.numpy()).mean(0) ** 0.5
    ref = _svd_k(W.numpy() * s, K) / s
    np.testing.assert_allclose(_dense(W, "asvd", st), ref, atol=1e-4)


def test_fwsvd_is_row_weighted_svd(problem):
    W, X, F, st = problem
    d = np.sqrt(F.numpy().sum(1))
    ref = _svd_k(d[:, None] * W.numpy(), K) / d[:, None]
    np.testing.assert_allclose(_dense(W, "fwsvd", st), ref, atol=1e-4)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_lstsq_is_the_least_squares_left_factor(problem, name):
    """With R fixed, L = argmin ||W X^T - L R X^T|| (numpy lstsq), never worse than no refit."""
    W, X, F, st = problem
    fac = _method(name).factorize(W.float(), st)
    _, R = fac.factors(K, dtype=torch.float64)
    Wn, Xn, Rn = W.numpy(), X.numpy(), R.numpy()
    Lt, *_ = np.linalg.lstsq((Rn @ Xn.T).T, (Wn @ Xn.T).T, rcond=None)
    ref = Lt.T @ Rn
    got = _dense(W, name, st, refit=True)
    assert _act_err(Wn, got, Xn) == pytest.approx(_act_err(Wn, ref, Xn), rel=1e-4)
    assert _act_err(Wn, got, Xn) <= _act_err(Wn, _dense(W, name, st), Xn) * (1 + 1e-6)


@pytest.mark.parametrize("whitening", ["cholesky", "eigh"])
def test_whitened_methods_with_cross_moment_solve_the_sequential_objective(problem, whitening):
    """min_{rank k} ||W X^T - W' X'^T||: reference SVD_k(P (W X^T)) pinv(X'^T), P = projector on rows of X'."""
    W, X, F, _ = problem
    g = torch.Generator().manual_seed(5)
    Xp = X + 0.3 * torch.randn(X.shape, generator=g, dtype=torch.float64)  # perturbed inputs X'
    st = InputStats.zeros(N).add_(Xp)
    stats = LayerStats(st, None, X.T @ Xp, ridge=1e-12)
    Wn, Xn, Xpn = W.numpy(), X.numpy(), Xp.numpy()
    pinv = np.linalg.pinv(Xpn.T)
    target = Wn @ Xn.T @ pinv @ Xpn.T  # projection of W X^T onto the row space of X'^T
    ref = _svd_k(target, K) @ pinv
    got_plain = _dense(W, "svd-llm", stats, whitening=whitening)
    got_refit = _dense(W, "svd-llm", stats, refit=True, whitening=whitening)

    def err(Wp):
        return float(np.linalg.norm(Wn @ Xn.T - Wp @ Xpn.T))

    assert err(got_plain) == pytest.approx(err(ref), rel=1e-4)
    assert err(got_refit) == pytest.approx(err(ref), rel=1e-4)
    assert err(got_plain) < err(_dense(W, "svd-llm", LayerStats(st), whitening=whitening)) - 1e-3


def test_the_ridge_pulls_the_corrected_target_toward_w(problem):
    """T(lam) = (W M + lam W)(C' + lam I)^-1: lam -> 0 gives W M C'^-1, lam -> inf gives W (not 0)."""
    W, X, F, _ = problem
    g = torch.Generator().manual_seed(5)
    Xp = X + 0.3 * torch.randn(X.shape, generator=g, dtype=torch.float64)
    st = InputStats.zeros(N).add_(Xp)
    C, M = Xp.T @ Xp, X.T @ Xp
    lo = LayerStats(st, None, M, ridge=1e-12).target(W)
    np.testing.assert_allclose(lo.numpy(), (W @ M @ torch.linalg.inv(C)).numpy(), rtol=1e-6, atol=1e-8)
    hi = LayerStats(st, None, M, ridge=1e8).target(W)
    np.testing.assert_allclose(hi.numpy(), W.numpy(), rtol=1e-4, atol=1e-4)
    lam = 0.5 * float(torch.diagonal(C).mean())
    mid = LayerStats(st, None, M, ridge=0.5).target(W)
    ref = np.linalg.solve((C + lam * torch.eye(N, dtype=torch.float64)).numpy(), (M.T @ W.T + lam * W.T).numpy()).T
    np.testing.assert_allclose(mid.numpy(), ref, rtol=1e-8, atol=1e-10)
