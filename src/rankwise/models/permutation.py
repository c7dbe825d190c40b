"""Permutation symmetries of a model, derived from its module structure (git re-basin's "permutation spec").

Hidden units can be reordered without changing the function: if ``P`` permutes the outputs of one
layer, permuting the inputs of every layer that reads them by the same ``P`` (and every elementwise
parameter in between: biases, norm scales, BatchNorm statistics) gives the same network. A
:class:`PermutationSpec` lists, for each independent permutation, every tensor axis it moves:

* ``sizes[p]`` -- the number of units ``n`` of permutation ``p``;
* ``axes[p]`` -- :class:`Axis` entries ``(key, axis, block, sections)``: state-dict tensor ``key`` is
  permuted along ``axis``, whose layout is ``sections`` equal parts of ``n`` units of ``block``
  consecutive indices each (a head's ``head_dim`` rows; a conv channel's ``H W`` flattened positions;
  GPT-2's fused q, k, v as 3 sections);
* ``probes[p]`` -- where activation matching reads the units: the input of a module (units on the last
  axis, or on axis 1 for a convolution).

Specs come from the module structure, never written by hand:

* **Transformers** (:func:`transformer_spec`): the residual stream (embeddings, every norm on the
  stream, every linear reading it and writing it, the LM head), each block's FFN channels, and each
  block's attention heads as whole heads (with grouped-query attention, whole KV groups with their
  query heads; rotary embeddings forbid permuting inside a head). Llama-family (Llama, Mistral, Qwen2,
  Gemma, ...) by their ``q/k/v/o_proj`` + ``gate/up/down_proj`` structure, and GPT-2 (``Conv1D``).
* **Anything else** (:func:`traced_spec`): ``torch.fx`` traces the module; the outputs of every
  ``Linear`` / ``Conv*d`` are a permutation that flows through elementwise modules (activations,
  dropout, BatchNorm, pooling, flatten) to the layers that read them; a residual ``+`` ties the
  permutations of its two inputs together; a unit that reaches any other operation (or the model's
  output) is left fixed. MLPs, convolutional stacks and ResNet-style blocks come out exactly.

:func:`permute_state` applies permutations to a state dict (``perm[i] = j``: unit ``i`` of the result
is unit ``j`` of the input).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from ..errors import ConfigError
from .surgery import decoder_blocks


@dataclass(frozen=True)
class Axis:
    key: str
    axis: int
    block: int = 1
    sections: int = 1


@dataclass(frozen=True)
class Probe:
    """Activations of a permutation's units: the input of ``module`` (units on the last axis, or on axis 1
    when ``channels``), ``block`` features per unit."""
    module: str
    block: int = 1
    channels: bool = False


@dataclass
class PermutationSpec:
    sizes: dict[str, int] = field(default_factory=dict)
    axes: dict[str, list[Axis]] = field(default_factory=dict)
    probes: dict[str, list[Probe]] = field(default_factory=dict)

    def add(self, name: str, n: int, axes: list[Axis], probes: list[Probe] = ()) -> None:
        if n < 2:  # one unit cannot move
            return
        self.sizes[name] = int(n)
        self.axes[name] = list(axes)
        self.probes[name] = list(probes)

    def identity(self) -> dict[str, torch.Tensor]:
        return {p: torch.arange(n) for p, n in self.sizes.items()}

    def by_key(self) -> dict[str, list[tuple[str, Axis]]]:
        """``{key: [(perm, axis entry), ...]}``: every permutation acting on each tensor."""
        out: dict[str, list[tuple[str, Axis]]] = {}
        for p, entries in self.axes.items():
            for a in entries:
                out.setdefault(a.key, []).append((p, a))
        return out


def axis_index(perm: torch.Tensor, block: int = 1, sections: int = 1) -> torch.Tensor:
    """The index along an axis laid out as ``sections x n x block`` that applies the unit permutation."""
    n = perm.numel()
    s = torch.arange(sections).view(-1, 1, 1) * (n * block)
    return (s + perm.view(1, -1, 1) * block + torch.arange(block).view(1, 1, -1)).flatten()


def permute_tensor(t: torch.Tensor, entries: list[tuple[torch.Tensor, Axis]]) -> torch.Tensor:
    """``t`` with each ``(perm, axis entry)`` applied."""
    for perm, a in entries:
        t = t.index_select(a.axis, axis_index(perm.to(t.device), a.block, a.sections).to(t.device))
    return t


def permute_state(state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor],
                  skip: tuple[str, str] | None = None) -> dict[str, torch.Tensor]:
    """``state`` with ``perms`` applied along every axis of ``spec`` (``skip = (perm, key)`` leaves that one
    permutation off that one tensor). Tensors no permutation touches are returned as they are."""
    out = dict(state)
    for key, acting in spec.by_key().items():
        if key not in state:
            continue
        use = [(perms[p], a) for p, a in acting if p in perms and (skip is None or skip != (p, key))]
        if use:
            out[key] = permute_tensor(state[key], use)
    return out


def permute_model_(model: nn.Module, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> nn.Module:
    """Apply ``perms`` to ``model``'s parameters and buffers in place (tied tensors stay tied: each key of a
    shared tensor receives the same permuted values)."""
    state = model.state_dict()
    new = permute_state(state, spec, perms)
    with torch.no_grad():
        for key, t in state.items():
            if new[key] is not t:
                t.copy_(new[key])
    return model


# ---- transformers ----------------------------------------------------------------------------------

def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _params(model: nn.Module, module_name: str) -> dict[str, torch.Tensor]:
    mod = model.get_submodule(module_name)
    return {n: p for n, p in mod.named_parameters(recurse=False)}


def _norms(model: nn.Module, prefix: str, d: int) -> list[str]:
    """Qualified names of the norm modules under ``prefix`` whose scale has ``d`` entries (on the stream)."""
    root = model.get_submodule(prefix) if prefix else model
    out = []
    for name, mod in root.named_modules():
        w = getattr(mod, "weight", None)
        if name.endswith(("q_norm", "k_norm")):  # per-head norms inside attention, not on the stream
            continue
        if "norm" in type(mod).__name__.lower() and isinstance(w, torch.Tensor) and tuple(w.shape) == (d,):
            out.append(_key(prefix, name))
    return out


def _elementwise(model: nn.Module, module_name: str, axis: int = 0) -> list[Axis]:
    return [Axis(_key(module_name, n), axis) for n, p in _params(model, module_name).items()]


def _embedding_keys(model: nn.Module) -> list[tuple[str, int]]:
    """``(key, axis)`` of the token (and position) embeddings and the LM head on the residual stream."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    emb = model.get_input_embeddings()
    out.append((_key(names[id(emb)], "weight"), 1))
    for n, m in model.named_modules():  # GPT-2's position embeddings
        if isinstance(m, nn.Embedding) and m is not emb and n.endswith("wpe"):
            out.append((_key(n, "weight"), 1))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        out.append((_key(names[id(head)], "weight"), 1))
    return out


