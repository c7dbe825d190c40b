"""FARMS: power-law alpha without aspect-ratio bias (Hu, Goel, Killiakov, Yang, ICML 2025).

The ESD of an (m, n) matrix depends on its aspect ratio ``Q = n/m``, which biases alpha between
layers of different shapes. FARMS instead pools the ESDs of submatrices of one fixed aspect
ratio cut from ``W`` and fits the pooled ESD:

    ESD_FARMS(W) = U_{w in windows} eig( W_w^T W_w ),   W_w = W[r0:r0+h, c0:c0+q h]

Following the authors' LLM code (``fixed_sampling``): the window has ``h = 100`` rows and
``q h = 200`` columns (``Q = 2``), ``10`` windows per dimension evenly spaced (step
``(dim - size) // 9``, last start clamped to ``dim - size``), so up to 100 windows; the pooled
ESD is fitted with the median eigenvalue as ``xmin`` (their ``fix_fingers='xmin_mid'``).
We orient the window's long side along the matrix's long side (eigenvalues of ``W`` and ``W^T``
coincide) and shrink ``h`` when the matrix is smaller than one window. ``sampling="random"``
draws the window starts uniformly with a seeded ``torch.Generator`` instead of the grid.

The window spectra are computed in float32 (``DTYPE``): all windows of a layer are stacked, their
(h, h) Grams formed by one batched product and decomposed by one batched ``eigvalsh``. The fit reads
only the upper half of the pooled ESD, whose eigenvalues the float32 Gram route gets to a relative
error of ``~p eps32 lambda_max / lambda ~ 1e-5`` (module ``linalg.spectrum``); measured on all 210
SmolLM2-135M layers the FARMS alpha moves by at most 1.9e-6 (mean 4e-7) against the float64 route,
which is 1.5x slower. Pass ``dtype=torch.float64`` to get the float64 route.
"""
from __future__ import annotations

import torch

from ..linalg.spectrum import gram_eigenvalues
from .powerlaw import PowerLawFit, fit_power_law

ROWS = 100
RATIO = 2.0
PER_DIM = 10
DTYPE = torch.float32


def _starts(dim: int, size: int, per_dim: int, sampling: str, g: torch.Generator | None) -> list[int]:
    if sampling == "random":
        return sorted(torch.randint(0, dim - size + 1, (per_dim,), generator=g).tolist())
    step = max(1, (dim - size) // max(per_dim - 1, 1))
    count = min(per_dim, max(1, (dim - size) // step + 1))
    return [min(i * step, dim - size) for i in range(count)]


def farms_windows(shape: tuple[int, int], rows: int = ROWS, ratio: float = RATIO, per_dim: int = PER_DIM,
                  sampling: str = "grid", seed: int = 0) -> list[tuple[int, int, int, int]]:
    """Windows ``(r0, c0, h, w)`` of aspect ratio ``w/h = ratio`` in a matrix of ``shape``.

    For a tall matrix (m > n) the windows are tall (``h = ratio * w``); see the module docstring.
    """
    if sampling not in ("grid", "random"):
        raise ValueError(f"unknown FARMS sampling {sampling!r}: 'grid' or 'random'")
    m, n = shape
    tall = m > n
    short, long = (n, m) if tall else (m, n)
    h = max(1, min(rows, short, int(long / ratio)))
    w = min(long, int(h * ratio))
    g = torch.Generator().manual_seed(seed) if sampling == "random" else None
    rs = _starts(short, h, per_dim, sampling, g)
    cs = _starts(long, w, per_dim, sampling, g)
    wins = [(r, c, h, w) for r in rs for c in cs]
    if tall:
        wins = [(c, r, w, h) for r, c, h, w in wins]
    return wins


def farms_eigenvalues(w: torch.Tensor, dtype: torch.dtype = DTYPE, **kw) -> torch.Tensor:
    """The pooled ESD: all eigenvalues ``sigma^2`` of all windows, ascending, float64 (computed in ``dtype``)."""
    wins = farms_windows(tuple(w.shape), **kw)
    subs = torch.stack([w[r: r + h, c: c + k] for r, c, h, k in wins])
    return gram_eigenvalues(subs, dtype).flatten().sort().values


def farms_fit(w: torch.Tensor, xmin: str = "mid", dtype: torch.dtype = DTYPE, **kw) -> PowerLawFit:
    """Power-law fit of the FARMS pooled ESD of ``w`` (xmin rule ``mid`` as the paper's code, or ``ks``)."""
    return fit_power_law(farms_eigenvalues(w, dtype, **kw).cpu().numpy(), thresh=0.0, xmin=xmin)
