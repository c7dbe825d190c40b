"""``compress``: replace a model's target linear layers by fitted structures under one global budget.

Flow (the same for the model in memory and for a checkpoint streamed from disk):

1. the method (``structure`` + its options) and the target layers (default: every linear layer inside
   the model's repeated blocks, :func:`rankwise.models.surgery.find_linears`);
2. calibration windows (default corpus, user text, token ids or ready windows), and the empirical
   Fisher of the dense model if the method reads it;
3. the plan: the budget (``ratio`` of stored weight values removed, or ``bits_per_weight``) shared out
   by the allocator (``uniform``, or a spectrum/sensitivity allocator for low rank, fed by a dry
   one-shot pass that factorizes every layer of the dense model);
4. the engine (:mod:`.engine`) calibrates and replaces the layers unit by unit;
5. the report: per layer the structure, its hyperparameters, values and bytes before and after.

:func:`compress` works in place on a model in memory (:func:`rankwise.compress` is the copying verb);
:func:`compress_low_memory` reads a checkpoint block by block and writes the result block by block.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..calibration.sampling import (DEFAULT_CALIB_WINDOWS, DEFAULT_SEED, DEFAULT_SEQLEN, calib_windows, check_seqlen,
                                    tokenize)
from ..calibration.stats import ABS_MEAN, COV, FISHER
from ..errors import ConfigError, NumericalError
from ..models.surgery import count_parameters, find_linears, linear_shape
from ..structures.base import StructuredLinear
from .allocation import AllocateOptions, AllocationContext, AllocationRequest, get_allocator
from .allocation.allocators import CANDIDATES
from .allocation.budget import check_plan, check_ratio
from .engine import Engine, EngineOptions, ModelSource, StreamedSource, WeightSource
from .engine.device import compute_device
from .engine.memory import trim
from .engine.distributed import Comm, module_fingerprint, sigterm_as_exit
from ..options import make_options
from .methods.base import CandidateGrid, LayerInput, Method, get_method
from .pruning import is_pruning, prune_model
from .report import CompressionReport, LayerReport
from .saving import manifest_extra

log = logging.getLogger(__name__)

DEFAULT_STRUCTURE = "lowrank"
DEFAULT_RATIO = 0.4
DEFAULT_FISHER_WINDOWS = 8


@dataclass
class CalibOptions:
    """Calibration sampling (serialized into ``rankwise.json``)."""

    windows: int = DEFAULT_CALIB_WINDOWS
    seqlen: int = DEFAULT_SEQLEN
    seed: int = DEFAULT_SEED
    fisher_windows: int = DEFAULT_FISHER_WINDOWS

    def validate(self) -> "CalibOptions":
        for name in ("windows", "seqlen", "fisher_windows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "seqlen" else 1):
                raise ConfigError(f"calibration {name} must be an integer >= {2 if name == 'seqlen' else 1}, got {v!r}")
        return self


@dataclass
class CompressConfig:
    """Everything that decides a compression run; saved in ``rankwise.json`` under ``config``."""

    structure: str = DEFAULT_STRUCTURE
    options: dict[str, Any] = field(default_factory=dict)       # the structure's options
    ratio: float | None = None                                  # params budget: fraction removed
    bits_per_weight: float | None = None                        # bytes budget
    targets: Sequence[str] | str | None = None
    allocate: str = "uniform"
    allocate_options: AllocateOptions = field(default_factory=AllocateOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)
    calib: CalibOptions = field(default_factory=CalibOptions)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets) if isinstance(self.targets, (list, tuple)) else self.targets
        return d


def calibration_windows(model: nn.Module, calib, tokenizer, n: int = DEFAULT_CALIB_WINDOWS,
                        seqlen: int = DEFAULT_SEQLEN, seed: int = DEFAULT_SEED) -> tuple[torch.Tensor, str]:
    """``(windows (n, L), source)`` from ``calib``: ``None`` (default corpus, calib split), a text, a
    list of texts (joined by blank lines), 1-D token ids (sampled), or ready (n, L) windows."""
    if isinstance(calib, torch.Tensor):
        if calib.ndim == 2:
            return calib.long(), "windows"
        if calib.ndim != 1:
            raise ConfigError(f"calibration ids must be 1-D token ids or (n, L) windows, got shape {tuple(calib.shape)}")
        ids, source = calib.long(), "ids"
    else:
        if tokenizer is None:
            raise ConfigError("calibration text needs a tokenizer: pass tokenizer=..., or pass token ids as calib")
        if calib is None:
            from ..calibration.corpus import load_corpus

            text, source = load_corpus("calib"), "wiki calib"
        elif isinstance(calib, str):
            text, source = calib, "text"
        else:
            text, source = "\n\n".join(calib), "texts"
        ids = tokenize(tokenizer, text)
    check_seqlen(model, seqlen)
    return calib_windows(ids, n, seqlen, seed), source


def check_bits(bits: float) -> float:
    try:
        b = float(bits)
    except (TypeError, ValueError):
        raise ConfigError(f"--bits-per-weight must be a number, got {bits!r}") from None
    if not math.isfinite(b) or not 1.0 <= b < 32.0:
        raise ConfigError(f"--bits-per-weight is the stored bits per targeted weight, all overhead counted, and must "
                          f"be in [1, 32), got {bits!r}; e.g. 3 or 4.25")
    return b


def check_allocator(allocate: str, structure: str, meth: Method) -> None:
    """:class:`ConfigError` unless ``--allocate`` shares the budget ``--structure`` takes and the method
    provides what the allocator reads (a factorization for ranks, candidate settings for bytes)."""
    from .allocation import ALLOCATORS

    alloc = get_allocator(allocate)
    if allocate == "uniform":
        return
    if alloc.budget != meth.budget:
        same = sorted(n for n in ALLOCATORS.names() if ALLOCATORS.get(n).budget == meth.budget)
        flag = {"params": "--ratio", "bytes": "--bits-per-weight"}
        raise ConfigError(f"--allocate {allocate} shares a {alloc.budget} budget ({flag[alloc.budget]}); --structure "
                          f"{structure} takes a {meth.budget} budget ({flag[meth.budget]}): use --allocate uniform"
                          + (f" or one of {', '.join(same)}" if same else ""))
    if alloc.needs_spectra and not hasattr(meth, "factorize"):
        raise ConfigError(f"--allocate {allocate} allocates ranks of low-rank factors; --structure {structure} "
                          "takes --allocate uniform")
    if alloc.needs == "costs" and not hasattr(meth, "candidates"):
        raise ConfigError(f"--allocate {allocate} chooses among a structure's candidate settings; --structure "
                          f"{structure} offers none: use --allocate uniform")


#: Objectives of the byte allocator: summed relative whitened errors, the predicted loss increase, or
#: ("auto") both plans validated on the held-out windows (relative alone when not validating).
OBJECTIVES = ("auto", "relative", "loss")
#: The validation's label of the loss-weighted plan under the "auto" objective.
LOSS_PLAN = "bits-greedy-loss"


def default_structure(bits_per_weight: float | None, options: Mapping[str, Any]) -> str:
    """The structure when none is named: ``mixed`` under a byte budget (``--bits-per-weight``), ``gptq`` for a
    code width alone (``--bits``), else low rank."""
    if bits_per_weight is not None:
        return "mixed"
    if options.get("bits") is not None:
        return "gptq"
    return DEFAULT_STRUCTURE


def _single_setting(meth: Method) -> bool:
    """The byte method has one setting per layer (fixed width and group size, no rank to choose)."""
    o = meth.options
    return getattr(o, "bits", None) is not None and getattr(o, "group_size", None) is not None \
        and not hasattr(o, "rank")


def validates(meth: Method, cfg: "CompressConfig") -> bool:
    """Whether the run validates its byte allocation against the uniform plan (:mod:`.validation`)."""
    alloc = get_allocator(cfg.allocate)
    return (cfg.bits_per_weight is not None and alloc.budget == "bytes" and alloc.needs == "costs"
            and cfg.allocate_options.validate and hasattr(meth, "uniform_plan"))


def build_config(structure: str | None = None, ratio: float | None = None, bits_per_weight: float | None = None, *,
                 method: str | None = None, options: Mapping[str, Any] | None = None, targets=None,
                 allocate: str | None = None, allocate_options: AllocateOptions | Mapping[str, Any] | None = None,
                 engine: EngineOptions | Mapping[str, Any] | None = None,
                 calib_options: CalibOptions | Mapping[str, Any] | None = None) -> tuple[CompressConfig, Method]:
    """A validated :class:`CompressConfig` and its method instance (fails before any model work)."""
    opts = dict(options or {})
    structure = structure or default_structure(bits_per_weight, opts)
    if method is not None:
        if "method" in opts and opts["method"] != method:
            raise ConfigError(f"method given twice: {method!r} and options['method']={opts['method']!r}")
        opts["method"] = method
    meth = get_method(structure, opts)
    if meth.budget == "params":
        if bits_per_weight is not None:
            raise ConfigError(f"--structure {structure} takes a parameter budget (--ratio), not --bits-per-weight")
        ratio = check_ratio(DEFAULT_RATIO if ratio is None else ratio)
    else:
        if ratio is not None:
            raise ConfigError(f"--structure {structure} takes a byte budget (--bits-per-weight), not --ratio")
        if bits_per_weight is None and getattr(meth.options, "bits", None) is None:
            raise ConfigError(f"--structure {structure} needs --bits-per-weight B (stored bits per weight, all overhead "
                              "counted; widths and group sizes chosen per layer) or --bits B (the code width of "
                              "every layer)")
        if bits_per_weight is not None:
            bits_per_weight = check_bits(bits_per_weight)
        elif meth.name in ("lorc", "lq") and meth.options.rank is None:
            raise ConfigError(f"--structure {structure} needs --bits-per-weight B (stored bits per weight, all "
                              "overhead counted): the rank takes what the codes leave (or fix both --bits and "
                              "--set rank=K)")
    if allocate is None:  # SVD-LLM v2 is its truncation and its allocation together
        if meth.budget == "bytes":
            allocate = "uniform" if bits_per_weight is None or _single_setting(meth) else "bits-greedy"
        else:
            allocate = "svd-llm-v2" if opts.get("method") == "svd-llm-v2" else "uniform"
    check_allocator(allocate, structure, meth)
    if meth.budget == "bytes" and bits_per_weight is None and allocate != "uniform":
        raise ConfigError(f"--allocate {allocate} shares a byte budget among the layers: pass --bits-per-weight B "
                          "(with --bits B alone every layer takes B-bit codes: --allocate uniform)")
    cfg = CompressConfig(structure, dataclasses.asdict(meth.options), ratio, bits_per_weight, targets, allocate,
                         make_options(AllocateOptions, allocate_options, {}, "allocator"),
                         make_options(EngineOptions, engine, {}, "engine").resolved(meth.engine_defaults()).validate(),
                         make_options(CalibOptions, calib_options, {}, "calibration").validate())
    if cfg.allocate_options.min_rank < 1 or not isinstance(cfg.allocate_options.min_rank, int):
        raise ConfigError(f"--min-rank must be an integer >= 1, got {cfg.allocate_options.min_rank!r}")
    candidate_grid(cfg.allocate_options)  # checks the measurement's name
    if cfg.allocate_options.objective not in OBJECTIVES:
        raise ConfigError(f"unknown allocation objective {cfg.allocate_options.objective!r}; valid: "
                          f"{', '.join(OBJECTIVES)}")
    return cfg, meth


def candidate_grid(options: AllocateOptions) -> CandidateGrid:
    """The byte allocators' candidate grid from the allocator options."""
    return CandidateGrid(tuple(options.bits) if options.bits else None,
                         tuple(options.group_sizes) if options.group_sizes else None, options.measure)


