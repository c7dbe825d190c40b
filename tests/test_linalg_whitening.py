import logging

import numpy as np
import pytest
import torch

from rankwise.errors import ConfigError, NumericalError, UnknownMethodError
from rankwise.linalg import cholesky_whitener, eigh_whitener, make_whitener


def _cov(n, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n, generator=g, dtype=torch.float64) @ torch.randn(n, T, generator=g, dtype=torch.float64)
    return X @ X.T


def test_cholesky_pd_no_damping():
    C = _cov(8, 50)
    w = cholesky_whitener(C)
    S = w.S.numpy()
    assert w.damping == 0.0 and w.kind == "cholesky"
    np.testing.assert_allclose(np.triu(S, 1), 0)
    np.testing.assert_allclose(S @ S.T, C.numpy(), rtol=1e-10, atol=1e-9)
    M = torch.randn(3, 8, dtype=torch.float64)
    np.testing.assert_allclose(w.unwhiten(M).numpy(), M.numpy() @ np.linalg.inv(S), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(w.unwhiten(w.whiten(M)).numpy(), M.numpy(), atol=1e-10)


def test_cholesky_damps_rank_deficient_and_reports(caplog):
    C = _cov(10, 4)  # rank 4 < 10
    with caplog.at_level(logging.WARNING, logger="rankwise"):
        w = cholesky_whitener(C, damping=1e-6)
    assert w.damping > 0 and "not positive definite" in caplog.text
    assert w.damping == pytest.approx(w.damping_rel * float(torch.diagonal(C).mean()))
    np.testing.assert_allclose(w.covariance.numpy(), C.numpy() + w.damping * np.eye(10), rtol=1e-9, atol=1e-9)
    assert np.all(np.linalg.eigvalsh(w.covariance.numpy()) > 0)


def test_cholesky_gives_up_with_clear_error():
    C = -torch.eye(4, dtype=torch.float64)
    with pytest.raises(NumericalError, match="eigh"):
        cholesky_whitener(C, max_tries=3)


def test_eigh_symmetric_root_and_clamping():
    C = _cov(8, 50, seed=1)
    w = eigh_whitener(C)
    S = w.S.numpy()
    np.testing.assert_allclose(S, S.T, atol=1e-10)
    np.testing.assert_allclose(S @ S.T, C.numpy(), rtol=1e-9, atol=1e-8)
    assert w.clamped == 0
    M = torch.randn(2, 8, dtype=torch.float64)
    np.testing.assert_allclose(w.unwhiten(M).numpy(), M.numpy() @ np.linalg.inv(S), rtol=1e-7, atol=1e-9)
    deficient = eigh_whitener(_cov(10, 3))
    assert deficient.clamped >= 7 and torch.isfinite(deficient.unwhiten(torch.randn(2, 10))).all()
    zero = eigh_whitener(torch.zeros(5, 5))
    assert torch.isfinite(zero.S).all()


def test_bad_covariances():
    with pytest.raises(ConfigError):
        cholesky_whitener(torch.randn(3, 4))
    C = _cov(4, 10)
    C[0, 0] = float("inf")
    with pytest.raises(NumericalError, match="non-finite"):
        eigh_whitener(C)
    with pytest.raises(UnknownMethodError, match="cholesky, eigh"):
        make_whitener(_cov(3, 5), "qr")
