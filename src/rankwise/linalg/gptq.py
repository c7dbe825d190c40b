"""GPTQ / OBQ: data-aware rounding of ``W (m, n)`` onto a group grid under ``C = X X^T``.

Objective: ``||(W - W') X||_F^2 = tr((W - W') C (W - W')^T)`` over ``W'`` on the grid of
:mod:`.quant` (``b`` bits, groups of ``g`` input columns). The rows are independent given ``C``, and
GPTQ quantizes the columns one at a time. With ``H = C + lambda I`` and ``U`` the upper Cholesky
factor of ``H^-1`` (``H^-1 = U^T U``), quantizing column ``j`` to ``q_j`` and spreading its error
over the columns not yet quantized,

    e = (w_j - q_j) / U_jj,      w_{j+1:} <- w_{j+1:} - e U_{j, j+1:},

is the optimal (OBS) update of the remaining columns for that rounding: the objective of the
final ``W'`` is ``sum_j ||w_j - q_j||^2 / U_jj^2`` with ``w_j`` the updated column (Frantar et al.,
2022). As in the reference implementation:

* damping ``lambda = percdamp * mean(diag C)`` (x10 more, recorded, if the Cholesky still fails);
* dead inputs (``C_jj = 0``) get ``H_jj = 1`` and ``W[:, j] = 0``: they never influence the output;
* lazy batch updates: the feedback inside a block of ``blocksize`` columns is applied eagerly, the
  block's accumulated error reaches the later columns in one matrix product;
* act-order (``act_order=True``): columns are processed by decreasing ``C_jj`` and the codes
  permuted back, so the stored layout stays the plain group layout;
* the grid of a group is computed when the first of its columns is reached, from the group's
  *current* (error-updated) columns; with ``static_groups=True`` all grids are the RTN grids of the
  original ``W``, computed before any update.

Guarantee: the result is returned only if its objective (under the undamped ``C``) is not above
the round-to-nearest codes' on the RTN grid of the same bits / group size / symmetry; otherwise the
RTN codes are returned. ``info["solver"]`` says which (``"gptq"`` or ``"rtn"``), with both
objectives. Hence ``objective(gptq(...)) <= objective(rtn(...))`` always. With a diagonal ``C``
there is no feedback and GPTQ is exactly the per-entry optimum over the grid.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError, NumericalError
from ._checks import as_covariance, as_matrix
from .refit import activation_error
from .quant import (
    QuantGrid, QuantizedMatrix, check_bits, check_group_size, column_groups, fit_grid, grid_from_range, rtn,
)


def quant_objective(W: torch.Tensor, Wq: torch.Tensor, C: torch.Tensor) -> float:
    """``tr((W - W') C (W - W')^T) = ||(W - W') X||_F^2`` (float64; :func:`.refit.activation_error` squared)."""
    return activation_error(W, Wq, C) ** 2


def _inverse_cholesky(H: torch.Tensor, damp: float, max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """Upper ``U`` with ``U^T U = (H + damp' I)^-1``; ``damp'`` escalates x10 from ``damp`` if needed."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    scale = max(float(torch.diagonal(H).mean()), 1e-30)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return U, damp
        damp = max(damp * 10.0, 1e-10 * scale)
    raise NumericalError(f"the {H.shape[0]} x {H.shape[0]} input covariance is not positive definite even with "
                         f"damping {damp / 10:.3g}; raise percdamp or collect more calibration data")


def gptq(W: torch.Tensor, C: torch.Tensor, bits: int, group_size: int, symmetric: bool = False, *,
         percdamp: float = 0.01, blocksize: int = 128, act_order: bool = True,
         static_groups: bool = False, rule: str = "minmax") -> QuantizedMatrix:
    """GPTQ codes of ``W (m, n)`` under ``C (n, n)``; algorithm and guarantee in the module docstring."""
    W = as_matrix(W, "W")
    m, n = W.shape
    C = as_covariance(C, n, "C")
    bits = check_bits(bits)
    g = check_group_size(group_size, n)
    if not percdamp >= 0:
        raise ConfigError(f"percdamp must be >= 0, got {percdamp}; the reference uses 0.01")
    if blocksize < 1:
        raise ConfigError(f"blocksize must be >= 1, got {blocksize}; the reference uses 128")
    base = rtn(W, bits, g, symmetric, rule)  # rule: how each group's grid is set (linalg.quant, "Grid rules")

    H = C.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    Wd = W.clone()
    Wd[:, dead] = 0.0
    groups = column_groups(n, g, W.device)
    if static_groups:
        grid = fit_grid(Wd, bits, g, symmetric, rule)
        ready = torch.ones(grid.scales.shape[1], dtype=torch.bool)
    else:
        G = int(groups[-1]) + 1
        grid = QuantGrid(bits, g, n, torch.zeros(m, G, dtype=torch.float16, device=W.device),
                         None if symmetric else torch.zeros(m, G, dtype=torch.float16, device=W.device))
        ready = torch.zeros(G, dtype=torch.bool)

    perm = (torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order
            else torch.arange(n, device=W.device))
    invperm = torch.argsort(perm)
    Wp = Wd[:, perm].contiguous()
    Hp = H[perm][:, perm]
    U, damp = _inverse_cholesky(Hp, percdamp * float(torch.diagonal(Hp).mean()))
    gp = groups[perm]  # group of each processed position
    codes_p = torch.zeros(m, n, dtype=torch.int64, device=W.device)

    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = Wp[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = int(gp[i1 + i])
            if not ready[j]:  # first column of group j: its grid from the group's current columns
                pos = invperm[groups == j]
                inb, out = pos[pos < i2] - i1, pos[pos >= i2]
                cur = torch.cat([W1[:, inb], Wp[:, out] - Err1[:, :i] @ U[i1:i1 + i, out]], dim=1)
                scale, mn = grid_from_range(cur.amin(1), cur.amax(1), bits, symmetric, rule)
                grid.scales[:, j] = scale
                if mn is not None:
                    grid.mins[:, j] = mn
                ready[j] = True
            col = perm[i1 + i: i1 + i + 1]
            w = W1[:, i: i + 1]
            q = grid.round(w, col)
            s, off = grid.columns(col)
            codes_p[:, i1 + i] = q[:, 0]
            err = (w - (q.to(torch.float64) * s + off)) / U1[i, i]
            W1[:, i:] -= err * U1[i: i + 1, i:]
            Err1[:, i: i + 1] = err
        Wp[:, i2:] -= Err1 @ U[i1:i2, i2:]

    codes = codes_p[:, invperm].to(torch.uint8)
    obj = quant_objective(W, QuantizedMatrix(codes, grid).dense(torch.float64), C)
    obj_rtn = quant_objective(W, base.dense(torch.float64), C)
    info = {"objective_gptq": obj, "objective_rtn": obj_rtn, "damping": damp,
            "damping_rel": damp / max(float(torch.diagonal(Hp).mean()), 1e-30), "dead_inputs": int(dead.sum()),
            "act_order": bool(act_order), "static_groups": bool(static_groups)}
    if obj <= obj_rtn:
        return QuantizedMatrix(codes, grid, {"solver": "gptq", **info})
    return QuantizedMatrix(base.codes, base.grid, {"solver": "rtn", **info})


__all__ = ["gptq", "quant_objective"]
