"""Randomized Hadamard rotations (rankwise.linalg.hadamard): orthogonal, exact function, fewer outliers."""
from __future__ import annotations

import pytest
import scipy.linalg
import torch

from rankwise.errors import ConfigError
from rankwise.linalg.hadamard import HadamardRotation, fwht, rotation_layout, rotation_signs_size
from rankwise.linalg.quant import rtn

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: threads only add contention


@pytest.mark.parametrize("p", [1, 2, 8, 64])
def test_fwht_is_the_sylvester_hadamard_product(p):
    X = torch.randn(3, 5, p, dtype=torch.float64, generator=torch.Generator().manual_seed(p))
    H = torch.tensor(scipy.linalg.hadamard(p), dtype=torch.float64)
    torch.testing.assert_close(fwht(X), X @ H, rtol=0, atol=1e-12)


def test_fwht_refuses_non_powers_of_two():
    with pytest.raises(ConfigError, match="power-of-two"):
        fwht(torch.zeros(3, 6))


@pytest.mark.parametrize("n,kind", [(2, "auto"), (16, "auto"), (16, "two-block"), (3, "auto"), (12, "auto"),
                                    (576, "auto"), (1536, "auto")])
def test_rotation_is_orthogonal_and_inverted_by_unrotate(n, kind):
    rot = HadamardRotation.make(n, seed=5, kind=kind)
    Q = rot.matrix()
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(Q @ Q.T, eye, rtol=0, atol=1e-12)
    V = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rot.rotate(V), V @ Q, rtol=0, atol=1e-12)
    torch.testing.assert_close(rot.unrotate(V), V @ Q.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(rot.unrotate(rot.rotate(V)), V, rtol=0, atol=1e-12)


def test_two_block_layout_covers_all_coordinates_with_overlapping_windows():
    assert rotation_layout(576) == ("two-block", 512, [0, 64])
    assert rotation_layout(1536) == ("two-block", 1024, [0, 512])
    assert rotation_layout(1024) == ("single", 1024, [0])
    assert rotation_layout(1024, "two-block") == ("two-block", 1024, [0, 0])  # the paper's H D2 H D1
    assert rotation_signs_size(576) == 1024


def test_rotation_spreads_every_coordinate():
    """A spike on one input coordinate (a row of Q) is spread: over all n coordinates with weight
    1/sqrt(n) by a single block; over at least p coordinates, none keeping more than 0.2 of it, by
    the two-block rotation at SmolLM2's sizes (measured maxima 0.18 for 576, 0.07 for 1536)."""
    Q = HadamardRotation.make(16, seed=1).matrix()
    torch.testing.assert_close(Q.abs(), torch.full((16, 16), 0.25, dtype=torch.float64), rtol=0, atol=1e-12)
    for n, p in ((576, 512), (1536, 1024)):
        Q = HadamardRotation.make(n, seed=0).matrix()
        assert int((Q.abs() > 1e-12).sum(1).min()) >= p
        assert float(Q.abs().max()) < 0.2


def test_seeded_and_distinct_per_seed():
    a, b, c = (HadamardRotation.make(40, seed=s).signs for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.int8 and set(a.tolist()) <= {-1, 1}


def test_rotate_covariance_is_qt_c_q():
    X = torch.randn(20, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    C = X @ X.T
    rot = HadamardRotation.make(20, seed=9)
    Q = rot.matrix()
    torch.testing.assert_close(rot.rotate_covariance(C), Q.T @ C @ Q, rtol=1e-12, atol=1e-9)


def test_layer_function_is_unchanged_before_quantization():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(7, 24, dtype=torch.float64, generator=g)
    x = torch.randn(10, 24, dtype=torch.float64, generator=g)
    rot = HadamardRotation.make(24, seed=11)
    # y = W x = (W Q)(Q^T x): rows of W and inputs x both go through v -> v Q
    torch.testing.assert_close(rot.rotate(x) @ rot.rotate(W).T, x @ W.T, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("n", [64, 96])
def test_rotation_lowers_the_quantization_error_with_outlier_columns(n):
    wins = 0
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(32, n, dtype=torch.float64, generator=g)
        W[:, torch.randperm(n, generator=g)[:3]] *= 25.0  # outlier input channels
        rot = HadamardRotation.make(n, seed=seed)
        # on the float-minimum grid (the integer zero point alone already represents small weights beside
        # outliers better, which makes the margin smaller)
        plain = float((W - rtn(W, 3, 32, zero_point="float").dense(torch.float64)).norm())
        rotated = float((W - rot.unrotate(rtn(rot.rotate(W), 3, 32, zero_point="float").dense(torch.float64))).norm())
        wins += rotated < 0.7 * plain
    assert wins == 5


def test_bad_shapes_say_which_layer_and_what_to_do():
    with pytest.raises(ConfigError, match=r"\(8 x 1\) layer.*turn rotation off"):
        rotation_layout(1, where="the (8 x 1) layer")
    with pytest.raises(ConfigError, match="two-block"):
        HadamardRotation.make(12, kind="single")
    with pytest.raises(ConfigError, match="unknown rotation kind"):
        HadamardRotation.make(12, kind="dense")
    with pytest.raises(ConfigError, match="needs 16 signs"):
        HadamardRotation.from_signs(12, torch.ones(8, dtype=torch.int8))
