"""What an adapter init is, and the registry of them (``adapt(model, init=NAME)`` / ``--init NAME``).

Every init gets the frozen ``base`` module, its weight ``W`` (out, in, float32), the layer's rank ``r``,
its own typed options (an ``Options`` dataclass: only the fields that init reads), the
:class:`InitContext` of the ``adapt`` call and the layer's name; it returns an adapter layer.
Conventions: ``s`` = scaling = alpha / r (rslora: alpha / sqrt(r)). *Residual* inits change the frozen
base to ``W_res = W - Delta W_0`` so that ``W_res + Delta W_0 = W`` exactly and the model's output at
step 0 equals the base model's; the other inits start from ``Delta W_0 = 0``.

Adding an init is one file in this package (plus its test)::

    @dataclass
    class MyOptions:
        beta: float = 1.0                       # validated in __post_init__ (ConfigError naming the fix)

    @register("my-init", options=MyOptions, residual=True, peft=True)
    def init_mine(base, W, r, opts: MyOptions, ctx: InitContext, name: str) -> AdapterLayer:
        \"\"\"My init: ``A = ...``, ``B = ...``; ``W_res = W - s B A``.\"\"\"
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ...errors import ConfigError
from ...options import make_options
from ...registry import Registry
from ..layers import AdapterLayer, add_to_base


@dataclass
class NoOptions:
    """An init without options."""


@dataclass
class InitContext:
    """What every layer of one ``adapt`` call shares besides the init's options: the scale, the seed,
    and the per-call data that data-driven inits read (filled by :func:`~rankwise.adaptation.attach.adapt`)."""

    alpha: float | None = None
    rslora: bool = False
    seed: int = 0
    eigen: dict = field(default_factory=dict)     # name -> (ratios, top eigenvectors) (EVA)
    grads: dict = field(default_factory=dict)     # name -> mean gradient (out, in) (LoRA-GA, LoRA-SB)
    covs: dict = field(default_factory=dict)      # name -> input covariance X^T X (in, in) (LQ-LoRA)

    def scaling(self, r: int) -> float:
        alpha = float(self.alpha if self.alpha is not None else r)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def generator(self, name: str) -> torch.Generator:
        """A generator seeded from (seed, layer name): independent of layer order."""
        h = sum((i + 1) * ord(c) for i, c in enumerate(name)) % (2**31)
        return torch.Generator().manual_seed(self.seed * 1_000_003 + h)


InitFn = Callable[[nn.Module, torch.Tensor, int, Any, InitContext, str], AdapterLayer]


@dataclass(frozen=True)
class InitSpec:
    name: str
    fn: InitFn
    Options: type = NoOptions      # the init's options dataclass
    needs: str = "none"            # "none" | "activations" | "covariance" | "gradients"
    residual: bool = False         # the base becomes W - Delta W_0 (or, quantized, Q ~ W - Delta W_0)
    peft: bool = False             # result is a plain LoRA (lora_A, lora_B) PEFT can load
    summary: str = ""
    quantized: bool = False        # the base becomes a frozen QuantLinear (lq-lora, loftq)

    def build_options(self, options: Any = None, **kwargs: Any) -> Any:
        """The init's ``Options`` from an instance, a dict and/or keywords; an option this init does not
        take raises :class:`ConfigError` listing the valid ones."""
        return make_options(self.Options, options, kwargs, f"init {self.name!r}")

    def option_names(self) -> list[str]:
        return list(self.Options.__dataclass_fields__)


#: name -> InitSpec; filled by the modules of this package.
INITS: Registry[InitSpec] = Registry("init", package="rankwise.adaptation.inits")

NEEDS = ("none", "activations", "covariance", "gradients")


def register(name: str, options: type = NoOptions, needs: str = "none", residual: bool = False,
             peft: bool = False, quantized: bool = False) -> Callable[[InitFn], InitFn]:
    """Register the decorated function as init ``name`` with its ``options`` dataclass."""
    if needs not in NEEDS:
        raise ValueError(f"init {name!r}: needs must be one of {NEEDS}, got {needs!r}")

    def deco(fn: InitFn) -> InitFn:
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        INITS.register(name, InitSpec(name, fn, options, needs, residual, peft, summary, quantized))
        return fn
    return deco


def get_init(name: str) -> InitSpec:
    """The registered init ``name``; an unknown name raises UnknownMethodError listing the valid ones."""
    return INITS.get(name)


# ---- option checks (for the Options dataclasses' __post_init__) ---------------------------------

def check_int(option: str, value: Any, minimum: int, fix: str = "") -> int:
    """``value`` as an int ``>= minimum``, else :class:`ConfigError` naming ``option``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"option {option} must be an integer >= {minimum}, got {value!r}"
                          + (f"; {fix}" if fix else ""))
    return int(value)


def check_positive(option: str, value: Any, fix: str = "") -> float:
    """``value`` as a finite float ``> 0``, else :class:`ConfigError` naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"option {option} must be a finite number > 0, got {value!r}" + (f"; {fix}" if fix else ""))
    return float(value)


# ---- helpers shared by inits -----------------------------------------------------------------

def kaiming_uniform(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """PEFT's LoRA A init: ``kaiming_uniform_(a=sqrt(5))`` = U(-1/sqrt(cols), 1/sqrt(cols))."""
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=g) * 2 - 1) * bound


def subtract_from_base(base: nn.Module, L: torch.Tensor, R: torch.Tensor) -> None:
    """Residual inits: the frozen base becomes ``W - L R``."""
    add_to_base(base, L @ R, -1.0)


__all__ = ["INITS", "InitContext", "InitSpec", "NoOptions", "check_int", "check_positive", "get_init",
           "kaiming_uniform", "register", "subtract_from_base"]
