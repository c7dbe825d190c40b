"""The one block-sequential engine that every compression mode uses.

For each *unit* (one decoder block, or ``blocks_per_unit`` consecutive blocks for methods that fit
layers jointly across blocks):

1. the source loads the unit's blocks onto the compute device;
2. its target layers are split into groups: all of them (``granularity="block"``), or the data-flow
   sub-groups ``[q, k, v] -> [o] -> [gate, up] -> [down]`` (``"subgroup"``, one block per unit);
3. for each group in order: calibration statistics of its layers are gathered by running the cached
   hidden states through the unit, whose earlier groups are already compressed; the group is fitted
   (``fit``) and its layers replaced;
4. the cached hidden states are advanced through the compressed unit: they become the inputs of the
   next unit; the source releases the unit (moves it back, or writes it to disk and frees it).

``mode="one-shot"`` calibrates every layer on the dense model: the hidden states are advanced through
each unit *before* it is compressed. With ``refit`` (sequential only) the dense model's hidden states
are cached too and each group is fitted to the dense outputs from the compressed inputs,
``min ||W X - W' X'||`` (cross moments, :mod:`rankwise.calibration.paired`), with a ridge toward ``W``
chosen per group on held-out calibration windows (:func:`choose_ridge`) unless fixed.

Held-out windows: the last ``ceil(holdout / batch_size)`` calibration batches (:meth:`Engine.heldout`).
The ridge choice scores on them and then adds their sums to the fit's; with ``exclude_heldout`` they
never enter any statistic (they only choose the ridge), so a whole pass can be scored on them end to
end (the validated byte allocation, :mod:`rankwise.compression.validation`).

Device and precision: see :mod:`.device` (blocks visit the compute device one unit at a time,
statistics in float64 there, layers stored in the model's dtype at the model's home). Inside a
``torch.distributed`` process group the calibration batches are sharded across ranks and the layers
of each group are fitted by one rank each and broadcast (:mod:`.distributed`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ...calibration.paired import PairedAccumulator
from ...calibration.stats import CHUNK_BYTES, InputStats, LayerStats, StatsAccumulator, collect_input_stats
from ...errors import ConfigError, NumericalError
from ...models.surgery import linear_bias, linear_shape, linear_weight, set_module
from ...structures.base import StructuredLinear
from ...structures.lowrank import LowRankLinear
from ..methods.base import LayerInput
from .dense import DenseInputs, record_dense_inputs
from .groups import dataflow_groups
from .memory import trim
from .distributed import Comm
from .runner import Activations, Stop, advance, capture_inputs, run_block
from .spill import SpilledBatches
from .source import WeightSource

MODES = ("sequential", "one-shot")
GRANULARITIES = ("block", "subgroup")
#: Ridges (relative to mean diag C') tried by the held-out choice; ``inf`` = no cross moment (target W).
RIDGE_CANDIDATES = (1e-3, 1e-2, 1e-1, 1.0, math.inf)

#: ``fit({name: LayerInput}) -> {name: layer}``: the method's fit plus the driver's checks and report.
FitFn = Callable[[Mapping[str, LayerInput]], dict[str, StructuredLinear]]


@dataclass
class EngineOptions:
    """How the engine walks the model (serialized into ``rankwise.json``)."""

    mode: str = "sequential"          # "sequential" | "one-shot"
    granularity: str | None = None    # "block" | "subgroup" (true-sequential sub-groups); None: the method's default
    refit: bool | None = None         # fit the dense model's outputs from the compressed inputs; None: the method's
    refit_ridge: float | None = None  # relative ridge toward W; None = chosen on held-out windows
    holdout: int = 8                  # calibration windows held out to choose the ridge
    batch_size: int = 4
    device: str = "cpu"

    def resolved(self, defaults: Mapping[str, object]) -> "EngineOptions":
        """A copy with ``granularity`` / ``refit`` / ``refit_ridge`` left as None filled in: from
        ``defaults`` (the method's measured best,
        :meth:`~rankwise.compression.methods.base.Method.engine_defaults`) in sequential mode, else
        ``block`` / no refit (what one-shot calibration can do); a ridge the method does not fix stays
        None (chosen on held-out windows)."""
        seq = self.mode == "sequential"
        gran = self.granularity if self.granularity is not None else (
            defaults.get("granularity", "block") if seq else "block")
        refit = self.refit if self.refit is not None else (bool(defaults.get("refit", False)) if seq else False)
        ridge = self.refit_ridge if self.refit_ridge is not None else defaults.get("refit_ridge")
        return dataclasses.replace(self, granularity=gran, refit=refit, refit_ridge=ridge)

    def validate(self) -> "EngineOptions":
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"unknown granularity {self.granularity!r}; valid: {', '.join(GRANULARITIES)}")
        if self.refit and self.mode != "sequential":
            raise ConfigError("--refit fits the dense model's outputs from the compressed model's inputs, which "
                              "exist only in sequential mode: drop --one-shot or --refit")
        if self.granularity == "subgroup" and self.mode != "sequential":
            raise ConfigError("--granularity subgroup calibrates each sub-group on the already compressed ones, "
                              "which needs sequential mode: drop --one-shot or use --granularity block")
        if self.refit_ridge is not None and not (isinstance(self.refit_ridge, (int, float))
                                                 and self.refit_ridge >= 0):
            raise ConfigError(f"--refit-ridge must be a number >= 0, got {self.refit_ridge!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.holdout, int) or self.holdout < 1:
            raise ConfigError(f"--refit-holdout must be a positive number of windows, got {self.holdout!r}")
        return self


def block_index(name: str, prefix: str) -> int | None:
    head = prefix + "."
    if not name.startswith(head):
        return None
    idx = name[len(head):].split(".", 1)[0]
    return int(idx) if idx.isdigit() else None


def _run_until(chain: list[tuple[int, nn.Module]], acts: Activations, b: int, stop: Mapping[str, nn.Module],
               device: torch.device) -> None:
    """Run batch ``b`` through ``chain`` and stop as soon as every module in ``stop`` has run."""
    left = set(stop)

    def make(name: str):
        def hook(module, args, out):
            left.discard(name)
            if not left:
                raise Stop
        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in stop.items()]
    try:
        x = acts.hidden[b]
        for i, block in chain:
            args, kwargs = acts.args(b, i)
            x = run_block(block, x, args, kwargs, device)
    except Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if left:
        raise NumericalError(f"layers never called during calibration: {sorted(left)[:5]}")


def _product(layer: nn.Module, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x W'^T`` (bias excluded) in float32 for a candidate layer: through a low-rank layer's two
    factors (``k (m + n)`` a row instead of ``m n``), else through ``dense()`` computed once."""
    if isinstance(layer, LowRankLinear):
        A, B = (w.detach().to(device=device, dtype=torch.float32) for w in (layer.A.weight, layer.B.weight))
        return lambda x: (x @ A.T) @ B.T
    D = (layer.dense() if isinstance(layer, StructuredLinear) else layer).detach().to(device=device,
                                                                                      dtype=torch.float32)
    return lambda x: x @ D.T


