"""``adapt(model, init, rank, ...)``: attach initialized adapters to a model's target layers (in place).

Targets are ``nn.Linear`` / GPT-2 ``Conv1D`` layers and, in rankwise-compressed models, whole
``LowRankLinear`` layers (the adapter then adds ``Delta W x`` to the factorized layer's output: it heals
the compressed layer as a unit). All base parameters are frozen; only adapter parameters train.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError, NoTargetLayersError, NumericalError
from ..models.surgery import find_linears, find_modules, set_module
from ..structures.base import StructuredLinear
from ..structures.lowrank import LowRankLinear
from .inits import InitContext, eva_eigen, eva_ranks, get_init
from .layers import AdapterLayer, adapter_layers, base_dense, base_shape

META_ATTR = "_rankwise_adapt"


def find_targets(model: nn.Module, targets: Sequence[str] | str | None = None) -> dict[str, nn.Module]:
    """Target layers: linears (not inside a targeted LowRankLinear) and LowRankLinear modules, by default
    all of them inside the model's repeated blocks (see :func:`rankwise.models.surgery.find_modules`)."""
    low = find_modules(model, targets, lambda m: isinstance(m, LowRankLinear))
    lin = {n: m for n, m in find_linears(model, targets, required=False).items()
           if not any(n.startswith(p + ".") for p in low)}
    found = {**lin, **low}
    if not found:
        find_linears(model, targets, required=True)  # raises with the list of layer types present
        raise NoTargetLayersError(f"no layer matches targets {targets!r}; pass --targets")  # pragma: no cover
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return dict(sorted(found.items(), key=lambda kv: order[kv[0]]))


def _calib_batches(calib: torch.Tensor | None, init: str) -> torch.Tensor:
    if calib is None or not isinstance(calib, torch.Tensor) or calib.ndim != 2 or calib.shape[0] == 0:
        raise ConfigError(
            f"init {init!r} needs calibration data: pass calib=(n, L) token windows "
            "(the CLI samples them from the calib split or --text-file)")
    return calib


def adapt(model: nn.Module, init: str = "pissa", rank: int = 16, alpha: float | None = None,
          targets: Sequence[str] | str | None = None, calib: torch.Tensor | None = None,
          rslora: bool = False, seed: int = 0, svd: str | None = None, calib_batch_size: int = 1,
          progress: bool = False, **options) -> nn.Module:
    """Attach ``init``-initialized rank-``rank`` adapters to ``model``'s target layers, in place; returns it.

    ``alpha`` defaults to ``rank`` (scaling 1). ``calib`` (n, L) token windows feed the data-driven
    inits (eva: activations; lora-ga, lora-sb: gradients; lq-lora: covariance). ``svd`` and the extra
    ``options`` are the init's own options (``INITS[init].Options``, e.g. pissa / salt: svd, svd_niter;
    lora-ga: gamma; lora-sb: sb_step; singlora: ramp_steps; lq-lora / loftq: bits, group_size, iters);
    an option the init does not take raises :class:`ConfigError` listing the valid ones.
    """
    spec = get_init(init)
    if svd is not None:
        options = {"svd": svd, **options}
    opts = spec.build_options(options)
    if adapter_layers(model):
        raise ConfigError("the model already has adapters; merge them (rankwise.adaptation.merge_and_unload) first")
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    layers = find_targets(model, targets)
    for name, mod in layers.items():
        m, n = base_shape(mod)
        if rank > min(m, n):
            raise ConfigError(f"rank {rank} is larger than min(out, in) = {min(m, n)} of layer {name} "
                              f"({m} x {n}); use --rank <= {min(m, n)} or exclude the layer with --targets")
    ctx = InitContext(alpha=alpha, rslora=rslora, seed=seed)
    ranks = {n: rank for n in layers}
    if spec.needs == "activations":
        from ..calibration.stats import collect_input_stats

        stats = collect_input_stats(model, _calib_batches(calib, init), list(layers), progress=progress)
        ctx.eigen = eva_eigen(stats, keep=2 * rank)
        del stats
        ranks = eva_ranks(ctx.eigen, rank)
    elif spec.needs == "covariance":
        from ..calibration.stats import collect_input_stats

        stats = collect_input_stats(model, _calib_batches(calib, init), list(layers), progress=progress)
        ctx.covs = {n: st.cov for n, st in stats.items()}
        del stats
    elif spec.needs == "gradients":
        from ..calibration.gradients import accumulate_gradients

        win = _calib_batches(calib, init)
        g = accumulate_gradients(model, win, list(layers), batch_size=calib_batch_size, progress=progress)
        nb = -(-win.shape[0] // calib_batch_size)
        ctx.grads = {k: v / nb for k, v in g.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    done = {}
    for name, base in layers.items():
        r = ranks[name]
        if r == 0:
            continue
        W = base_dense(base)
        if not bool(torch.isfinite(W).all()):
            raise NumericalError(f"layer {name} has non-finite weights; cannot initialize adapters from it")
        adapter = spec.fn(base, W, r, opts, ctx, name).to(W.device)
        adapter.init_state = {k: v.clone() for k, v in adapter.adapter_state().items()}
        set_module(model, name, adapter)
        done[name] = r
    setattr(model, META_ATTR, {
        "init": init, "rank": rank, "alpha": alpha, "rslora": rslora, "seed": seed,
        "svd": getattr(opts, "svd", None),
        "targets": list(targets) if isinstance(targets, (list, tuple)) else targets,
        "ranks": done, "residual": spec.residual, "options": asdict(opts),
    })
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for a in adapter_layers(model).values() for p in a.trainable_parameters()]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


def merge(model: nn.Module) -> nn.Module:
    for a in adapter_layers(model).values():
        a.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for a in adapter_layers(model).values():
        a.unmerge()
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapter by its base with ``Delta W`` folded in (in place).

    Dense bases get ``W + Delta W``; a ``LowRankLinear`` base ``B A`` becomes the exact rank-(k + r)
    layer ``[B | L] [A ; R]`` from the adapter's factors ``L R = Delta W``; any other structured base
    (a quantized one) becomes a dense ``nn.Linear`` with ``W' + Delta W`` (its de-quantized weight
    plus the update: a quantized grid cannot absorb the update exactly).
    """
    for name, a in adapter_layers(model).items():
        if isinstance(a.base, StructuredLinear) and not isinstance(a.base, LowRankLinear):
            lin = a.base.to_linear()
            lin.weight.data += a.delta().to(lin.weight.device, lin.weight.dtype)
            set_module(model, name, lin)
        elif isinstance(a.base, LowRankLinear):
            if a.merged:
                a.unmerge()
            L, R = a.factors()
            b = a.base
            new = LowRankLinear.from_factors(torch.cat([b.B.weight.float(), L.to(b.B.weight.device)], 1),
                                             torch.cat([b.A.weight.float(), R.to(b.A.weight.device)], 0),
                                             None if b.B.bias is None else b.B.bias.float(), dtype=b.A.weight.dtype)
            set_module(model, name, new)
        else:
            a.merge()
            set_module(model, name, a.base)
    if hasattr(model, META_ATTR):
        delattr(model, META_ATTR)
    return model


def set_train_step(model: nn.Module, step: int) -> None:
    """Tell step-dependent adapters (SingLoRA's ramp) the current optimizer step."""
    for a in adapter_layers(model).values():
        if hasattr(a, "set_step"):
            a.set_step(step)
