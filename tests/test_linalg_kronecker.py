import numpy as np
import pytest
import torch

from rankwise.errors import ConfigError
from rankwise.linalg.kronecker import (
    check_factor_shape, factor_shapes, kron_rearrange, kron_sum_dense, nearest_kron_factor, nearest_kron_sum,
)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _np_rearrange(W, m1, n1):
    """Van Loan-Pitsianis rearrangement by explicit loops: row a*n1 + c = vec of block (a, c)."""
    m2, n2 = W.shape[0] // m1, W.shape[1] // n1
    return np.stack([W[a * m2:(a + 1) * m2, c * n2:(c + 1) * n2].reshape(-1) for a in range(m1) for c in range(n1)])


def test_dense_and_rearrangement_match_numpy_kron():
    A, B = _rand(2, 3, 2, seed=1), _rand(2, 2, 4, seed=2)
    W = kron_sum_dense(A, B).numpy()
    np.testing.assert_allclose(W, np.kron(A[0], B[0]) + np.kron(A[1], B[1]), atol=1e-12)
    R = kron_rearrange(torch.from_numpy(W), 3, 2).numpy()
    np.testing.assert_allclose(R, _np_rearrange(W, 3, 2), atol=0)
    np.testing.assert_allclose(kron_rearrange(torch.from_numpy(np.kron(A[0], B[0])), 3, 2).numpy(),
                               np.outer(A[0].numpy().reshape(-1), B[0].numpy().reshape(-1)), atol=1e-12)


@pytest.mark.parametrize("m1,n1,m2,n2,r", [(3, 2, 2, 4, 2), (4, 4, 3, 2, 3), (1, 3, 5, 2, 1)])
def test_exact_recovery_of_a_kronecker_sum(m1, n1, m2, n2, r):
    W = kron_sum_dense(_rand(r, m1, n1, seed=3), _rand(r, m2, n2, seed=4))
    A, B, err = nearest_kron_sum(W, m1, n1, r)
    np.testing.assert_allclose(kron_sum_dense(A, B).numpy(), W.numpy(), atol=1e-9)
    assert err < 1e-9


def test_optimal_against_the_rearranged_svd():
    W = _rand(12, 8, seed=5)
    for r in (1, 3, 5):
        A, B, err = nearest_kron_sum(W, 4, 2, r)
        s = np.linalg.svd(_np_rearrange(W.numpy(), 4, 2), compute_uv=False)
        fro = float(np.linalg.norm(W.numpy() - kron_sum_dense(A, B).numpy()))
        assert np.isclose(fro, np.sqrt(np.sum(s[r:] ** 2)), rtol=1e-9) and np.isclose(err, fro, rtol=1e-9)
        for seed in range(3):  # any other r-term sum is worse
            other = kron_sum_dense(A + 1e-3 * _rand(*A.shape, seed=10 + seed), B)
            assert fro <= float(np.linalg.norm(W.numpy() - other.numpy()))


def test_whitened_fit_is_exact_for_a_kronecker_covariance():
    n1, n2 = 3, 2
    X1, X2 = _rand(n1, 10, seed=6), _rand(n2, 10, seed=7)
    C1, C2 = X1 @ X1.T, X2 @ X2.T
    C = torch.kron(C1, C2)
    F1, F2 = nearest_kron_factor(C, n1)
    np.testing.assert_allclose(torch.kron(F1, F2).numpy(), C.numpy(), atol=1e-9)
    W = _rand(8, 6, seed=8)
    A, B, err = nearest_kron_sum(W, 4, n1, 2, C1, C2)
    A.requires_grad_(True)
    B.requires_grad_(True)
    D = W - kron_sum_dense(A, B)
    obj = torch.trace(D @ C @ D.T)
    assert np.isclose(float(obj.detach()), err ** 2, rtol=1e-8)
    obj.backward()  # the exact minimizer: a stationary point of the true objective
    assert float(A.grad.abs().max()) < 1e-7 * float(obj.detach()) and float(B.grad.abs().max()) < 1e-7 * float(obj.detach())
    Af, Bf, _ = nearest_kron_sum(W, 4, n1, 2)
    Df = W - kron_sum_dense(Af, Bf)
    assert float(obj.detach()) <= float(torch.trace(Df @ C @ Df.T))


def test_factor_shapes_and_errors():
    shapes = factor_shapes(576, 576)
    assert shapes[0] == (24, 24) and all(576 % a == 0 and 576 % b == 0 for a, b in shapes)
    assert factor_shapes(192, 576)[0] == (12, 24)
    assert factor_shapes(7, 5) == []  # both prime: every factorization is trivial
    assert all(a * b > 1 and (7 // a) * (12 // b) > 1 for a, b in factor_shapes(7, 12))
    with pytest.raises(ConfigError, match=r"5 does not divide the output size 12 .* \[1, 2, 3, 4, 6, 12\]"):
        check_factor_shape(12, 8, 5, 2)
    with pytest.raises(ConfigError, match="number of Kronecker terms"):
        nearest_kron_sum(_rand(4, 4), 2, 2, 5)
    with pytest.raises(ConfigError, match="both"):
        nearest_kron_sum(_rand(4, 4), 2, 2, 1, C1=torch.eye(2, dtype=torch.float64))