def transformer_spec(model: nn.Module) -> PermutationSpec:
    """The spec of a Llama-family or GPT-2 model (module docstring)."""
    config = model.config
    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    d = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd"))
    spec = PermutationSpec()
    res: list[Axis] = [Axis(k, a) for k, a in _embedding_keys(model)]
    res_probes: list[Probe] = []
    gpt2 = isinstance(getattr(blocks[0], "attn", None), nn.Module) and hasattr(blocks[0].attn, "c_attn")
    for i, _ in enumerate(blocks):
        b = f"{prefix}.{i}"
        for norm in _norms(model, b, d):
            res += _elementwise(model, norm)
            res_probes.append(Probe(norm))
        if gpt2:
            _gpt2_block(model, config, b, i, res, spec)
        else:
            _llama_block(model, config, b, i, res, spec)
    top = prefix.rsplit(".", 2)[0] if prefix.count(".") else ""
    for norm in _norms(model, top, d):
        if not norm.startswith(prefix + "."):
            res += _elementwise(model, norm)
            res_probes.append(Probe(norm))
    spec.add("residual", d, _dedup(res), res_probes)
    return spec


def _dedup(axes: list[Axis]) -> list[Axis]:
    seen, out = set(), []
    for a in axes:
        if a not in seen:
            seen.add(a)
            out.append(a)
    return out


