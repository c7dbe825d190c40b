"""QuantLinear and LowRankQuantLinear: forward == dense, bit-exact save/load, real byte savings."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rankwise.errors import ConfigError
from rankwise.linalg.hadamard import HadamardRotation
from rankwise.linalg.lowrank_quant import lorc
from rankwise.linalg.quant import rtn
from rankwise.structures.base import LAYERS, build_layer
from rankwise.structures.lowrank_quant import LowRankQuantLinear
from rankwise.structures.quant import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def make_layer(kind: str, out: int = 12, n: int = 20, bits: int = 3, g: int = 8, symmetric: bool = False,
               rotate: bool = False, bias: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=gen, dtype=torch.float64)
    b = torch.randn(out, generator=gen) if bias else None
    rot = HadamardRotation.make(n, seed=seed + 1) if rotate else None
    Wr = W if rot is None else rot.rotate(W)
    if kind == "quant":
        return QuantLinear.from_quantized(rtn(Wr, bits, g, symmetric), b, rot, seed=seed + 1), W
    X = torch.randn(n, 3 * n, generator=gen, dtype=torch.float64)
    res = lorc(Wr, X @ X.T, bits, g, rank=3, symmetric=symmetric, quantizer="rtn")
    return LowRankQuantLinear.from_lowrank_quant(res, b, rot, seed=seed + 1), W


CASES = [("quant", 2, 8, False, False, True), ("quant", 3, 7, True, False, False), ("quant", 4, 20, False, True, True),
         ("quant", 8, 5, True, True, True), ("quant", 5, 64, False, False, True), ("quant", 6, 3, False, True, False),
         ("lowrank-quant", 4, 8, False, False, True), ("lowrank-quant", 3, 6, True, True, True),
         ("lowrank-quant", 7, 20, False, True, False)]


@pytest.mark.parametrize("kind,bits,g,symmetric,rotate,bias", CASES)
def test_forward_equals_dense_matmul_and_dense_is_close_to_w(kind, bits, g, symmetric, rotate, bias):
    layer, W = make_layer(kind, bits=bits, g=g, symmetric=symmetric, rotate=rotate, bias=bias)
    x = torch.randn(2, 5, 20, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = x @ layer.dense().T + (layer.bias if bias else 0)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    rel = float((layer.dense().double() - W).norm() / W.norm())
    assert rel < {2: 0.6, 3: 0.3, 4: 0.2, 5: 0.1, 6: 0.05, 7: 0.03, 8: 0.01}[bits]
    assert isinstance(layer.dense(), torch.Tensor) and layer.dense().dtype == torch.float32


@pytest.mark.parametrize("kind,bits,g,symmetric,rotate,bias", CASES)
def test_safetensors_round_trip_through_meta_is_bit_exact(tmp_path, kind, bits, g, symmetric, rotate, bias):
    layer, _ = make_layer(kind, bits=bits, g=g, symmetric=symmetric, rotate=rotate, bias=bias)
    path = tmp_path / "layer.safetensors"
    save_file(layer.state_dict(), str(path))
    empty = build_layer(layer.describe())
    assert all(t.device.type == "meta" for t in empty.state_dict().values())
    empty.load_state_dict(load_file(str(path)), strict=True, assign=True)
    for k, v in layer.state_dict().items():
        w = empty.state_dict()[k]
        assert w.dtype == v.dtype and torch.equal(w, v), k
    x = torch.randn(4, 20)
    with torch.no_grad():
        assert torch.equal(empty(x), layer(x))
    assert empty.describe() == layer.describe() and empty.nbytes() == layer.nbytes()


def test_registered_kinds():
    assert LAYERS.get("quant") is QuantLinear and LAYERS.get("lowrank-quant") is LowRankQuantLinear


def test_storage_layout_and_byte_count():
    layer, _ = make_layer("lowrank-quant", out=12, n=20, bits=3, g=8, rotate=True)
    sd = layer.state_dict()
    assert sd["codes"].dtype == torch.uint8 and sd["codes"].shape == (12, 8)  # ceil(20 * 3 / 8)
    assert sd["scales"].dtype == torch.float16 and sd["scales"].shape == (12, 3)  # groups 8, 8, 4
    assert sd["mins"].shape == (12, 3)
    assert sd["rotation_signs"].dtype == torch.int8 and sd["rotation_signs"].shape == (32,)  # two 16-blocks
    assert sd["left"].shape == (12, 3) and sd["right"].shape == (3, 20) and sd["left"].dtype == torch.float16
    expected = 12 * 8 + 2 * 12 * 3 * 2 + 32 + 2 * 3 * (12 + 20)
    assert layer.nbytes() == expected
    assert layer.nbytes(include_bias=True) == expected + 12 * 4
    assert QuantLinear.spec_nbytes(20, 12, {k: v for k, v in layer.spec().items() if k != "rank"}) \
        + LowRankQuantLinear.factor_bytes(20, 12, 3) == expected
    assert layer.num_stored() == 12 * 20 + 3 * 32


@pytest.mark.parametrize("out,n", [(576, 1536), (1536, 576)])
def test_four_bit_g128_layer_shrinks_memory_and_file_by_the_expected_factor(tmp_path, out, n):
    """(4 + 32/128) / 32 of float32: 4-bit codes, a float16 scale and minimum per 128 weights (576 inputs
    make a ragged group of 64, still within 1%)."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(out, n, generator=gen)
    layer = QuantLinear.from_quantized(rtn(W, 4, 128), None)
    dense_bytes = out * n * 4
    factor = (4 + 32 / 128) / 32
    assert layer.nbytes() / dense_bytes == pytest.approx(factor, rel=0.01)
    # resident memory: every tensor the layer holds, before and after a forward, is its storage
    x = torch.randn(3, n)
    for _ in range(2):
        held = [t for t in list(layer.state_dict().values()) + list(vars(layer).values())
                if isinstance(t, torch.Tensor)]
        assert sum(t.numel() * t.element_size() for t in held) == layer.nbytes(include_bias=True)
        assert not any(t.is_floating_point() and t.numel() >= out * n for t in held)  # no dense copy kept
        with torch.no_grad():
            layer(x)
    # the file on disk
    dense_file, quant_file = tmp_path / "dense.safetensors", tmp_path / "quant.safetensors"
    save_file(nn.Linear(n, out, bias=False).state_dict(), str(dense_file))
    save_file(layer.state_dict(), str(quant_file))
    assert os.path.getsize(quant_file) / os.path.getsize(dense_file) == pytest.approx(factor, rel=0.01)


