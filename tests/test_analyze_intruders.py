"""Intruder dimensions on a synthetic fine-tune with planted directions; update statistics."""
import numpy as np
import pytest
import torch

from rankwise.analysis.intruders import intruder_dimensions, update_stats

pytestmark = pytest.mark.usefixtures("one_thread")



def _base(out=96, inp=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, out, generator=g, dtype=torch.float64))
    s = 10.0 * torch.arange(1, out + 1, dtype=torch.float64) ** -0.7
    return u @ torch.diag(s) @ v.T, g


def test_planted_intruders_are_found():
    w0, g = _base()
    planted = 3
    a = torch.randn(96, planted, generator=g, dtype=torch.float64)
    b = torch.randn(planted, 160, generator=g, dtype=torch.float64)
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b.T)
    w1 = w0 + qa @ torch.diag(torch.tensor([30.0, 25.0, 20.0], dtype=torch.float64)) @ qb.T  # big new directions
    r = intruder_dimensions(w0, w1)
    assert r.count == planted and r.indices == [0, 1, 2]
    assert len(r.max_cos) == 10 and all(c < 0.5 for c in r.max_cos[:3]) and all(c > 0.5 for c in r.max_cos[3:])
    # a small dense update (full fine-tuning-like) keeps the singular vectors: no intruders
    w2 = w0 + 1e-3 * torch.randn(96, 160, generator=g, dtype=torch.float64)
    assert intruder_dimensions(w0, w2).count == 0
    assert intruder_dimensions(w0, w1, k=2).count == 2
    assert intruder_dimensions(w0, w1, eps=1e-6).count == 0


def test_update_stats_against_numpy():
    w0, g = _base()
    lora = torch.randn(96, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 160, generator=g, dtype=torch.float64)
    st = update_stats(w0, w0 + lora)
    assert st["relative_change"] == pytest.approx(np.linalg.norm(lora.numpy()) / np.linalg.norm(w0.numpy()))
    s = np.linalg.svd(lora.numpy(), compute_uv=False)
    assert st["delta_stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-8)
    assert st["delta_effective_rank"] <= 4.0 + 1e-6