def _llama_block(model, config, b: str, i: int, res: list[Axis], spec: PermutationSpec) -> None:
    attn, mlp = f"{b}.self_attn", f"{b}.mlp"
    try:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            model.get_submodule(f"{attn}.{name}")
        for name in ("gate_proj", "up_proj", "down_proj"):
            model.get_submodule(f"{mlp}.{name}")
    except AttributeError:
        raise ConfigError(f"{type(model).__name__}: block {b} is not a Llama-family block (self_attn.q/k/v/o_proj, "
                          "mlp.gate/up/down_proj); permutation specs cover Llama-family and GPT-2 transformers and "
                          "any module torch.fx can trace") from None
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    hd = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    group = heads // kv
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        mod = attn if name.endswith(("q_proj", "k_proj", "v_proj")) else mlp
        res.append(Axis(f"{mod}.{name}.weight", 1))
    for mod, name in ((attn, "o_proj"), (mlp, "down_proj")):
        res.append(Axis(f"{mod}.{name}.weight", 0))
        if "bias" in _params(model, f"{mod}.{name}"):
            res.append(Axis(f"{mod}.{name}.bias", 0))
    head_axes = [Axis(f"{attn}.o_proj.weight", 1, hd * group)]
    for name, blk in (("q_proj", hd * group), ("k_proj", hd), ("v_proj", hd)):
        head_axes += [Axis(f"{attn}.{name}.{p}", 0, blk) for p in _params(model, f"{attn}.{name}")]
    spec.add(f"heads.{i}", kv, head_axes, [Probe(f"{attn}.o_proj", hd * group)])
    inter = model.get_submodule(f"{mlp}.down_proj").in_features
    ffn = [Axis(f"{mlp}.down_proj.weight", 1)]
    for name in ("gate_proj", "up_proj"):
        ffn += [Axis(f"{mlp}.{name}.{p}", 0) for p in _params(model, f"{mlp}.{name}")]
    spec.add(f"ffn.{i}", inter, ffn, [Probe(f"{mlp}.down_proj")])


def _gpt2_block(model, config, b: str, i: int, res: list[Axis], spec: PermutationSpec) -> None:
    heads, d = int(config.n_head), int(config.n_embd)
    hd = d // heads
    res += [Axis(f"{b}.attn.c_attn.weight", 0), Axis(f"{b}.mlp.c_fc.weight", 0),
            Axis(f"{b}.attn.c_proj.weight", 1), Axis(f"{b}.attn.c_proj.bias", 0),
            Axis(f"{b}.mlp.c_proj.weight", 1), Axis(f"{b}.mlp.c_proj.bias", 0)]
    spec.add(f"heads.{i}", heads, [Axis(f"{b}.attn.c_attn.weight", 1, hd, 3), Axis(f"{b}.attn.c_attn.bias", 0, hd, 3),
                                   Axis(f"{b}.attn.c_proj.weight", 0, hd)], [Probe(f"{b}.attn.c_proj", hd)])
    inter = model.get_submodule(f"{b}.mlp.c_fc").nf
    spec.add(f"ffn.{i}", inter, [Axis(f"{b}.mlp.c_fc.weight", 1), Axis(f"{b}.mlp.c_fc.bias", 0),
                                 Axis(f"{b}.mlp.c_proj.weight", 0)], [Probe(f"{b}.mlp.c_proj")])


# ---- anything torch.fx can trace ------------------------------------------------------------------

_PASS_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardswish,
                 nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.MaxPool1d, nn.MaxPool2d,
                 nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PASS_FUNCTIONS = {torch.relu, torch.tanh, torch.sigmoid, nn.functional.relu, nn.functional.gelu, nn.functional.silu,
                   nn.functional.tanh, nn.functional.sigmoid, nn.functional.leaky_relu, nn.functional.dropout,
                   nn.functional.max_pool2d, nn.functional.avg_pool2d, nn.functional.adaptive_avg_pool2d}
