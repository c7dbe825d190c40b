"""Runtime forms (packed int4/int8 kernels, de-quantize-once caches, sparse merged to dense) against
de-quantize-then-matmul references: exact grid mapping, every path, the fallbacks, cache
invalidation, unchanged storage, autograd."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from safetensors.torch import load, save

from rankwise.linalg.hadamard import HadamardRotation
from rankwise.linalg.kernel_grids import dequantize_packed, int4_group_size, int4_operands, int8_operands
from rankwise.linalg.lowrank_quant import LowRankQuant
from rankwise.linalg.quant import QuantGrid, QuantizedMatrix, dequantize, pack_codes, rtn, unpack_codes
from rankwise.models.runtime import prepare_inference, runtime_summary, runtime_table
from rankwise.structures import kernels
from rankwise.structures.base import build_layer
from rankwise.structures.lowrank_quant import LowRankQuantLinear
from rankwise.structures.quant import QuantLinear
from rankwise.structures.sparse import LowRankSparseLinear, SparseLinear

pytestmark = pytest.mark.usefixtures("one_thread")

needs_int4 = pytest.mark.skipif(not kernels.int4_cpu_available(), reason="torch < 2.6: no CPU int4 kernel")
needs_int8 = pytest.mark.skipif(not kernels.int8_available(), reason="no int8 kernel in this torch")


def quant_layer(out: int, n: int, bits: int, g: int, symmetric: bool = False, bias: bool = True, seed: int = 0,
                rotate: bool = False) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=gen) * 0.05
    b = torch.randn(out, generator=gen) if bias else None
    rot = HadamardRotation.make(n, seed=seed + 1) if rotate else None
    Wr = W if rot is None else rot.rotate(W.double()).float()
    return QuantLinear.from_quantized(rtn(Wr, bits, g, symmetric), b, rot, seed=seed + 1)


def reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """De-quantize, then one float64 product: the reference every path is held to."""
    y = x.detach().double() @ layer.dense().detach().double().T
    return y if layer.bias is None else y + layer.bias.detach().double()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.detach().double() - ref).norm() / ref.norm())


# ---- the grid mapping (pure math) ------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n,g,symmetric", [(576, 128, False), (576, 64, True), (96, 32, False), (512, 512, True),
                                           (320, 100000, False)])
def test_int4_operands_reproduce_the_grid_exactly(bits, n, g, symmetric):
    qm = rtn(torch.randn(8, n, generator=torch.Generator().manual_seed(bits)), bits, g, symmetric)
    q, scale, zero, kg = int4_operands(qm.codes, qm.grid)
    assert kg == int4_group_size(n, g) and kg in (32, 64, 128, 256)
    assert q.dtype == torch.int32 and 0 <= int(q.min()) and int(q.max()) <= 15
    Wk = ((q.double() - 8).view(8, -1, kg) * scale.double()[..., None] + zero.double()[..., None]).view(8, n)
    assert torch.equal(Wk, dequantize(qm.codes, qm.grid, torch.float64))  # exact, not close


def test_int4_group_size_covers_ragged_groups_and_refuses_what_no_kernel_size_divides():
    assert int4_group_size(576, 128) == 64        # groups 128 x 4 + 64: kernel groups of 64
    assert int4_group_size(576, 576) == 64        # one group per row
    assert int4_group_size(1536, 128) == 128 and int4_group_size(4096, 1024) == 256
    assert int4_group_size(576, 48) is None and int4_group_size(100, 32) is None and int4_group_size(576, 16) is None


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_operands_reproduce_the_grid_exactly(symmetric):
    qm = rtn(torch.randn(6, 40, generator=torch.Generator().manual_seed(1)), 8, 64, symmetric)
    w, s, z = int8_operands(qm.codes, qm.grid)
    Wk = s.double()[:, None] * w.double() + (0 if z is None else z.double()[:, None])
    assert w.dtype == torch.int8 and (z is None) == symmetric
    assert torch.equal(Wk, dequantize(qm.codes, qm.grid, torch.float64))


@pytest.mark.parametrize("bits", range(2, 9))
def test_dequantize_packed_is_bit_exact(bits):
    for n, g, sym in [(576, 128, False), (100, 48, True), (37, 16, False)]:
        qm = rtn(torch.randn(5, n, generator=torch.Generator().manual_seed(n)), bits, g, sym)
        ref = dequantize(qm.codes, qm.grid, torch.float32)
        packed = pack_codes(qm.codes, bits)
        assert torch.equal(dequantize_packed(packed, qm.grid), ref)
        assert torch.equal(dequantize_packed(packed, qm.grid, torch.bfloat16), ref.bfloat16())


@needs_int4
@pytest.mark.parametrize("bits,symmetric", [(4, False), (3, True), (2, False)])
def test_int4_kernel_in_float32_matches_the_reference_to_rounding(bits, symmetric):
    """torch's float32 version of the kernel (its exact reference loop) on our operands: the mapping,
    packing and row padding (20 rows -> 32) are right to float32 rounding."""
    layer = quant_layer(20, 192, bits, 64, symmetric, bias=False)
    codes = unpack_codes(layer.codes, bits, 192)
    form = kernels.int4_cpu(codes, layer.grid(), layer.quantized_weight, dtype=torch.float32)
    x = torch.randn(3, 192)
    assert rel_err(form.matmul(x), reference(layer, x)) < 1e-6


# ---- every path on the real shapes -----------------------------------------------------------

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def random_quant_layer(out: int, n: int, bits: int, g: int, seed: int = 0) -> QuantLinear:
    """A layer with random codes, scales and minimums (paths and errors do not depend on fitted values)."""
    gen = torch.Generator().manual_seed(seed)
    G = -(-n // g)
    grid = QuantGrid(bits, g, n, (torch.rand(out, G, generator=gen) * 0.01 + 1e-3).half(),
                     (torch.rand(out, G, generator=gen) * -0.05).half())
    codes = torch.randint(0, 2 ** bits, (out, n), generator=gen, dtype=torch.uint8)
    return QuantLinear.from_quantized(QuantizedMatrix(codes, grid), torch.randn(out, generator=gen))


@pytest.fixture(scope="module")
def real_layers():
    """4-bit asymmetric layers of SmolLM2's shapes with g = 32 / 64 / 128 (built once)."""
    return {(out, n, g): random_quant_layer(out, n, 4, g, seed=out + n + g) for out, n in SHAPES for g in (32, 64, 128)}


