"""Validated allocations: an allocated plan is kept only if it beats the uniform plan end to end on held-out windows.

Each candidate plan (the allocator's -- with the default objective two of them, the relative errors' and
the loss-weighted errors' -- and the method's uniform plan at the same budget) is run through
the one engine (:class:`~.engine.Engine`) with its held-out calibration windows -- the last
``ceil(holdout / batch_size)`` batches, the ones the refit's ridge choice scores on -- kept out of every
statistic (``exclude_heldout``). After each sequential pass the compressed model's mean next-token NLL
on those windows,

    L(plan) = sum_{w in H} sum_t -log p(x_{w,t+1} | x_{w,<=t}) / (|H| (L - 1)),

is measured (:func:`rankwise.evaluation.perplexity.window_nll`), and the dense layers are put back
before the next pass. The plan with the lowest ``L`` is kept (a tie keeps the uniform plan; only the
best plan so far holds its compressed layers, so at most two plans' layers are in memory), its
layers are put back into the model, and ``info`` records every ``L``, the windows and the choice. The
kept model was calibrated on the windows that were not held out.

The passes need the whole model in memory (they restore its dense layers and score it end to end);
a streamed (``--low-memory``) run cannot validate and says so before any work.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..models.surgery import set_module

#: ``run_pass(plan) -> (layer reports, engine)``: one engine pass with the held-out windows excluded.
PassFn = Callable[[Mapping[str, Any]], tuple[dict, Any]]


def validate_plans(model: nn.Module, modules: Mapping[str, nn.Module], plans: Mapping[str, Mapping[str, Any]],
                   run_pass: PassFn, windows: torch.Tensor, batch_size: int = 4, progress: bool = False,
                   baseline: str = "uniform") -> tuple[str, dict, dict[str, Any]]:
    """``(chosen label, its layer reports, info)``: every plan of ``plans`` run and scored (module
    docstring); the model ends with the chosen plan's layers."""
    from ..evaluation.perplexity import window_nll

    dense = {n: model.get_submodule(n) for n in modules}
    losses: dict[str, float] = {}
    best: tuple | None = None  # (key, label, reports, layers): only the best plan so far keeps its layers
    held = None
    for label, plan in plans.items():
        for n, mod in dense.items():
            set_module(model, n, mod)
        reports, engine = run_pass(plan)
        held = engine.heldout(windows)
        total, count = window_nll(model, held, batch_size=batch_size, progress=progress)
        loss = total / max(count, 1)
        losses[label] = loss if math.isfinite(loss) else math.inf
        key = (losses[label], label != baseline)
        if best is None or key < best[0]:
            best = (key, label, reports, {n: model.get_submodule(n) for n in modules})
        del reports
    _, chosen, chosen_reports, layers = best
    for n, mod in layers.items():
        set_module(model, n, mod)
    info = {"heldout_windows": int(held.shape[0]), "heldout_tokens": int(held.shape[0] * (held.shape[1] - 1)),
            "nll": losses, "chosen": chosen, "baseline": baseline}
    if chosen == baseline and len(losses) > 1:
        others = ", ".join(f"{k} {losses[k]:.4f}" for k in losses if k != baseline)
        info["note"] = (f"the allocated plan did not beat the uniform plan on the {info['heldout_windows']} held-out "
                        f"calibration windows (mean NLL {others} vs uniform {losses[baseline]:.4f}): the uniform "
                        "plan is used")
    return chosen, chosen_reports, info


def check_validation_possible(in_memory: bool) -> None:
    """:class:`ConfigError` for a streamed run (see the module docstring)."""
    if not in_memory:
        raise ConfigError("--low-memory cannot validate a byte allocation (it scores the whole compressed model on "
                          "held-out windows and restores dense layers between passes): pass --no-validate, "
                          "--allocate uniform, or drop --low-memory")
