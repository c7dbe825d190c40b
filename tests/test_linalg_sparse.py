import itertools

import numpy as np
import pytest
import torch

from rankwise.errors import ConfigError
from rankwise.linalg.sparse import (
    feature_scales, lowrank_sparse_fit, mask_to_rows, pack_2bit, project_pattern, refit_lowrank_under_cov,
    semistructured_columns, semistructured_compress, unpack_2bit, wanda_mask,
)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _act_err(D, C):
    D = np.asarray(D, dtype=np.float64)
    return float(np.sqrt(max(np.trace(D @ C @ D.T), 0.0)))


def test_unstructured_mask_is_rowwise_topk_brute_force():
    A = _rand(6, 9)
    mask = project_pattern(A, "unstructured", 4).numpy()
    for i, row in enumerate(np.abs(A.numpy())):
        best = max(itertools.combinations(range(9), 4), key=lambda c: row[list(c)].sum())
        assert set(np.flatnonzero(mask[i])) == set(best)


def test_24_mask_is_valid_and_optimal_per_group():
    A = _rand(5, 12, seed=1)
    mask = project_pattern(A, "2:4").numpy()
    groups = mask.reshape(5, 3, 4)
    assert (groups.sum(-1) == 2).all()
    a = np.abs(A.numpy()).reshape(5, 3, 4)
    for i, g in itertools.product(range(5), range(3)):
        best = max(itertools.combinations(range(4), 2), key=lambda c: a[i, g, list(c)].sum())
        assert set(np.flatnonzero(groups[i, g])) == set(best)
    with pytest.raises(ConfigError, match="multiple of 4"):
        project_pattern(_rand(3, 6), "2:4")
    with pytest.raises(ConfigError, match="unknown sparsity pattern"):
        project_pattern(A, "4:8")
    with pytest.raises(ConfigError, match="keep_per_row"):
        project_pattern(A, "unstructured", 13)


def test_wanda_mask_minimizes_diagonal_activation_error_brute_force():
    W, d = _rand(3, 4, seed=2), _rand(4, seed=3).abs() + 0.1
    mask = wanda_mask(W, d, "unstructured", 2).numpy()
    Wn, C = W.numpy(), np.diag(d.numpy() ** 2)  # diagonal covariance: the exact activation error
    for i in range(3):
        errs = {c: _act_err((Wn[i] * ~np.isin(range(4), c))[None], C) for c in itertools.combinations(range(4), 2)}
        assert set(np.flatnonzero(mask[i])) == set(min(errs, key=errs.get))


@pytest.mark.parametrize("q", [1, 4, 7, 12])
def test_pack_unpack_2bit_roundtrip(q):
    pos = torch.randint(0, 4, (3, q), generator=torch.Generator().manual_seed(q))
    packed = pack_2bit(pos)
    assert packed.dtype == torch.uint8 and packed.shape == (3, -(-q // 4))
    assert torch.equal(unpack_2bit(packed, q), pos)


def test_compressed_formats_reconstruct_the_masked_matrix():
    W = _rand(4, 16, seed=4)
    mask = project_pattern(W, "2:4")
    values, packed = semistructured_compress(W, mask)
    cols = semistructured_columns(packed, 16)
    rebuilt = torch.zeros_like(W).scatter_(1, cols, values)
    assert torch.equal(rebuilt, W * mask) and packed.shape == (4, 2)
    m2 = project_pattern(W, "unstructured", 5)
    v, c = mask_to_rows(W, m2)
    assert c.dtype == torch.int16 and bool((c[:, 1:] > c[:, :-1]).all())
    assert torch.equal(torch.zeros_like(W).scatter_(1, c.long(), v), W * m2)
    with pytest.raises(ConfigError, match="same number"):
        ragged = torch.zeros(4, 16, dtype=torch.bool)
        ragged[0, :2] = ragged[1:, 0] = True
        mask_to_rows(W, ragged)


def test_feature_scales_floor_dead_inputs():
    d = feature_scales(torch.tensor([4.0, 0.0, 9.0], dtype=torch.float64))
    assert d[0] == 2.0 and d[2] == 3.0 and 0 < d[1] < 1e-5


@pytest.mark.parametrize("pattern,keep", [("unstructured", 5), ("2:4", None)])
def test_oats_objective_never_increases_and_respects_pattern(pattern, keep):
    W, d = _rand(12, 16, seed=5), _rand(16, seed=6).abs() + 0.2
    res = lowrank_sparse_fit(W, d, 3, pattern, keep, iters=15)
    h = np.array(res.history)
    assert len(h) == 30 and (np.diff(h) <= 1e-10 * h[0]).all() and h[-1] < h[0]
    assert np.isclose(h[-1], float(torch.linalg.norm((W - res.dense()) * d)), rtol=1e-9)
    assert torch.equal(res.S != 0, res.mask & (res.S != 0)) and torch.linalg.matrix_rank(res.L @ res.R) == 3
    if pattern == "2:4":
        assert (res.mask.reshape(12, 4, 4).sum(-1) == 2).all()
    else:
        assert (res.mask.sum(1) == keep).all()


def test_oats_first_step_is_the_scaled_truncated_svd():
    W, d = _rand(8, 10, seed=7), _rand(10, seed=8).abs() + 0.5
    res = lowrank_sparse_fit(W, d, 2, "unstructured", 3, iters=1)
    U, s, Vh = np.linalg.svd(W.numpy() * d.numpy(), full_matrices=False)
    ref = (U[:, :2] * s[:2]) @ Vh[:2] / d.numpy()
    np.testing.assert_allclose((res.L @ res.R).numpy(), ref, atol=1e-10)
    resid = (W.numpy() - ref) * d.numpy()
    keep = np.argsort(-np.abs(resid), axis=1)[:, :3]
    S_ref = np.zeros_like(resid)
    np.put_along_axis(S_ref, keep, np.take_along_axis(resid, keep, 1), 1)
    np.testing.assert_allclose(res.S.numpy(), S_ref / d.numpy(), atol=1e-10)


def test_refit_is_the_whitened_fit_and_never_worse():
    W, X = _rand(6, 8, seed=9), _rand(8, 40, seed=10)
    X[0] *= 5.0
    C = X @ X.T
    res = lowrank_sparse_fit(W, torch.diagonal(C).sqrt(), 2, "unstructured", 3, iters=10)
    L, R = refit_lowrank_under_cov(W, res.S, 2, C)
    Cn, T = C.numpy(), (W - res.S).numpy()
    Sc = np.linalg.cholesky(Cn)
    U, s, Vh = np.linalg.svd(T @ Sc)
    ref = (U[:, :2] * s[:2]) @ Vh[:2] @ np.linalg.inv(Sc)
    np.testing.assert_allclose((L @ R).numpy(), ref, atol=1e-8)
    before = _act_err(W.numpy() - res.dense().numpy(), Cn)
    after = _act_err(W.numpy() - (L @ R + res.S).numpy(), Cn)
    assert after <= before * (1 + 1e-12)
