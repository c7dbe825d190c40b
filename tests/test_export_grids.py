"""Grid rules of the quantizers (``grid`` = minmax | gguf, ``zero_point`` = exact): llama.cpp's reference grids and
integer zero points, checked against gguf-py's quantizers and against their own definitions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rankwise.errors import ConfigError
from rankwise.linalg.gptq import gptq, quant_objective
from rankwise.linalg.quant import column_groups, rtn


@pytest.fixture(scope="module")
def W():
    return torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * 0.05


@pytest.mark.parametrize("bits,symmetric,qtype", [(4, True, "Q4_0"), (8, True, "Q8_0"), (4, False, "Q4_1")])
def test_gguf_grid_is_llama_cpps_and_never_rounds_worse(W, bits, symmetric, qtype):
    from gguf import GGMLQuantizationType, quants

    qt = getattr(GGMLQuantizationType, qtype)
    ref = torch.from_numpy(quants.dequantize(quants.quantize(W.numpy(), qt), qt).astype(np.float32))
    ours = rtn(W, bits, 32, symmetric, grid="gguf", zero_point="float").dense()
    assert (ours == ref).float().mean() > 0.99  # the same grids: only rare midpoints round apart
    # llama.cpp rounds with 1 / (unrounded d); we round on the stored float16 grid: never farther
    assert bool(((W - ours).abs() <= (W - ref).abs() + 1e-7).all())


def test_gguf_q4_0_scale_is_the_signed_extreme_over_minus_eight(W):
    qm = rtn(W, 4, 32, True, grid="gguf")
    g = W.view(48, 8, 32)
    ext = torch.gather(g, 2, g.abs().argmax(2, keepdim=True))[..., 0]
    assert torch.equal(qm.grid.scales, (ext.double() / -8).half())
    assert bool((qm.grid.scales < 0).any()) and bool((qm.grid.scales > 0).any())  # both signs occur


def test_zero_point_grid_has_exact_integer_zero_points_and_half_step_error(W):
    qm = rtn(W, 4, 32, False, zero_point="exact")
    s, mn = qm.grid.scales.double(), qm.grid.mins.double()
    z = -mn / s
    assert bool((z == z.round()).all()) and int(z.min()) >= 0 and int(z.max()) <= 15
    step = s[:, column_groups(256, 32)]
    assert bool(((W.double() - qm.dense(torch.float64)).abs() <= step / 2 * (1 + 1e-3)).all())


def test_gptq_takes_the_grid_rule_and_stays_no_worse_than_rtn_on_it(W):
    X = torch.randn(256, 600, generator=torch.Generator().manual_seed(1)).double()
    C = X @ X.T
    for kw in ({"grid": "gguf"}, {"zero_point": "exact"}):
        q = gptq(W, C, 4, 32, symmetric="grid" in kw, clip="minmax", **kw)
        r = rtn(W, 4, 32, "grid" in kw, **kw)
        assert quant_objective(W, q.dense(torch.float64), C) <= quant_objective(W, r.dense(torch.float64), C)
    with pytest.raises(ConfigError, match="unknown grid"):
        rtn(W, 4, 32, True, grid="fancy")
