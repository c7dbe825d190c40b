"""``rankwise.analyze(model, ...)``: every registered metric on every selected linear layer.

Singular values are computed once per layer (float64 eigenvalues of the smaller Gram matrix) and
shared by all metrics; only ``intruders`` needs singular vectors. Layers are processed in parallel,
one BLAS thread per layer (see ``parallel``): first every spectrum (timed as ``decomposition_s``),
then every metric (``metrics_s``, FARMS' own window spectra included); CPU seconds summed over the
workers are ``decomposition_cpu_s`` and ``metric_cpu_s`` (per metric).
"""
from __future__ import annotations

import csv
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, NoTargetLayersError
from ..linalg.spectrum import singular_values
from ..models.surgery import find_linears, layer_index, linear_weight, module_type
from .metrics import METRICS, REQUIRES, LayerData
from .parallel import default_workers, parallel_map

log = logging.getLogger("rankwise")

DEFAULT_METRICS = ("spectrum", "powerlaw", "farms")
ALL_LAYERS = ".*"


@dataclass
class AnalysisResult:
    """``layers``: one flat record per analyzed layer; ``summary``: model-level aggregates.

    ``spectra`` / ``white_spectra``: singular values per layer name (float64 tensors, descending).
    ``skipped``: ``{"name", "shape", "reason"}`` for layers that could not be analyzed.
    """

    layers: list[dict]
    summary: dict
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    white_spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "summary": self.summary}

    def write_json(self, path: str | Path) -> None:
        from ..files import write_json

        write_json(path, _jsonable(self.to_dict()))

    def write_csv(self, path: str | Path) -> None:
        from ..files import atomic_file

        keys: list[str] = []
        for r in self.layers:
            keys += [k for k in r if k not in keys]
        with atomic_file(path, newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in self.layers:
                w.writerow({k: ("x".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
                            for k, v in r.items()})


def _jsonable(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    return o


def _resolve_metrics(metrics: Sequence[str] | str | None, calib: bool, compare: bool) -> list[str]:
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    if not metrics:
        metrics = list(DEFAULT_METRICS) + (["whitened"] if calib else []) + (["intruders", "alignment"] if compare else [])
    for m in metrics:
        METRICS.get(m)  # an unknown name raises the registry's one error, listing the valid names
    missing = [m for m in metrics if (m == "whitened" and not calib) or (m in ("intruders", "alignment") and not compare)]
    if missing:
        raise ConfigError("metric(s) " + ", ".join(f"{m} need {REQUIRES[m]}" for m in missing))
    return list(metrics)


def _select(model: nn.Module, layers: Sequence[str] | str | None) -> dict[str, nn.Module]:
    found = find_linears(model, layers or ALL_LAYERS, required=False)
    if not found:
        kinds = sorted({type(m).__name__ for m in model.modules()} - {type(model).__name__})
        raise NoTargetLayersError(
            f"{type(model).__name__} has no linear layer matching {layers or 'any name'!r} "
            f"(analyze reads nn.Linear and GPT-2 Conv1D; module types present: {kinds[:8]}); "
            "pass another --layers pattern or a model with linear layers")
    return found


def _pair(found: dict[str, nn.Module], other: nn.Module, layers) -> dict[str, torch.Tensor]:
    theirs = find_linears(other, layers or ALL_LAYERS, required=False)
    only_a = [n for n in found if n not in theirs]
    only_b = [n for n in theirs if n not in found]
    bad = [f"{n}: {tuple(linear_weight(found[n]).shape)} vs {tuple(linear_weight(theirs[n]).shape)}"
           for n in found if n in theirs and linear_weight(found[n]).shape != linear_weight(theirs[n]).shape]
    if only_a or only_b or bad:
        parts = []
        if only_a:
            parts.append(f"only in the analyzed model: {only_a[:5]}{' ...' if len(only_a) > 5 else ''}")
        if only_b:
            parts.append(f"only in the compared model: {only_b[:5]}{' ...' if len(only_b) > 5 else ''}")
        if bad:
            parts.append(f"shapes differ: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
        raise ConfigError("--compare needs the same linear layers with the same shapes; " + "; ".join(parts)
                          + " (compare a fine-tune with its own base model, or restrict with --layers)")
    return {n: linear_weight(theirs[n]).detach() for n in found}


def _whiteners(model, names, calib, calib_stats, batch_size, progress, whitening) -> dict:
    from ..calibration.stats import collect_input_stats
    from ..linalg.whitening import make_whitener

    stats = calib_stats if calib_stats is not None else collect_input_stats(
        model, calib, names, batch_size=batch_size, progress=progress)
    out = {}
    for n in names:
        if n not in stats:
            raise ConfigError(f"calibration statistics have no entry for layer {n!r}")
        out[n] = make_whitener(stats[n].covariance_mean, kind=whitening)
    return out


def analyze(model: nn.Module | str, *, layers: Sequence[str] | str | None = None,
            metrics: Sequence[str] | str | None = None, compare: nn.Module | str | None = None,
            calib: torch.Tensor | None = None, calib_stats: dict | None = None, batch_size: int = 4,
            whitening: str = "cholesky", intruder_k: int = 10, intruder_eps: float = 0.5,
            farms_sampling: str = "grid", farms_xmin: str = "mid", seed: int = 0,
            device: str | torch.device | None = None, workers: int | None = None,
            progress: bool = False) -> AnalysisResult:
    """Spectral diagnostics of the linear layers of ``model`` (an ``nn.Module`` or a model name/path).

    ``layers``: names or regexes selecting layers (default: every linear layer except embeddings /
    LM head). ``compare``: the *base* model; ``model`` is then read as the tuned one (intruders,
    relative change). ``calib``: (n, L) token windows, or ``calib_stats`` from
    ``collect_input_stats``, for the whitened spectrum. ``device``: where spectra are computed.
    ``workers``: layers decomposed at once, one thread each (default ``torch.get_num_threads()``;
    1 on a non-CPU device). Non-finite layers are skipped and listed in ``result.skipped``.
    """
    t_all = time.perf_counter()
    if isinstance(model, str):
        from ..models.loading import load_model

        model = load_model(model)[0]
    if isinstance(compare, str):
        from ..models.loading import load_model

        compare = load_model(compare)[0]
    has_calib = calib is not None or calib_stats is not None
    names_metrics = _resolve_metrics(metrics, has_calib, compare is not None)
    if intruder_k < 1 or not 0 < intruder_eps <= 1:
        raise ConfigError(f"need intruder_k >= 1 and 0 < intruder_eps <= 1, got {intruder_k}, {intruder_eps}")
    found = _select(model, layers)
    bases = _pair(found, compare, layers) if compare is not None else {}
    opts = dict(intruder_k=intruder_k, intruder_eps=intruder_eps, farms_sampling=farms_sampling,
                farms_xmin=farms_xmin, seed=seed)

    on_cpu = device is None or torch.device(device).type == "cpu"
    if not on_cpu:
        workers = 1
    elif workers is None:
        workers = default_workers()
    whiteners = {}
    if "whitened" in names_metrics:
        whiteners = _whiteners(model, list(found), calib, calib_stats, batch_size, progress, whitening)

    def spectra_of(n: str) -> tuple[torch.Tensor, tuple | None, str | None, float]:
        t = time.thread_time()
        w = linear_weight(found[n]).detach()
        if device is not None:
            w = w.to(device)
        if not bool(torch.isfinite(w).all()):
            return w, None, f"{int((~torch.isfinite(w)).sum())} non-finite values (nan/inf)", 0.0
        if n in bases and not bool(torch.isfinite(bases[n]).all()):
            return w, None, "compared layer has non-finite values", 0.0
        s = singular_values(w).cpu()
        sw = None
        if n in whiteners:
            wh = whiteners[n]
            sw = singular_values(wh.whiten(w.to(wh.factor.device))).cpu()
        return w, (s, sw), None, time.thread_time() - t

    t_dec = time.perf_counter()
    bar = tqdm(total=len(found), desc="spectra", disable=not progress, leave=False)
    decomposed = parallel_map(spectra_of, list(found), workers, progress=bar.update)
    bar.close()
    t_dec = time.perf_counter() - t_dec

    weights: dict[str, torch.Tensor] = {}
    spectra: dict[str, torch.Tensor] = {}
    white: dict[str, torch.Tensor] = {}
    skipped: list[dict] = []
    dec_cpu = sum(d[3] for d in decomposed)
    for n, (w, ss, reason, _) in zip(found, decomposed):
        if reason is not None:
            skipped.append({"name": n, "shape": list(w.shape), "reason": reason})
            log.warning("layer %s: %s; skipped", n, reason)
            continue
        weights[n], spectra[n] = w, ss[0]
        if ss[1] is not None:
            white[n] = ss[1]
    names = list(weights)

    def record_of(n: str) -> tuple[dict, list[float]]:
        w = weights[n]
        d = LayerData(name=n, weight=w, s=spectra[n], s_white=white.get(n),
                      base_weight=bases[n].to(w.device) if n in bases else None, options=opts)
        rec = {"name": n, "index": layer_index(n), "type": module_type(n), "shape": list(w.shape)}
        secs = []
        for m in names_metrics:
            t = time.thread_time()
            rec.update(METRICS.get(m)(d))
            secs.append(time.thread_time() - t)
        return rec, secs

    t_fit = time.perf_counter()
    bar = tqdm(total=len(names), desc="metrics", disable=not progress, leave=False)
    done = parallel_map(record_of, names, workers, progress=bar.update)
    bar.close()
    t_fit = time.perf_counter() - t_fit
    records = [rec for rec, _ in done]
    # CPU seconds of each metric, summed over layers and workers
    metric_cpu = {m: sum(secs[i] for _, secs in done) for i, m in enumerate(names_metrics)}
    summary = summarize(records, skipped)
    summary["timing"] = {"decomposition_s": t_dec, "metrics_s": t_fit, "total_s": time.perf_counter() - t_all,
                         "workers": workers, "decomposition_cpu_s": dec_cpu, "metric_cpu_s": metric_cpu}
    summary["metrics"] = names_metrics
    return AnalysisResult(records, summary, spectra, white, skipped)


def _stats(vals: list) -> dict | None:
    v = [x for x in vals if isinstance(x, (int, float)) and math.isfinite(x)]
    if not v:
        return None
    return {"mean": statistics.fmean(v), "median": statistics.median(v), "min": min(v), "max": max(v)}


_SUMMARY_KEYS = ("alpha", "alpha_weighted", "farms_alpha", "stable_rank", "effective_rank", "rank90",
                 "w_rank90", "intruders", "relative_change", "align_u_mean", "align_v_mean")


def summarize(records: list[dict], skipped: list[dict] | None = None) -> dict:
    """Model-level aggregates: per-metric mean/median/min/max, per module type means, counts."""
    out: dict = {"layers": len(records), "skipped": skipped or []}
    for k in _SUMMARY_KEYS:
        st = _stats([r.get(k) for r in records])
        if st is not None:
            out[k] = st
    alphas = [r["alpha"] for r in records if r.get("alpha") is not None]
    if alphas:
        out["alpha_in_2_6"] = sum(2 <= a <= 6 for a in alphas) / len(alphas)
        out["alpha_missing"] = len(records) - len(alphas)
    if any("intruders" in r for r in records):
        out["intruders_total"] = int(sum(r.get("intruders", 0) for r in records))
    by_type: dict[str, dict] = {}
    for t in dict.fromkeys(r["type"] for r in records):
        rs = [r for r in records if r["type"] == t]
        by_type[t] = {k: s["mean"] for k in ("alpha", "farms_alpha", "stable_rank", "rank90", "w_rank90",
                                             "intruders") if (s := _stats([r.get(k) for r in rs]))}
    out["by_type"] = by_type
    return out
