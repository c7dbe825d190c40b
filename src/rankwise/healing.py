"""Healing: a short training of a compressed model on calibration windows; the saved size and format do not change.

One entry point, :func:`heal`, for every layer kind it can train (a model may hold several):

* low-rank layers (:class:`LowRankLinear`, ``W' = B A``): LoRA corrections on the two factor matrices
  (``A <- A + b_A a_A``, ``B <- B + b_B a_B``, rank ``rank`` each, zero at step 0), merged back into
  ``A`` and ``B`` afterwards;
* quantized layers (:class:`QuantLinear`, and :class:`LowRankQuantLinear` ``W' = dequant(c) + L R``):
  the integer codes ``c`` stay frozen and the group scales and minimums are trained, as in
  EfficientQAT's end-to-end stage (E2E-QP), through the relative parametrization

      s = s0 (1 + a),      m = m0 + s0 b        (a, b trainable, 0 at step 0; w' = s c + m),

  so that one learning rate moves every group by the same fraction of its step whatever the layer's
  scale; the low-rank factors ``L``, ``R`` of lowrank-quant layers are trained directly, each tensor
  at ``lr`` times its initial root-mean-square value (the same relative rate). Afterwards ``s``, ``m``,
  ``L``, ``R`` are rounded back to float16 into the very buffers they came from (a symmetric grid
  has no ``m``);
* a plain model (a pruned one: fewer blocks, heads, channels or hidden dimensions): LoRA corrections
  of every linear layer inside the blocks, merged back.

What it minimizes: next-token cross-entropy, or, with the dense ``teacher`` (pruned models: ``rankwise
compress --structure depth|width|slice --heal-steps N``), knowledge distillation on the logits,

    KL(p_teacher || p_student) = mean_t sum_v p_T(v | t) (log p_T(v | t) - log p_S(v | t)),

over every position of the calibration windows.

Training uses calibration windows only (never evaluation text) and the adapters' loop
(:func:`rankwise.adaptation.train.train`: AdamW, warmup + cosine, gradient clipping, a non-finite
loss restores the last good state); every other parameter of the model is frozen. The healed model
has exactly the tensors, shapes and dtypes of the unhealed one: the same size, the same format.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError
from .structures.lowrank import LowRankLinear
from .structures.lowrank_quant import LowRankQuantLinear
from .structures.quant import QuantLinear

#: Default learning rates when ``HealOptions.lr`` is None: LoRA on low-rank factors; quantization parameters
#: (relative to each group's step, see the module docstring).
DEFAULT_LR = {"lowrank": 5e-4, "quant": 1e-3}


@dataclass
class HealOptions:
    steps: int = 0              # 0 = no healing
    rank: int = 8               # rank of the LoRA corrections of low-rank factors
    lr: float | None = None     # None: DEFAULT_LR per layer kind
    batch_size: int = 2
    seed: int = 0


def factor_targets(model: nn.Module) -> list[str]:
    """Qualified names of the factor matrices (``<layer>.A``, ``<layer>.B``) of every low-rank layer."""
    return [f"{n}.{f}" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for f in ("A", "B")]


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every quantized layer (plain or with low-rank factors) of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _is_plain(model: nn.Module) -> bool:
    """No structured layer at all: a plain (e.g. pruned) model, healed through every block linear."""
    from .structures.base import StructuredLinear

    return not any(isinstance(m, StructuredLinear) for m in model.modules())


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    kw = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
    out = model(input_ids=ids, **kw)
    logits = out.logits if hasattr(out, "logits") else out
    return logits.float()


def distillation_loss(teacher: nn.Module):
    """``loss(model, ids)``: the mean per-token ``KL(p_teacher || p_model)`` of the logits on ``ids``."""
    def loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = F.log_softmax(_logits(teacher, ids), dim=-1).flatten(0, 1)
        s = F.log_softmax(_logits(model, ids), dim=-1).flatten(0, 1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean")
    return loss


class QuantTrainer:
    """Trainable float32 quantization parameters of one :class:`QuantLinear` (module docstring): installed
    into the layer's buffers before each forward, written back in float16 by :meth:`finish`."""

    def __init__(self, layer: QuantLinear) -> None:
        self.layer = layer
        self.s0 = layer.scales.detach().float()
        self.a = nn.Parameter(torch.zeros_like(self.s0))
        self.m0 = None if layer.mins is None else layer.mins.detach().float()
        self.b = None if self.m0 is None else nn.Parameter(torch.zeros_like(self.m0))
        self.factors = {}
        if isinstance(layer, LowRankQuantLinear):
            self.factors = {k: nn.Parameter(getattr(layer, k).detach().float().clone()) for k in ("left", "right")}
        self._saved = {k: layer._buffers[k] for k in ("scales", "mins", *self.factors)}
        self._hook = layer.register_forward_pre_hook(lambda mod, args: self._install())

    def groups(self) -> list[dict]:
        """AdamW groups: the relative scale/minimum shifts at ``lr``, each factor at ``lr`` x its RMS."""
        out = [{"params": [p for p in (self.a, self.b) if p is not None], "lr_scale": 1.0}]
        for p in self.factors.values():
            rms = float(p.detach().square().mean().sqrt())
            out.append({"params": [p], "lr_scale": rms if rms > 0 else 1.0})
        return out

    def values(self) -> dict[str, torch.Tensor]:
        out = {"scales": self.s0 * (1.0 + self.a)}
        if self.b is not None:
            out["mins"] = self.m0 + self.s0 * self.b
        out.update(self.factors)
        return out

    def _install(self) -> None:
        for k, v in self.values().items():
            self.layer._buffers[k] = v

    @torch.no_grad()
    def finish(self) -> None:
        """Round the trained values back to float16 into the original buffers; remove the hook."""
        self._hook.remove()
        for k, v in self.values().items():
            buf = self._saved[k]
            buf.copy_(v.detach().to(buf.dtype))
            self.layer._buffers[k] = buf


