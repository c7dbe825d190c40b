"""``structurize``: swap a freshly built model's linear layers for trainable structured ones under a
parameter budget, initialized structure-aware (:mod:`.structured`).

A layer ``m x n`` keeps at most ``(1 - ratio) m n`` stored values. Each structure picks its sizes
for that budget (an option fixes one, e.g. ``rank`` or ``nblocks``):

* ``lowrank``: ``k (m + n)``, ``k = floor(keep m n / (m + n))``;
* ``monarch``: ``r b (m + n)`` with ``b`` input = output blocks, ``b`` a common divisor of ``m, n``
  (the most values within budget; ties: ``b`` nearest ``sqrt(min(m, n))``);
* ``blockdiag-lowrank``: ``m n / b + k (m + n)``, the smallest common ``b`` giving the blocks at most
  half the budget, the rest rank;
* ``kronecker``: ``t (m1 n1 + m2 n2)``, the most balanced factor shape, ``t`` terms;
* ``sltrain``: SLTrain's ``W = B A + S``: ``k (m + n)`` plus ``density n`` entries per row in ``S``,
  whose support is drawn uniformly at random (seeded) and then fixed: only its values train;
* ``blast``: ``r (m + n + b^2)``, ``b = nblocks`` (default 4).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..models.saved import structured_layers
from ..models.surgery import find_linears, linear_bias, linear_shape, set_module
from ..registry import Registry
from ..structures.base import StructuredLinear
from ..structures.blast import BlastLinear, check_blast_shape
from ..structures.blockdiag import BlockDiagLowRankLinear
from ..structures.kronecker import KroneckerLinear
from ..structures.lowrank import LowRankLinear
from ..structures.monarch import MonarchLinear
from ..structures.sparse import LowRankSparseLinear
from ..linalg.kronecker import check_factor_shape, factor_shapes
from .structured import structured_init_

Builder = Callable[..., StructuredLinear]
#: structure name -> builder(m, n, budget, bias, generator, **options) -> StructuredLinear (empty factors)
BUILDERS: Registry[Builder] = Registry("trainable structure")


def _common_divisors(m: int, n: int) -> list[int]:
    return [d for d in range(1, min(m, n) + 1) if m % d == 0 and n % d == 0]


def _need(what: str, value: int, m: int, n: int, budget: int) -> int:
    if value < 1:
        raise ConfigError(f"a {m}x{n} layer has no {what} >= 1 within {budget} values (keep {budget / (m * n):.0%}); "
                          "lower the ratio")
    return value


@BUILDERS.register("lowrank")
def _lowrank(m, n, budget, bias, g, rank: int | None = None):
    k = int(rank) if rank is not None else _need("rank", budget // (m + n), m, n, budget)
    return LowRankLinear(n, m, k, bias=bias)


@BUILDERS.register("monarch")
def _monarch(m, n, budget, bias, g, nblocks: int | None = None, rank: int | None = None):
    cands = [int(nblocks)] if nblocks is not None else [b for b in _common_divisors(m, n) if b > 1]
    if not cands:
        raise ConfigError(f"Monarch needs a block count > 1 dividing both {m} and {n}; they have none (use another "
                          "structure for this layer, or leave it out with targets)")
    best = None
    for b in cands:
        if m % b or n % b:
            raise ConfigError(f"Monarch block count {b} does not divide both sides of {m}x{n}; use one of "
                              f"{_common_divisors(m, n)}")
        r = int(rank) if rank is not None else min(budget // (b * (m + n)), m // b, n // b)
        if r < 1:
            continue
        key = (r * b * (m + n), -abs(b - math.sqrt(min(m, n))))
        if best is None or key > best[0]:
            best = (key, b, r)
    if best is None:
        raise ConfigError(f"no Monarch layout of a {m}x{n} layer fits {budget} values; lower the ratio")
    return MonarchLinear(n, m, best[1], best[1], best[2], bias=bias)


@BUILDERS.register("blockdiag-lowrank")
def _blockdiag(m, n, budget, bias, g, nblocks: int | None = None, rank: int | None = None):
    divs = _common_divisors(m, n)
    if nblocks is None:
        fit = [b for b in divs if m * n // b <= budget // 2]
        if not fit:
            raise ConfigError(f"no block-diagonal layout of a {m}x{n} layer fits half of {budget} values; lower the "
                              "ratio")
        nblocks = fit[0]
    if int(nblocks) not in divs:
        raise ConfigError(f"block count {nblocks} does not divide both sides of {m}x{n}; use one of {divs}")
    k = int(rank) if rank is not None else _need("rank", (budget - m * n // int(nblocks)) // (m + n), m, n, budget)
    return BlockDiagLowRankLinear(n, m, int(nblocks), k, bias=bias)


@BUILDERS.register("kronecker")
def _kronecker(m, n, budget, bias, g, m1: int | None = None, n1: int | None = None, terms: int | None = None):
    if m1 is None or n1 is None:
        shapes = factor_shapes(m, n)
        if not shapes:
            raise ConfigError(f"a {m}x{n} layer has no non-trivial Kronecker factor shape (a side is prime)")
        m1, n1 = shapes[0]
    m2, n2 = check_factor_shape(m, n, int(m1), int(n1))
    t = int(terms) if terms is not None else _need("Kronecker term",
                                                   min(budget // (m1 * n1 + m2 * n2), m1 * n1, m2 * n2), m, n, budget)
    return KroneckerLinear(n, m, int(m1), int(n1), t, bias=bias)


@BUILDERS.register("sltrain")
def _sltrain(m, n, budget, bias, g, density: float = 0.03, rank: int | None = None):
    if not 0 < float(density) < 1:
        raise ConfigError(f"SLTrain density must be in (0, 1), got {density}")
    k = max(1, round(float(density) * n))
    r = int(rank) if rank is not None else _need("rank", (budget - m * k) // (m + n), m, n, budget)
    layer = LowRankSparseLinear(n, m, r, "unstructured", k, bias=bias)
    cols = torch.rand(m, n, generator=g).argsort(dim=1)[:, :k].sort(dim=1).values   # fixed random support
    layer.S.cols.copy_(cols.to(layer.S.cols.dtype))
    return layer


@BUILDERS.register("blast")
def _blast(m, n, budget, bias, g, nblocks: int = 4, rank: int | None = None):
    check_blast_shape(m, n, int(nblocks), 1)
    b = int(nblocks)
    r = int(rank) if rank is not None else _need("rank", budget // (m + n + b * b), m, n, budget)
    return BlastLinear(n, m, b, r, bias=bias)


def structurize(model: nn.Module, structure: str, ratio: float = 0.5, targets: Sequence[str] | str | None = None,
                seed: int = 0, inplace: bool = False, init: bool = True, **options: Any) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with its target linears (default: every linear inside the
    repeated blocks) replaced by ``structure`` layers of at most ``(1 - ratio) m n`` values each,
    structure-aware initialized (``init``). A layer the structure cannot express is a
    :class:`ConfigError` naming it; nothing is changed then."""
    builder = BUILDERS.get(structure)
    if not (isinstance(ratio, (int, float)) and 0 <= ratio < 1):
        raise ConfigError(f"ratio must be in [0, 1) (the fraction of each layer's values removed), got {ratio}")
    layers = find_linears(model, targets)
    g = torch.Generator().manual_seed(int(seed))
    built = {}
    for name, lin in layers.items():
        m, n = linear_shape(lin)
        budget = int((1 - ratio) * m * n)
        try:
            new = builder(m, n, budget, linear_bias(lin) is not None, g, **options)
        except ConfigError as e:
            raise ConfigError(f"layer {name} ({m}x{n}) cannot be {structure}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"structure {structure!r} does not take option(s) {sorted(options)}: {e}") from None
        if new.num_stored() > budget and not options:
            raise ConfigError(f"layer {name}: {structure} needs {new.num_stored()} values > budget {budget}")
        w = lin.weight
        new.to(dtype=w.dtype, device=w.device)
        if init:
            structured_init_(new, g)
        built[name] = new
    target = model if inplace else copy.deepcopy(model)
    for name, new in built.items():
        set_module(target, name, new)
    target._rankwise_structurize = {"structure": structure, "ratio": ratio, "seed": seed, "options": options,
                                    "layers": len(built)}
    return target


def structure_parameters(model: nn.Module) -> dict[str, int]:
    """``{"structured": values stored in structured layers, "dense_equivalent": m n summed over them}``."""
    layers = list(structured_layers(model).values())
    return {"structured": sum(m.num_stored() for m in layers),
            "dense_equivalent": sum(m.in_features * m.out_features for m in layers)}
