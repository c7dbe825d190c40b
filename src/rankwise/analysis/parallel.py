"""Run many small, independent decompositions in parallel, one BLAS/LAPACK thread each.

A layer's eigenvalue problem is small (p <= a few thousand): LAPACK's tridiagonalization is half
BLAS-2 and threads inside it synchronize after every column, so on a busy machine a
multi-threaded ``eigvalsh`` waits on its own threads (measured on the reference 2-core box, load ~8:
a batch of 100 FARMS windows took 394 ms with 2 torch threads against 55 ms with 1; one 576 x 576
problem 107-264 ms with 2 NumPy threads against 30 ms with 1). Layers are independent, so instead
each worker thread runs whole layers single-threaded and ``workers`` layers run at once: no thread
ever waits on another, and the cores are used as many as the caller allows.

``workers`` defaults to ``torch.get_num_threads()`` (the cores, or ``OMP_NUM_THREADS`` /
``torch.set_num_threads`` when the user set them), so the analysis uses as many threads as any other
torch or NumPy call in the same process. NumPy's BLAS and torch's intra-op pool are set to one
thread for the duration and restored afterwards.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

import torch
from threadpoolctl import threadpool_limits

from ..errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """How many layers to decompose at once: ``torch.get_num_threads()``."""
    return max(1, torch.get_num_threads())


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """NumPy's BLAS and torch's intra-op pool (MKL included) on one thread, restored on exit."""
    prev = torch.get_num_threads()
    with threadpool_limits(limits=1, user_api="blas"):
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(prev)


def parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None,
                 progress: Callable[[int], None] | None = None) -> list[R]:
    """``[fn(x) for x in items]`` in order, ``workers`` items at a time, each on one BLAS thread.

    ``fn`` must release the GIL in its heavy part (torch and NumPy linear algebra do). ``progress``
    is called with 1 after each finished item, in the caller's thread.
    """
    items = list(items)
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}; pass e.g. workers=1")
    workers = min(workers, max(1, len(items)))
    out: list[R] = []
    with one_blas_thread():
        if workers == 1:
            for x in items:
                out.append(fn(x))
                if progress:
                    progress(1)
            return out
        # torch's thread count is per thread for OpenMP/MKL: set it in every worker as well.
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as ex:
            for r in ex.map(fn, items):
                out.append(r)
                if progress:
                    progress(1)
    return out