def heal(model: nn.Module, windows: torch.Tensor, options: HealOptions, progress: bool = False,
         teacher: nn.Module | None = None) -> dict:
    """Heal ``model`` in place on token ``windows`` (n, L), distilling from ``teacher`` when given; returns
    ``{options, trained, loss, loss_first, loss_last, ...}``."""
    import re

    from .adaptation.attach import adapt, merge_and_unload, trainable_parameters
    from .adaptation.train import TrainConfig, train

    if options.steps < 1 or options.rank < 1 or (options.lr is not None and not options.lr > 0):
        raise ConfigError(f"healing needs steps >= 1, rank >= 1 and lr > 0, got {options}")
    factors, quant = factor_targets(model), quant_layers(model)
    plain = not factors and not quant and _is_plain(model)
    if not factors and not quant and not plain:
        raise ConfigError("healing trains low-rank factors, quantization scales or the linear layers of a plain "
                          "(pruned) model, and this model has other structured layers; use --structure lowrank, "
                          "gptq, lorc, lq, mixed, rtn or a pruning structure (or drop --heal-steps)")
    lr = options.lr if options.lr is not None else DEFAULT_LR["quant" if quant else "lowrank"]
    was_training = model.training
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    groups: list = []
    plain_layers = 0
    if factors or plain:
        from .adaptation.layers import adapter_layers

        targets = [re.escape(n) + "$" for n in factors] if factors else None  # None: every block linear
        adapt(model, init="lora", rank=options.rank, targets=targets, seed=options.seed)
        plain_layers = len(adapter_layers(model)) if plain else 0
        scale = 1.0 if options.lr is not None or not quant else DEFAULT_LR["lowrank"] / lr
        groups.append({"params": trainable_parameters(model), "lr_scale": scale})
    trainers = [QuantTrainer(layer) for layer in quant.values()]
    for t in trainers:
        groups += t.groups()
    try:
        res = train(model, windows, TrainConfig(steps=options.steps, lr=lr, batch_size=options.batch_size,
                                                warmup=max(1, options.steps // 10), seed=options.seed),
                    progress=progress, params=groups,
                    loss_fn=None if teacher is None else distillation_loss(teacher))
    finally:
        for t in trainers:
            t.finish()
    if factors or plain:
        merge_and_unload(model)
    for p in model.parameters():
        p.requires_grad_(flags.get(id(p), False))
    model.train(was_training)
    if res.stopped_on_nan:
        raise ConfigError(f"healing hit a non-finite loss at step {res.nan_step}; lower --heal-lr")
    what = [k for k, v in (("low-rank factors (LoRA, merged)", factors),
                           ("quantization scales and minimums (codes frozen)", quant),
                           ("block linear layers (LoRA, merged)", plain)) if v]
    return {"options": {**asdict(options), "lr": lr}, "trained": what,
            "loss": "kl-to-dense" if teacher is not None else "cross-entropy",
            "layers": len(quant) + len(factors) // 2 + plain_layers,
            "trainable_params": res.trainable_params, "loss_first": res.losses[0], "loss_last": res.losses[-1],
            "seconds_per_step": res.seconds_per_step}
