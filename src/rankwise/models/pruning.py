"""Structured-pruning surgery: drop decoder blocks, attention heads and FFN channels, and rewrite the
config so that the smaller model is still a plain model of its family. Knows no job.

A block's layout (:class:`BlockLayout`) names the layers that write heads (``q``, ``k``, ``v``, or a
fused ``qkv``), the one that reads them (``o``), the FFN's input layers (``gate``/``up``, ``c_fc``,
``intermediate.dense``) and its output layer (``down``), plus the config keys that can express a
pruned width. Grouped-query attention: query head ``h`` reads KV head ``h // r``, ``r = heads /
kv_heads`` (Hugging Face's ``repeat_kv``); a kept set must keep the same number of query heads in
every kept KV group.

Weights are read and written through (out, in) views (:func:`linear_weight`), so GPT-2's ``Conv1D``
stays a ``Conv1D`` (its state dict keeps the layout ``from_pretrained`` expects).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .surgery import Conv1D, decoder_blocks, linear_bias, linear_weight, set_module


@dataclass(frozen=True)
class BlockLayout:
    """Where a family's block keeps its heads and channels (names relative to the block)."""

    family: str
    q: str | None
    k: str | None
    v: str | None
    qkv: str | None                       # fused q|k|v (GPT-2 c_attn)
    o: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    attention: str                        # the attention module holding the head geometry
    head_keys: tuple[str, str, str] | None  # config keys (heads, kv_heads, head_dim) that express pruned heads
    channel_key: str | None               # config key of the FFN width

    @property
    def head_writers(self) -> tuple[str, ...]:
        return (self.qkv,) if self.qkv else tuple(x for x in (self.q, self.k, self.v) if x)


LAYOUTS = (
    BlockLayout("llama", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", None, "self_attn.o_proj",
                ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "self_attn",
                ("num_attention_heads", "num_key_value_heads", "head_dim"), "intermediate_size"),
    BlockLayout("gpt2", None, None, None, "attn.c_attn", "attn.c_proj", ("mlp.c_fc",), "mlp.c_proj", "attn",
                None, "n_inner"),
    BlockLayout("bert", "attention.self.query", "attention.self.key", "attention.self.value", None,
                "attention.output.dense", ("intermediate.dense",), "output.dense", "attention.self", None,
                "intermediate_size"),
)


@dataclass(frozen=True)
class Widths:
    """One block's widths: query heads, KV heads, head dim, FFN channels."""

    heads: int
    kv_heads: int
    head_dim: int
    channels: int


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
        return True
    except AttributeError:
        return False


def block_layout(model: nn.Module) -> BlockLayout:
    """The layout of ``model``'s blocks (from their module names); :class:`ConfigError` if unknown."""
    block = decoder_blocks(model)[0]
    for lay in LAYOUTS:
        needed = [lay.o, lay.mlp_out, *lay.head_writers]
        if all(_has(block, n) for n in needed):
            mlp_in = tuple(n for n in lay.mlp_in if _has(block, n))
            if mlp_in:
                return BlockLayout(**{**lay.__dict__, "mlp_in": mlp_in})
    raise ConfigError(f"{type(model).__name__}: structured pruning knows the Llama family (q/k/v/o_proj, "
                      "gate/up/down_proj), GPT-2 and BERT blocks; this block's layers are not one of them")


def widths(model: nn.Module, layout: BlockLayout | None = None) -> list[Widths]:
    """Each block's widths, read from its layers."""
    layout = layout or block_layout(model)
    out = []
    for block in decoder_blocks(model):
        attn = block.get_submodule(layout.attention)
        hd = int(getattr(attn, "head_dim", 0) or getattr(attn, "attention_head_size", 0))
        o_in = int(linear_weight(block.get_submodule(layout.o)).shape[1])
        if layout.qkv:
            heads = kv = o_in // hd
        else:
            heads = int(linear_weight(block.get_submodule(layout.q)).shape[0]) // hd
            kv = int(linear_weight(block.get_submodule(layout.k)).shape[0]) // hd
        ch = int(linear_weight(block.get_submodule(layout.mlp_out)).shape[1])
        out.append(Widths(heads, kv, hd, ch))
    return out


