"""``init_(model, method, data=None)``: initialize every target layer of a model in place.

Target layers: the structured layers (outermost) and the linear layers not inside one -- inside the
repeated blocks of a transformer, every one of them in a plain network (an MLP). Biases are zeroed.

* ``orthogonal`` -- ``W`` with orthonormal rows or columns (``W W^T = I`` for ``m <= n``, else
  ``W^T W = I``), times ``gain``; structured layers get their structure-aware init instead.
* ``spectral`` -- ``W <- W sqrt(d_out / d_in) / ||W||_2`` (Yang, Simon & Bernstein's spectral
  condition): every layer's spectral norm is exactly ``sqrt(d_out / d_in)``. A structured layer is
  rescaled through the factors its matrix is linear in (``A`` of a low-rank ``B A``, ``B1`` of a
  Monarch, ...), so the condition holds for its dense matrix too.
* ``idinit`` -- IDInit (Pan et al. 2024): the padded identity, ``W[i, j] = 1`` iff ``j = i mod n``
  for ``m >= n`` (the input, copied down the rows: full column rank) and ``W = [I_m 0]`` for ``m < n``
  (the first ``m`` inputs), so a chain ``n -> d -> ... -> d -> n`` with ``d >= n`` is the identity at
  init (and ReLU passes it: the network maps non-negative ``x`` to ``x``). In a transformer the last linear
  of each residual branch (``o_proj``, ``down_proj``: the last one registered in its parent module) is
  zeroed, so every block is the identity at init (IDInit's residual rule).
* ``lsuv`` -- LSUV (Mishkin & Matas 2016), data-driven: ``orthogonal`` (structure-aware for
  structured layers) first; then, layer by layer in execution order (recorded by hooking one
  forward), forward ``data`` and scale the layer by ``1 / sqrt(Var(output))`` until
  ``|Var - 1| <= tol`` (at most ``max_iters`` times per layer); each layer's output variance on
  ``data`` is then 1.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..models.saved import structured_layers
from ..models.surgery import Conv1D, find_linears, is_linear
from ..registry import Registry
from ..structures.base import StructuredLinear
from .structured import structured_init_

INITS: Registry[Callable[..., dict]] = Registry("init")

#: kind -> the factors a structured layer's matrix is linear in (scaling them all by c scales W' by c).
LINEAR_FACTORS = {"lowrank": ("A.weight",), "monarch": ("B1",), "blockdiag-lowrank": ("blocks", "A.weight"),
                  "kronecker": ("A",), "lowrank-sparse": ("A.weight", "S.values"), "blast": ("diag",),
                  "sparse": ("values",)}


def target_layers(model: nn.Module, targets: Sequence[str] | str | None = None) -> dict[str, nn.Module]:
    """The structured layers and the linear layers not inside one, in model order (module docstring)."""
    structured = structured_layers(model)
    found = dict(structured)

    def inside(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in structured)

    lin = find_linears(model, targets, required=False)
    if not lin and targets is None:
        lin = find_linears(model, [".*"], required=False)
    found.update({n: m for n, m in lin.items() if not inside(n)})
    if targets is not None:
        found = {n: m for n, m in found.items() if n in lin or n in structured}
    if not found:
        raise ConfigError(f"{type(model).__name__} has no linear or structured layer to initialize; pass targets=")
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return dict(sorted(found.items(), key=lambda kv: order[kv[0]]))


def _weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight parameter data of a dense linear (GPT-2 Conv1D: its transpose view)."""
    return layer.weight.data.T if (Conv1D and isinstance(layer, Conv1D)) else layer.weight.data


@torch.no_grad()
def scale_layer_(layer: nn.Module, c: float) -> None:
    """``W' <- c W'`` (dense or structured; the bias is untouched)."""
    if isinstance(layer, StructuredLinear):
        keys = LINEAR_FACTORS.get(layer.kind)
        if keys is None:
            raise ConfigError(f"cannot rescale a {layer.kind!r} layer (init supports {sorted(LINEAR_FACTORS)})")
        for k in keys:
            layer.get_parameter(k).mul_(c)
    else:
        layer.weight.mul_(c)


def _zero_bias(layer: nn.Module) -> None:
    b = getattr(layer, "bias", None)
    if isinstance(b, torch.Tensor):
        b.data.zero_()


