"""Paired statistics of the refit against brute force: ``C' = X'^T X'`` and ``M = X^T X'`` over every
batch (float64 activations exactly; float32 ones to float32's precision; bfloat16 ones in more than one
converted chunk per batch), added in place to sums the caller already has, and ``on_pair`` sees each
batch's (dense, compressed) inputs."""
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


#: dtype -> relative tolerance of the sums against float64 brute force (float32 products for all but float64)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5}


@pytest.mark.parametrize("given,dtype", [(False, torch.float64), (True, torch.float64), (False, torch.float32),
                                         (True, torch.bfloat16)])
def test_cross_moments_equal_brute_force(given, dtype):
    d = 5
    rows = CHUNK_BYTES // (4 * d) + 300  # bfloat16 rows are converted in more than one float32 chunk per batch
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, rows // 2, d, generator=g).to(dtype), torch.randn(2, rows // 2, d, generator=g).to(dtype))
               for _ in range(3)]
    dense, current = _pair_of_linears(d)
    dense["l"].to(dtype), current["l"].to(dtype)
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
    tol = TOL[dtype]
    scale = np.abs(Xp).sum(0).max() ** 2 / len(Xp)  # |entries| of the sums are at most ~ this
    np.testing.assert_allclose(st.cov.numpy(), Xp.T @ Xp + base_cov, rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(M.numpy(), X.T @ Xp + base_M, rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(st.abs_sum.numpy(), np.abs(Xp).sum(0), rtol=tol)
    assert torch.equal(st.cov, st.cov.T), "C' is exactly symmetric"
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


def test_recorded_dense_inputs_and_shared_sums():
    """``record`` stands for the dense pre-hooks; layers sharing their leader's inputs (q/k/v) get its
    very sums, computed once and equal to every separate layer's; a follower whose inputs are not its
    leader's is an error."""
    torch.manual_seed(0)
    d = 4
    cur = {n: nn.Linear(d, 2) for n in ("q", "k", "v")}
    x, xp = torch.randn(3, 7, d), torch.randn(3, 7, d)
    calls = []
    alone = PairedAccumulator(None, cur)
    shared = PairedAccumulator(None, cur, share={"k": "q", "v": "q"},
                               on_pair=lambda n, a, b: calls.append(n))
    for acc in (alone, shared):
        with acc, torch.no_grad():
            for n in cur:
                acc.record(n, x)
            for n in cur:
                cur[n](xp)
    assert calls == ["q", "k", "v"]
    assert shared.sums["k"] is shared.sums["q"] is shared.sums["v"]
    for n in cur:
        assert alone.sums[n] is not alone.sums["q"] or n == "q"
        torch.testing.assert_close(shared.sums[n][1], alone.sums[n][1], rtol=0, atol=0)
        torch.testing.assert_close(shared.sums[n][0].cov, alone.sums[n][0].cov, rtol=0, atol=0)
    with PairedAccumulator(None, cur, share={"k": "q"}) as acc, torch.no_grad(), \
            pytest.raises(RuntimeError, match="shares the sums of q but not its inputs"):
        acc.record("q", x)
        acc.record("k", x.clone())
        cur["q"](xp)
        cur["k"](xp)


def test_a_batch_does_not_keep_the_last_batchs_inputs():
    """Recording the next batch drops the previous batch's inputs (the low-memory peak: at ``down_proj``
    they are two (tokens, 1536) tensors beside the next forward's intermediates)."""
    import weakref

    cur = {n: nn.Linear(4, 2) for n in ("q", "k")}
    with PairedAccumulator(None, cur, share={"k": "q"}) as acc, torch.no_grad():
        x, xp = torch.randn(6, 4), torch.randn(6, 4)
        for n in cur:
            acc.record(n, x)
        for n in cur:
            cur[n](xp)
        refs = [weakref.ref(x), weakref.ref(xp)]
        del x, xp
        for n in cur:
            acc.record(n, torch.randn(6, 4))
        assert [r() for r in refs] == [None, None]
