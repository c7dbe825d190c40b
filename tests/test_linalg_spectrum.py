"""Singular values via the Gram eigenvalues (float64 and float32 routes), and the scalar summaries, against numpy."""
import math

import numpy as np
import pytest
import torch

from rankwise.errors import ConfigError, NumericalError
from rankwise.linalg.spectrum import (condition_number, effective_rank, energy_curve, gram_eigenvalues,
                                      rank_for_energy, singular_values, stable_rank)


def _student_t(shape, df: int, seed: int) -> torch.Tensor:
    """Seeded Student-t samples (heavy tails like trained weights): z / sqrt(chi2_df / df)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=g)
    chi2 = (torch.randn(*shape, df, generator=g) ** 2).sum(-1)
    return z / (chi2 / df).sqrt()


@pytest.mark.parametrize("shape", [(7, 13), (13, 7), (10, 10), (1, 5)])
def test_singular_values_match_numpy(shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g)
    ref = np.linalg.svd(w.double().numpy(), compute_uv=False)
    s = singular_values(w)
    assert s.dtype == torch.float64 and s.shape == (min(shape),)
    np.testing.assert_allclose(s.numpy(), ref, rtol=1e-10, atol=1e-12)


def test_stacked_matrices_match_numpy_per_matrix():
    """(..., m, n) input (the torch route) gives each matrix's spectrum, wide and tall alike."""
    g = torch.Generator().manual_seed(2)
    for shape in [(3, 6, 9), (2, 2, 9, 4)]:
        w = torch.randn(*shape, generator=g)
        ref = np.linalg.svd(w.double().numpy(), compute_uv=False)
        s = singular_values(w)
        assert s.shape == ref.shape and s.dtype == torch.float64
        np.testing.assert_allclose(s.numpy(), ref, rtol=1e-10, atol=1e-12)


def test_gram_eigenvalues_are_ascending_squares():
    w = torch.randn(20, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ev = gram_eigenvalues(w)
    ref = np.sort(np.linalg.svd(w.numpy(), compute_uv=False) ** 2)
    np.testing.assert_allclose(ev.numpy(), ref, rtol=1e-12)
    assert bool((ev[1:] >= ev[:-1]).all())


@pytest.mark.parametrize("batched", [False, True])
def test_float32_route_within_its_error_bound(batched):
    """|lambda32 - lambda64| <= c p eps32 lambda_max (module docstring), on a heavy-tailed spectrum."""
    w = _student_t((4, 60, 150) if batched else (150, 60), df=3, seed=5)
    ev64 = gram_eigenvalues(w.double())
    ev32 = gram_eigenvalues(w, torch.float32)
    assert ev32.dtype == torch.float64
    lam_max = ev64.amax(dim=-1, keepdim=True)
    err = ((ev32 - ev64).abs() / lam_max).max().item()
    assert 0 < err <= 60 * 6e-8                       # p = 60; float32 unit roundoff 6e-8


def test_bad_dtype_raises_config_error():
    with pytest.raises(ConfigError, match="float32 or torch.float64"):
        singular_values(torch.ones(3, 4), torch.float16)


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