def test_dtype_casts_keep_the_storage_and_move_only_the_bias():
    layer, _ = make_layer("lowrank-quant", rotate=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 20)
    with torch.no_grad():
        y32 = layer(x)
    layer.to(torch.bfloat16)
    sd = layer.state_dict()
    assert sd["bias"].dtype == torch.bfloat16
    for k in ("codes", "scales", "mins", "left", "right", "rotation_signs"):
        assert sd[k].dtype == before[k].dtype and torch.equal(sd[k], before[k]), k
    with torch.no_grad():
        y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)
    layer.half().float()
    assert layer.state_dict()["scales"].dtype == torch.float16 and torch.equal(layer.state_dict()["scales"],
                                                                               before["scales"])


def test_bad_configurations_raise_config_errors():
    with pytest.raises(ConfigError, match="bits"):
        QuantLinear(8, 4, bits=9)
    with pytest.raises(ConfigError, match="group size"):
        QuantLinear(8, 4, bits=4, group_size=0)
    with pytest.raises(ConfigError, match=r"\(4 x 1\) layer.*turn rotation off"):
        QuantLinear(1, 4, bits=4, rotation={"kind": "auto", "seed": 0})
    with pytest.raises(ConfigError, match="rank 5 is out of range"):
        LowRankQuantLinear(8, 4, bits=4, rank=5)
    layer, _ = make_layer("quant")
    with pytest.raises(ConfigError, match="bias"):
        QuantLinear.from_quantized(rtn(torch.randn(3, 4), 4, 4), torch.zeros(2))
    assert "bits=3" in repr(layer)