@needs_int4
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_path_on_the_real_shapes_matches_the_reference(real_layers, dtype):
    gen = torch.Generator().manual_seed(0)
    for (out, n, g), layer in real_layers.items():
        assert layer.kernel_path()[0] == "int4-cpu", (out, n, g)
        x = torch.randn(2, 1, n, generator=gen).to(dtype)
        with torch.no_grad():
            y = layer(x)
        assert y.dtype == dtype and y.shape == (2, 1, out)
        # the kernel runs in bfloat16 (its fast dtype) with float32 accumulation: bfloat16 rounding
        assert rel_err(y, reference(layer, x)) < 1e-2, (out, n, g)
        layer.release()


@needs_int4
def test_long_inputs_take_the_transient_path_and_exact_gives_the_reference(real_layers, monkeypatch):
    layer = real_layers[(192, 576, 128)]
    x = torch.randn(kernels.LONG_ROWS + 3, 576)
    with torch.no_grad():
        form = layer.runtime(torch.float32)
        monkeypatch.setattr(form, "matmul_fn", None)  # the kernel itself must not run for long inputs
        y = layer(x)
        with kernels.exact():
            y_exact = layer(x[:1])
        assert not kernels.exact_mode()
    assert y.dtype == torch.float32 and rel_err(y, reference(layer, x)) < 1e-2
    torch.testing.assert_close(y_exact.double(), reference(layer, x[:1]), rtol=1e-5, atol=1e-5)


@needs_int8
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_per_channel_path(symmetric, dtype):
    layer = quant_layer(192, 576, 8, 576, symmetric, seed=3)
    assert layer.kernel_path()[0] == "int8-cpu"
    x = torch.randn(4, 576).to(dtype)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype and rel_err(y, reference(layer, x)) < 1e-2


@pytest.mark.parametrize("bits,g,rotate,why", [
    (4, 48, False, "no int4 kernel group size"), (3, 100, False, "no int4 kernel group size"),
    (5, 64, False, "no kernel for 5-bit"), (7, 32, False, "no kernel for 7-bit"),
    (8, 64, False, "int8 kernel takes one scale per row"), (4, 64, True, "rotated input")])