# -- plan ------------------------------------------------------------------------------------------

def _targets(method: Method, cfg: CompressConfig, shapes: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    if method.budget == "params":
        return {n: (1.0 - cfg.ratio) * m * k for n, (m, k) in shapes.items()}
    return {n: cfg.bits_per_weight * m * k / 8.0 for n, (m, k) in shapes.items()}


def make_plan(method: Method, cfg: CompressConfig, shapes: Mapping[str, tuple[int, int]],
              measured: Mapping[str, Any], context: AllocationContext, dense_elem: int = 4) -> tuple[dict, dict]:
    """``({name: spec or None}, allocation info)``.

    ``measured`` is what the allocator's dry pass measured per layer (:func:`measure_layer`):
    factorizations (``needs="spectra"`` / ``"factors"``) or candidate tables (``needs="costs"``). A params method with a
    factorization gets its ranks from the allocator; a bytes method gets its specs from a bytes
    allocator (keeping a layer dense, ``dense_elem`` bytes a value, is one more candidate unless
    ``--bits`` is fixed), or with ``--allocate uniform`` the method's uniform plan (one setting for
    every layer within the budget).
    """
    alloc = get_allocator(cfg.allocate)
    if hasattr(method, "factorize") and method.budget == "params":
        req = AllocationRequest(cfg.ratio, shapes, measured, cfg.allocate_options, context)
        ranks = alloc.fn(req)
        if CANDIDATES in req.info:  # --allocate search: the rank profiles to validate against ``ranks``
            req.info[CANDIDATES] = {k: _rank_specs(shapes, p) for k, p in req.info[CANDIDATES].items()}
        return _rank_specs(shapes, ranks), req.info
    if method.budget == "bytes" and alloc.budget == "bytes":
        dense = None
        if cfg.allocate_options.dense and getattr(method.options, "bits", None) is None:
            dense = {n: m * k * dense_elem for n, (m, k) in shapes.items()}
        req = AllocationRequest(None, shapes, {}, cfg.allocate_options, context,
                                bits_per_weight=cfg.bits_per_weight, costs=measured, dense_bytes=dense,
                                weights=context.weights)
        return alloc.fn(req), req.info
    if method.budget == "bytes" and hasattr(method, "uniform_plan"):
        return method.uniform_plan(shapes, cfg.bits_per_weight, candidate_grid(cfg.allocate_options))
    plan = {}
    for n, target in _targets(method, cfg, shapes).items():
        try:
            plan[n] = method.plan_layer(shapes[n], target)
        except ConfigError as e:
            raise ConfigError(f"layer {n} ({shapes[n][0]} x {shapes[n][1]}): {e}") from None
    return plan, {}


def _rank_specs(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int | None]) -> dict:
    """A checked rank plan as ``{name: {"rank": k} or None}``."""
    check_plan(shapes, ranks)
    return {n: (None if ranks.get(n) is None else {"rank": int(ranks[n])}) for n in shapes}


