"""Group quantization grids, round-to-nearest and bit packing (rankwise.linalg.quant), against numpy references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.errors import ConfigError, NumericalError
from rankwise.linalg.quant import (
    check_bits, check_group_size, fit_grid, num_groups, pack_codes, packed_row_bytes, quantize, rtn,
    unpack_codes,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: threads only add contention


def numpy_rtn(W: np.ndarray, bits: int, g: int, symmetric: bool, zero_point: str = "float") -> np.ndarray:
    """Independent reference: loop over rows and (ragged) groups, float16 grid, nearest point by search."""
    m, n = W.shape
    out = np.empty_like(W)
    maxq = 2 ** bits - 1
    for i in range(m):
        for a in range(0, n, g):
            w = W[i, a:a + g]
            if symmetric:
                s = np.float64(np.float16(2 * np.abs(w).max() / maxq))
                pts = s * (np.arange(maxq + 1) - 2 ** (bits - 1))
            elif zero_point == "float":
                s = np.float64(np.float16((w.max() - w.min()) / maxq))
                pts = s * np.arange(maxq + 1) + np.float64(np.float16(w.min()))
            else:  # an integer zero point: 0 on the grid (GPTQ reference / compressed-tensors)
                lo, hi = min(w.min(), 0.0), max(w.max(), 0.0)
                s = np.float64(np.float16((hi - lo) / maxq))
                z = np.clip(np.round(-lo / s), 0, maxq)
                pts = s * np.arange(maxq + 1) + np.float64(np.float16(-z * s))
            out[i, a:a + g] = pts[np.abs(w[:, None] - pts[None, :]).argmin(1)]
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("g", [1, 5, 7, 16, 100])
@pytest.mark.parametrize("symmetric,zero_point", [(False, "integer"), (False, "float"), (True, "integer")])
def test_rtn_matches_numpy_reference_with_ragged_groups(bits, g, symmetric, zero_point):
    rng = np.random.default_rng(bits * 100 + g)
    W = rng.standard_normal((6, 16))  # g = 5, 7 leave a ragged last group; g = 100 means one group
    q = rtn(torch.from_numpy(W), bits, g, symmetric, zero_point=zero_point)
    ref = numpy_rtn(W, bits, min(g, 16), symmetric, zero_point)
    got = q.dense(torch.float64).numpy()
    # same grid; only exact ties between two grid points could differ, and none occur here
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    assert q.grid.scales.shape == (6, -(-16 // min(g, 16)))


@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_is_at_most_half_a_step(symmetric):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 50, generator=g, dtype=torch.float64) * 3
    q = rtn(W, 3, 16, symmetric, zero_point="float")
    scale, _ = q.grid.columns()
    err = (W - q.dense(torch.float64)).abs()
    # float16 rounding of the scale moves the far end of the grid by up to maxq * 2^-11 of a step
    assert bool((err <= scale / 2 * (1 + 7 * 2.0 ** -11) + 1e-12).all())
    assert float(err.max()) > 0.3 * float(scale.max() / 2)  # the bound is not vacuous


def test_constant_and_zero_groups_are_exact():
    W = torch.tensor([[0.3, 0.3, 0.3, 0.0, 0.0, 0.0]], dtype=torch.float64)
    for sym in (False, True):
        q = rtn(W, 4, 3, symmetric=sym, zero_point="float")
        if not sym:
            assert torch.equal(q.dense(torch.float64), W.to(torch.float16).double())
        assert torch.equal(q.dense(torch.float64)[0, 3:], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("bad", [1, 9, 0, -3, 2.5, "4", None])
def test_bits_outside_2_to_8_raise_config_error(bad):
    with pytest.raises(ConfigError, match="bits"):
        check_bits(bad)


def test_group_size_rules():
    with pytest.raises(ConfigError, match="group size must be >= 1"):
        check_group_size(0, 10)
    with pytest.raises(ConfigError):
        rtn(torch.randn(2, 4), 4, -1)
    assert check_group_size(128, 40) == 40  # larger than the input size: one group
    assert num_groups(576, 128) == 5  # ragged: 4 full groups + one of 64
    W = torch.randn(3, 576, dtype=torch.float64)
    assert rtn(W, 4, 128).grid.scales.shape == (3, 5)


def test_overflowing_range_is_a_numerical_error():
    W = torch.tensor([[1e6, -1e6, 0.0, 1.0]])
    with pytest.raises(NumericalError, match="float16"):
        rtn(W, 4, 4, symmetric=True)


def test_nbytes_counts_codes_scales_and_minimums():
    W = torch.randn(10, 37)
    assert rtn(W, 3, 8).nbytes() == 10 * 14 + 10 * 5 * 2 * 2  # ceil(37 * 3 / 8) = 14 bytes a row, 5 groups
    assert rtn(W, 3, 8, symmetric=True).nbytes() == 10 * 14 + 10 * 5 * 2


def test_quantize_is_idempotent_on_its_own_grid():
    W = torch.randn(4, 20, generator=torch.Generator().manual_seed(3))
    q = rtn(W, 5, 6)
    assert torch.equal(quantize(q.dense(torch.float64), q.grid), q.codes)


# ---- packing ------------------------------------------------------------------------------------


def reference_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Independent reference: the row's bitstream as one Python integer, cut into little-endian bytes."""
    rows = []
    for row in codes:
        v = sum(int(c) << (j * bits) for j, c in enumerate(row))
        nbytes = -(-len(row) * bits // 8)
        rows.append(list(v.to_bytes(nbytes, "little")))
    return np.array(rows, dtype=np.uint8)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), m=st.integers(1, 4), n=st.integers(1, 40), seed=st.integers(0, 2 ** 16))