def test_fallbacks_cache_the_dequantized_matrix_once(bits, g, rotate, why):
    layer = quant_layer(48, 192, bits, g, rotate=rotate)
    path, note = layer.kernel_path()
    assert path == "dense-cache" and why in note
    x = torch.randn(2, 192)
    with torch.no_grad():
        y = layer(x)
        form = layer.runtime(torch.float32)
        assert layer(x) is not None and layer.runtime(torch.float32) is form  # built once, reused
    assert form.nbytes == 48 * 192 * 4 and layer.prepare()["runtime_bytes"] == 48 * 192 * 4
    torch.testing.assert_close(y.double(), reference(layer, x), rtol=1e-5, atol=1e-6)


@needs_int4
def test_torch_without_the_int4_kernel_falls_back_to_the_cache(monkeypatch):
    layer = quant_layer(32, 64, 4, 32)
    monkeypatch.setattr("rankwise.structures.quant.int4_cpu_available", lambda: False)
    path, note = layer.kernel_path()
    assert path == "dense-cache" and "torch >= 2.6" in note
    x = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), reference(layer, x), rtol=1e-5, atol=1e-6)


@needs_int4
@pytest.mark.parametrize("rotate", [False, True])
def test_lowrank_quant_runs_the_kernel_plus_two_skinny_products(rotate):
    gen = torch.Generator().manual_seed(5)
    qm = rtn(torch.randn(64, 128, generator=gen) * 0.05, 4, 32)
    res = LowRankQuant(qm, (torch.randn(64, 4, generator=gen) * 0.01).half(),
                       (torch.randn(4, 128, generator=gen) * 0.01).half(), {})
    rot = HadamardRotation.make(128, seed=1) if rotate else None
    layer = LowRankQuantLinear.from_lowrank_quant(res, torch.randn(64, generator=gen), rot, seed=1)
    info = layer.prepare()
    assert info["path"] == ("dense-cache" if rotate else "int4-cpu")
    x = torch.randn(3, 128)
    with torch.no_grad():
        y = layer(x)
    assert rel_err(y, reference(layer, x)) < (1e-5 if rotate else 1e-2)


# ---- the cache follows the stored tensors ----------------------------------------------------


@needs_int4
def test_the_runtime_form_rebuilds_when_stored_tensors_change():
    layer = quant_layer(32, 64, 4, 32)
    other = quant_layer(32, 64, 4, 32, seed=7)
    x = torch.randn(1, 64)
    with torch.no_grad():
        layer(x)
        form = layer.runtime(torch.float32)
        layer.scales.mul_(2)  # in place
        assert layer.runtime(torch.float32) is not form
        assert rel_err(layer(x), reference(layer, x)) < 1e-2
        layer.load_state_dict(other.state_dict())  # copies into the buffers
        assert rel_err(layer(x), reference(other, x)) < 1e-2
        layer.codes = other.codes.clone()  # a replaced buffer
        layer.mins = torch.zeros_like(layer.mins)
        assert rel_err(layer(x), reference(layer, x)) < 1e-2
        layer.to(torch.bfloat16)  # a cast drops the form; the storage keeps its dtypes
        assert "_runtime" not in layer.__dict__ and layer.scales.dtype == torch.float16
        assert rel_err(layer(x.bfloat16()), reference(layer, x.bfloat16())) < 1e-2


