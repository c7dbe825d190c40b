"""Perplexity against an independent hand computation; protocol errors; the real model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rankwise.errors import CorpusError
from rankwise.evaluation import perplexity


def _reference_ppl(model, windows: torch.Tensor) -> float:
    """Token-by-token log-softmax in numpy float64, one window at a time."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0].double().numpy()
            for t in range(len(w) - 1):
                row = logits[t]
                logz = row.max() + np.log(np.exp(row - row.max()).sum())
                nll += logz - row[int(w[t + 1])]
                count += 1
    return math.exp(nll / count)


def test_matches_hand_loop(tiny_any, random_ids):
    res = perplexity(tiny_any, ids=random_ids, seqlen=40, windows=5, batch_size=2)
    ref = _reference_ppl(tiny_any, random_ids[: 5 * 40].view(5, 40))
    assert res.windows == 5 and res.tokens == 5 * 39
    assert res.ppl == pytest.approx(ref, rel=1e-5)


def test_batch_size_does_not_change_result(tiny_llama, random_ids):
    a = perplexity(tiny_llama, ids=random_ids, seqlen=50, windows=6, batch_size=1)
    b = perplexity(tiny_llama, ids=random_ids, seqlen=50, windows=6, batch_size=4)
    assert a.ppl == pytest.approx(b.ppl, rel=1e-5)


def test_random_model_is_near_uniform(tiny_llama, random_ids):
    # a freshly initialized model predicts roughly uniformly over its 320 tokens
    res = perplexity(tiny_llama, ids=random_ids, seqlen=64, windows=4)
    assert 200 < res.ppl < 500


def test_text_shorter_than_one_window(tiny_llama, tiny_tok):
    with pytest.raises(CorpusError, match="fewer than one window"):
        perplexity(tiny_llama, tiny_tok, text="too short", seqlen=128)


def test_seqlen_longer_than_context(tiny_llama, random_ids):
    with pytest.raises(CorpusError, match="context of 256"):
        perplexity(tiny_llama, ids=random_ids, seqlen=512)


@pytest.mark.integration
def test_real_model_perplexity_is_sane(real_model, real_test_ids):
    model, tok, _ = real_model
    res = perplexity(model, ids=real_test_ids, seqlen=512, windows=4)
    assert res.tokens == 4 * 511
    assert 8 < res.ppl < 60, res.ppl
