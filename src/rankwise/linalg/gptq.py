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
    QuantGrid, QuantizedMatrix, check_bits, check_grid_options, check_group_size, column_groups, fit_grid,
    round_to_grid, rtn, search_range,
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
         static_groups: bool = False, zero_point: str = "integer", clip: str = "minmax") -> QuantizedMatrix:
    """GPTQ codes of ``W (m, n)`` under ``C (n, n)``; algorithm and guarantee in the module docstring.
    ``zero_point`` / ``clip``: how each group's grid is chosen (:func:`.quant.search_range`; the
    clipping search weights column ``j`` by ``C_jj``); ``clip="auto"`` runs min/max and the search and
    keeps the lower objective (``info["clip"]`` says which)."""
    if clip == "auto":  # both grids' searches, the lower objective kept (measured: mse wins at 3 bits, not always at 4)
        kw = dict(percdamp=percdamp, blocksize=blocksize, act_order=act_order, static_groups=static_groups,
                  zero_point=zero_point)
        a = gptq(W, C, bits, group_size, symmetric, clip="minmax", **kw)
        b = gptq(W, C, bits, group_size, symmetric, clip="mse", **kw)
        fa, fb = (q.info[f"objective_{q.info['solver']}"] for q in (a, b))
        best = b if fb <= fa else a
        best.info["clip_objectives"] = {"minmax": fa, "mse": fb}
        return best
    W = as_matrix(W, "W")
    m, n = W.shape
    C = as_covariance(C, n, "C")
    bits = check_bits(bits)
    g = check_group_size(group_size, n)
    check_grid_options(zero_point, clip)
    if not percdamp >= 0:
        raise ConfigError(f"percdamp must be >= 0, got {percdamp}; the reference uses 0.01")
    if blocksize < 1:
        raise ConfigError(f"blocksize must be >= 1, got {blocksize}; the reference uses 128")
    imp = torch.diagonal(C).to(torch.float64)
    base = rtn(W, bits, g, symmetric, zero_point=zero_point, clip=clip, importance=imp)

    H = C.to(torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    Wd = W.to(torch.float64).clone()
    Wd[:, dead] = 0.0
    groups = column_groups(n, g, W.device)
    G = int(groups[-1]) + 1
    if static_groups:
        grid = fit_grid(Wd, bits, g, symmetric, zero_point=zero_point, clip=clip, importance=imp)
        ready = torch.ones(G, dtype=torch.bool)
    else:
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
    # The sweep runs on transposed float32 copies (column j of W = row j, contiguous), as the reference
    # implementations do; H^-1's factor is computed in float64 first. Per processed position: the
    # step and offset of its grid (filled when the group's grid is fixed).
    f32 = torch.float32
    Wt = Wp.T.contiguous().to(f32)
    Ut = U.to(f32)
    St = torch.zeros(n, m, dtype=f32, device=W.device)
    Ot = torch.zeros(n, m, dtype=f32, device=W.device)
    maxq, zcode = grid.maxq, (2 ** (bits - 1) if symmetric else 0)

    def fix(j: int, scale: torch.Tensor, mn: torch.Tensor | None) -> None:
        pos = invperm[groups == j]
        s = scale.to(f32)[None, :]
        St[pos] = s
        Ot[pos] = (-(2 ** (bits - 1)) * s) if mn is None else mn.to(f32)[None, :]

    if static_groups:
        for j in range(G):
            fix(j, grid.scales[:, j], None if grid.mins is None else grid.mins[:, j])
    codes_t = torch.zeros(n, m, dtype=torch.int64, device=W.device)
    one = torch.zeros(1, dtype=torch.int64, device=W.device)

    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = Wt[i1:i2].clone()
        U1 = Ut[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = int(gp[i1 + i])
            if not ready[j]:  # first column of group j: its grid from the group's current columns
                cols = (groups == j).nonzero().flatten()
                pos = invperm[cols]
                inb, out = pos[pos < i2] - i1, pos[pos >= i2]
                cur = torch.cat([W1[inb], Wt[out] - Ut[i1:i1 + i, out].T @ Err1[:i]], dim=0).T
                order = torch.cat([cols[pos < i2], cols[pos >= i2]])
                scale, mn = search_range(cur, one.expand(cur.shape[1]), 1, bits, symmetric, zero_point, clip,
                                         imp[order])
                grid.scales[:, j] = scale[:, 0]
                if mn is not None:
                    grid.mins[:, j] = mn[:, 0]
                fix(j, scale[:, 0], None if mn is None else mn[:, 0])
                ready[j] = True
            w = W1[i]
            s, o = St[i1 + i], Ot[i1 + i]
            q = torch.round((w - o) / torch.where(s > 0, s, 1.0)).clamp_(0, maxq)
            q = torch.where(s > 0, q, float(zcode))
            codes_t[i1 + i] = q.to(torch.int64)
            err = (w - (q * s + o)) / U1[i, i]
            W1[i:] -= U1[i, i:, None] * err[None, :]
            Err1[i] = err
        Wt[i2:] -= Ut[i1:i2, i2:].T @ Err1

    codes_p = codes_t.T
    codes = codes_p[:, invperm].to(torch.uint8)
    obj = quant_objective(W, QuantizedMatrix(codes, grid).dense(torch.float64), C)
    obj_rtn = quant_objective(W, base.dense(torch.float64), C)
    info = {"objective_gptq": obj, "objective_rtn": obj_rtn, "damping": damp,
            "damping_rel": damp / max(float(torch.diagonal(Hp).mean()), 1e-30), "dead_inputs": int(dead.sum()),
            "act_order": bool(act_order), "static_groups": bool(static_groups), "zero_point": zero_point,
            "clip": clip}
    if obj <= obj_rtn:
        return QuantizedMatrix(codes, grid, {"solver": "gptq", **info})
    return QuantizedMatrix(base.codes, base.grid, {"solver": "rtn", **info})


__all__ = ["gptq", "quant_objective"]
