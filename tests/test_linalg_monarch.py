import numpy as np
import pytest
import torch

from rankwise.errors import ConfigError
from rankwise.linalg.monarch import check_monarch_shape, monarch_als, monarch_dense, monarch_num_values, monarch_project

# (m, n, in_blocks b, out_blocks l, rank r): square, rectangular both ways, unequal block counts
SHAPES = [(8, 8, 2, 2, 1), (6, 8, 2, 3, 1), (12, 6, 3, 2, 2), (8, 12, 4, 2, 1)]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _factors(m, n, b, l, r, seed=0):
    return _rand(b, l * r, n // b, seed=seed), _rand(l, m // l, b * r, seed=seed + 1)


def _obj(W, Wp, C=None):
    D = (W - Wp).numpy()
    return float(np.sum(D * D)) if C is None else float(np.trace(D @ C.numpy() @ D.T))


@pytest.mark.parametrize("m,n,b,l,r", SHAPES)
def test_dense_matches_entrywise_formula_and_two_stage_product(m, n, b, l, r):
    B1, B2 = _factors(m, n, b, l, r)
    W = monarch_dense(B1, B2).numpy()
    p, s = n // b, m // l
    ref = np.zeros((m, n))
    for t in range(s):
        for j in range(l):
            for i in range(b):
                for c in range(p):
                    ref[t * l + j, i * p + c] = sum(B2[j, t, i * r + q] * B1[i, j * r + q, c] for q in range(r))
    np.testing.assert_allclose(W, ref, atol=1e-12)
    x = _rand(n, seed=7).numpy()  # P2 B2 P1 B1 x, stage by stage
    z = np.stack([B1[i].numpy() @ x[i * p:(i + 1) * p] for i in range(b)]).reshape(b, l, r)
    y = np.stack([B2[j].numpy() @ z[:, j, :].reshape(-1) for j in range(l)])  # (l, s)
    np.testing.assert_allclose(y.T.reshape(-1), W @ x, atol=1e-10)
    assert monarch_num_values(m, n, b, l, r) == B1.numel() + B2.numel()


@pytest.mark.parametrize("m,n,b,l,r", SHAPES)
def test_projection_recovers_exact_monarch(m, n, b, l, r):
    W = monarch_dense(*_factors(m, n, b, l, r, seed=3))
    X = _rand(n, 3 * n, seed=4)
    for C in (None, X @ X.T):
        P1, P2 = monarch_project(W, b, l, r, C)
        np.testing.assert_allclose(monarch_dense(P1, P2).numpy(), W.numpy(), atol=1e-9)


@pytest.mark.parametrize("m,n,b,l,r", SHAPES)
def test_projection_is_frobenius_optimal(m, n, b, l, r):
    W = _rand(m, n, seed=5)
    P1, P2 = monarch_project(W, b, l, r)
    err = _obj(W, monarch_dense(P1, P2))
    # independent reference: the blockwise SVD tails of the (j, i) blocks W[j::l, i p:(i+1) p]
    p, Wn = n // b, W.numpy()
    tail = sum(np.sum(np.linalg.svd(Wn[j::l, i * p:(i + 1) * p], compute_uv=False)[r:] ** 2)
               for j in range(l) for i in range(b))
    assert np.isclose(err, tail, rtol=1e-9)
    for seed in range(5):  # beats random Monarch factors and random perturbations of the optimum
        assert err < _obj(W, monarch_dense(*_factors(m, n, b, l, r, seed=10 + seed)))
        Q1 = P1 + 1e-3 * _rand(*P1.shape, seed=20 + seed)
        assert err <= _obj(W, monarch_dense(Q1, P2))


def test_projection_is_stationary_under_block_diagonal_covariance():
    m, n, b, l, r = 6, 8, 2, 3, 1
    W = _rand(m, n, seed=6)
    C = torch.zeros(n, n, dtype=torch.float64)
    for i in range(b):  # uncorrelated input blocks: the closed form is exact
        X = _rand(4, 20, seed=30 + i)
        C[i * 4:(i + 1) * 4, i * 4:(i + 1) * 4] = X @ X.T
    P1, P2 = monarch_project(W, b, l, r, C)
    P1.requires_grad_(True)
    P2.requires_grad_(True)
    D = W - monarch_dense(P1, P2)
    torch.trace(D @ C @ D.T).backward()
    assert float(P1.grad.abs().max()) < 1e-8 and float(P2.grad.abs().max()) < 1e-8


def test_als_never_increases_and_b2_step_is_the_least_squares_optimum():
    m, n, b, l, r = 6, 8, 2, 3, 1
    W, X = _rand(m, n, seed=8), _rand(n, 30, seed=9)
    X[0] *= 4.0
    C = X @ X.T
    P1, P2 = monarch_project(W, b, l, r, C)
    fit = monarch_als(W, C, P1, P2, iters=8, tol=0.0)
    h = np.array(fit.history)
    assert len(h) == 17 and (np.diff(h) <= 1e-10 * h[0]).all() and h[-1] < 0.95 * h[0]
    assert np.isclose(h[-1], _obj(W, fit.dense(), C), rtol=1e-9)
    # brute force B2 step: W' is linear in B2 for fixed B1 -> least squares over vec(B2) in the whitened space
    J = torch.autograd.functional.jacobian(lambda B2: monarch_dense(P1, B2), P2).reshape(m * n, -1).numpy()
    S = np.linalg.cholesky(C.numpy())
    A = np.stack([(J[:, q].reshape(m, n) @ S).reshape(-1) for q in range(J.shape[1])], 1)
    sol = np.linalg.lstsq(A, (W.numpy() @ S).reshape(-1), rcond=None)[0]
    best = float(np.sum(((W.numpy() @ S).reshape(-1) - A @ sol) ** 2))
    one = monarch_als(W, C, P1, P2, iters=1, tol=0.0)
    assert np.isclose(one.history[1], best, rtol=1e-7)


def test_bad_shapes_name_what_works():
    with pytest.raises(ConfigError, match=r"input block count 5 does not divide .* \[1, 2, 3, 4, 6, 8, 12, 24\]"):
        check_monarch_shape(24, 24, 5, 2, 1)
    with pytest.raises(ConfigError, match="output block count 4"):
        check_monarch_shape(6, 24, 2, 4, 1)
    with pytest.raises(ConfigError, match="1 <= rank <= 3"):
        check_monarch_shape(6, 8, 2, 2, 4)