def measure_layer(method: Method, needs: str, W: torch.Tensor, stats, options: AllocateOptions | None = None):
    """What an allocator with ``needs`` reads of one layer, measured on the dense model's statistics:
    its spectrum (``"spectra"``: the factorization with the singular vectors dropped, the final pass
    refactorizes), its whole factorization (``"factors"``) or its candidate settings with bytes and
    whitened errors (``"costs"``)."""
    if needs in ("spectra", "factors"):
        fac = method.factorize(W, stats)
        if needs == "spectra":
            fac.U, fac.Vh = fac.U[:, :0], fac.Vh[:0]
        return fac
    if needs == "costs":
        return method.candidates(W, stats, candidate_grid(options or AllocateOptions()))
    raise ConfigError(f"unknown allocator measurement {needs!r}")


# -- fitting and reporting ---------------------------------------------------------------------------

class _Fitter:
    """The engine's ``fit``: the method's fit plus finiteness checks and the cast to the model's dtype;
    ``replaced`` records the report of each layer that went into the model."""

    def __init__(self, method: Method, dtype: torch.dtype) -> None:
        self.method, self.dtype = method, dtype
        self.layers: dict[str, LayerReport] = {}
        self.notes: dict[str, str] = {}  # the plan's per-layer fallback notes (spec["note"])

    def __call__(self, items: Mapping[str, LayerInput]) -> dict[str, StructuredLinear]:
        for name, x in items.items():
            if x.spec and x.spec.get("note"):
                self.notes[name] = str(x.spec["note"])
        try:
            layers = self.method.fit_unit(items)
        except NumericalError as e:
            raise NumericalError(f"layers {list(items)[:3]}: {e}") from None
        memo: dict = {}
        for name, layer in layers.items():
            for t in layer.state_dict().values():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise NumericalError(f"fitting {name} produced non-finite values; its calibration statistics may "
                                         "be degenerate (try more calibration windows or --whitening eigh)")
            layer.cast_(self.dtype, memo)
        return layers

    def replaced(self, name: str, layer: StructuredLinear, shape: tuple[int, int], elem: int,
                 ridge: float | None) -> None:
        m, n = shape
        info = getattr(layer, "fit_info", {}) or {}
        note = "; ".join(x for x in (self.notes.get(name), info.get("note")) if x) or None
        self.layers[name] = LayerReport(name, shape, layer.kind, layer.spec(), m * n, layer.num_stored(),
                                        m * n * elem, layer.nbytes(), float(info.get("damping", 0.0)), ridge, note)