def _new_like(old: nn.Module, W: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A fresh layer of ``old``'s type (``nn.Linear`` or ``Conv1D``) with weight ``W`` (out, in)."""
    out_f, in_f = W.shape
    dtype, device = linear_weight(old).dtype, linear_weight(old).device
    if Conv1D and isinstance(old, Conv1D):
        new = Conv1D(out_f, in_f)
        new.weight = nn.Parameter(W.detach().t().contiguous().to(device=device, dtype=dtype))
        new.bias = nn.Parameter((bias if bias is not None else torch.zeros(out_f)).detach().clone()
                                .to(device=device, dtype=dtype))
        return new
    new = nn.Linear(in_f, out_f, bias=bias is not None, device=device, dtype=dtype)
    with torch.no_grad():
        new.weight.copy_(W)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def keep_rows(block: nn.Module, name: str, rows: torch.Tensor) -> None:
    """Keep the output rows ``rows`` of the block's layer ``name`` (and of its bias)."""
    old = block.get_submodule(name)
    rows = rows.to(linear_weight(old).device)
    b = linear_bias(old)
    set_module(block, name, _new_like(old, linear_weight(old).detach()[rows], None if b is None else b.detach()[rows]))


def keep_columns(block: nn.Module, name: str, cols: torch.Tensor, weight: torch.Tensor | None = None,
                 like: nn.Module | None = None) -> None:
    """Keep the input columns ``cols`` of the block's layer ``name``: its weight there, or ``weight``
    ((out, len(cols)), a refit, e.g. held by a fitted column subset standing in for the layer). The new
    layer has the type of ``like`` (default: the current layer; ``nn.Linear`` or ``Conv1D``)."""
    old = block.get_submodule(name)
    if weight is None:
        weight = linear_weight(old).detach()[:, cols.to(linear_weight(old).device)]
    b = linear_bias(old)
    set_module(block, name, _new_like(like if like is not None else old, weight.detach(),
                                      None if b is None else b.detach()))


def heads_to_kv(heads: Sequence[int], n_heads: int, n_kv: int) -> list[int]:
    """The KV heads the kept query ``heads`` read; :class:`ConfigError` unless every kept KV group keeps
    the same number of query heads."""
    r = n_heads // n_kv
    per: dict[int, int] = {}
    for h in heads:
        per[h // r] = per.get(h // r, 0) + 1
    if not per or len(set(per.values())) != 1:
        raise ConfigError(f"kept query heads {list(heads)} leave KV groups unevenly divided (GQA needs the same "
                          "number of query heads per kept KV head)")
    return sorted(per)


def prune_heads(block: nn.Module, layout: BlockLayout, geometry: Widths, heads: Sequence[int],
                o_weight: torch.Tensor | None = None, like: nn.Module | None = None) -> Widths:
    """Keep the query ``heads`` of one block (ascending; KV heads follow, see :func:`heads_to_kv`);
    ``o_weight`` (out, len(heads) * head_dim) replaces the reader's kept columns (a refit). Returns the
    block's new widths."""
    if layout.qkv:
        raise ConfigError(f"{layout.family} fuses q, k and v; its heads cannot be pruned here")
    heads = sorted(int(h) for h in heads)
    hd = geometry.head_dim
    kv = heads_to_kv(heads, geometry.heads, geometry.kv_heads)

    def rows(idx: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(i * hd, (i + 1) * hd) for i in idx])

    keep_rows(block, layout.q, rows(heads))
    keep_rows(block, layout.k, rows(kv))
    keep_rows(block, layout.v, rows(kv))
    keep_columns(block, layout.o, rows(heads), o_weight, like)
    attn = block.get_submodule(layout.attention)
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = len(heads) // len(kv)
    for attr, value in (("num_heads", len(heads)), ("num_key_value_heads", len(kv)),
                        ("num_attention_heads", len(heads)), ("all_head_size", len(heads) * hd)):
        if hasattr(attn, attr):
            setattr(attn, attr, value)
    return Widths(len(heads), len(kv), hd, geometry.channels)


def prune_channels(block: nn.Module, layout: BlockLayout, channels: Sequence[int] | torch.Tensor,
                   out_weight: torch.Tensor | None = None, like: nn.Module | None = None) -> None:
    """Keep the FFN ``channels`` (ascending) of one block; ``out_weight`` (out, len(channels)) replaces
    the output layer's kept columns (a refit)."""
    idx = torch.as_tensor(sorted(int(c) for c in channels), dtype=torch.long)
    for name in layout.mlp_in:
        keep_rows(block, name, idx)
    keep_columns(block, layout.mlp_out, idx, out_weight, like)
    mlp = block.get_submodule(layout.mlp_out.rsplit(".", 1)[0]) if "." in layout.mlp_out else block
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(idx.numel())


def drop_blocks(model: nn.Module, drop: Sequence[int]) -> list[int]:
    """Remove the blocks ``drop`` (indices); renumber the kept blocks' ``layer_idx`` (the KV cache's
    slot) and rewrite ``num_hidden_layers`` and every per-layer list in the config. Returns the kept
    original indices."""
    blocks = decoder_blocks(model)
    n = len(blocks)
    drop_set = {int(i) for i in drop}
    if not drop_set <= set(range(n)):
        raise ConfigError(f"block indices {sorted(drop_set - set(range(n)))} are out of range (the model has {n})")
    kept = [i for i in range(n) if i not in drop_set]
    if not kept:
        raise ConfigError(f"dropping every one of the {n} blocks leaves no model")
    new = nn.ModuleList([blocks[i] for i in kept])
    parent_name, child = _parent_of(model, blocks)
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    for j, block in enumerate(new):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = j
    cfg = _text_config(model)
    values = {key: [value[i] for i in kept] for key, value in cfg.to_dict().items()
              if isinstance(value, list) and len(value) == n and key != "architectures"}
    set_config(cfg, num_hidden_layers=len(kept), **values)
    return kept


def _parent_of(model: nn.Module, blocks: nn.ModuleList) -> tuple[str, str]:
    for name, mod in model.named_modules():
        if mod is blocks:
            parent, _, child = name.rpartition(".")
            return parent, child
    raise ConfigError("decoder blocks not found by name")  # pragma: no cover


def _text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def uniform_widths(model: nn.Module, layout: BlockLayout | None = None) -> Widths | None:
    """The blocks' common widths, or ``None`` when they differ (a config cannot express that)."""
    ws = widths(model, layout)
    return ws[0] if all(w == ws[0] for w in ws) else None


def write_widths(model: nn.Module, layout: BlockLayout | None = None) -> None:
    """Rewrite the config's head counts / FFN width from the blocks (which must agree), and check that
    the config class accepts them. :class:`ConfigError` naming what cannot be expressed otherwise."""
    layout = layout or block_layout(model)
    w = uniform_widths(model, layout)
    if w is None:
        raise ConfigError("the blocks have different widths, which a plain config.json cannot express; prune with "
                          "uniform widths (--set widths=uniform) or export through HF remote code, whose per-layer "
                          "structure table holds per-block widths")
    cfg = _text_config(model)
    values = {}
    if layout.head_keys is not None:
        hk, kvk, hdk = layout.head_keys
        values.update({hk: w.heads, kvk: w.kv_heads, hdk: w.head_dim})
    elif w.heads != _config_heads(cfg):
        raise ConfigError(f"{layout.family}'s config fixes head_dim = hidden_size / heads, so pruned heads cannot be "
                          "expressed; prune FFN channels only (--set parts=channels)")
    if layout.channel_key is not None:
        values[layout.channel_key] = w.channels
    set_config(cfg, **values)


def record_attributes(model: nn.Module, layout: BlockLayout | None = None) -> dict:
    """Per-block widths that no config key holds, for the HF remote-code export: sets and returns
    ``config.rankwise_attributes = {attention module: {"num_key_value_groups": r}}`` (the attribute
    transformers' attention reads per module; the layers' own shapes carry the rest)."""
    layout = layout or block_layout(model)
    prefix = next(n for n, m in model.named_modules() if m is decoder_blocks(model))
    attrs = {}
    for i, block in enumerate(decoder_blocks(model)):
        attn = block.get_submodule(layout.attention)
        if hasattr(attn, "num_key_value_groups"):
            attrs[f"{prefix}.{i}.{layout.attention}"] = {"num_key_value_groups": int(attn.num_key_value_groups)}
    cfg = _text_config(model)
    object.__setattr__(cfg, "rankwise_attributes", attrs)
    return attrs


def _config_heads(cfg) -> int | None:
    for key in ("num_attention_heads", "n_head"):
        if getattr(cfg, key, None) is not None:
            return int(getattr(cfg, key))
    return None


def check_config(cfg, **values) -> None:
    """The config class's own validation (e.g. Llama's ``hidden_size % num_attention_heads == 0``) of
    ``cfg`` with ``values`` set, as one :class:`ConfigError`; ``cfg`` itself is not changed."""
    try:
        trial = type(cfg).from_dict({**cfg.to_dict(), **values})
        if hasattr(trial, "validate_architecture"):
            trial.validate_architecture()
    except Exception as e:  # ValueError, or huggingface_hub's strict-dataclass validation errors
        msg = " ".join(str(e).split())
        raise ConfigError(f"the pruned shape does not fit {type(cfg).__name__} ({msg}); choose another ratio or "
                          "structure") from None


def set_config(cfg, **values) -> None:
    """Set several config values at once: validated together first (:func:`check_config`), then
    assigned without the per-assignment validation that would see the half-updated states."""
    check_config(cfg, **values)
    amap = getattr(cfg, "attribute_map", {}) or {}
    for key, value in values.items():
        object.__setattr__(cfg, amap.get(key, key), value)


class Passthrough(nn.Module):
    """Stands in for a block (a skipped one, or one whose arguments a hook records): returns the hidden
    states unchanged and keeps the attributes the model's loop reads (attention type, layer index)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))

    def forward(self, hidden_states=None, *args, **kwargs):
        return hidden_states


class skipping:
    """``with skipping(model, [i, j]):`` the model runs with blocks ``i`` and ``j`` replaced by the
    identity (the blocks are put back on exit)."""

    def __init__(self, model: nn.Module, indices: Sequence[int]) -> None:
        self.blocks = decoder_blocks(model)
        self.indices = [int(i) for i in indices]
        self.saved: dict[int, nn.Module] = {}

    def __enter__(self) -> "skipping":
        for i in self.indices:
            self.saved[i] = self.blocks[i]
            self.blocks[i] = Passthrough(self.blocks[i])
        return self

    def __exit__(self, *exc) -> None:
        for i, block in self.saved.items():
            self.blocks[i] = block


@torch.no_grad()
def block_states(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """The hidden states entering each block plus the last block's output (``n_blocks + 1`` tensors of
    shape (batch, seq, hidden)) for token ids ``ids``, from one forward pass."""
    blocks = decoder_blocks(model)
    states: list[torch.Tensor] = []

    def pre(module, args, kwargs):
        states.append((args[0] if args else kwargs["hidden_states"]).detach())

    def post(module, args, kwargs, out):
        states.append((out[0] if isinstance(out, (tuple, list)) else out).detach())

    handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(post, with_kwargs=True))
    try:
        model(input_ids=ids, **({"use_cache": False} if is_causal_lm(model) else {}))
    finally:
        for h in handles:
            h.remove()
    return states


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face causal LM (its logits predict the next token)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
