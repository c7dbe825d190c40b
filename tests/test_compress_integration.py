"""One end-to-end run on the real bundled model (few windows): finite, sane perplexity."""
from __future__ import annotations

import math

import pytest

from rankwise.compression.compress import compress
from rankwise.evaluation.perplexity import perplexity
from rankwise.models.loading import load_model
from rankwise.structures.lowrank import LowRankLinear


#: Stored reference (torch 2.13.0 CPU, transformers 5.23.0, this test's exact settings), measured with 1 and
#: with 2 threads: dense 26.477537 both; compressed 836.5457 / 836.4412 (1.2e-4 relative apart). The dense
#: value is a fixed model on fixed windows (float32 logits, float64 sums): 1e-4 covers any BLAS. The
#: compressed one goes through whitening of rank-deficient covariances, which amplifies rounding: 1%
#: is ~80x the thread-count effect yet far below what a changed method, ratio, refit or calibration
#: does (plain SVD: ~1e7). A deliberate change to the compression numerics must update these numbers
#: (the float32 products summed in float64 of the engine-speed change moved it from 816.13, 2.5 %).
REFERENCE = {"dense": 26.477537, "compressed": 836.49}


@pytest.mark.integration
def test_real_model_compresses_to_sane_perplexity(real_test_ids, real_calib_ids):
    model, tok, _ = load_model("smollm2-135m-instruct")  # a private copy: the session fixture stays dense
    dense = perplexity(model, ids=real_test_ids, seqlen=256, windows=4).ppl
    # block granularity without refit (the stored reference's settings; the default sub-groups + refit is
    # ~2.4x slower and is measured on the full protocol in BENCHMARKS.md, issue 11)
    model, rep = compress(model, ratio=0.2, calib=real_calib_ids, calib_options=dict(windows=4, seqlen=128),
                          engine=dict(granularity="block", refit=False), progress=False)
    assert len(rep.layers) == 30 * 7 and all(lr.rank for lr in rep.layers)
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 210
    assert 0.2 <= rep.achieved_ratio < 0.21
    comp = perplexity(model, ids=real_test_ids, seqlen=256, windows=4).ppl
    assert math.isfinite(comp)
    # 20% removed keeps only ~40% of each layer's rank, and 4 x 128 calibration tokens leave the
    # 1536-dim covariances rank-deficient, hence the large jump. Plain SVD gives ~1e7 (BENCHMARKS.md).
    assert dense == pytest.approx(REFERENCE["dense"], rel=1e-4), dense
    assert comp == pytest.approx(REFERENCE["compressed"], rel=1e-2), comp