def _dense_report(name: str, shape: tuple[int, int], elem: int) -> LayerReport:
    m, n = shape
    return LayerReport(name, shape, None, None, m * n, m * n, m * n * elem, m * n * elem)


class _DryFitter:
    """A dry pass's ``fit``: what the allocator reads of each layer (:func:`measure_layer`), kept for the plan."""

    def __init__(self, method: Method, needs: str, options: AllocateOptions) -> None:
        self.method, self.needs, self.options, self.measured = method, needs, options, {}
        self.energy: dict[str, float] = {}  # tr(W C W^T) of each layer (objective "loss")

    def __call__(self, items: Mapping[str, LayerInput]) -> dict:
        for name, x in items.items():
            self.measured[name] = measure_layer(self.method, self.needs, x.W, x.stats, self.options)
            if self.needs == "costs" and self.options.objective in ("loss", "auto"):
                C = x.stats.covariance().to(torch.float32)
                W = x.W.to(torch.float32)
                self.energy[name] = float(((W @ C) * W).sum(dtype=torch.float64))
        return {}


def _needs(method: Method) -> set[str]:
    return set(method.needs())


def _joint(method: Method) -> bool:
    """Whether the method fits a unit's layers together (a distributed run keeps them on one rank)."""
    return type(method).fit_unit is not Method.fit_unit


def run_device(cfg: CompressConfig, dtype: torch.dtype, comm: Comm) -> torch.device:
    """This rank's compute device, checked to exist and to compute in ``dtype``: ``--device cuda``
    in a distributed run means each rank's current GPU (``torchrun`` sets it to ``LOCAL_RANK``)."""
    spec = cfg.engine.device
    if comm.active and str(spec) == "cuda" and torch.cuda.is_available():
        spec = f"cuda:{torch.cuda.current_device()}"
    return compute_device(spec, dtype)


