"""Quantized + low-rank fits (rankwise.linalg.lowrank_quant): LoRC and the monotone LQ alternation."""
from __future__ import annotations

import pytest
import torch

from rankwise.errors import ConfigError
from rankwise.linalg.factorization import whitened_svd
from rankwise.linalg.gptq import gptq, quant_objective
from rankwise.linalg.lowrank_quant import fit_lowrank, lorc, lq
from rankwise.linalg.quant import rtn
from rankwise.linalg.whitening import make_whitener

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: threads only add contention


def problem(seed: int, m: int = 24, n: int = 40, tokens: int = 200, spikes: int = 3):
    """A weight with a strong low-rank part (what LQ-LoRA's initialization exploits) and correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    W = W + 3 * torch.randn(m, spikes, generator=g, dtype=torch.float64) @ torch.randn(spikes, n, generator=g,
                                                                                      dtype=torch.float64)
    X = torch.randn(n, tokens, generator=g, dtype=torch.float64)
    X = X * torch.linspace(0.3, 2, n, dtype=torch.float64)[:, None]
    X = X + 0.5 * torch.randn(1, tokens, generator=g, dtype=torch.float64)
    return W, X @ X.T


@pytest.mark.parametrize("quantizer", ["gptq", "rtn"])
def test_lorc_is_the_quantization_plus_the_whitened_fit_of_its_error(quantizer):
    W, C = problem(0)
    res = lorc(W, C, 3, 8, rank=4, quantizer=quantizer)
    Q = gptq(W, C, 3, 8) if quantizer == "gptq" else rtn(W, 3, 8)
    assert torch.equal(res.quant.codes, Q.codes)
    fac = whitened_svd(W - Q.dense(torch.float64), C)
    L, R = fac.factors(4)
    torch.testing.assert_close(res.left, L.half(), rtol=0, atol=0)
    torch.testing.assert_close(res.right, R.half(), rtol=0, atol=0)
    f_q = quant_objective(W, Q.dense(torch.float64), C)
    f = quant_objective(W, res.dense(torch.float64), C)
    # the LR-step reaches the Eckart-Young value sum_{i>k} s_i^2 (up to the float16 factors)
    assert f == pytest.approx(fac.error(4) ** 2, rel=1e-3)
    assert f < 0.9 * f_q
    assert res.history == [pytest.approx(f, rel=1e-12)]


def test_lr_step_beats_other_rank_k_corrections():
    W, C = problem(1)
    Qd = rtn(W, 2, 8).dense(torch.float64)
    L, R = fit_lowrank(W - Qd, make_whitener(C), 3)
    best = quant_objective(W, Qd + L.double() @ R.double(), C)
    U, S, Vh = torch.linalg.svd(W - Qd)  # the plain (unweighted) SVD of the error is a worse choice
    plain = quant_objective(W, Qd + (U[:, :3] * S[:3]) @ Vh[:3], C)
    assert best < plain
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # and so are perturbations of the optimum
        Lp = L.double() + 0.05 * torch.randn(L.shape, generator=g, dtype=torch.float64)
        assert best < quant_objective(W, Qd + Lp @ R.double(), C)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("init", ["best", "lorc", "svd"])
def test_lq_objective_decreases_monotonically_and_never_exceeds_lorc(seed, init):
    W, C = problem(seed)
    res = lq(W, C, 2, 8, rank=3, iters=6, init=init)
    h = res.history
    assert all(b <= a for a, b in zip(h, h[1:]))
    assert res.info["objective"] == h[-1]
    assert quant_objective(W, res.dense(torch.float64), C) == pytest.approx(h[-1], rel=1e-10)
    if init != "svd":
        assert h[-1] <= lorc(W, C, 2, 8, rank=3).history[-1] * (1 + 1e-12)


def test_lq_improves_on_lorc_when_the_weight_has_a_dominant_low_rank_part():
    """LQ-LoRA's point: take the low-rank part out before quantizing, so the grid is finer."""
    wins = 0
    for seed in range(4):
        W, C = problem(seed, spikes=2)
        a = lq(W, C, 2, 8, rank=2, iters=4).history[-1]
        b = lorc(W, C, 2, 8, rank=2).history[-1]
        wins += a < 0.95 * b
    assert wins >= 3


def test_lq_with_rtn_quantizer_and_eigh_whitening_is_monotone():
    W, C = problem(5, tokens=20)  # fewer tokens than inputs: singular C
    res = lq(W, C, 3, 16, rank=2, iters=4, quantizer="rtn", whitening="eigh")
    assert all(b <= a for a, b in zip(res.history, res.history[1:]))
    assert res.left.dtype == torch.float16 and res.right.dtype == torch.float16


def test_bad_options_raise_config_errors():
    W, C = problem(0, m=6, n=8)
    with pytest.raises(ConfigError, match="rank"):
        lq(W, C, 4, 4, rank=7)
    with pytest.raises(ConfigError, match="quantizer"):
        lq(W, C, 4, 4, rank=2, quantizer="awq")
    with pytest.raises(ConfigError, match="iters"):
        lq(W, C, 4, 4, rank=2, iters=-1)
    with pytest.raises(ConfigError, match="init"):
        lq(W, C, 4, 4, rank=2, init="random")
    with pytest.raises(ConfigError, match="bits"):
        lorc(W, C, 1, 4, rank=2)
