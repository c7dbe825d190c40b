"""Singular-value spectra without singular vectors, and the scalar summaries built on them.

For ``W`` of shape (m, n) with ``p = min(m, n)``, the Gram matrix of the smaller side,
``G = W W^T`` (m <= n) or ``G = W^T W`` (m > n), is (p, p) symmetric PSD and

    sigma_i(W)^2 = lambda_i(G),   i = 1..p.

Cost: ``m n p`` multiply-adds for ``G`` (a symmetric rank-k update, half a general product) plus
``~(4/3) p^3`` flops to tridiagonalize ``G`` and ``O(p^2)`` for the tridiagonal eigenvalues, against
``~4 m n p`` for the bidiagonalization of a full SVD.

Error (``eps`` the unit roundoff of the working ``dtype``): the product is backward stable and the
symmetric eigensolver is backward stable, so every eigenvalue is exact to ``|d lambda_i| <= c p eps
sigma_max^2`` in absolute terms (Weyl). In float64 (default) singular values above ``~1e-7
sigma_max`` keep float32-or-better relative accuracy. In float32 (``eps = 6e-8``) only eigenvalues
above ``~1e-4 lambda_max`` keep 3+ digits; FARMS, whose fit reads the upper half of 100 x 100 window
spectra, uses it (see ``analysis.farms``). Eigenvalues that rounding makes negative are clamped at 0.

Backend, chosen per operation (measured single-threaded on the reference 2-core AMD EPYC box):
one CPU matrix goes through NumPy's BLAS/LAPACK (``a @ a.T`` is dispatched to ``syrk``, then
``syevd``: 5.7 s for SmolLM2's 210 layers against 9.6 s for torch's ``matmul`` + ``eigvalsh``);
stacks of matrices (..., m, n) and non-CPU tensors go through torch (batched ``eigvalsh``: 42 ms for
100 FARMS windows in float32 against 58 ms for NumPy). Both routes use ``torch.get_num_threads()``
threads: NumPy's BLAS is capped at torch's count for the call, so ``torch.set_num_threads`` /
``OMP_NUM_THREADS`` govern both (``analysis.parallel`` runs many problems at once, one thread each).
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from ..errors import ConfigError, NumericalError

_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_numpy_blas = None


def _numpy_blas_threads_like_torch() -> contextlib.AbstractContextManager:
    """Cap NumPy's BLAS/LAPACK threads at ``torch.get_num_threads()`` for one call (no-op when already)."""
    global _numpy_blas
    if _numpy_blas is None:
        from threadpoolctl import ThreadpoolController

        _numpy_blas = ThreadpoolController().select(user_api="blas")
    n = torch.get_num_threads()
    if all(lib.num_threads <= n for lib in _numpy_blas.lib_controllers):
        return contextlib.nullcontext()
    return _numpy_blas.limit(limits=n)


def gram_eigenvalues(w: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Eigenvalues ``sigma_i(W)^2`` of the smaller Gram of ``w`` (..., m, n), ascending, clamped at 0.

    Computed in ``dtype`` (float64 or float32; see the module docstring for the error), returned as
    float64 on ``w``'s device.
    """
    if w.ndim < 2:
        raise NumericalError(f"singular values need a matrix, got shape {tuple(w.shape)}")
    if dtype not in _DTYPES:
        raise ConfigError(f"spectrum dtype must be torch.float32 or torch.float64, got {dtype}")
    if not bool(torch.isfinite(w).all()):
        raise NumericalError("matrix has non-finite entries (nan/inf); its spectrum is undefined: "
                             "fix or skip the layer (reload the weights in float32)")
    w = w.detach()
    if w.ndim == 2 and w.device.type == "cpu":
        a = w.to(dtype).numpy()
        with _numpy_blas_threads_like_torch():
            g = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a    # same buffer -> BLAS syrk
            ev = torch.from_numpy(np.linalg.eigvalsh(g).astype(np.float64, copy=False))
    else:
        a = w.to(dtype)
        g = a @ a.mT if a.shape[-2] <= a.shape[-1] else a.mT @ a
        ev = torch.linalg.eigvalsh(g).to(torch.float64)
    return ev.clamp_min(0)


def singular_values(w: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values of ``w`` (..., m, n), descending, float64: ``sqrt(gram_eigenvalues(w, dtype))``."""
    return gram_eigenvalues(w, dtype).sqrt().flip(-1)


def energy_curve(s: torch.Tensor) -> torch.Tensor:
    """``E(k) = sum_{i<=k} sigma_i^2 / sum_i sigma_i^2`` for k = 1..p (s descending)."""
    e = s.to(torch.float64) ** 2
    tot = e.sum()
    if tot <= 0:
        return torch.ones_like(e)
    return e.cumsum(0) / tot


def rank_for_energy(s: torch.Tensor, frac: float) -> int:
    """Smallest k with ``E(k) >= frac``: the rank whose truncation keeps ``frac`` of ``||W||_F^2``."""
    if not 0 < frac <= 1:
        raise ValueError(f"energy fraction must be in (0, 1], got {frac}")
    c = energy_curve(s)
    k = int(torch.searchsorted(c, torch.tensor(frac - 1e-12, dtype=c.dtype)).item()) + 1
    return min(k, int(s.numel()))


def stable_rank(s: torch.Tensor) -> float:
    """Stable rank ``||W||_F^2 / ||W||_2^2 = sum sigma_i^2 / sigma_1^2`` (0 for W = 0)."""
    top = float(s.max()) if s.numel() else 0.0
    return float((s.to(torch.float64) ** 2).sum() / top**2) if top > 0 else 0.0


def effective_rank(s: torch.Tensor) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): ``exp(-sum p_i log p_i)``, ``p_i = sigma_i / sum sigma``.

    Equals r for r equal nonzero singular values; 0 for W = 0.
    """
    s = s.to(torch.float64)
    tot = s.sum()
    if tot <= 0:
        return 0.0
    p = s[s > 0] / tot
    return float(torch.exp(-(p * p.log()).sum()))


def condition_number(s: torch.Tensor) -> float:
    """``sigma_max / sigma_min`` over all p singular values (inf when sigma_min = 0)."""
    lo, hi = float(s.min()), float(s.max())
    return hi / lo if lo > 0 else math.inf