def windows_digest(windows: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def _agreement(cfg: CompressConfig, model_id: Mapping[str, Any], windows: torch.Tensor) -> dict[str, Any]:
    """What every rank of a distributed run must agree on (compared before any collective work)."""
    import transformers

    from .. import __version__

    return {"config": cfg.to_dict(), "model": dict(model_id), "calibration windows": windows_digest(windows),
            "windows shape": list(windows.shape),
            "versions": [__version__, torch.__version__, transformers.__version__]}


def _run(source: WeightSource, modules: Mapping[str, nn.Module], method: Method, cfg: CompressConfig,
         windows: torch.Tensor, fisher: Mapping[str, torch.Tensor], progress: bool,
         context: AllocationContext) -> tuple[dict[str, LayerReport], dict]:
    """The plan (after a dry one-shot pass on the dense model when the allocator measures layers), the
    engine pass, and for a validated byte allocation the uniform plan's pass to compare with
    (:mod:`.validation`)."""
    shapes = {n: linear_shape(m) for n, m in modules.items()}
    needs = _needs(method)
    need_cov = COV in needs
    alloc = get_allocator(cfg.allocate)
    validate = validates(method, cfg)
    if validate:
        from .validation import check_validation_possible

        check_validation_possible(source.in_memory)
    if alloc.needs == "costs" and cfg.bits_per_weight is not None and hasattr(method, "candidate_specs"):
        check_feasible(method, cfg, shapes)  # before any measuring: the error names the smallest budget
    measured: dict = {}
    if alloc.needs != "none":
        probe = _DryFitter(method, alloc.needs, cfg.allocate_options)
        dry = dataclasses.replace(cfg.engine, mode="one-shot", granularity="block", refit=False)
        Engine(source, modules, {n: {} for n in modules}, probe, dry, need_cov=need_cov or alloc.needs == "costs",
               fisher=fisher, progress=progress, dry=True, exclude_heldout=validate).run(windows)
        measured = probe.measured
    objective = cfg.allocate_options.objective
    loss_weights = None
    if alloc.needs == "costs" and (objective == "loss" or (objective == "auto" and validate)):
        if not context.output_energy:
            raise ConfigError("the byte allocator's loss objective needs the output gradients of the dense model, "
                              "which were not measured (the whole model must be in memory)")
        loss_weights = {n: context.output_energy[n] * probe.energy[n] for n in shapes}
    dtype = source.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    context.weights = loss_weights if objective == "loss" else None
    plan, info = make_plan(method, cfg, shapes, measured, context, dense_elem=elem)
    plans = {cfg.allocate: plan}
    profiles = info.pop(CANDIDATES, None)  # --allocate search: the uniform plan against the rank profiles
    if objective == "auto" and loss_weights is not None:  # the loss-weighted plan is validated too
        context.weights = loss_weights
        plan_loss, info_loss = make_plan(method, cfg, shapes, measured, context, dense_elem=elem)
        context.weights = None
        info[LOSS_PLAN.replace("-", "_")] = info_loss.get("bits_greedy")
        if not _same_plan(plan_loss, plan):
            plans[LOSS_PLAN] = plan_loss

    def run_pass(p: Mapping[str, Any], exclude: bool = False):
        fitter = _Fitter(method, dtype)
        engine = Engine(source, modules, p, fitter, cfg.engine, blocks_per_unit=method.blocks_per_unit,
                        need_cov=need_cov, fisher=fisher, progress=progress, joint=_joint(method),
                        on_replace=lambda n, layer, ridge: fitter.replaced(n, layer, shapes[n], elem, ridge),
                        exclude_heldout=exclude)
        engine.run(windows)
        reports = {n: fitter.layers.get(n) or _dense_report(n, shapes[n], elem) for n in modules}
        if any(fitter.layers.get(n) is None for n in p if p[n] is not None):
            raise NumericalError("some planned layers were never replaced; the engine did not reach them")
        return reports, engine

    chosen = cfg.allocate
    if validate:
        try:
            base, base_info = method.uniform_plan(shapes, cfg.bits_per_weight, candidate_grid(cfg.allocate_options))
        except ConfigError as e:
            base, base_info = None, {"uniform": {"infeasible": str(e)}}
        info.update(base_info)
        plans = {k: p for k, p in plans.items() if base is None or not _same_plan(p, base)}
        if base is None or not plans:
            info["validation"] = {"skipped": "no uniform plan fits the budget" if base is None
                                  else "the allocated plan is the uniform plan"}
            validate = False
    if profiles is not None:
        plans = {k: p for k, p in profiles.items() if not _same_plan(p, plan)}
        base, validate = plan, bool(plans)
        if not plans:
            info["validation"] = {"skipped": "every rank profile is the uniform plan on these layers"}
    if validate:
        from .validation import validate_plans

        chosen, reports, info["validation"] = validate_plans(
            source.model, modules, {**plans, "uniform": base}, lambda p: run_pass(p, exclude=True),
            windows, cfg.engine.batch_size, progress)
    else:
        reports, _ = run_pass(plan)
    if method.budget == "bytes" and cfg.bits_per_weight is not None:
        info["budget"] = budget_use(cfg.bits_per_weight, shapes, reports, info, chosen)
    return reports, info


def check_feasible(method: Method, cfg: CompressConfig, shapes: Mapping[str, tuple[int, int]]) -> None:
    """:class:`ConfigError` naming the smallest feasible budget when even the smallest candidate of every
    layer exceeds ``--bits-per-weight`` (bytes only, nothing fitted)."""
    from .allocation.bytes import check_byte_budget
    from .methods.base import Candidate
    from .methods.candidates import spec_bytes

    grid = candidate_grid(cfg.allocate_options)
    tables = {n: [Candidate(s, spec_bytes(shape, s), 0.0) for s in method.candidate_specs(shape, grid)]
              for n, shape in shapes.items()}
    check_byte_budget(cfg.bits_per_weight, shapes, tables, cfg.allocate_options.bits, cfg.allocate_options.group_sizes)


def _same_plan(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a.keys() == b.keys() and all((a[n] is None) == (b[n] is None) and (a[n] is None or dict(a[n]) == dict(b[n]))
                                        for n in a)


def budget_use(bits_per_weight: float, shapes: Mapping[str, tuple[int, int]], reports: Mapping[str, LayerReport],
               info: Mapping[str, Any], chosen: str) -> dict[str, Any]:
    """The byte budget against the stored bytes; ``reason`` when more than
    :data:`~.allocation.bytes.UNUSED_WARN` of it is unused."""
    from .allocation.bytes import UNUSED_WARN, byte_budget

    budget = byte_budget(bits_per_weight, shapes)
    used = sum(lr.bytes_after for lr in reports.values())
    total = sum(m * n for m, n in shapes.values())
    out = {"budget_bytes": budget, "used_bytes": used, "bits_per_weight": 8.0 * used / total,
           "unused_fraction": 1.0 - used / budget if budget else 0.0, "plan": chosen}
    if out["unused_fraction"] > UNUSED_WARN:
        if chosen == "uniform":
            uni = info.get("uniform", {})
            why = f"one setting for every layer ({uni.get('setting', 'uniform')})"
            nxt = uni.get("next_larger")
            why += (f": the next larger, {nxt['setting']}, needs {nxt['bits_per_weight']:.3f} bits per weight"
                    if nxt else ": no larger setting among the candidates")
            if "validation" in info and info["validation"].get("chosen") == "uniform":
                why += "; the allocated plan lost the held-out validation"
            elif uni.get("fixed"):
                why += "; --bits and --group-size are both fixed: drop one to let the allocator mix settings"
            elif "bits_greedy" not in info:
                why += "; the default allocator (bits-greedy) mixes settings to fill the budget"
        else:
            key = LOSS_PLAN.replace("-", "_") if chosen == LOSS_PLAN else "bits_greedy"
            why = (info.get(key) or {}).get("unused", "the candidates are discrete")
        out["reason"] = why
        log.warning("the plan leaves %.1f%% of the byte budget unused (%.3f of %.3f bits per weight): %s",
                    100 * out["unused_fraction"], out["bits_per_weight"], bits_per_weight, why)
    return out


def _report(cfg: CompressConfig, method: Method, layers: Mapping[str, LayerReport], info: dict, source_desc: dict,
            t0: float, model_before: int, model_after: int) -> CompressionReport:
    return CompressionReport(
        structure=method.name, method=str(cfg.options.get("method", method.name)),
        budget=({"ratio": cfg.ratio} if cfg.ratio is not None else {"bits_per_weight": cfg.bits_per_weight}
                if cfg.bits_per_weight is not None else {"bits": cfg.options.get("bits")}),
        allocate=cfg.allocate, mode=cfg.engine.mode, granularity=cfg.engine.granularity, refit=cfg.engine.refit,
        calibration=source_desc, layers=list(layers.values()), model_params_before=model_before,
        model_params_after=model_after, seconds=time.perf_counter() - t0, allocation=info or None,
        config=cfg.to_dict())


def _damping_summary(report: CompressionReport) -> None:
    if report.damped_layers:
        log.info("%d of %d covariances were not positive definite and got a small ridge (see the report's "
                 "per-layer 'damping')", len(report.damped_layers), len(report.layers))


class _QuietDamping(logging.Filter):
    """Per-layer damping notes go to the report (and one summary line), not one warning per layer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("covariance (")


# -- the two entry points -------------------------------------------------------------------------------

def compress(model: nn.Module, structure: str | None = None, ratio: float | None = None,
             bits_per_weight: float | None = None, *, method: str | None = None,
             options: Mapping[str, Any] | None = None, calib=None, tokenizer=None, targets=None,
             allocate: str | None = None, allocate_options=None, engine=None, calib_options=None,
             progress: bool = True, context: AllocationContext | None = None, **engine_kw
             ) -> tuple[nn.Module, CompressionReport]:
    """Compress ``model`` IN PLACE; returns ``(model, report)`` (:func:`rankwise.compress` copies first).

    ``structure``: a name in :data:`~.methods.base.STRUCTURES` (default ``lowrank``), ``options`` its
    options (``method`` is a shortcut for the low-rank objective). Budget: ``ratio`` (fraction of the
    targeted weight values removed, default 0.4) or ``bits_per_weight``. ``calib``: None (default
    corpus; needs ``tokenizer``), text, list of texts, 1-D token ids or (n, L) windows. Engine options
    (:class:`EngineOptions`: ``mode``, ``granularity``, ``refit``, ``refit_ridge``, ``holdout``,
    ``batch_size``, ``device``) as ``engine=`` or keywords; calibration (:class:`CalibOptions`:
    ``windows``, ``seqlen``, ``seed``, ``fisher_windows``) as ``calib_options=``.
    """
    t0 = time.perf_counter()
    engine = {**(dataclasses.asdict(engine) if isinstance(engine, EngineOptions) else dict(engine or {})),
              **engine_kw}
    comm = Comm.current()

    def preflight():
        cfg, meth = build_config(structure, ratio, bits_per_weight, method=method, options=options,
                                 targets=targets, allocate=allocate, allocate_options=allocate_options,
                                 engine=engine, calib_options=calib_options)
        model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        device = run_device(cfg, model_dtype, comm)
        modules = find_linears(model, targets)
        windows, source_name = calibration_windows(model, calib, tokenizer, cfg.calib.windows, cfg.calib.seqlen,
                                                   cfg.calib.seed)
        return cfg, meth, device, modules, windows, source_name

    cfg, meth, device, modules, windows, source_name = comm.agreed(preflight)
    if is_pruning(meth):
        if comm.active:
            raise ConfigError(f"--structure {meth.name} runs in one process; run it without torchrun")
        desc = {"source": source_name, "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
                "seed": cfg.calib.seed, "fisher_windows": 0}
        return model, prune_model(model, meth, cfg, windows, device, desc, progress)
    comm.check_same(_agreement(cfg, module_fingerprint(model) if comm.active else {}, windows))
    needs = _needs(meth)
    was_training = model.training
    model.eval()
    model_before = count_parameters(model)
    transform = meth.prepare_model(model)  # e.g. the residual stream's rotation: before any statistics
    fisher: dict = {}
    if FISHER in needs:
        from ..calibration.gradients import accumulate_gradients

        fisher = accumulate_gradients(model, windows[:cfg.calib.fisher_windows], list(modules), batch_size=1,
                                      squared=True, progress=progress)
    ctx = context or AllocationContext()
    ctx.model, ctx.windows, ctx.progress = model, windows, progress
    objective = cfg.allocate_options.objective
    if get_allocator(cfg.allocate).needs == "costs" and (objective == "loss" or (objective == "auto"
                                                                                 and validates(meth, cfg))):
        from ..calibration.gradients import output_gradient_energy

        ctx.output_energy = output_gradient_energy(model, windows[:cfg.calib.fisher_windows], list(modules),
                                                   progress=progress)
    filt = _QuietDamping()
    logging.getLogger("rankwise").addFilter(filt)
    try:
        layers, info = _run(ModelSource(model, device), modules, meth, cfg, windows, fisher, progress, ctx)
    finally:
        logging.getLogger("rankwise").removeFilter(filt)
    model.train(was_training)
    desc = {"source": source_name, "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
            "seed": cfg.calib.seed, "fisher_windows": min(cfg.calib.fisher_windows, int(windows.shape[0])) if fisher else 0}
    report = _report(cfg, meth, layers, info, desc, t0, model_before, count_parameters(model))
    report.model_transform = transform
    _damping_summary(report)
    return model, report


def compress_low_memory(model_arg: str | os.PathLike | None, out_dir: str | os.PathLike,
                        structure: str | None = None, ratio: float | None = None,
                        bits_per_weight: float | None = None, *, method: str | None = None,
                        options: Mapping[str, Any] | None = None, calib=None, targets=None,
                        allocate: str | None = None, allocate_options=None, engine=None, calib_options=None,
                        progress: bool = True, overwrite: bool = False, dtype: torch.dtype | str | None = None,
                        extra: Mapping[str, Any] | None = None, cache_on_disk: bool = True,
                        **engine_kw) -> CompressionReport:
    """Compress the checkpoint at ``model_arg`` (built-in name or HF directory) block by block into
    ``out_dir``: same options and same result as :func:`compress` followed by saving, with at most one
    block's weights in memory. The Fisher-weighted objective (gradients of the whole model) is not
    available. ``dtype``: compute/storage dtype (default: the checkpoint's).

    Memory (see BENCHMARKS.md, "memory model"): the calibration text is tokenized in chunks, the
    embeddings and head are never resident while blocks are compressed (the capture of the block-0
    inputs reads only the embedding rows of the calibration tokens; the output copies them from the
    checkpoint in chunks), and the cached activations are advanced in place. ``cache_on_disk`` (the
    default) keeps those activations (the refit's two caches) in files in a temporary directory beside
    ``out_dir``, one batch resident at a time (:mod:`.engine.spill`); off, they stay in memory.

    Inside a ``torch.distributed`` process group every rank runs this with the same arguments and
    only rank 0 writes ``out_dir`` (see :mod:`.engine.distributed`).
    """
    from transformers import AutoConfig

    from ..files import atomic_dir, check_new_output
    from ..models.loading import load_tokenizer
    from ..models.offline import hub_offline
    from ..models.registry import resolve_model
    from ..models.saved import MANIFEST, WEIGHTS_FILE, manifest, write_side_files
    from ..models.architecture import config_class, record
    from ..models.skeleton import empty_model
    from ..models.streaming import FileTensors, index_dtypes, index_shapes, stream_merge, weight_index
    from ..models.surgery import block_prefix
    from .engine.device import parse_dtype
    from .engine.spill import spill_directory
    from .rankplot import write_rank_report

    t0 = time.perf_counter()
    engine = {**(dataclasses.asdict(engine) if isinstance(engine, EngineOptions) else dict(engine or {})),
              **engine_kw}
    comm = Comm.current()

    def preflight():
        cfg, meth = build_config(structure, ratio, bits_per_weight, method=method, options=options,
                                 targets=targets, allocate=allocate, allocate_options=allocate_options,
                                 engine=engine, calib_options=calib_options)
        if is_pruning(meth):
            raise ConfigError(f"--structure {meth.name} rewrites the architecture of the whole model and runs in "
                              "memory; drop --low-memory")
        if FISHER in _needs(meth):
            raise ConfigError("--low-memory cannot use the fwsvd objective: it needs gradients of the whole model; "
                              "use svd, asvd or svd-llm, or drop --low-memory")
        if getattr(meth.options, "rotate", None) == "stream":
            raise ConfigError("--low-memory cannot rotate the residual stream (rotate=stream changes the embeddings, "
                              "every block and the head of the whole model first); drop --low-memory or --rotate")
        if validates(meth, cfg):
            from .validation import check_validation_possible

            check_validation_possible(False)
        if get_allocator(cfg.allocate).budget == "bytes" and cfg.allocate_options.objective == "loss":
            raise ConfigError("--low-memory cannot weight the byte allocation by the loss (--allocate-objective loss "
                              "needs gradients of the whole model): use --allocate-objective relative or drop "
                              "--low-memory")
        if get_allocator(cfg.allocate).whole_model:
            raise ConfigError(f"--low-memory cannot use --allocate {cfg.allocate}: it measures the loss of the whole "
                              "model with each layer truncated; use uniform, spectrum-band or svd-llm-v2 (they run "
                              "block by block), or drop --low-memory")
        if comm.is_main:
            check_new_output(out_dir, overwrite)
        path = Path(resolve_model(model_arg))
        index = weight_index(path)
        stored = index_dtypes(index)
        want = parse_dtype(dtype) or next((d for d in stored.values() if d.is_floating_point), torch.float32)
        device = run_device(cfg, want, comm)
        with hub_offline():
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        tok = load_tokenizer(path)
        model = empty_model(config, config_class(config))  # the checkpoint's class (architectures), else causal LM
        windows, source_name = calibration_windows(model, calib, tok, cfg.calib.windows, cfg.calib.seqlen,
                                                   cfg.calib.seed)
        modules = find_linears(model, targets)
        shapes = index_shapes(index)
        ident = {"tensors": sum(1 for _ in shapes), "params": sum(int(torch.Size(v).numel()) for v in shapes.values()),
                 "dtype": str(want)}
        return cfg, meth, path, index, want, device, config, model, windows, source_name, modules, ident, tok

    (cfg, meth, path, index, dtype, device, config, model, windows, source_name, modules,
     ident, tok) = comm.agreed(preflight)
    comm.check_same(_agreement(cfg, ident, windows))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    prefix = block_prefix(model) + "."
    outside, aliases = _outside_tensors(model, prefix, index, path)
    ctx = AllocationContext(model=None, windows=windows, progress=progress)
    filt = _QuietDamping()
    with (sigterm_as_exit() if comm.active else contextlib.nullcontext()), \
            (atomic_dir(out_dir, overwrite=overwrite) if comm.is_main else contextlib.nullcontext(None)) as tmp, \
            (spill_directory(out_dir) if cache_on_disk else contextlib.nullcontext(None)) as spill:
        shard_dir = None
        if tmp is not None:
            shard_dir = tmp / ".blocks"
            shard_dir.mkdir()
            write_side_files(tmp, config, tok, None, record(model).get("model_class"))  # now: reloading the tokenizer at the end would be the peak
        del tok
        trim()  # the tokenizer and the calibration text are gone
        source = StreamedSource(model, index, dtype, shard_dir, device, path, spill)
        model_before = source.parameter_count()
        logging.getLogger("rankwise").addFilter(filt)
        try:
            layers, info = _run(source, modules, meth, cfg, windows, {}, progress, ctx)
        finally:
            logging.getLogger("rankwise").removeFilter(filt)
        delta = sum(lr.params_after - lr.params_before for lr in layers.values())
        desc = {"source": source_name, "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
                "seed": cfg.calib.seed, "fisher_windows": 0, "low_memory": True}
        report = _report(cfg, meth, layers, info, desc, t0, model_before, model_before + delta)

        def write() -> None:
            if tmp is None:
                return
            in_file = [k for k in outside if k in index]
            buffers = {k: outside[k] for k in outside if k not in index}
            stream_merge([FileTensors(index, in_file, dtype), buffers] + source.shards, tmp / WEIGHTS_FILE,
                         {"format": "pt", "rankwise": "rankwise"})
            for s in source.shards:
                s.unlink()
            shard_dir.rmdir()
            described = {n: {"kind": lr.kind, "shape": list(lr.shape), "bias": f"{n}.bias" in index, "spec": lr.spec}
                         for n, lr in layers.items() if lr.kind is not None}
            aliases.update(source.aliases)  # tensors shared across blocks (a shared basis), written once
            meta = manifest(described, aliases, dtype,
                            {**record(model), **manifest_extra(report), "source_model": str(path), **(extra or {})})
            if (path / "generation_config.json").is_file():
                from transformers import GenerationConfig

                with hub_offline():
                    GenerationConfig.from_pretrained(str(path), local_files_only=True).save_pretrained(tmp)
            from ..files import write_json

            write_json(tmp / MANIFEST, meta)
            write_rank_report(report, tmp)

        comm.agreed(write)
    _damping_summary(report)
    return report


def _outside_tensors(model: nn.Module, prefix: str, index: Mapping[str, Path], path: Path
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state keys outside the blocks, each shared tensor once (``{key: tensor}``, meta for those
    the checkpoint holds) and ``aliases = {dropped key: kept key}`` (tied head and embeddings)."""
    from ..errors import ArtifactError

    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if key.startswith(prefix):
            continue
        if id(t) in seen:
            aliases[key] = seen[id(t)]
            continue
        seen[id(t)] = key
        if key not in index and t.is_meta:
            raise ArtifactError(f"{path}: no tensor for {key} in the safetensors files")
        kept[key] = t.detach()
    return kept, aliases


