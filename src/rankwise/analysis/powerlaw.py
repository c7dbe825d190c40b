"""Power-law fit of an eigenvalue tail, as WeightWatcher (0.7.x, ``pl_package='ww'``) does it.

Given the ESD ``lambda_1 <= ... <= lambda_N`` (eigenvalues of ``W^T W``, no normalization; those
``<= thresh = 1e-5`` dropped) and a candidate ``xmin = lambda_i``, the continuous power-law MLE
(Hill / Clauset-Shalizi-Newman) over the ``n = N - i`` values ``>= xmin`` is

    alpha_i = 1 + n / sum_{j>=i} log(lambda_j / lambda_i)

and its Kolmogorov-Smirnov distance is

    D_i = max_{j>=i} | 1 - (lambda_j / lambda_i)^(1 - alpha_i)  -  (j - i) / n |.

``xmin`` is the candidate with the smallest ``D_i`` (first on ties; ``D_i = 1`` when
``alpha_i <= 1``). For ``N < 20`` WeightWatcher switches to a small-sample rule: bias-corrected
``alpha = 1 + (n-1)/sum log(lambda_j/lambda_i)`` over tails of at least 8 values, chosen (in
effect) by the smallest ``D_i``; we do the same. ``sigma = (alpha - 1)/sqrt(n)`` is the MLE standard error.

All candidates are evaluated at once (an (N-1) x N masked array, in row blocks), instead of
WeightWatcher's Python loop over candidates.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

EVALS_THRESH = 1e-5
MIN_EVALS = 8
SMALL_N = 20
_BLOCK_ELEMS = 4_000_000


@dataclass
class PowerLawFit:
    """Result of :func:`fit_power_law`. ``alpha is None`` means no fit; ``reason`` says why."""

    alpha: float | None
    xmin: float | None = None
    D: float | None = None
    sigma: float | None = None
    num_tail: int = 0
    num_evals: int = 0
    lambda_max: float | None = None
    alpha_weighted: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _ks_all(x: np.ndarray, logx: np.ndarray, alphas: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``D_i`` for the candidate indices ``rows`` (see module docstring)."""
    N = x.shape[0]
    out = np.empty(rows.shape[0])
    block = max(1, _BLOCK_ELEMS // N)
    j = np.arange(N)
    for b in range(0, rows.shape[0], block):
        r = rows[b: b + block]
        n = (N - r).astype(np.float64)
        a = alphas[r]
        diff = logx[None, :] - logx[r, None]                      # log(lambda_j / lambda_i)
        k = j[None, :] - r[:, None]                               # j - i
        with np.errstate(over="ignore", invalid="ignore"):
            t = np.abs(1.0 - np.exp((1.0 - a)[:, None] * diff) - k / n[:, None])
        t[k < 0] = 0.0
        d = np.nanmax(t, axis=1)
        d[~(a > 1)] = 1.0
        out[b: b + block] = d
    return out


def _candidates(x: np.ndarray, logx: np.ndarray, bias_corrected: bool) -> tuple[np.ndarray, np.ndarray]:
    N = x.shape[0]
    i = np.arange(N - 1)
    n = (N - i).astype(np.float64)
    suffix = np.cumsum(logx[::-1])[::-1]                          # sum_{j>=i} log lambda_j
    s = suffix[:-1] - n * logx[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + (n - 1.0 if bias_corrected else n) / s
    return alphas, s


def fit_power_law(evals, thresh: float = EVALS_THRESH, xmin: str = "ks") -> PowerLawFit:
    """Fit ``p(lambda) ~ lambda^-alpha`` to the tail of ``evals`` (any order).

    ``xmin="ks"``: WeightWatcher's rule (minimum KS distance over all candidates).
    ``xmin="mid"``: the median eigenvalue (``i = N // 2``), the ``xmin_mid`` rule of the FARMS /
    AlphaPruning code.
    """
    ev = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    lam_max = float(ev[-1]) if ev.size else None
    x = ev[ev > thresh]
    N = int(x.shape[0])
    base = dict(num_evals=int(ev.size), lambda_max=lam_max)
    if N < MIN_EVALS:
        return PowerLawFit(alpha=None, reason=f"only {N} eigenvalues above {thresh:g}; a power-law fit needs "
                           f"at least {MIN_EVALS}", **base)
    logx = np.log(x)
    if xmin == "mid":
        i = N // 2
        alphas, _ = _candidates(x, logx, False)
        if i >= N - 1:
            i = N - 2
        D = float(_ks_all(x, logx, alphas, np.array([i]))[0])
        best, alpha = i, float(alphas[i])
    elif xmin == "ks":
        if N < SMALL_N:
            alphas, s = _candidates(x, logx, True)
            rows = np.arange(N - 1)
            D_all = _ks_all(x, logx, alphas, rows)
            ok = ((N - rows) >= MIN_EVALS) & (s > 1e-12) & (alphas > 1)
            # WeightWatcher scores candidates by D - 0.868/sqrt(n), but its WWFit constructor then
            # re-selects argmin(D) over the same valid candidates (others keep D = 1); we match that.
            best = int(np.argmin(np.where(ok, D_all, 1.0)))
            D = float(D_all[best])
        else:
            alphas, _ = _candidates(x, logx, False)
            D_all = _ks_all(x, logx, alphas, np.arange(N - 1))
            best = int(np.argmin(D_all))
            D = float(D_all[best])
        alpha = float(alphas[best])
    else:
        raise ValueError(f"unknown xmin rule {xmin!r}: 'ks' or 'mid'")
    if not math.isfinite(alpha) or alpha <= 1:
        return PowerLawFit(alpha=None, reason=f"degenerate tail (alpha={alpha:g}); eigenvalues too uniform "
                           "for a power law", **base)
    xm = float(x[best])
    n_tail = int((ev >= xm).sum())
    aw = alpha * math.log10(lam_max) if lam_max and lam_max > 0 else None
    return PowerLawFit(alpha=alpha, xmin=xm, D=D, sigma=(alpha - 1) / math.sqrt(N - best), num_tail=n_tail,
                       alpha_weighted=aw, **base)
