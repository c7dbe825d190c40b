"""parallel_map: order, one BLAS thread per worker, thread settings restored; spectra cap NumPy's BLAS at torch's count."""
import threading

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from rankwise.analysis.parallel import parallel_map
from rankwise.errors import ConfigError
from rankwise.linalg import spectrum


def _blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def test_results_in_order_and_each_worker_single_threaded():
    before_torch, before_blas = torch.get_num_threads(), _blas_threads()
    seen = []

    def job(i):
        seen.append((threading.get_ident(), torch.get_num_threads(), tuple(_blas_threads())))
        w = torch.randn(30, 20, generator=torch.Generator().manual_seed(i))
        return i, spectrum.singular_values(w)

    ticks = []
    out = parallel_map(job, range(12), workers=3, progress=ticks.append)
    assert [i for i, _ in out] == list(range(12)) and sum(ticks) == 12
    for i, s in out:
        w = torch.randn(30, 20, generator=torch.Generator().manual_seed(i))
        np.testing.assert_allclose(s.numpy(), np.linalg.svd(w.double().numpy(), compute_uv=False), rtol=1e-10)
    assert {t for _, t, _ in seen} == {1} and {b for _, _, b in seen} == {tuple(1 for _ in before_blas)}
    assert len({tid for tid, _, _ in seen}) > 1                    # really ran on several threads
    assert torch.get_num_threads() == before_torch and _blas_threads() == before_blas


def test_one_worker_runs_inline_and_errors_propagate_with_threads_restored():
    before = torch.get_num_threads()
    assert parallel_map(lambda x: threading.get_ident(), [1, 2], workers=1) == [threading.get_ident()] * 2

    def boom(x):
        raise ValueError("bad layer")

    with pytest.raises(ValueError, match="bad layer"):
        parallel_map(boom, range(4), workers=2)
    assert torch.get_num_threads() == before
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="workers must be a positive integer"):
            parallel_map(abs, [1], workers=bad)


def test_numpy_route_uses_torchs_thread_count(monkeypatch):
    """A 2-D CPU spectrum runs NumPy's LAPACK with at most torch.get_num_threads() threads."""
    seen = []
    real = np.linalg.eigvalsh

    def spy(g):
        seen.append(max(_blas_threads()))
        return real(g)

    monkeypatch.setattr(spectrum.np.linalg, "eigvalsh", spy)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spectrum.singular_values(torch.ones(5, 7))
    finally:
        torch.set_num_threads(n)
    assert seen == [1]
