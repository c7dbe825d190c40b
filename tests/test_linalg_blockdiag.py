import numpy as np
import pytest
import torch

from rankwise.errors import ConfigError
from rankwise.linalg import whitened_svd
from rankwise.linalg.blockdiag import blockdiag_dense, blockdiag_fit, blockdiag_lowrank_fit, check_blocks


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cov(n, seed=1):
    X = _rand(n, 3 * n, seed=seed)
    X[0] += 2 * X[-1]
    return X @ X.T


def _obj(D, C):
    D = D.numpy()
    return float(np.trace(D @ C.numpy() @ D.T))


def test_blockdiag_fit_is_the_least_squares_optimum_brute_force():
    m, n, b = 6, 9, 3
    T, C = _rand(m, n, seed=2), _cov(n)
    blocks = blockdiag_fit(T, b, C)
    BD = blockdiag_dense(blocks)
    assert BD.shape == (m, n) and bool((BD.reshape(b, 2, b, 3)[0, :, 1] == 0).all())
    # brute force: least squares over the free entries (the diagonal blocks) in the whitened space
    S = np.linalg.cholesky(C.numpy())
    free = [(i, j) for i in range(m) for j in range(n) if i // 2 == j // 3]
    A = np.stack([(np.eye(m)[:, [i]] @ np.eye(n)[[j]] @ S).reshape(-1) for i, j in free], 1)
    sol = np.linalg.lstsq(A, (T.numpy() @ S).reshape(-1), rcond=None)[0]
    ref = np.zeros((m, n))
    for (i, j), v in zip(free, sol):
        ref[i, j] = v
    np.testing.assert_allclose(BD.numpy(), ref, atol=1e-9)
    np.testing.assert_array_equal(blockdiag_fit(T, b).numpy(), np.stack([T.numpy()[2 * g:2 * g + 2, 3 * g:3 * g + 3]
                                                                          for g in range(b)]))


@pytest.mark.parametrize("init", ["lowrank", "blockdiag"])
def test_alternation_never_increases_and_starts_from_lowrank(init):
    W, C = _rand(8, 12, seed=3), _cov(12, seed=4)
    res = blockdiag_lowrank_fit(W, 4, 2, C, iters=12, tol=0.0, init=init)
    h = np.array(res.history)
    assert len(h) == 13 and (np.diff(h) <= 1e-10 * h[0]).all()
    assert np.isclose(h[-1], _obj(W - res.dense(), C), rtol=1e-9)
    if init == "lowrank":  # the start is the whitened rank-2 fit of W; the result can only be better
        assert np.isclose(h[0], whitened_svd(W, C).error(2) ** 2, rtol=1e-9)
    assert torch.linalg.matrix_rank(res.L @ res.R) == 2


def test_frobenius_version_and_exact_blockdiag():
    BD = blockdiag_dense(_rand(3, 2, 2, seed=5))
    res = blockdiag_lowrank_fit(BD, 3, 1, None, iters=3, init="blockdiag")
    assert res.history[-1] < 1e-20  # a pure block-diagonal matrix is fitted exactly by the first BD step


def test_bad_block_counts():
    with pytest.raises(ConfigError, match=r"4 diagonal blocks do not divide a 6x9 matrix.*\[1, 3\]"):
        check_blocks(6, 9, 4)
    with pytest.raises(ConfigError, match="init"):
        blockdiag_lowrank_fit(_rand(6, 9), 3, 1, init="zeros")
