"""Shared fixtures: tiny random models (fast) and the real bundled model (integration)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER" in os.environ:
    # pytest-xdist runs one worker per core (pyproject's addopts: -n 2): one thread each, so two workers
    # do not oversubscribe the cores (OpenMP and BLAS read these before torch and numpy load).
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import pytest
import torch

from rankwise.models.tiny import save_tiny, tiny_model, tiny_tokenizer


@pytest.fixture(params=["llama", "gpt2", "gemma3"])
def tiny_any(request):
    """Each tiny architecture in turn (Llama, GPT-2 with Conv1D, Gemma3)."""
    return tiny_model(request.param)


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture
def tiny_gpt2():
    return tiny_model("gpt2")


@pytest.fixture
def tiny_gemma3():
    return tiny_model("gemma3")


@pytest.fixture
def one_thread():
    """Batched tiny eigenproblems run far faster on one thread on a small shared box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny Llama + tokenizer directory (read-only by convention: copy before changing)."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama", "llama")


@pytest.fixture
def random_ids():
    """Deterministic random token ids for the tiny models' vocabulary (320)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 320, (4000,), generator=g)


# ---- real model (integration) -------------------------------------------------------------

@pytest.fixture
def singular_calibration():
    """``make(m) -> (W (m, 32), stats, fresh)``: calibration statistics of 20 tokens for 32 inputs (a
    singular covariance, input variances over two decades) and 4000 fresh tokens of the same
    distribution, to check that a data-aware fit generalizes beyond the calibration windows."""
    from rankwise.calibration.stats import InputStats, LayerStats

    def make(m: int, n: int = 32):
        g = torch.Generator().manual_seed(3)
        mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
        X = torch.randn(20, n, generator=g, dtype=torch.float64) @ mix.T
        fresh = torch.randn(4000, n, generator=g, dtype=torch.float64) @ mix.T
        stats = LayerStats(InputStats(X.T @ X, X.abs().sum(0), (X * X).sum(0), X.shape[0]))
        return torch.randn(m, n, generator=g), stats, fresh
    return make


@pytest.fixture(scope="session")
def real_model():
    """The bundled SmolLM2-135M-Instruct: (model, tokenizer, path). Loaded once per session."""
    from rankwise.models.loading import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def real_test_ids(real_model):
    from rankwise.calibration import load_corpus, tokenize

    return tokenize(real_model[1], load_corpus("test"))


@pytest.fixture(scope="session")
def real_calib_ids(real_model):
    from rankwise.calibration import load_corpus, tokenize

    return tokenize(real_model[1], load_corpus("calib"))