def test_pack_unpack_round_trip_and_layout(bits, m, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (m, n), generator=g).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (m, packed_row_bytes(n, bits))
    np.testing.assert_array_equal(packed.numpy(), reference_pack(codes.numpy(), bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_four_bit_layout_is_two_values_per_byte_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0, 7]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x0F, 0x07]]


def test_pack_rejects_out_of_range_codes_and_wrong_shapes():
    with pytest.raises(ConfigError, match="0..3"):
        pack_codes(torch.tensor([[4]]), 2)
    with pytest.raises(ConfigError, match="packed codes"):
        unpack_codes(torch.zeros(2, 3, dtype=torch.uint8), 4, 10)


# ---- the GGUF trap ------------------------------------------------------------------------------

TRAP_LAYERS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.7.mlp.down_proj.weight",
               "model.layers.20.mlp.up_proj.weight"]


def _rel(W: torch.Tensor, Wq: torch.Tensor) -> float:
    return float((W.double() - Wq.double()).norm() / W.double().norm())


@pytest.mark.integration
def test_smollm2_weights_are_q4_1_so_asymmetric_4bit_g32_rtn_reproduces_them(real_model):
    """SmolLM2 ships as a Q4_1 GGUF (blocks of 32 inputs, a float16 scale and minimum each): asymmetric
    4-bit RTN with groups of 32 lands on the very same grid. Measured relative Frobenius errors on
    these layers: exactly 0.0 at 4-bit g32, 0.099-0.115 at 4-bit g128, and 0.046-0.053 at *5*-bit g32
    (more bits look worse: the grid no longer matches); ~5e-4 at 4-bit g32 if the zero point were stored
    as a float16 code offset instead of a minimum. No benchmark may present g32 as a result."""
    sd = real_model[0].state_dict()
    for name in TRAP_LAYERS:
        W = sd[name].float()
        e32 = _rel(W, rtn(W, 4, 32, zero_point="float").dense())
        e128 = _rel(W, rtn(W, 4, 128, zero_point="float").dense())
        assert e32 < 1e-6, (name, e32)
        assert e128 > 0.05, (name, e128)
        assert _rel(W, rtn(W, 5, 32, zero_point="float").dense()) > 0.03
        # the zero-point alternative: w' = (code - z) s with z = -lo / s in float16
        m, n = W.shape
        Wg = W.double().view(m, n // 32, 32)
        lo, hi = Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True)
        s = ((hi - lo) / 15).half().double()
        z = (-lo / ((hi - lo) / 15)).half().double()
        Wz = ((Wg / s + z).round().clamp(0, 15) - z) * s
        assert 1e-4 < _rel(Wg, Wz) < 1e-3


