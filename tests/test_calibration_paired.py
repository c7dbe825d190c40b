"""Paired statistics of the refit against brute force: ``C' = X'^T X'`` and ``M = X^T X'`` over every
batch (rows in more than one float64 chunk), added in place to sums the caller already has, and
``on_pair`` sees each batch's (dense, compressed) inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rankwise.calibration.paired import PairedAccumulator
from rankwise.calibration.stats import CHUNK_BYTES, InputStats


def _pair_of_linears(d: int):
    torch.manual_seed(0)
    return {"l": nn.Linear(d, 3)}, {"l": nn.Linear(d, 3)}


@pytest.mark.parametrize("given", [False, True])
def test_cross_moments_equal_brute_force(given):
    d = 5
    rows = CHUNK_BYTES // (8 * d) + 300  # more than one float64 chunk per batch
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, rows // 2, d, generator=g), torch.randn(2, rows // 2, d, generator=g))
               for _ in range(3)]
    dense, current = _pair_of_linears(d)
    seen = []
    start_cov, start_M = torch.eye(d, dtype=torch.float64), 2 * torch.eye(d, dtype=torch.float64)
    sums = None
    if given:
        st0 = InputStats.zeros(d)
        st0.cov += start_cov
        st0.n = 7
        sums = {"l": [st0, start_M.clone()]}
    acc = PairedAccumulator(dense, current, on_pair=lambda n, x, xp: seen.append((n, x.clone(), xp.clone())),
                            sums=sums)
    with acc, torch.no_grad():
        for x, xp in batches:
            dense["l"](x)
            current["l"](xp)
    X = np.concatenate([x.reshape(-1, d).double().numpy() for x, _ in batches])
    Xp = np.concatenate([xp.reshape(-1, d).double().numpy() for _, xp in batches])
    st, M = acc.sums["l"]
    base_cov, base_M, base_n = (start_cov.numpy(), start_M.numpy(), 7) if given else (0.0, 0.0, 0)
    np.testing.assert_allclose(st.cov.numpy(), Xp.T @ Xp + base_cov, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(M.numpy(), X.T @ Xp + base_M, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(st.abs_sum.numpy(), np.abs(Xp).sum(0), rtol=1e-10)
    assert st.n == len(Xp) + base_n
    if given:
        assert acc.sums is sums and st is sums["l"][0], "the caller's sums are added to in place"
    assert [n for n, _, _ in seen] == ["l"] * 3
    for (_, x, xp), (bx, bxp) in zip(seen, batches):
        assert torch.equal(x, bx.reshape(-1, d)) and torch.equal(xp, bxp.reshape(-1, d))


def test_compressed_forward_without_a_dense_one_is_an_error():
    dense, current = _pair_of_linears(4)
    with PairedAccumulator(dense, current), torch.no_grad(), pytest.raises(RuntimeError, match="no dense input"):
        current["l"](torch.randn(2, 4))
