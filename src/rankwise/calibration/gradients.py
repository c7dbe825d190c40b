"""Weight gradients of the LM loss summed over calibration batches (LoRA-GA, FWSVD).

For batches ``b`` of windows, with ``loss_b`` the mean next-token cross-entropy over the batch's
scored tokens, return per named layer (weights in (out, in) orientation, float64):

* ``squared=False``: ``G = sum_b d loss_b / d W``        (LoRA-GA's gradient)
* ``squared=True``:  ``F = sum_b (d loss_b / d W)^2``    (empirical Fisher diagonal, FWSVD)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, NumericalError
from ..models.surgery import Conv1D, get_modules, linear_weight
from .stats import _check_windows, run_model


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``ids`` (b, L) over the b (L-1) scored tokens."""
    out = run_model(model, ids)
    logits = out.logits if hasattr(out, "logits") else out
    logits = logits[:, :-1].flatten(0, 1)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, ids[:, 1:].flatten())


def _weight_param(module: nn.Module) -> torch.nn.Parameter:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.nn.Parameter):
        raise ConfigError(f"{type(module).__name__} has no weight parameter to differentiate")
    return w


def accumulate_gradients(model: nn.Module, windows: torch.Tensor, names: Sequence[str], batch_size: int = 1,
                         squared: bool = False, progress: bool = False) -> dict[str, torch.Tensor]:
    """``{name: sum_b grad_b}`` (or ``sum_b grad_b**2``) of the named layers' weights, (out, in) float64.

    Only the named weights require grad during the passes; every parameter's ``requires_grad`` and
    ``.grad`` are left as they were, and the model runs in eval mode (restored afterwards).
    """
    _check_windows(windows, batch_size)
    modules = get_modules(model, names)
    params = [_weight_param(m) for m in modules.values()]
    conv = [bool(Conv1D) and isinstance(m, Conv1D) for m in modules.values()]
    acc = {n: torch.zeros(tuple(linear_weight(m).shape), dtype=torch.float64, device=p.device)
           for (n, m), p in zip(modules.items(), params)}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    device = params[0].device if params else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for i in tqdm(range(0, windows.shape[0], batch_size), desc="gradients", disable=not progress, leave=False):
            loss = lm_loss(model, windows[i: i + batch_size].to(device))
            if not bool(torch.isfinite(loss)):
                raise NumericalError(f"non-finite LM loss on calibration batch {i // batch_size}; "
                                     "check the model weights or run in float32")
            grads = torch.autograd.grad(loss, params)
            for (name, g), is_conv in zip(zip(acc, grads), conv):
                g = (g.t() if is_conv else g).to(torch.float64)
                if not bool(torch.isfinite(g).all()):
                    raise NumericalError(f"non-finite gradient for layer {name!r}")
                acc[name].add_(g * g if squared else g)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    return acc


def output_fisher(model: nn.Module, windows: torch.Tensor, names: Sequence[str], batch_size: int = 1,
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """``{name: D}`` with ``D_r = mean_t (dL / dy_{t,r})^2`` per output feature ``r`` of each named layer
    (float64): the diagonal of the empirical Fisher of the layer's *output* ``y_t`` at each position
    ``t`` of ``windows``, ``L`` the window's summed next-token cross-entropy (so ``dL / dy_t`` counts
    every later token ``y_t`` reaches through attention). An output error ``e`` then raises the loss by
    about ``1/2 sum_t sum_r D_r e_{t,r}^2`` (second order, diagonal): what an error in each output
    direction costs. No parameter receives a gradient."""
    _check_windows(windows, batch_size)
    modules = get_modules(model, names)
    device = next(model.parameters()).device
    acc: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, out):
            y = out[0] if isinstance(out, (tuple, list)) else out
            outs[name] = y
            return None
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings()
        for i in tqdm(range(0, windows.shape[0], batch_size), desc="output fisher", disable=not progress, leave=False):
            ids = windows[i: i + batch_size].to(device)
            with torch.enable_grad():
                h = emb(ids).detach().requires_grad_(True)  # a leaf so that the graph reaches every layer
                handle = emb.register_forward_hook(lambda m, a, o: h)
                try:
                    out = model(input_ids=ids, **({"use_cache": False} if hasattr(model, "config") else {}))
                finally:
                    handle.remove()
                logits = (out.logits if hasattr(out, "logits") else out)[:, :-1].float()
                loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
                grads = torch.autograd.grad(loss, [outs[n] for n in modules])
            for n, g in zip(modules, grads):
                g = g.detach().to(torch.float64).flatten(0, -2)
                if not bool(torch.isfinite(g).all()):
                    raise NumericalError(f"non-finite output gradient of layer {n!r}")
                s = g.square().sum(0)
                acc[n] = s if n not in acc else acc[n] + s
            tokens += int(ids.shape[0] * (ids.shape[1] - 1))
            outs.clear()
    finally:
        for hd in handles:
            hd.remove()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    return {n: v / max(tokens, 1) for n, v in acc.items()}
def output_gradient_energy(model: nn.Module, windows: torch.Tensor, names: Sequence[str], batch_size: int = 1,
                           progress: bool = False) -> dict[str, float]:
    """``{name: sum_b sum_t ||d loss_b / d y_t||^2 / m}``: the squared gradient of the LM loss at each named
    layer's output ``y`` (``m`` outputs), summed over the calibration tokens and averaged over the outputs,
    float64. It is ``tr(G) / m`` of the output-gradient second moment ``G = sum_t g_t g_t^T``: under an
    isotropic ``G`` the loss increase of an output error ``Delta y_t = Delta W x_t`` is
    ``~ tr(G)/m * ||Delta W X||_F^2`` (HAWQ-V2's trace-weighted perturbation). Parameters and the
    model's mode are left as they were."""
    _check_windows(windows, batch_size)
    modules = get_modules(model, names)
    params = [_weight_param(m) for m in modules.values()]
    acc = {n: 0.0 for n in modules}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    device = params[0].device if params else next(model.parameters()).device
    was_training = model.training

    def capture(name: str, m: int):
        def fwd(module, args, out):
            def bwd(g):
                acc[name] += float(g.detach().double().square().sum()) / m
            out.register_hook(bwd)
        return fwd

    handles = [mod.register_forward_hook(capture(n, int(linear_weight(mod).shape[0]))) for n, mod in modules.items()]
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for i in tqdm(range(0, windows.shape[0], batch_size), desc="gradients", disable=not progress, leave=False):
            loss = lm_loss(model, windows[i: i + batch_size].to(device))
            if not bool(torch.isfinite(loss)):
                raise NumericalError(f"non-finite LM loss on calibration batch {i // batch_size}; "
                                     "check the model weights or run in float32")
            torch.autograd.grad(loss, params)
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    return acc