def test_integer_zero_point_puts_zero_on_the_grid_and_stays_within_a_step():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(8, 48, generator=g, dtype=torch.float64) + 0.3
    q = rtn(W, 3, 16)
    scale, offset = q.grid.columns()
    z = -offset / scale  # the zero point: an integer up to the float16 rounding of min
    assert torch.allclose(z, z.round(), atol=2e-3) and bool(((z.round() >= 0) & (z.round() <= 7)).all())
    err = (W - q.dense(torch.float64)).abs()
    assert bool((err <= scale * (1 + 1e-3)).all())
    small = torch.zeros(1, 16, dtype=torch.float64)
    small[0, 0], small[0, 1:] = 1.0, -0.01  # a tiny weight beside a large one: stored as 0, not as -1/14
    assert float(rtn(small, 3, 16).dense(torch.float64)[0, 1]) == pytest.approx(0.0, abs=1e-3)


def test_clip_search_never_loses_to_min_max_on_its_weighted_error():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(16, 64, generator=g, dtype=torch.float64)
    W[:, 3] *= 8  # outliers make clipping worth it
    h = torch.rand(64, generator=g, dtype=torch.float64) + 0.05
    for sym in (False, True):
        errs = {}
        for clip in ("minmax", "mse"):
            Wq = rtn(W, 3, 32, sym, clip=clip, importance=h).dense(torch.float64)
            errs[clip] = float((((W - Wq) ** 2) * h).sum())
        assert errs["mse"] < 0.95 * errs["minmax"]
    with pytest.raises(ConfigError, match="clip"):
        rtn(W, 3, 32, clip="l1")
    with pytest.raises(ConfigError, match="zero_point"):
        rtn(W, 3, 32, zero_point="half")


def test_gguf_symmetric_search_is_llama_cpps_imatrix_rule_by_brute_force():
    """Each (row, group): llama.cpp's make_qx_quants with an importance matrix, written out in numpy per
    group (starts m / -(8 + 0.1 k), weighted least-squares scale for the codes, float16), against the
    vectorized search; and never worse than the plain Q4_0 scale."""
    from rankwise.linalg.quant import search_range

    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 96))
    W[0, :32] = 0.0  # a constant group
    h = rng.uniform(0.1, 5.0, 96)
    got, mins = search_range(torch.tensor(W), torch.arange(96) // 32, 3, 4, True, clip="mse",
                             importance=torch.tensor(h), grid="gguf")
    assert mins is None

    def err(w, hh, d):
        d = float(np.float16(d))
        c = np.clip(np.round(w / d), -8, 7) if d != 0 else np.zeros_like(w)
        return float((hh * (w - d * c) ** 2).sum())

    for r in range(6):
        for g in range(3):
            w, hh = W[r, 32 * g: 32 * g + 32], h[32 * g: 32 * g + 32]
            m = w[np.argmax(np.abs(w))] if np.abs(w).max() > 0 else 0.0
            if abs(w.min()) >= abs(w.max()):
                m = w.min()
            cands = [m / -8.0]
            for k in range(-9, 10):
                d0 = m / -(8 + 0.1 * k)
                if d0 == 0:
                    continue
                c = np.clip(np.round(w / d0), -8, 7)
                den = (hh * c * c).sum()
                cands.append((hh * w * c).sum() / den if den > 0 else d0)
            best = min(err(w, hh, d) for d in cands)
            assert err(w, hh, float(got[r, g])) == pytest.approx(best, rel=1e-9, abs=1e-12)
            assert err(w, hh, float(got[r, g])) <= err(w, hh, m / -8.0) + 1e-12
