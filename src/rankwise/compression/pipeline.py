"""``compress(model, ...)``: calibrate, factorize every targeted layer, swap in ``LowRankLinear``.

Flow (all in place on ``model``; :func:`rankwise.compress` is the copying wrapper):

1. targets = ``find_linears(model, targets)``; weights must be finite.
2. calibration windows from the default corpus's calib split, user text or token ids
   (``calib_windows`` x ``calib_seqlen`` tokens at seeded random starts).
3. statistics the method needs (input abs-mean, covariance ``C = sum x x^T`` in float64, or the
   empirical Fisher ``sum_b (dL_b/dW)^2`` of the dense model on ``fisher_windows`` windows).
4. a rank plan from the allocator (``uniform``: ``k = floor(m n (1-R)/(m+n))``), then each layer is
   factorized once under the method's objective, truncated to its planned rank (optionally
   with the least-squares left refit) and replaced.

Two calibration modes:

* ``one-shot``: statistics of the dense model in one pass over the windows.
* ``sequential``: block by block. The hidden states entering block 0 are cached; block ``i``'s
  statistics are gathered on the outputs of the already-compressed blocks ``0..i-1``, its layers
  are replaced, and the compressed block is re-run to produce the inputs of block ``i+1``. Peak
  memory: the model + one block's statistics + the cached hidden states.
  With ``refit`` the dense model's hidden states are cached too, and each layer's left factor is
  refit to reproduce the DENSE layer's outputs from the compressed inputs,
  ``L = argmin ||W X - L R X'||_F`` (see :mod:`.paired`), compensating upstream error.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.gradients import accumulate_gradients
from ..calibration.sampling import (
    DEFAULT_CALIB_WINDOWS, DEFAULT_SEED, DEFAULT_SEQLEN, calib_windows, check_seqlen, tokenize,
)
from ..calibration.stats import StatsAccumulator, collect_input_stats
from ..errors import ConfigError, NumericalError
from ..models.surgery import (
    block_prefix, count_parameters, decoder_blocks, find_linears, linear_bias, linear_shape, linear_weight,
    set_module,
)
from ..structures.lowrank import LowRankLinear
from .allocate import AllocationRequest, get_allocator
from .budget import check_plan, check_ratio, layer_params
from .methods import ABS_MEAN, COV, FISHER, LayerStats, get_method, truncate
from .report import CompressionReport, LayerReport
from .blocks import BlockRunner, capture_block_inputs
from .paired import paired_block_stats

log = logging.getLogger(__name__)

#: Chosen by benchmarks/compress_quality.py (see BENCHMARKS.md).
DEFAULT_METHOD = "svd-llm"
DEFAULT_REFIT = False
DEFAULT_SEQUENTIAL = True
DEFAULT_FISHER_WINDOWS = 8


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


def _check_finite_weights(layers: dict[str, nn.Module]) -> None:
    for name, mod in layers.items():
        if not bool(torch.isfinite(linear_weight(mod)).all()):
            raise NumericalError(f"layer {name} has non-finite weights (nan/inf); fix or reload the model before compressing")


def _block_of(name: str, prefix: str) -> int | None:
    head = prefix + "."
    if not name.startswith(head):
        return None
    idx = name[len(head):].split(".", 1)[0]
    return int(idx) if idx.isdigit() else None


class _Compressor:
    """Factorizes and replaces layers; collects the per-layer report."""

    def __init__(self, model, method, plan, refit, shapes):
        self.model, self.method, self.plan, self.refit, self.shapes = model, method, plan, refit, shapes
        self.layers: dict[str, LayerReport] = {}

    def replace(self, name: str, module: nn.Module, stats: LayerStats, fac=None) -> None:
        shape = self.shapes[name]
        k = self.plan.get(name)
        if k is None:
            self.layers[name] = LayerReport(name, shape, None, layer_params(shape, None), layer_params(shape, None))
            return
        W = linear_weight(module).detach()
        Wf = W.to(torch.float32)
        if fac is None:
            fac = self.method.factorize(Wf, stats)
        L, R = truncate(Wf, fac, k, stats, self.refit)
        if not (bool(torch.isfinite(L).all()) and bool(torch.isfinite(R).all())):
            raise NumericalError(f"factorizing {name} produced non-finite factors; its calibration statistics may be degenerate")
        bias = linear_bias(module)
        new = LowRankLinear.from_factors(L, R, None if bias is None else bias.detach(), dtype=W.dtype)
        set_module(self.model, name, new)
        damping = float(fac.info.get("damping", 0.0) or 0.0)
        self.layers[name] = LayerReport(name, shape, k, layer_params(shape, None), layer_params(shape, k), damping)


class _DampingFilter(logging.Filter):
    """Per-layer damping notes go to the report (and one summary line), not one warning per layer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("covariance (")


