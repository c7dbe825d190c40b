import numpy as np
import pytest
import torch

from rankwise.errors import ConfigError, NumericalError
from rankwise.linalg.ldu import ldu


def _pivot_orders(L, U):
    rows = [int(torch.nonzero((L[:, k] - 1).abs() < 1e-12)[0]) for k in range(L.shape[1])]
    cols = [int(torch.nonzero((U[k] - 1).abs() < 1e-12)[0]) for k in range(U.shape[0])]
    return rows, cols


def test_full_rank_reconstructs_and_is_triangular_after_pivoting():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(7, 5, generator=g, dtype=torch.float64)
    L, d, U = ldu(W, 5)
    np.testing.assert_allclose((L * d @ U).numpy(), W.numpy(), atol=1e-10)
    rows, cols = _pivot_orders(L, U)
    Lp = L[rows]                    # pivot rows first: unit lower triangular
    Up = U[:, cols]                 # pivot columns first: unit upper triangular
    np.testing.assert_allclose(Lp.numpy(), np.tril(Lp.numpy()), atol=1e-12)
    np.testing.assert_allclose(np.diag(Lp.numpy()), 1.0)
    np.testing.assert_allclose(Up.numpy(), np.triu(Up.numpy()), atol=1e-12)
    # complete pivoting: first pivot is the largest entry
    assert abs(float(d[0])) == pytest.approx(float(W.abs().max()))


def test_truncated_residual_is_schur_complement():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 6, generator=g, dtype=torch.float64)
    L, d, U = ldu(W, 2)
    rows, cols = _pivot_orders(L, U)
    res = W - L * d @ U
    # brute-force Schur complement of the pivot block
    others_r = [i for i in range(6) if i not in rows]
    others_c = [j for j in range(6) if j not in cols]
    Wn = W.numpy()
    S = Wn[np.ix_(others_r, others_c)] - Wn[np.ix_(others_r, cols)] @ np.linalg.solve(
        Wn[np.ix_(rows, cols)], Wn[np.ix_(rows, others_c)])
    np.testing.assert_allclose(res.numpy()[np.ix_(others_r, others_c)], S, atol=1e-10)
    np.testing.assert_allclose(res.numpy()[rows], 0, atol=1e-10)
    np.testing.assert_allclose(res.numpy()[:, cols], 0, atol=1e-10)


def test_exact_for_low_rank_and_errors():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(8, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 9, generator=g, dtype=torch.float64)
    L, d, U = ldu(W, 3)
    np.testing.assert_allclose((L * d @ U).numpy(), W.numpy(), atol=1e-9)
    with pytest.raises(ConfigError):
        ldu(W, 9)
    with pytest.raises(NumericalError):
        ldu(torch.full((3, 3), float("nan")), 2)
