"""Each registered method's guarantee, checked against an independent numpy reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rankwise.calibration.stats import InputStats
from rankwise.compression.methods import METHODS, LayerStats, get_method, truncate
from rankwise.errors import UnknownMethodError

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


def _dense(W, name, stats, refit=False):
    meth = METHODS[name]
    L, R = truncate(W.float(), meth.factorize(W.float(), stats), K, stats, refit)
    return (L.double() @ R.double()).numpy()


def test_registry_names_and_unknown():
    assert set(METHODS) == {"svd", "asvd", "fwsvd", "svd-llm", "svd-llm-v2"}
    with pytest.raises(UnknownMethodError) as e:
        get_method("svd-lm")
    for name in METHODS:
        assert name in str(e.value)


def test_stats_needed_adds_covariance_for_refit():
    assert METHODS["svd"].stats_needed(False) == frozenset()
    assert METHODS["svd"].stats_needed(True) == {"cov"}
    assert METHODS["asvd"].stats_needed(True) == {"abs_mean", "cov"}
    assert METHODS["fwsvd"].stats_needed(False) == {"fisher"}


def test_svd_is_eckart_young(problem):
    W, X, F, st = problem
    np.testing.assert_allclose(_dense(W, "svd", st), _svd_k(W.numpy(), K), atol=1e-4)


@pytest.mark.parametrize("name", ["svd-llm", "svd-llm-v2"])
def test_whitened_methods_are_the_activation_optimum(problem, name):
    """min_{rank k} ||(W - W') X^T||: W' = SVD_k(W X^T) pinv(X^T) (X has full column rank)."""
    W, X, F, st = problem
    Wn, Xn = W.numpy(), X.numpy()
    ref = _svd_k(Wn @ Xn.T, K) @ np.linalg.pinv(Xn.T)
    got = _dense(W, name, st)
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


@pytest.mark.parametrize("name", list(METHODS))
def test_refit_is_the_least_squares_left_factor(problem, name):
    """With R fixed, L = argmin ||W X^T - L R X^T|| (numpy lstsq), never worse than no refit."""
    W, X, F, st = problem
    meth = METHODS[name]
    fac = meth.factorize(W.float(), st)
    _, R = fac.factors(K, dtype=torch.float64)
    Wn, Xn, Rn = W.numpy(), X.numpy(), R.numpy()
    Lt, *_ = np.linalg.lstsq((Rn @ Xn.T).T, (Wn @ Xn.T).T, rcond=None)
    ref = Lt.T @ Rn
    got = _dense(W, name, st, refit=True)
    assert _act_err(Wn, got, Xn) == pytest.approx(_act_err(Wn, ref, Xn), rel=1e-4)
    assert _act_err(Wn, got, Xn) <= _act_err(Wn, _dense(W, name, st), Xn) * (1 + 1e-6)


@pytest.mark.parametrize("name", ["svd-llm", "svd-llm-v2"])
def test_whitened_methods_with_cross_moment_solve_the_sequential_objective(problem, name):
    """min_{rank k} ||W X^T - W' X'^T||: reference SVD_k(P (W X^T)) pinv(X'^T), P = projector on rows of X'."""
    W, X, F, _ = problem
    g = torch.Generator().manual_seed(5)
    Xp = X + 0.3 * torch.randn(X.shape, generator=g, dtype=torch.float64)  # perturbed inputs X'
    st = InputStats.zeros(N).add_(Xp)
    stats = LayerStats(st, None, X.T @ Xp)
    Wn, Xn, Xpn = W.numpy(), X.numpy(), Xp.numpy()
    pinv = np.linalg.pinv(Xpn.T)
    target = Wn @ Xn.T @ pinv @ Xpn.T  # projection of W X^T onto the row space of X'^T
    ref = _svd_k(target, K) @ pinv
    got_plain = _dense(W, name, stats)
    got_refit = _dense(W, name, stats, refit=True)

    def err(Wp):
        return float(np.linalg.norm(Wn @ Xn.T - Wp @ Xpn.T))

    assert err(got_plain) == pytest.approx(err(ref), rel=1e-4)
    assert err(got_refit) == pytest.approx(err(ref), rel=1e-4)
    assert err(got_plain) < err(_dense(W, name, LayerStats(st))) - 1e-3