def _summarize_damping(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        filt = _DampingFilter()
        logger = logging.getLogger("rankwise")
        logger.addFilter(filt)
        try:
            model, report = fn(*args, **kwargs)
        finally:
            logger.removeFilter(filt)
        if report.damped_layers:
            log.info("%d of %d covariances were not positive definite and got a small ridge (see the report's "
                     "per-layer 'damping')", len(report.damped_layers), len(report.layers))
        return model, report
    return wrapper


@_summarize_damping
def compress(
    model: nn.Module,
    method: str = DEFAULT_METHOD,
    ratio: float = 0.4,
    calib=None,
    tokenizer=None,
    targets: Sequence[str] | str | None = None,
    refit: bool = DEFAULT_REFIT,
    allocate: str = "uniform",
    calib_windows: int = DEFAULT_CALIB_WINDOWS,
    calib_seqlen: int = DEFAULT_SEQLEN,
    seed: int = DEFAULT_SEED,
    sequential: bool = DEFAULT_SEQUENTIAL,
    batch_size: int = 4,
    fisher_windows: int = DEFAULT_FISHER_WINDOWS,
    progress: bool = True,
    allocate_options: dict | None = None,
) -> tuple[nn.Module, CompressionReport]:
    """Compress ``model`` IN PLACE; returns ``(model, report)``.

    ``ratio``: fraction of the targeted weight parameters removed. ``calib``: None (default
    corpus; needs ``tokenizer``), text, list of texts, 1-D token ids or (n, L) windows.
    ``fwsvd`` takes the Fisher of the dense model on the first ``fisher_windows`` windows.
    ``allocate_options``: extra allocator context (``min_rank``, ``speed_aware``, ``speed_profile``,
    ``sensitivity_*``; see :mod:`rankwise.compression.allocate`).
    """
    t0 = time.perf_counter()
    meth = get_method(method)
    ratio = check_ratio(ratio)
    alloc = get_allocator(allocate)
    layers = find_linears(model, targets)
    _check_finite_weights(layers)
    names = list(layers)
    shapes = {n: linear_shape(m) for n, m in layers.items()}
    needs = meth.stats_needed(refit)
    input_needs = needs & {ABS_MEAN, COV}
    want_cov = COV in needs
    model_before = count_parameters(model)

    windows, source = None, "none"
    if needs or alloc.needs_factorizations or calib is not None:
        windows, source = calibration_windows(model, calib, tokenizer, calib_windows, calib_seqlen, seed)
    was_training = model.training
    model.eval()

    fisher: dict[str, torch.Tensor] = {}
    if FISHER in needs:
        fisher = accumulate_gradients(model, windows[:fisher_windows], names, batch_size=1, squared=True,
                                      progress=progress)

    def layer_stats(name: str, inputs: dict) -> LayerStats:
        return LayerStats(inputs.get(name), fisher.get(name))

    facs: dict = {}
    dense_stats: dict = {}
    if alloc.needs_factorizations or not sequential:
        if input_needs:
            dense_stats = collect_input_stats(model, windows, names, batch_size, progress=progress, cov=want_cov)
    if alloc.needs_factorizations:
        for name in tqdm(names, desc="factorize", disable=not progress, leave=False):
            facs[name] = meth.factorize(linear_weight(layers[name]).detach().float(), layer_stats(name, dense_stats))
    context = {"model": model, "windows": windows, "method": meth, "refit": refit, "tokenizer": tokenizer,
               "progress": progress, **(allocate_options or {})}
    request = AllocationRequest(ratio, shapes, facs, context)
    plan = alloc.fn(request)
    check_plan(shapes, plan)

    comp = _Compressor(model, meth, plan, refit, shapes)
    sequential_run = sequential and bool(input_needs)
    bar = tqdm(total=len(names), desc=f"compress {method}", disable=not progress, leave=False)
    if not sequential_run:
        for name in names:
            bar.set_postfix_str(name, refresh=False)
            st = layer_stats(name, dense_stats)
            comp.replace(name, layers[name], st, facs.pop(name, None))
            dense_stats.pop(name, None)
            bar.update()
    else:
        if sequential and alloc.needs_factorizations:
            facs.clear()  # the plan came from the dense model; refactorize on the sequential statistics
            dense_stats.clear()
        blocks = decoder_blocks(model)
        prefix = block_prefix(model)
        by_block: dict[int, list[str]] = {}
        rest = []
        for name in names:
            i = _block_of(name, prefix)
            (rest if i is None else by_block.setdefault(i, [])).append(name)
        if by_block:
            runner = capture_block_inputs(model, blocks, windows, batch_size)
            dense_runner = BlockRunner(blocks, list(runner.hidden), runner.extras) if refit else None
            device = next(model.parameters()).device
            last = max(by_block)
            for i in range(len(blocks)):
                block_names = by_block.get(i, [])
                dense_out = None
                cross: dict = {}
                if block_names:
                    mods = {n: layers[n] for n in block_names}
                    if dense_runner is not None:
                        got, cross, dense_out = paired_block_stats(i, mods, dense_runner, runner, want_cov, device)
                    else:
                        with StatsAccumulator(mods, cov=want_cov) as acc:
                            runner.run(i, device)
                        got = acc.stats
                    missing = [n for n in block_names if n not in got]
                    if missing:
                        raise NumericalError(f"layers never called during calibration: {missing[:5]}")
                    for name in block_names:
                        bar.set_postfix_str(name, refresh=False)
                        st = layer_stats(name, got)
                        st.cross = cross.pop(name, None)
                        comp.replace(name, layers[name], st)
                        got.pop(name)
                        bar.update()
                if i >= last:
                    break
                if dense_runner is not None:
                    dense_runner.hidden = dense_out if dense_out is not None else dense_runner.run(i, device)
                runner.advance(i, device)
            del runner, dense_runner
        if rest:  # targeted layers outside the decoder blocks: one pass on the partly compressed model
            st = collect_input_stats(model, windows, rest, batch_size, cov=want_cov)
            for name in rest:
                comp.replace(name, layers[name], layer_stats(name, st))
                bar.update()
    bar.close()
    model.train(was_training)

    reports = [comp.layers[n] for n in names]
    report = CompressionReport(
        method=meth.name, ratio=ratio, refit=bool(refit), allocate=alloc.name,
        mode="sequential" if sequential_run else "one-shot",
        calibration={"source": source, "windows": 0 if windows is None else int(windows.shape[0]),
                     "seqlen": 0 if windows is None else int(windows.shape[1]), "seed": seed,
                     "fisher_windows": min(fisher_windows, int(windows.shape[0])) if fisher else 0},
        layers=reports,
        targeted_params_before=sum(r.params_before for r in reports),
        targeted_params_after=sum(r.params_after for r in reports),
        model_params_before=model_before,
        model_params_after=count_parameters(model),
        seconds=time.perf_counter() - t0,
        allocation=request.info or None,
    )
    return model, report
