import numpy as np
import pytest
import torch

from rankwise.errors import ConfigError
from rankwise.linalg import whitened_svd
from rankwise.linalg.shared_basis import shared_whitened_basis


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cov(n, seed):
    X = _rand(n, 3 * n, seed=seed)
    return X @ X.T


def test_one_layer_is_the_whitened_svd():
    W, C = _rand(6, 8, seed=1), _cov(8, 2)
    fit = shared_whitened_basis([W], 3, covs=[C])
    np.testing.assert_allclose((fit.basis @ fit.coefs[0]).numpy(), whitened_svd(W, C, dtype=torch.float64).dense(3, torch.float64).numpy(),
                               atol=1e-9)
    assert np.isclose(fit.error(), whitened_svd(W, C).error(3), rtol=1e-9)


def test_group_is_the_concatenated_svd_and_its_error_is_the_tail():
    Ws = [_rand(6, 5, seed=3), _rand(6, 7, seed=4)]
    covs = [_cov(5, 5), _cov(7, 6)]
    fit = shared_whitened_basis(Ws, 3, covs=covs)
    Ss = [np.linalg.cholesky(C.numpy()) for C in covs]
    stacked = np.hstack([W.numpy() @ S for W, S in zip(Ws, Ss)])
    s = np.linalg.svd(stacked, compute_uv=False)
    joint = sum(np.linalg.norm((W.numpy() - fit.basis.numpy() @ K.numpy()) @ S) ** 2
                for W, K, S in zip(Ws, fit.coefs, Ss))
    assert np.isclose(joint, np.sum(s[3:] ** 2), rtol=1e-9) and np.isclose(fit.error() ** 2, joint, rtol=1e-9)
    # identity covariances: the plain SVD of [W_1, W_2]
    plain = shared_whitened_basis(Ws, 2, covs=[torch.eye(5, dtype=torch.float64), torch.eye(7, dtype=torch.float64)])
    U, s2, Vh = np.linalg.svd(np.hstack([W.numpy() for W in Ws]), full_matrices=False)
    ref = (U[:, :2] * s2[:2]) @ Vh[:2]
    np.testing.assert_allclose(np.hstack([(plain.basis @ K).numpy() for K in plain.coefs]), ref, atol=1e-9)


def test_errors():
    with pytest.raises(ConfigError, match="same number of rows"):
        shared_whitened_basis([_rand(4, 3), _rand(5, 3)], 1, covs=[_cov(3, 1), _cov(3, 2)])
    with pytest.raises(ConfigError, match="one input covariance"):
        shared_whitened_basis([_rand(4, 3)], 1)
    with pytest.raises(ConfigError, match="shared rank"):
        shared_whitened_basis([_rand(4, 3)], 5, covs=[_cov(3, 1)])