def heldout_errors(W: torch.Tensor, candidates, x: torch.Tensor, xp: torch.Tensor, device=None) -> list[float]:
    """``[||W X_h - W'_j X'_h||_F^2 for each candidate j]`` over the rows of the held-out inputs ``x``
    (dense model) and ``xp`` (compressed prefix), both (tokens, in); a candidate is a layer or its
    (out, in) matrix ``W'_j``. Per row chunk of at most ``CHUNK_BYTES`` of output, ``W x`` is
    computed once and each candidate's ``W'_j x'`` through :func:`_product`, in float32; each chunk's
    squared norm is added in float64. (It only ranks the candidate ridges, whose errors differ far more
    than float32's relative 1e-6; float64 copies of ``W`` and ``W'`` would double the score's memory.)"""
    W32 = W.to(device=device, dtype=torch.float32)
    maps = [_product(c, W32.device) for c in candidates]
    totals = torch.zeros(len(maps), dtype=torch.float64, device=W32.device)
    step = max(64, CHUNK_BYTES // (4 * W32.shape[0]))
    for s in range(0, x.shape[0], step):
        a = x[s: s + step].to(device=W32.device, dtype=torch.float32)
        c = xp[s: s + step].to(device=W32.device, dtype=torch.float32)
        y = a @ W32.T
        for j, f in enumerate(maps):
            r = f(c)
            r.sub_(y)  # W' x' - W x, in place
            totals[j] += torch.linalg.vector_norm(r, dtype=torch.float64).square()
    return totals.tolist()


@dataclass
class HeldOut:
    """What the held-out pass of :meth:`Engine.choose_ridge` runs: the unit on the compressed cache, the
    held-out batches (local indices), the dense model's inputs, and the group's modules in the model."""

    chain: list
    acts: Activations
    dense: DenseInputs
    mods: dict[str, nn.Module]
    batches: list[int]


def _sum_input_stats(comm: Comm, stats: list[InputStats]) -> None:
    """All-reduce the sums of ``stats`` (each object once, in the given order) across ranks."""
    if not comm.active:
        return
    uniq = list({id(st): st for st in stats}.values())
    comm.sum_([t for st in uniq for t in (st.cov, st.abs_sum, st.sq_sum) if t is not None])
    n = torch.tensor([st.n for st in uniq], dtype=torch.int64)
    comm.sum_([n])
    for st, k in zip(uniq, n.tolist()):
        st.n = int(k)


class Engine:
    """One compression pass over ``source`` (see the module docstring).

    ``joint``: the fit takes a group's layers together (``Method.fit_unit`` overridden); a distributed
    run then fits the whole group on one rank instead of spreading its layers."""

    def __init__(self, source: WeightSource, modules: Mapping[str, nn.Module], plan: Mapping[str, object],
                 fit: FitFn, options: EngineOptions, *, blocks_per_unit: int = 1, need_cov: bool = True,
                 fisher: Mapping[str, torch.Tensor] | None = None, progress: bool = False,
                 on_replace: Callable[[str, StructuredLinear, float | None], None] | None = None,
                 dry: bool = False, joint: bool = False, comm: Comm | None = None,
                 exclude_heldout: bool = False) -> None:
        self.source, self.plan, self.fit, self.opts = source, plan, fit, options.validate()
        self.exclude_heldout = exclude_heldout
        self.names = [n for n in modules if plan.get(n) is not None]
        self.bpu, self.need_cov, self.fisher = max(1, int(blocks_per_unit)), need_cov, dict(fisher or {})
        self.device = source.device
        self.progress = progress
        self.ridges: dict[str, float] = {}
        self.on_replace, self.dry, self.joint = on_replace, dry, joint
        self.comm = comm or Comm.current()
        self._turn = 0  # groups fitted so far (a joint group's rank in a distributed run)
        if dry and options.mode != "one-shot":
            raise ConfigError("a dry pass (statistics of the dense model only) runs in one-shot mode")
        if self.bpu > 1 and options.granularity == "subgroup":
            raise ConfigError("this structure fits several blocks jointly; use --granularity block")

    # -- statistics ----------------------------------------------------------------------------
    def _modules(self, names) -> dict[str, nn.Module]:
        return {n: self.source.model.get_submodule(n) for n in names}

    def _held_from(self, nb: int) -> int:
        """Global index of the first held-out batch (the last ``holdout`` windows), ``nb`` if none."""
        if self.opts.refit_ridge is not None and not self.exclude_heldout:
            return nb
        if nb < 2:
            why = ("validating a byte allocation" if self.exclude_heldout else "choosing the refit ridge")
            raise ConfigError(f"{why} needs at least two calibration windows (one is held out): raise "
                              "--calib-windows" + ("" if self.exclude_heldout else ", pass --refit-ridge, or --no-refit"))
        return nb - max(1, min(nb - 1, math.ceil(self.opts.holdout / self.opts.batch_size)))

    def heldout(self, windows: torch.Tensor) -> torch.Tensor:
        """The held-out calibration windows of a pass over ``windows`` (the last batches, see the module doc)."""
        n = int(windows.shape[0])
        bs = self._batch_size(n)
        return windows[self._held_from(-(-n // bs)) * bs:]

    def _batch_size(self, n: int) -> int:
        """The batch size a pass over ``n`` windows uses: a short calibration set whose windows must be held
        out is split into two batches."""
        if (self.opts.refit and self.opts.refit_ridge is None or self.exclude_heldout) and 2 <= n <= self.opts.batch_size:
            return -(-n // 2)
        return self.opts.batch_size

    def _collect(self, names, chain, acts, dense) -> tuple[dict[str, LayerStats], dict]:
        """``(stats, split)``: per layer statistics over all windows; or, for a refit whose ridge is
        chosen, ``({}, {"fit": sums over the non-held-out windows, "held": HeldOut})`` (the held-out
        windows run in :meth:`choose_ridge`, which adds their sums). Each rank runs its own batches;
        the sums are then added across ranks."""
        mods = self._modules(names)
        comm = self.comm
        if dense is None:
            held_from = self._held_from(self.nb) if self.exclude_heldout else self.nb

            def local():
                with StatsAccumulator(mods, cov=self.need_cov, device=self.device, share=True) as acc:
                    for b in range(len(acts.hidden)):
                        if acts.ids[b] < held_from:
                            _run_until(chain, acts, b, mods, self.device)
                return acc.stats
            found = comm.agreed(local)
            _sum_input_stats(comm, [found[n] for n in names])
            return {n: LayerStats(found[n], self.fisher.get(n)) for n in names}, {}
        choose = self.opts.refit_ridge is None
        held_from = self._held_from(self.nb)
        held = [b for b, gb in enumerate(acts.ids) if gb >= held_from]
        share = dense.leaders(names)

        def local():
            with PairedAccumulator(None, mods, cov=True, device=self.device, share=share) as acc:
                for b in range(len(acts.hidden)):
                    if b not in held:
                        for n, x in dense.batch(b, names).items():
                            acc.record(n, x)
                        _run_until(chain, acts, b, mods, self.device)
            return acc.sums
        sums = comm.agreed(local)
        self._sum_pairs(names, mods, sums, share)
        # every layer is in ``sums``: _run_until raises for one that never ran, _sum_pairs fills a rank's gaps
        stats = self._with_fisher({n: LayerStats(sums[n][0], cross=sums[n][1]) for n in names})
        if not choose:
            for st in stats.values():
                st.ridge = self.opts.refit_ridge
            return stats, {}
        return {}, {"fit": stats, "held": HeldOut(chain, acts, dense, mods, held)}

    def _sum_pairs(self, names, mods: Mapping[str, nn.Module], sums: dict[str, list],
                   share: Mapping[str, str]) -> None:
        """All-reduce the paired sums ``sums[name] = [InputStats C', M]`` across ranks, each shared pair
        (``share``: layer -> the layer whose sums it uses) once; zeros for a layer this rank never ran."""
        comm = self.comm
        if not comm.active:
            return
        for n in names:
            if n not in sums:
                lead = share.get(n, n)
                if lead != n and lead in sums:
                    sums[n] = sums[lead]
                    continue
                k = linear_shape(mods[n])[1]
                sums[n] = [InputStats.zeros(k, device=self.device),
                           torch.zeros(k, k, dtype=torch.float64, device=self.device)]
        uniq = list({id(sums[n]): sums[n] for n in names}.values())
        _sum_input_stats(comm, [p[0] for p in uniq])
        comm.sum_([p[1] for p in uniq])

    def _with_fisher(self, stats: dict[str, LayerStats]) -> dict[str, LayerStats]:
        """The dense model's Fisher diagonal (collected once, before the pass) on each layer's stats."""
        for n, st in stats.items():
            st.fisher = self.fisher.get(n)
        return stats

    # -- fitting ---------------------------------------------------------------------------------
    def _inputs(self, names, stats: Mapping[str, LayerStats]) -> dict[str, LayerInput]:
        out = {}
        for n in names:
            mod = self.source.model.get_submodule(n)
            W = linear_weight(mod).detach().to(torch.float32)
            bias = linear_bias(mod)
            out[n] = LayerInput(W, None if bias is None else bias.detach(), stats[n], self.plan[n])
        return out

    def _owners(self, names) -> dict[str, int]:
        """The rank that fits each layer of the group (all rank 0's without a process group)."""
        cost = {}
        for n in names:
            m, k = linear_shape(self.source.model.get_submodule(n))
            cost[n] = float(m) * k * min(m, k)  # the SVD's flops
        return self.comm.owners(list(names), cost, joint=self.joint, turn=self._turn)

    def _fit_mine(self, names, stats, owners) -> dict[str, StructuredLinear]:
        """Fit the layers of ``names`` this rank owns (every rank raises if any rank's fit failed)."""
        mine = [n for n in names if owners[n] == self.comm.rank]
        return self.comm.agreed(lambda: self.fit(self._inputs(mine, stats)) if mine else {})

    def choose_ridge(self, names, split: dict) -> float:
        """The candidate ridge whose fit on the non-held-out windows (``split["fit"]``) has the smallest
        held-out error ``sum_layers ||W X_h - W' X'_h||^2`` (:func:`heldout_errors`), the held-out
        windows run once for all candidates. While they run, their sums are added to ``split["fit"]``
        in place, which then holds the sums over every window: the held-out windows never have
        statistics of their own (at 7B that saves ``2 f^2`` float64 = 1.9 GB on ``down_proj``)."""
        fit, held = split["fit"], split["held"]
        comm = self.comm
        owners = self._owners(names)
        candidates = []
        for lam in RIDGE_CANDIDATES:
            stats = {n: LayerStats(fit[n].inputs, fit[n].fisher, None if math.isinf(lam) else fit[n].cross,
                                   None if math.isinf(lam) else lam) for n in names}
            layers = self._fit_mine(names, stats, owners)
            candidates.append(comm.share_layers(list(names), owners, layers, self.device))  # every rank scores
        weights = {n: linear_weight(held.mods[n]).detach().to(self.device, torch.float32) for n in names}
        errors = torch.zeros(len(RIDGE_CANDIDATES), dtype=torch.float64)

        def score(name: str, x: torch.Tensor, xp: torch.Tensor) -> None:
            got = heldout_errors(weights[name], [layers[name] for layers in candidates], x, xp, self.device)
            errors.add_(torch.tensor(got, dtype=torch.float64))

        share = held.dense.leaders(names)
        pairs = {n: [fit[n].inputs, fit[n].cross] for n in names if share[n] == n}
        sums = {n: pairs[share[n]] for n in names}  # a layer sharing its leader's sums gets its very list
        if self.exclude_heldout:
            sums = {}  # scored only: their sums go to a throw-away accumulator
        elif comm.active and comm.rank != 0:  # rank 0 keeps the (reduced) fit sums; the others add theirs
            for st, M in pairs.values():
                for t in (st.cov, st.abs_sum, st.sq_sum, M):
                    t.zero_()
                st.n = 0

        def local():
            with PairedAccumulator(None, held.mods, cov=True, device=self.device, on_pair=score, sums=sums,
                                   share=share) as acc:
                for b in held.batches:
                    for n, x in held.dense.batch(b, names).items():
                        acc.record(n, x)
                    _run_until(held.chain, held.acts, b, held.mods, self.device)
        comm.agreed(local)
        if not self.exclude_heldout:
            self._sum_pairs(names, held.mods, sums, share)
        comm.sum_([errors])
        best, best_val = None, math.inf
        for lam, val in zip(RIDGE_CANDIDATES, errors.tolist()):
            if val < best_val:
                best, best_val = lam, val
        return best

    def _fit_group(self, names, stats, split, refit: bool = True) -> None:
        if split:
            lam = self.choose_ridge(names, split)
            stats = split.pop("fit")
            split.clear()
            for n in names:
                self.ridges[n] = lam
                if math.isinf(lam):
                    stats[n].cross, stats[n].ridge = None, None
                else:
                    stats[n].ridge = lam
        elif self.opts.refit and refit:
            for n in names:
                self.ridges[n] = float(self.opts.refit_ridge)
        if self.dry:  # spectra for the allocator: every rank factorizes every layer
            self.fit(self._inputs(names, stats))
            self._bar.update(len(names))
            return
        owners = self._owners(names)
        self._turn += 1
        layers = self._fit_mine(names, stats, owners)
        layers = self.comm.share_layers(list(names), owners, layers, self.device)
        for n in names:
            self._bar.update()
            old = self.source.model.get_submodule(n)
            home = linear_weight(old).device  # the compute device inside a unit; the model's outside
            set_module(self.source.model, n, layers[n].to(home))
            self.source.retire(old)
            if self.on_replace is not None:
                self.on_replace(n, layers[n], self.ridges.get(n))

    # -- the pass ----------------------------------------------------------------------------------
    def _groups(self, unit: list[int], names: list[str], acts: Activations) -> list[list[str]]:
        if self.opts.granularity == "block" or self.opts.mode == "one-shot":
            return [names]
        i = unit[0]
        args, kwargs = acts.args(0, i)
        return dataflow_groups(self.source.blocks[i], self._modules(names), acts.hidden[0], args, kwargs,
                               self.device)

    @torch.no_grad()
    def run(self, windows: torch.Tensor) -> None:
        n = int(windows.shape[0])
        if self._batch_size(n) != self.opts.batch_size:
            # windows are held out (the ridge's choice, a validation): a short calibration set in two batches
            self.opts = dataclasses.replace(self.opts, batch_size=self._batch_size(n))
        src, opts = self.source, self.opts
        prefix = src.prefix
        by_block: dict[int, list[str]] = {}
        rest = []
        for n in self.names:
            i = block_index(n, prefix)
            (rest if i is None else by_block.setdefault(i, [])).append(n)
        if rest and not src.in_memory:
            raise ConfigError(f"low-memory mode compresses layers inside the decoder blocks only; {rest[:3]} are "
                              "outside them: drop them from --targets or drop --low-memory")
        self._bar = tqdm(total=len(self.names), desc="compress", disable=not self.progress, leave=False)
        if by_block:
            self._blocks(windows, by_block)
        if rest:  # targeted layers outside the decoder blocks: one pass on the partly compressed model
            self._check_weights(rest)
            fit_windows = windows[:len(windows) - len(self.heldout(windows))] if self.exclude_heldout else windows
            st = self.comm.agreed(collect_input_stats, src.model, fit_windows, rest, opts.batch_size, cov=self.need_cov)
            # fitted to W (no refit: the pass has no dense twin of the compressed prefix to pair with)
            self._fit_group(rest, {n: LayerStats(st[n], self.fisher.get(n)) for n in rest}, {}, refit=False)
        self._bar.close()

    def _check_weights(self, names) -> None:
        """Non-finite weights are named before calibration (else the first symptom is the non-finite
        activations of a later layer in the block); the one check of every targeted weight."""
        for n in names:
            if not bool(torch.isfinite(linear_weight(self.source.model.get_submodule(n))).all()):
                raise NumericalError(f"layer {n} has non-finite weights (nan/inf); fix or reload the model")

    def _blocks(self, windows: torch.Tensor, by_block: dict[int, list[str]]) -> None:
        src, opts, comm = self.source, self.opts, self.comm
        self.nb = -(-int(windows.shape[0]) // opts.batch_size)
        mine = comm.agreed(comm.batches, self.nb)
        store = None if src.spill is None else SpilledBatches(src.spill)
        with src.outside(windows):
            acts = comm.agreed(capture_inputs, src.model, src.blocks, windows, opts.batch_size, self.device,
                               batches=mine, store=store)
        if not src.in_memory:
            trim()
        dense_acts = acts.copy() if opts.refit else None
        try:
            self._units(acts, dense_acts, by_block)
        finally:
            for a in (acts, dense_acts):
                if a is not None:
                    a.close()

    def _units(self, acts: Activations, dense_acts: Activations | None, by_block: dict[int, list[str]]) -> None:
        src, opts = self.source, self.opts
        last = max(by_block)
        for start in range(0, last + 1, self.bpu):
            unit = list(range(start, min(start + self.bpu, len(src.blocks))))
            chain = [(i, src.load(i)) for i in unit]
            names = [n for i in unit for n in by_block.get(i, [])]
            self._check_weights(names)
            dense = None
            if names and opts.refit:  # the dense unit's inputs of every layer, and its output (the dense advance)
                dense_blocks = {i: src.dense_copy(i) for i in unit}
                pre = src.prefix + "."
                dmods = {}
                for n in names:
                    i, rest = n[len(pre):].split(".", 1)
                    dmods[n] = dense_blocks[int(i)].get_submodule(rest)
                dense = self.comm.agreed(record_dense_inputs, [(i, dense_blocks[i]) for i in unit], dense_acts,
                                         dmods, self.device, src.spill)
                del dense_blocks, dmods
            if opts.mode == "one-shot":
                stats, _ = self._collect(names, chain, acts, None) if names else ({}, {})
                advance(chain, acts, self.device, inplace=True)
                if names:
                    self._fit_group(names, stats, {})
            else:
                for group in (self._groups(unit, names, acts) if names else []):
                    stats, split = self._collect(group, chain, acts, dense)
                    self._fit_group(group, stats, split)
                    del stats, split
                if start + self.bpu <= last:
                    advance(chain, acts, self.device, inplace=True)
            recorded = dense is not None
            if recorded:
                dense.close()
            del dense
            for i in unit:
                src.release(i, write=not self.dry)
            if not src.in_memory or recorded:  # the dense inputs' many small tensors: give the heap back
                trim()
        for i in range(last + 1, len(src.blocks)):  # blocks after the last target: streamed sources copy them
            if not src.in_memory and not self.dry:
                src.load(i)
                src.release(i)