@torch.no_grad()
def _orthogonal_(layer: nn.Module, gain: float, g: torch.Generator) -> None:
    if isinstance(layer, StructuredLinear):
        structured_init_(layer, g)
        return
    W = _weight(layer)
    m, n = W.shape
    Z = torch.randn(max(m, n), min(m, n), generator=g, dtype=torch.float64)
    Q, R = torch.linalg.qr(Z)
    Q = Q * torch.sign(torch.diagonal(R))
    W.copy_((Q if m >= n else Q.T).to(W.dtype) * gain)
    _zero_bias(layer)


def _dense_of(layer: nn.Module) -> torch.Tensor:
    return layer.dense() if isinstance(layer, StructuredLinear) else _weight(layer).float()


@INITS.register("orthogonal")
def orthogonal(model, layers, data, g, gain: float = 1.0) -> dict:
    for layer in layers.values():
        _orthogonal_(layer, gain, g)
    return {}


@INITS.register("spectral")
@torch.no_grad()
def spectral(model, layers, data, g) -> dict:
    for layer in layers.values():
        W = _dense_of(layer)
        if float(W.abs().max()) == 0:          # nothing to rescale: start from an orthogonal matrix
            _orthogonal_(layer, 1.0, g)
            W = _dense_of(layer)
        m, n = W.shape
        scale_layer_(layer, math.sqrt(m / n) / float(torch.linalg.matrix_norm(W.double(), 2)))
        _zero_bias(layer)
    return {}


def _last_in_parent(names: list[str]) -> set[str]:
    last: dict[str, str] = {}
    for n in names:
        last[n.rpartition(".")[0]] = n
    return set(last.values())


@INITS.register("idinit")
@torch.no_grad()
def idinit(model, layers, data, g, zero_residual: bool = True) -> dict:
    structured = [n for n, l in layers.items() if isinstance(l, StructuredLinear)]
    if structured:
        raise ConfigError(f"idinit makes dense layers identity-like; {structured[0]} is a structured layer "
                          "(use --init lsuv or spectral for structured models)")
    try:
        from ..models.surgery import decoder_blocks

        decoder_blocks(model)
        residual = zero_residual
    except Exception:
        residual = False
    zeroed = _last_in_parent(list(layers)) if residual else set()
    for name, layer in layers.items():
        W = _weight(layer)
        m, n = W.shape
        W.zero_()
        if name not in zeroed:
            i = torch.arange(m)[:, None]
            j = torch.arange(n)[None, :]
            W.copy_(((j == i % n) if m >= n else (i == j)).to(W.dtype))
        _zero_bias(layer)
    return {"zeroed": sorted(zeroed)}


def _forward(model: nn.Module, data: torch.Tensor) -> None:
    if not data.is_floating_point():
        model(input_ids=data)
    else:
        model(data)


@INITS.register("lsuv")
@torch.no_grad()
def lsuv(model, layers, data, g, tol: float = 0.01, max_iters: int = 10) -> dict:
    if data is None:
        raise ConfigError("lsuv is data-driven: pass data= (a batch of inputs, or token ids for a language model)")
    for layer in layers.values():
        _orthogonal_(layer, 1.0, g)
    seen: list[str] = []
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, layer in layers.items():
        def hook(mod, inp, out, name=name):
            if name not in seen:
                seen.append(name)
            outputs[name] = out.detach()
        hooks.append(layer.register_forward_hook(hook))
    variances = {}
    was = model.training
    model.eval()
    try:
        _forward(model, data)                       # execution order
        for name in list(seen):
            for _ in range(int(max_iters)):
                var = float(outputs[name].double().var())
                if not math.isfinite(var) or var <= 0:
                    raise ConfigError(f"layer {name}'s output has variance {var} on the data; LSUV cannot scale "
                                      "it (check the data, or use --init spectral)")
                if abs(var - 1.0) <= tol:
                    break
                scale_layer_(layers[name], 1.0 / math.sqrt(var))
                _forward(model, data)
            variances[name] = float(outputs[name].double().var())
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {"variances": variances, "order": seen}


def init_(model: nn.Module, method: str, data: torch.Tensor | None = None,
          targets: Sequence[str] | str | None = None, seed: int = 0, **options: Any) -> dict:
    """Initialize ``model``'s target layers in place with ``method`` (``lsuv``, ``idinit``,
    ``spectral``, ``orthogonal``); returns what the method recorded (LSUV: each layer's variance)."""
    fn = INITS.get(method)
    layers = target_layers(model, targets)
    g = torch.Generator().manual_seed(int(seed))
    try:
        return fn(model, layers, data, g, **options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise ConfigError(f"init {method!r} does not take option(s) {sorted(options)}") from None
        raise