@needs_int4
def test_storage_and_saved_bytes_are_unchanged_by_the_runtime_form():
    layer = quant_layer(32, 64, 4, 32)
    before = save(layer.state_dict())
    nbytes = layer.nbytes()
    layer.prepare()
    with torch.no_grad():
        layer(torch.randn(1, 64))
    assert layer.prepare()["runtime_bytes"] > 0
    assert save(layer.state_dict()) == before and layer.nbytes() == nbytes
    assert set(layer.state_dict()) == {"codes", "scales", "mins", "bias"}
    # copies and pickles never carry the form (it holds closures)
    twin = pickle.loads(pickle.dumps(layer))
    assert "_runtime" not in twin.__dict__ and "_runtime" not in copy.deepcopy(layer).__dict__
    fresh = build_layer(layer.describe(), device="cpu")
    fresh.load_state_dict(load(before))
    x = torch.randn(1, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


# ---- autograd ----------------------------------------------------------------------------------


@needs_int4
def test_gradients_reach_the_scales_and_minimums_through_the_reference_path():
    layer = quant_layer(32, 64, 4, 32)
    x = torch.randn(3, 64)
    layer.scales.requires_grad_(True)
    layer.mins.requires_grad_(True)
    y = layer(x)
    y.square().sum().backward()
    # closed form: dL/dW = 2 y^T x, dW/dscale = code, dW/dmin = 1, summed over each group
    gW = 2 * (x @ layer.quantized_weight().detach().T + layer.bias.detach()).T @ x
    codes = unpack_codes(layer.codes, 4, 64).float()
    torch.testing.assert_close(layer.scales.grad.float(), (gW * codes).view(32, 2, 32).sum(-1), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer.mins.grad.float(), gW.view(32, 2, 32).sum(-1), rtol=2e-2, atol=2e-2)


@needs_int4
def test_gradients_reach_the_input_through_the_kernel():
    layer = quant_layer(32, 64, 4, 32)
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    assert layer.runtime(torch.float32).path == "int4-cpu"
    torch.testing.assert_close(x.grad, layer.dense().sum(0).expand(2, 64), rtol=1e-5, atol=1e-5)


# ---- sparse layers and the model report --------------------------------------------------------


def test_sparse_layers_are_merged_to_dense_on_cpu_and_follow_their_values():
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(24, 32, generator=gen)
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask.view(24, 8, 4)[..., :2] = True
    sp = SparseLinear.from_dense(W, mask, "2:4", bias=torch.randn(24, generator=gen))
    lrs = LowRankSparseLinear.from_parts(torch.randn(24, 3, generator=gen), torch.randn(3, 32, generator=gen), W,
                                         mask, "2:4")
    x = torch.randn(2, 32)
    for layer in (sp, lrs):
        with torch.no_grad():
            ref = layer.native_matmul(x) if layer is lrs else layer.sparse_matmul(x)
            ref = ref if layer.bias is None else ref + layer.bias
            assert layer.prepare()["path"] == "merged-dense"
            torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        sp.values.mul_(-1)
        torch.testing.assert_close(sp(x), sp.sparse_matmul(x) + sp.bias, rtol=1e-5, atol=1e-5)


@needs_int4
def test_prepare_inference_reports_every_layer(tiny_llama):
    from rankwise.models.surgery import find_linears, linear_bias, linear_weight, set_module

    specs = iter([(4, 32), (5, 32), (8, 64), (3, 64)] * 4)
    for name, lin in find_linears(tiny_llama).items():
        bits, g = next(specs)
        W = linear_weight(lin)
        set_module(tiny_llama, name, QuantLinear.from_quantized(rtn(W, bits, min(g, W.shape[1]), bits == 8),
                                                                linear_bias(lin)))
    rows = prepare_inference(tiny_llama)
    summary = runtime_summary(rows)
    assert summary["layers"] == 15 and summary["paths"]["dense"] == 1  # the LM head
    assert {"int4-cpu", "dense-cache"} <= set(summary["paths"])
    assert summary["stored_bytes"] == sum(r.stored_bytes for r in rows) and summary["runtime_bytes"] > 0
    assert all(r.runtime_bytes == (0 if r.path == "dense" else r.runtime_bytes) for r in rows)
    table = runtime_table(rows)
    assert "int4-cpu" in table and "no kernel for 5-bit codes" in table and table.splitlines()[-1].startswith("total")
    ids = torch.randint(0, 320, (1, 6))
    with torch.no_grad():
        out = tiny_llama.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    assert "model.layers.0.self_attn.q_proj" in runtime_table(rows, per_layer=True)
    import rankwise

    assert rankwise.prepare_inference(tiny_llama) == rows  # the API verb; forms already built are kept


def test_lowrank_calls_its_products_directly_unless_a_sub_module_is_hooked():
    from rankwise.structures.lowrank import LowRankLinear

    layer = LowRankLinear(16, 8, 3)
    x = torch.randn(2, 16)
    with torch.no_grad():
        ref = x @ layer.dense().T + layer.bias
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)
        seen = []
        handle = layer.A.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)
        handle.remove()
    assert seen == [torch.Size([2, 3])]  # the hook ran: the sub-modules were called


@needs_int4
def test_scales_turned_into_parameters_still_run_and_train():
    """A healing step may hold the grid as parameters: the fast path runs without grad, the reference with it."""
    layer = quant_layer(32, 64, 4, 32)
    scales = layer.scales
    del layer._buffers["scales"]
    layer.scales = torch.nn.Parameter(scales.float().half(), requires_grad=True)
    x = torch.randn(1, 64)
    with torch.no_grad():
        assert rel_err(layer(x), reference(layer, x)) < 1e-2
    layer(x).sum().backward()
    assert layer.scales.grad is not None and layer.scales.grad.shape == (32, 2)
