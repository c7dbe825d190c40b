"""The settings a quantized layer can take under a byte budget, their measured errors, and the uniform plan.

Grid of an (out ``m``, in ``n``) layer: code widths ``b`` (the fixed ``bits``, else the grid's widths,
default 2, 3, 4, 8) x group sizes ``g`` (the fixed ``group_size``, else the grid's, default 32, 64, 128; each
capped at ``n``, duplicates dropped); for quantized + low-rank candidates also ranks ``k`` in
:func:`rank_grid`. Bytes are exact (the spec's layer counted: packed codes, float16 scales and
minimums, rotation signs, float16 factors). The cost is the relative whitened error of the fit,

    e(c) = tr((T - W'_c) C (T - W'_c)^T) / tr(T C T^T),      T = stats.target(W), C = stats.covariance(),

measured (not modelled) as follows:

* round-to-nearest: every candidate fitted (RTN costs milliseconds);
* GPTQ, ``measure="exact"``: every candidate fitted, one GPTQ run each;
* GPTQ, ``measure="estimate"`` (the default): the RTN error ``e_rtn(b, g)`` of every candidate
  (exact), and one GPTQ run per width ``b <= 4`` at the reference group size ``g_ref`` (the grid's
  largest), giving

      e(b, g) = e_rtn(b, g) * e_gptq(b, g_ref) / e_rtn(b, g_ref),

  exact at ``g_ref``; for ``b > 4`` ``e(b, g) = e_rtn(b, g)``, an upper bound (GPTQ keeps its codes
  only when its objective is not above RTN's, :func:`rankwise.linalg.gptq.gptq`). That is 3 GPTQ runs
  per layer on the default grid instead of 12 (BENCHMARKS.md compares the estimate with the exact
  errors on SmolLM2's layers);
* quantized + low rank (LoRC, :mod:`.lorc`), at each width at ``g_ref`` (or the fixed group size):
  with ``Q`` the quantized part and ``S S^T = C``, the rank-``k`` LoRC fit leaves
  ``sum_{i>k} s_i((T - Q) S)^2``, so one whitened SVD gives every rank of the grid (exact before
  the float16 rounding of the factors). ``lq``'s alternation starts from LoRC's fit and keeps only
  rounds that lower the objective, so these are upper bounds of its errors.

:func:`uniform_quant_plan`: one (width, group size) for every layer (``--allocate uniform``, and the
plan a byte allocation is validated against).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ...errors import ConfigError
from ...linalg.factorization import whitened_svd
from ...linalg.gptq import quant_objective
from ...linalg.quant import check_bits, check_group_size, rtn
from ...linalg.whitening import make_whitener
from ...structures.lowrank_quant import LowRankQuantLinear
from ...structures.quant import QuantLinear
from .base import DEFAULT_GROUP_SIZES, DEFAULT_WIDTHS, Candidate, CandidateGrid, LayerStats, Method
from .rtn import DEFAULT_GROUP_SIZE, QuantOptions, quant_spec

#: Widths up to which GPTQ is run to measure a candidate (wider: the round-to-nearest error, a bound).
GPTQ_MEASURED_MAX_BITS = 4


def candidate_widths(opts: QuantOptions, grid: CandidateGrid) -> list[int]:
    """Code widths a byte allocator may choose, narrowest first: the fixed ``bits``, or the grid's (default
    :data:`~.base.DEFAULT_WIDTHS`: 2, 3, 4, 8)."""
    if opts.bits is not None:
        return [opts.bits]
    widths = sorted({check_bits(b) for b in (grid.widths or DEFAULT_WIDTHS)})
    if not widths:
        raise ConfigError("the list of candidate widths is empty; give at least one of 2..8")
    return widths


def candidate_group_sizes(opts: QuantOptions, grid: CandidateGrid, n: int) -> list[int]:
    """Group sizes for ``n`` inputs, smallest first: the fixed ``group_size``, or the grid's (default 32,
    64, 128), each capped at ``n``."""
    if opts.group_size is not None:
        return [check_group_size(opts.group_size, n)]
    sizes = grid.group_sizes if grid.group_sizes else DEFAULT_GROUP_SIZES
    if not sizes:
        raise ConfigError("the list of candidate group sizes is empty; give at least one, e.g. 128")
    return sorted({check_group_size(int(g), n) for g in sizes})


def relative_error(T: torch.Tensor, Wp: torch.Tensor, C: torch.Tensor) -> float:
    """``tr((T - W') C (T - W')^T) / tr(T C T^T)`` (0 when the denominator is 0), float64 throughout."""
    den = quant_objective(T, torch.zeros_like(T), C)
    return 0.0 if den <= 0 else quant_objective(T, Wp, C) / den


class ErrorMeter:
    """``rel(W') = tr((T - W') C (T - W')^T) / tr(T C T^T)`` for many ``W'`` of one layer: the denominator in
    float64 once, each numerator as ``sum((E C) * E)`` with the ``m n^2`` product in float32 (the sum in
    float64). Relative accuracy ~1e-6 -- the costs only rank candidates, and a layer's dozen numerators
    are most of the measuring pass's arithmetic."""

    def __init__(self, T: torch.Tensor, C: torch.Tensor) -> None:
        self.T, self.C32 = T.to(torch.float64), C.to(torch.float32)
        self.den = float(((self.T @ C.to(torch.float64)) * self.T).sum())

    def __call__(self, Wp: torch.Tensor) -> float:
        if self.den <= 0:
            return 0.0
        E = (self.T - Wp.to(torch.float64)).to(torch.float32)
        return float(((E @ self.C32) * E).sum(dtype=torch.float64)) / self.den


def rank_grid(m: int, n: int) -> list[int]:
    """Candidate ranks of an (m, n) layer: 1, 2, 3, 4, 6, 8, 12, ... (powers of two and their 1.5 multiples)
    up to ``min(m, n) / 2`` (beyond it the factors cost about as much as the dense matrix)."""
    top, out, p = max(1, min(m, n) // 2), set(), 1
    while p <= top:
        out.update(k for k in (p, p + p // 2) if 1 <= k <= top)
        p *= 2
    return sorted(out)


def candidate_specs(shape: tuple[int, int], opts: QuantOptions, grid: CandidateGrid,
                    ranks: list[int] | None = None) -> list[dict[str, Any]]:
    """The specs of the grid for one layer without fitting anything (bytes only: the feasibility check
    before the measuring pass). ``ranks``: quantized + low-rank specs at the reference group size."""
    m, n = shape
    sizes = candidate_group_sizes(opts, grid, n)
    if ranks is None:
        return [quant_spec(shape, b, opts, g) for b in candidate_widths(opts, grid) for g in sizes]
    return [{**quant_spec(shape, b, opts, sizes[-1]), "rank": int(k)} for b in candidate_widths(opts, grid)
            for k in ranks]


def spec_bytes(shape: tuple[int, int], spec: Mapping[str, Any]) -> int:
    """Exact bytes of a quantized (or quantized + low-rank) layer of this spec."""
    m, n = shape
    cls = QuantLinear if spec.get("rank") is None else LowRankQuantLinear
    return cls.spec_nbytes(n, m, dict(spec))


def _problem(W: torch.Tensor, stats: LayerStats, spec: Mapping[str, Any]):
    from .gptq import rotated_problem

    return rotated_problem(W, stats, spec)


def quant_candidates(meth: Method, W: torch.Tensor, stats: LayerStats, grid: CandidateGrid,
                     keep: bool = False) -> list[Candidate] | tuple[list[Candidate], dict]:
    """The plain quantized candidates of ``meth`` (rtn, gptq or mixed) with their errors measured as in
    the module docstring. ``keep``: also return ``{width: (spec at g_ref, de-quantized codes in the
    rotated space, float64)}`` of the GPTQ fits (the low-rank candidates reuse them)."""
    m, n = W.shape
    opts = meth.options
    widths, sizes = candidate_widths(opts, grid), candidate_group_sizes(opts, grid, n)
    g_ref = sizes[-1]
    T, C, _ = _problem(W, stats, quant_spec((m, n), widths[0], opts, g_ref))  # in the rotated space
    rel = ErrorMeter(T, C)
    data_aware = meth.name != "rtn"
    fit_all = data_aware and grid.measure == "exact"
    e_rtn, e_fit, kept = {}, {}, {}
    # round-to-nearest as the rtn structure stores it (its zero point and clipping); for GPTQ's estimate the
    # min/max grid of GPTQ's zero point (the clipping search is GPTQ's own business)
    rtn_kw = {"zero_point": opts.zero_point, "clip": opts.clip if not data_aware else "minmax"}
    for b in widths:
        for g in sizes:
            if not fit_all:
                e_rtn[b, g] = rel(rtn(T, b, g, bool(opts.symmetric), **rtn_kw).dense(torch.float64))
            if data_aware and (fit_all or (g == g_ref and b <= GPTQ_MEASURED_MAX_BITS)):
                spec = quant_spec((m, n), b, opts, g)
                layer = meth.fit(W, None, stats, spec)
                Qd = layer.quantized_weight(torch.float32).double()
                e_fit[b, g] = rel(Qd)
                if g == g_ref:
                    kept[b] = (spec, Qd)
    out = []
    for b in widths:
        ratio = None
        if (b, g_ref) in e_fit and not fit_all:
            base = e_rtn[b, g_ref]
            ratio = e_fit[b, g_ref] / base if base > 0 else 1.0
        for g in sizes:
            spec = quant_spec((m, n), b, opts, g)
            if (b, g) in e_fit:
                cost, exact = e_fit[b, g], True
            elif ratio is not None:
                cost, exact = e_rtn[b, g] * ratio, False
            else:
                cost, exact = e_rtn[b, g], not data_aware
            out.append(Candidate(spec, QuantLinear.spec_nbytes(n, m, spec), float(cost), exact))
    return (out, kept) if keep else out


def lowrank_candidates(T: torch.Tensor, C: torch.Tensor, Qd: torch.Tensor, spec: Mapping[str, Any],
                       ranks: list[int], whitening: str = "cholesky", whitener=None) -> list[Candidate]:
    """LoRC candidates ``{**spec, "rank": k}`` for ``k`` in ``ranks`` on top of the de-quantized ``Qd``
    (all in the rotated space): one whitened SVD of ``T - Qd`` (module docstring)."""
    m, n = T.shape
    whitener = whitener or make_whitener(C, whitening)
    err = whitened_svd(T - Qd, whitener=whitener).errors().square()
    base = ErrorMeter(T, C)(Qd)
    scale = base / float(err[0]) if float(err[0]) > 0 else 0.0  # err[0] = ||(T - Q) S||^2 under the whitener's C
    qbytes = QuantLinear.spec_nbytes(n, m, dict(spec))
    return [Candidate({**spec, "rank": int(k)}, qbytes + LowRankQuantLinear.factor_bytes(n, m, k),
                      float(err[k]) * scale) for k in ranks if k < err.numel()]


def uniform_quant_plan(shapes: Mapping[str, tuple[int, int]], bits_per_weight: float | None, opts: QuantOptions,
                       grid: CandidateGrid) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``({layer: spec}, info)``: one width and group size for every layer.

    Without a budget the width must be fixed (``--bits``) and the group size is the fixed one or
    :data:`DEFAULT_GROUP_SIZE`. Under ``--bits-per-weight B``: among the grid's (width, group size)
    pairs whose layers together fit ``floor(B sum m n / 8)`` bytes, the one storing the most bytes
    (ties: the wider codes); :class:`ConfigError` naming the smallest feasible budget when none fits."""
    from ..allocation.bytes import byte_budget, describe_spec

    total = sum(m * n for m, n in shapes.values())
    if bits_per_weight is None:
        if opts.bits is None:
            raise ConfigError("a quantized structure needs --bits B (code width) or --bits-per-weight B (stored "
                              "bits per weight, all overhead counted)")
        plan = {name: quant_spec(s, opts.bits, opts) for name, s in shapes.items()}
        return plan, {"uniform": _describe(plan, shapes, None)}
    budget = byte_budget(bits_per_weight, shapes)
    widths = candidate_widths(opts, grid)
    options = []
    sizes = sorted({g for m, n in shapes.values() for g in candidate_group_sizes(opts, grid, n)})
    if opts.group_size is not None:
        sizes = [opts.group_size]
    for b in widths:
        for g in sizes:
            plan = {name: quant_spec(s, b, opts, g) for name, s in shapes.items()}
            nbytes = sum(QuantLinear.spec_nbytes(s[1], s[0], plan[name]) for name, s in shapes.items())
            options.append((nbytes, b, -g, plan))
    fits = [o for o in options if o[0] <= budget]
    if not fits:
        nbytes, _, _, plan = min(options, key=lambda o: o[0])
        need = 8.0 * nbytes / total
        example = describe_spec(next(iter(plan.values())))
        raise ConfigError(f"--bits-per-weight {bits_per_weight:g} cannot be met with one setting for every layer: "
                          f"the smallest, {example}, needs {need:.3f} bits per weight; raise --bits-per-weight to "
                          f"at least {need:.3f}" + ("" if opts.bits is None else " or drop the fixed --bits")
                          + ("" if opts.group_size is None else " or use a larger --group-size"))
    nbytes, b, _, plan = max(fits, key=lambda o: (o[0], o[1], o[2]))
    info = _describe(plan, shapes, budget)
    info["fixed"] = opts.bits is not None and opts.group_size is not None
    bigger = sorted((o for o in options if o[0] > budget), key=lambda o: o[0])
    if bigger:
        info["next_larger"] = {"setting": describe_spec(next(iter(bigger[0][3].values()))),
                               "bits_per_weight": 8.0 * bigger[0][0] / total}
    return plan, {"uniform": info}


def _describe(plan, shapes, budget: int | None) -> dict[str, Any]:
    from ..allocation.bytes import describe_spec

    total = sum(m * n for m, n in shapes.values())
    nbytes = sum(QuantLinear.spec_nbytes(s[1], s[0], plan[name]) for name, s in shapes.items())
    out = {"setting": describe_spec(next(iter(plan.values()))), "planned_bytes": nbytes,
           "planned_bits_per_weight": 8.0 * nbytes / total}
    if budget is not None:
        out["budget_bytes"] = budget
    return out


__all__ = ["DEFAULT_GROUP_SIZE", "GPTQ_MEASURED_MAX_BITS", "candidate_group_sizes", "candidate_specs", "candidate_widths",
           "spec_bytes",
           "lowrank_candidates", "quant_candidates", "rank_grid", "relative_error", "uniform_quant_plan"]