_PASS_METHODS = {"relu", "tanh", "sigmoid", "contiguous"}
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _Units:
    """Union-find over the permutations born at each producer (a residual add joins two)."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.size: dict[str, int] = {}
        self.axes: dict[str, list[Axis]] = {}
        self.probes: dict[str, list[Probe]] = {}
        self.fixed: set[str] = set()

    def new(self, name: str, n: int) -> str:
        self.parent[name], self.size[name], self.axes[name], self.probes[name] = name, n, [], []
        return name

    def find(self, p: str) -> str:
        while self.parent[p] != p:
            self.parent[p] = self.parent[self.parent[p]]
            p = self.parent[p]
        return p

    def union(self, a: str, b: str) -> str:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.size[a] != self.size[b]:
            self.fixed.update((a, b))
            return a
        self.parent[b] = a
        self.axes[a] += self.axes.pop(b)
        self.probes[a] += self.probes.pop(b)
        if b in self.fixed:
            self.fixed.add(a)
        return a


def traced_spec(model: nn.Module) -> PermutationSpec:
    """The spec of any module ``torch.fx.symbolic_trace`` can trace (module docstring)."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # noqa: BLE001 -- fx raises many kinds; one clear message
        raise ConfigError(f"cannot derive the permutations of {type(model).__name__}: torch.fx could not trace it "
                          f"({type(e).__name__}: {e}); permutation matching supports Llama-family and GPT-2 "
                          "transformers and modules fx can trace (MLPs, CNNs, ResNets)") from None
    mods = dict(model.named_modules())
    u = _Units()
    flow: dict[torch.fx.Node, tuple[str, bool]] = {}   # node -> (units, flattened after conv)

    def fix(node) -> None:
        for arg in node.all_input_nodes:
            if arg in flow:
                u.fixed.add(u.find(flow[arg][0]))

    for node in graph.nodes:
        ins = [a for a in node.all_input_nodes if a in flow]
        mod = mods.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, (nn.Linear, *_CONV)):
            if ins:
                p, flat = flow[ins[0]]
                p = u.find(p)
                n = u.size[p]
                fan_in = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
                if fan_in % n or (fan_in != n and not flat):
                    u.fixed.add(p)
                else:
                    u.axes[p].append(Axis(f"{node.target}.weight", 1, fan_in // n))
                    u.probes[p].append(Probe(node.target, fan_in // n, channels=isinstance(mod, _CONV)))
            n_out = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            q = u.new(node.target, n_out)
            u.axes[q] += [Axis(f"{node.target}.{k}", 0) for k, _ in mod.named_parameters(recurse=False)]
            flow[node] = (q, False)
        elif ins and (isinstance(mod, _PASS_MODULES) or (node.op == "call_function" and node.target in _PASS_FUNCTIONS)
                      or (node.op == "call_method" and node.target in _PASS_METHODS)):
            flow[node] = flow[ins[0]]
        elif ins and isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)):
            p = u.find(flow[ins[0]][0])
            ok = not isinstance(mod, nn.LayerNorm) or tuple(mod.normalized_shape) == (u.size[p],)
            if ok:
                u.axes[p] += [Axis(f"{node.target}.{k}", 0) for k, t in mod.state_dict().items() if t.ndim == 1]
                flow[node] = flow[ins[0]]
            else:
                fix(node)
        elif ins and _is_flatten(node, mod):
            flow[node] = (flow[ins[0]][0], True)
        elif node.op == "call_function" and node.target in (operator.add, torch.add) and len(ins) == 2 \
                and all(isinstance(a, torch.fx.Node) for a in node.args[:2]):
            p = u.union(flow[ins[0]][0], flow[ins[1]][0])
            flow[node] = (p, flow[ins[0]][1] or flow[ins[1]][1])
        else:
            fix(node)
    spec = PermutationSpec()
    for p in list(u.parent):
        if u.find(p) == p and p not in u.fixed and u.probes[p]:
            spec.add(p, u.size[p], _dedup(u.axes[p]), u.probes[p])
    return spec


def _is_flatten(node, mod) -> bool:
    if isinstance(mod, nn.Flatten):
        return mod.start_dim == 1 and mod.end_dim == -1
    if node.op == "call_function" and node.target is torch.flatten:
        return (node.args[1:2] or (node.kwargs.get("start_dim", 0),))[0] == 1
    if node.op == "call_method" and node.target == "flatten":
        return (node.args[1:2] or (node.kwargs.get("start_dim", 0),))[0] == 1
    if node.op == "call_method" and node.target in ("view", "reshape") and len(node.args) == 3:
        return node.args[2] == -1
    return False


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """The permutation spec of ``model``: a transformer's from its blocks, anything else by tracing."""
    if hasattr(model, "config") and hasattr(model, "get_input_embeddings"):
        return transformer_spec(model)
    return traced_spec(model)


__all__ = ["Axis", "PermutationSpec", "Probe", "axis_index", "permutation_spec", "permute_model_", "permute_state",
           "permute_tensor", "traced_spec", "transformer_spec"]
