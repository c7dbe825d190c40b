"""Singular values via the float64 Gram eigenvalues, and the scalar summaries, against numpy."""
import math

import numpy as np
import pytest
import torch

from rankwise.errors import NumericalError
from rankwise.linalg.spectrum import (batched_singular_values, condition_number, effective_rank, energy_curve,
                                      rank_for_energy, singular_values, stable_rank)


@pytest.mark.parametrize("shape", [(7, 13), (13, 7), (10, 10), (1, 5)])
def test_singular_values_match_numpy(shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g)
    ref = np.linalg.svd(w.double().numpy(), compute_uv=False)
    s = singular_values(w)
    assert s.dtype == torch.float64 and s.shape == (min(shape),)
    np.testing.assert_allclose(s.numpy(), ref, rtol=1e-10, atol=1e-12)


def test_batched_matches_single_and_keeps_order():
    g = torch.Generator().manual_seed(2)
    mats = [torch.randn(6, 9, generator=g), torch.randn(9, 4, generator=g), torch.randn(6, 9, generator=g)]
    out = batched_singular_values(mats)
    for w, s in zip(mats, out):
        np.testing.assert_allclose(s.numpy(), np.linalg.svd(w.double().numpy(), compute_uv=False), rtol=1e-10)


def test_closed_forms_on_known_spectrum():
    sv = torch.tensor([4.0, 2.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    w = q @ torch.diag(sv) @ q.T.flip(0)
    s = singular_values(w)
    np.testing.assert_allclose(s.numpy(), sv.numpy(), atol=1e-7)
    assert stable_rank(sv) == pytest.approx((16 + 4 + 4 + 1) / 16)
    p = np.array([4, 2, 2, 1]) / 9.0
    assert effective_rank(sv) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert effective_rank(torch.ones(6, dtype=torch.float64)) == pytest.approx(6.0)
    np.testing.assert_allclose(energy_curve(sv).numpy(), np.cumsum([16, 4, 4, 1, 0]) / 25)
    assert rank_for_energy(sv, 0.64) == 1 and rank_for_energy(sv, 0.65) == 2 and rank_for_energy(sv, 0.99) == 4
    assert rank_for_energy(sv, 1.0) == 4
    assert condition_number(sv) == math.inf and condition_number(sv[:4]) == pytest.approx(4.0)


def test_non_finite_raises():
    w = torch.ones(3, 4)
    w[1, 2] = float("nan")
    with pytest.raises(NumericalError, match="non-finite"):
        singular_values(w)
