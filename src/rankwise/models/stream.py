"""The residual stream of a pre-norm transformer: find it, fold its norms, rotate (or slice) it.

Computational invariance (QuaRot, SliceGPT): in a pre-norm block the stream ``x`` (row vectors of
width ``d``) is only ever *read* through a norm and *written* by adding a linear map's output::

    x <- x + W_out f(W_in norm(x))           (per sub-layer: attention, MLP)

An RMSNorm without gain commutes with any orthogonal ``Q``: ``rms(x Q) = rms(x)``. So once every norm's
gain ``g`` (and a LayerNorm's bias ``b``) is folded into the linears that read it, the whole network
can run on the rotated stream ``x Q`` with, in ``nn.Linear`` orientation (``W`` is (out, in)),

* embeddings ``E <- E Q`` (token and position tables),
* every reader ``W <- W Q`` (q/k/v, gate/up, fc, and ``lm_head``),
* every writer ``W <- Q^T W``, ``bias <- Q^T bias`` (o_proj, down_proj, GPT-2's c_proj),

and every logit is unchanged. All of it is folded into the weights: the model keeps its plain
architecture (same classes, same config apart from what is listed below) and needs no extra op at
inference.

Folding (:func:`fold_norms`, exact): for a norm ``y = n(x) * g + b`` read by ``W x + c``,
``W <- W diag(g)``, ``c <- c + W b``, and the norm's gain becomes 1 (Llama ``weight = 1``, Gemma's
``(1 + weight)`` form ``weight = 0``, found by probing the module, not by family name). A reader
without a bias (GPT-2's ``lm_head`` under ``ln_f``) cannot take ``W b``: the norm keeps the bias
``b / g`` instead, which rotates with the stream. LayerNorm models (GPT-2) are also *centred*: every
writer's output and every embedding row get their mean removed (``W <- (I - 1 1^T / d) W``), so the
stream has zero mean and a LayerNorm acts on it as an RMSNorm; LN(x) depends only on
``x - mean(x)``, so this is exact too.

Rotating or slicing (:func:`rotate_stream`): ``Q`` is ``(d, d')`` with orthonormal columns. ``d' = d``
is a rotation (exact); ``d' < d`` also deletes ``d - d'`` directions of the stream (SliceGPT's
rotate-and-slice; approximate, exact only when the stream has no energy outside ``span(Q)``). Then
the weights above change shape, the norms get width ``d'``, ``config.hidden_size`` becomes ``d'``
(``head_dim`` is pinned first where the config derived it from ``hidden_size``), and each norm's gain
becomes ``sqrt(d / d')`` (a norm divides by ``sqrt(mean(x^2))``, a mean over ``d'`` entries now;
its ``eps`` is then relative to ``d'``, a negligible change). Gemma's embedding scale is
``sqrt(hidden_size)``, so the token table is also multiplied by ``sqrt(d / d')``. For a LayerNorm
model ``Q`` must map the all-ones direction onto itself (``1/sqrt(d) Q = 1/sqrt(d')``), or the
LayerNorm would subtract a mean the stream no longer lacks: :func:`rankwise.linalg.orthogonal.align_mean`
makes any ``Q`` whose span contains that direction satisfy it (:func:`stream_rotation` does it for
the rotation it builds).

Tied embeddings: the head reads the final norm, so folding its gain into ``lm_head`` makes it differ
from the token table. The head is then *untied* (its own copy; ``config.tie_word_embeddings =
False``), which adds ``vocab x d`` stored values: :attr:`StreamInfo.untied_params` records them, and
byte budgets must count them. When the final gain is already a constant (all entries equal) the tie
is kept: a constant gain commutes with ``Q`` and stays in the norm.

Supported blocks (:func:`stream_layout`): Llama-style (``input_layernorm -> self_attn.{q,k,v}_proj``,
``self_attn.o_proj``, ``post_attention_layernorm -> mlp.{gate,up}_proj``, ``mlp.down_proj``: Llama,
Mistral, Qwen2/3, Gemma 1; per-head ``q_norm`` / ``k_norm`` are inside attention and untouched) and
GPT-2 (``ln_1 -> attn.c_attn``, ``attn.c_proj``, ``ln_2 -> mlp.c_fc``, ``mlp.c_proj``; ``Conv1D``
weights are handled in their transposed storage). Anything else raises
:class:`~rankwise.errors.UnsupportedArchitectureError`: post-norm encoders (BERT), parallel blocks,
and Gemma 2/3, whose "sandwich" norms normalize each sub-layer's *output* before the residual add
(``x + g * rms(o_proj(...))``): that gain sits between the writer and the stream and does not commute
with ``Q``. Before changing anything, the layout is checked on one forward pass of a few tokens
(:func:`verify_layout`): each reader's input is its norm's output, each norm reads the stream, each
block's output is its input plus its writers' outputs, the head reads the final norm.

API (a model in memory, in place; ``layout`` is recomputed when not given)::

    layout = stream_layout(model)             # StreamLayout: embeddings, blocks -> sublayers, final norm, head
    info = fold_norms(model, layout)          # exact; unties the head if needed
    rotate_stream(model, Q, layout)           # Q (d, d') orthonormal columns; needs folded norms
    info = fold_and_rotate(model, seed=0)     # both, with stream_rotation(d, seed): random Hadamard or orthogonal

``layout.readers()``, ``layout.writers()`` and ``layout.norms()`` list the qualified module names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedArchitectureError
from ..linalg.orthogonal import align_mean, check_orthonormal_columns, stream_rotation
from .surgery import Conv1D, block_prefix, decoder_blocks, is_linear

SUPPORTED = "Llama-style (Llama, Mistral, Qwen2/3, Gemma 1) and GPT-2 pre-norm decoders"


@dataclass
class Sublayer:
    """One pre-norm sub-layer: ``norm`` read by ``readers``; ``writers`` add to the stream."""

    norm: str
    readers: list[str]
    writers: list[str]


@dataclass
class StreamLayout:
    """Where the residual stream is written, normalized and read (qualified module names)."""

    family: str                         # "llama" | "gpt2": the block form recognized
    hidden: int
    embeddings: list[str]               # tables whose rows are added into the stream (tokens, positions)
    blocks: list[list[Sublayer]]
    final_norm: str
    head: str | None                    # the output projection reading final_norm (None: a bare decoder)
    norm_kind: str                      # "rms" | "layer"

    def norms(self) -> list[str]:
        return [s.norm for b in self.blocks for s in b] + [self.final_norm]

    def readers(self) -> list[str]:
        return [r for b in self.blocks for s in b for r in s.readers] + ([self.head] if self.head else [])

    def writers(self) -> list[str]:
        return [w for b in self.blocks for s in b for w in s.writers]

    def norm_readers(self) -> list[tuple[str, list[str]]]:
        """``(norm, readers)`` for every stream norm, the final one last."""
        return [(s.norm, s.readers) for b in self.blocks for s in b] + [(self.final_norm,
                                                                           [self.head] if self.head else [])]


@dataclass
class StreamInfo:
    """What :func:`fold_norms` / :func:`fold_and_rotate` did."""

    family: str
    hidden: int
    width: int                          # d' after rotate_stream (d for a rotation)
    kind: str | None = None             # "hadamard" | "orthogonal" | "given"
    seed: int | None = None
    untied: bool = False
    untied_params: int = 0              # values added by untying the head (vocab x d')
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- layout ------------------------------------------------------------------------------------------

def _names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def _child(mod: nn.Module, path: str) -> nn.Module | None:
    try:
        return mod.get_submodule(path)
    except AttributeError:
        return None


def _block_form(block: nn.Module, where: str) -> tuple[str, list[tuple[str, list[str], list[str]]]]:
    """``(family, [(norm, readers, writers)])`` relative to the block, or UnsupportedArchitectureError."""
    has = lambda p: _child(block, p) is not None  # noqa: E731
    kind = type(block).__name__
    if has("pre_feedforward_layernorm") or has("post_feedforward_layernorm"):
        raise UnsupportedArchitectureError(
            f"{kind} ({where}) has sandwich norms (post_attention_layernorm / post_feedforward_layernorm normalize "
            "each sub-layer's output before the residual add, as in Gemma 2/3): their gain sits between the writer "
            f"and the stream and does not commute with a rotation, so the stream cannot be rotated exactly. "
            f"Supported: {SUPPORTED}; compress without --rotate")
    llama = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    if all(has(p) for p in llama):
        return "llama", [("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                          ["self_attn.o_proj"]),
                         ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"])]
    gpt2 = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
    if all(has(p) for p in gpt2):
        return "gpt2", [("ln_1", ["attn.c_attn"], ["attn.c_proj"]), ("ln_2", ["mlp.c_fc"], ["mlp.c_proj"])]
    raise UnsupportedArchitectureError(
        f"cannot rotate the residual stream of {kind} ({where}): its blocks are not of a supported pre-norm form "
        f"({SUPPORTED}); compress without --rotate")


_INNER_OK = ("q_norm", "k_norm")  # per-head norms inside attention: they never see the stream


def _leaves_with_params(mod: nn.Module, prefix: str) -> dict[str, nn.Module]:
    return {f"{prefix}.{n}" if n else prefix: m for n, m in mod.named_modules()
            if any(True for _ in m.parameters(recurse=False))}


def stream_layout(model: nn.Module) -> StreamLayout:
    """The model's :class:`StreamLayout`, from its module structure; the forward check is :func:`verify_layout`."""
    blocks = decoder_blocks(model)
    prefix = block_prefix(model)
    names = _names(model)
    families, subs = set(), []
    for i, block in enumerate(blocks):
        fam, form = _block_form(block, f"{prefix}.{i}")
        families.add(fam)
        subs.append([Sublayer(f"{prefix}.{i}.{n}", [f"{prefix}.{i}.{r}" for r in rs], [f"{prefix}.{i}.{w}" for w in ws])
                     for n, rs, ws in form])
        known = {x for s in subs[-1] for x in (s.norm, *s.readers, *s.writers)}
        for name, m in _leaves_with_params(block, f"{prefix}.{i}").items():
            if name not in known and not name.endswith(_INNER_OK):
                raise UnsupportedArchitectureError(
                    f"cannot rotate the residual stream: {name} ({type(m).__name__}) is not a norm, reader or writer of "
                    f"the stream in a supported form ({SUPPORTED}); compress without --rotate")
        for s in subs[-1]:
            for lin in (*s.readers, *s.writers):
                mod = model.get_submodule(lin)
                if not is_linear(mod):
                    raise UnsupportedArchitectureError(
                        f"{lin} is a {type(mod).__name__}, not a plain linear layer: rotate the stream of the dense "
                        "model, before any layer is replaced by a compressed structure")
    family = families.pop()
    base = model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else model
    base_name = prefix.rpartition(".")[0]
    emb = model.get_input_embeddings()
    if emb is None or id(emb) not in names:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no input embedding table to rotate")
    embeddings = [names[id(emb)]]
    if family == "gpt2" and _child(base, "wpe") is not None:
        embeddings.append(f"{base_name}.wpe" if base_name else "wpe")
    final = next((n for n in ("norm", "ln_f", "final_layernorm") if _child(base, n) is not None), None)
    if final is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__}: no final norm (norm / ln_f) after the blocks; "
                                           f"supported: {SUPPORTED}")
    final = f"{base_name}.{final}" if base_name else final
    head_mod = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = names.get(id(head_mod)) if head_mod is not None else None
    hidden = int(emb.weight.shape[1])
    layout = StreamLayout(family, hidden, embeddings, subs, final, head, "layer" if family == "gpt2" else "rms")
    known = set(layout.norms()) | set(layout.readers()) | set(layout.writers()) | set(embeddings)
    for name, m in _leaves_with_params(model, "").items():
        name = name.lstrip(".")
        if name.startswith(prefix + ".") or name in known or name.endswith(_INNER_OK):
            continue
        raise UnsupportedArchitectureError(
            f"cannot rotate the residual stream: {name} ({type(m).__name__}) outside the blocks is not an embedding, "
            f"the final norm or the head ({SUPPORTED}); compress without --rotate")
    for n in layout.norms():
        _norm_kind(model.get_submodule(n), n, layout.norm_kind)
    return layout


# -- norms ---------------------------------------------------------------------------------------------

def _eps(norm: nn.Module) -> float:
    for a in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(norm, a, None)
        if isinstance(v, (int, float)):
            return float(v)
    raise UnsupportedArchitectureError(f"{type(norm).__name__}: cannot find its epsilon (variance_epsilon / eps)")


def _norm_kind(norm: nn.Module, name: str, kind: str) -> None:
    if kind == "layer" and not isinstance(norm, nn.LayerNorm):
        raise UnsupportedArchitectureError(f"{name} is a {type(norm).__name__}, expected nn.LayerNorm")
    if kind == "rms":
        w = getattr(norm, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 1 or getattr(norm, "bias", None) is not None:
            raise UnsupportedArchitectureError(f"{name} ({type(norm).__name__}) is not an RMSNorm with a gain vector")
        _eps(norm)


@torch.no_grad()
def _probe_gain(norm: nn.Module, d: int) -> torch.Tensor:
    """The gain ``g`` of an RMSNorm module, ``norm(x) = g * x / sqrt(mean(x^2) + eps)``, measured on +-1
    inputs (float64 result); UnsupportedArchitectureError when the module is not of that form."""
    w = norm.weight
    gen = torch.Generator().manual_seed(0)
    eps = _eps(norm)
    gains = []
    for scale in (1.0, 3.0):
        s = (torch.randint(0, 2, (d,), generator=gen) * 2 - 1).to(torch.float64)
        x = (s * scale).to(device=w.device, dtype=torch.float32)[None]
        y = norm(x)[0].to(torch.float64).cpu()
        gains.append(y * s * math.sqrt(scale * scale + eps) / scale)
    if not torch.allclose(gains[0], gains[1], rtol=1e-4, atol=1e-6):
        raise UnsupportedArchitectureError(f"{type(norm).__name__} does not compute g * x / sqrt(mean(x^2) + eps); "
                                           "cannot fold it")
    return gains[0]


@torch.no_grad()
def _norm_gain_bias(norm: nn.Module, kind: str, d: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if kind == "layer":
        g = norm.weight.detach().double().cpu() if norm.weight is not None else torch.ones(d, dtype=torch.float64)
        b = norm.bias.detach().double().cpu() if norm.bias is not None else None
        return g, b
    return _probe_gain(norm, d), None


@torch.no_grad()
def _set_gain(norm: nn.Module, kind: str, value: float, name: str) -> None:
    """Make the norm's gain the constant ``value`` (Llama ``weight = value``, Gemma ``weight = value - 1``)."""
    if kind == "layer":
        if norm.weight is None:
            if value != 1.0:
                raise UnsupportedArchitectureError(f"{name}: a LayerNorm without a gain cannot take the gain {value}")
            return
        norm.weight.fill_(value)
        return
    d = norm.weight.shape[0]
    for w in (value, value - 1.0):
        norm.weight.fill_(w)
        if torch.allclose(_probe_gain(norm, d), torch.full((d,), value, dtype=torch.float64), rtol=1e-5, atol=1e-6):
            return
    raise UnsupportedArchitectureError(f"{name} ({type(norm).__name__}): cannot set its gain to a constant")


def _constant(g: torch.Tensor) -> float | None:
    c = float(g[0])
    return c if bool(torch.allclose(g, torch.full_like(g, c), rtol=1e-5, atol=0.0)) else None


# -- weights in nn.Linear orientation ----------------------------------------------------------------

def _get_w(mod: nn.Module) -> torch.Tensor:
    w = mod.weight.detach()
    return (w.t() if Conv1D and isinstance(mod, Conv1D) else w).to(torch.float64)


def _set_w(mod: nn.Module, W: torch.Tensor) -> None:
    """Store ``W`` (out, in) into ``mod`` (nn.Linear, Conv1D or nn.Embedding (rows = out)), shape may change."""
    old = mod.weight
    if Conv1D and isinstance(mod, Conv1D):
        W = W.t()
        mod.nx, mod.nf = int(W.shape[0]), int(W.shape[1])
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = int(W.shape[0]), int(W.shape[1])
    elif isinstance(mod, nn.Embedding):
        mod.embedding_dim = int(W.shape[1])
    new = W.to(dtype=old.dtype, device=old.device).contiguous()
    if new.shape == old.shape:
        with torch.no_grad():
            old.copy_(new)
    else:
        mod.weight = nn.Parameter(new, requires_grad=old.requires_grad)


def _set_bias(mod: nn.Module, b: torch.Tensor) -> None:
    old = mod.bias
    new = b.to(dtype=old.dtype, device=old.device)
    if new.shape == old.shape:
        with torch.no_grad():
            old.copy_(new)
    else:
        mod.bias = nn.Parameter(new, requires_grad=old.requires_grad)


def _bias(mod: nn.Module) -> torch.Tensor | None:
    b = getattr(mod, "bias", None)
    return None if b is None else b.detach().to(torch.float64)


# -- the forward check ---------------------------------------------------------------------------------

def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def verify_layout(model: nn.Module, layout: StreamLayout, tokens: int = 6, rtol: float = 1e-3) -> None:
    """Check on one forward pass (``tokens`` token ids) that the model computes what ``layout`` says (see the
    module docstring); UnsupportedArchitectureError naming the first mismatch."""
    seen: dict[str, Any] = {}
    hooks = []

    def out_hook(name):
        def h(mod, args, kwargs, out):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input", None))
            if isinstance(x, torch.Tensor):
                seen[name + ":in"] = x.detach().double()
            seen[name + ":out"] = _first(out).detach().double()
        return h

    blocks = decoder_blocks(model)
    prefix = block_prefix(model)
    watched = {f"{prefix}.{i}" for i in range(len(blocks))} | set(layout.norms()) | set(layout.readers()) | \
        set(layout.writers()) | set(layout.embeddings)
    for name in watched:
        hooks.append(model.get_submodule(name).register_forward_hook(out_hook(name), with_kwargs=True))
    was = model.training
    model.eval()
    try:
        vocab = int(model.get_input_embeddings().weight.shape[0])
        dev = model.get_input_embeddings().weight.device
        ids = (torch.arange(tokens, device=dev) * 7919 + 11) % vocab
        model(input_ids=ids[None])
    finally:
        model.train(was)
        for h in hooks:
            h.remove()

    def same(a: str, b: torch.Tensor, what: str) -> None:
        x = seen.get(a)
        if x is None or x.shape != b.shape or not torch.allclose(x, b, rtol=rtol, atol=rtol * float(b.abs().max()) + 1e-6):
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} does not compute a pre-norm residual stream as expected: {what}; "
                f"supported: {SUPPORTED}; compress without --rotate")

    stream = sum(seen[e + ":out"] for e in layout.embeddings)
    for i, subs in enumerate(layout.blocks):
        blk = f"{prefix}.{i}"
        same(blk + ":in", stream, f"the input of {blk} is not the sum of the previous writers and embeddings")
        for s in subs:
            same(s.norm + ":in", stream, f"{s.norm} does not read the residual stream")
            for r in s.readers:
                same(r + ":in", seen[s.norm + ":out"], f"{r} does not read {s.norm}'s output")
            for w in s.writers:
                stream = stream + seen[w + ":out"]
        same(blk + ":out", stream, f"{blk}'s output is not its input plus its writers' outputs")
    same(layout.final_norm + ":in", stream, f"{layout.final_norm} does not read the last block's output")
    if layout.head:
        same(layout.head + ":in", seen[layout.final_norm + ":out"], f"{layout.head} does not read {layout.final_norm}")


# -- fold -----------------------------------------------------------------------------------------------

def _tied(model: nn.Module, layout: StreamLayout) -> bool:
    if layout.head is None:
        return False
    return model.get_submodule(layout.head).weight is model.get_submodule(layout.embeddings[0]).weight


def _set_untied_config(model: nn.Module) -> None:
    cfgs = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        cfgs.append(text)
    for c in cfgs:
        c.tie_word_embeddings = False


@torch.no_grad()
def fold_norms(model: nn.Module, layout: StreamLayout | None = None, verify: bool = True) -> StreamInfo:
    """Fold every stream norm's gain (and bias) into its readers; centre the stream of a LayerNorm model;
    untie the head when its folded weight differs from the token table. Exact; see the module docstring."""
    layout = layout or stream_layout(model)
    if verify:
        verify_layout(model, layout)
    d = layout.hidden
    info = StreamInfo(layout.family, d, d)
    if _tied(model, layout):  # first: centring the token table would change a tied head too
        g, b = _norm_gain_bias(model.get_submodule(layout.final_norm), layout.norm_kind, d)
        if _constant(g) is None or (b is not None and bool(b.abs().max() > 0)):
            head = model.get_submodule(layout.head)
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
            _set_untied_config(model)
            info.untied = True
            info.untied_params = int(head.weight.numel())
            info.notes.append(f"{layout.head} untied from {layout.embeddings[0]}: +{info.untied_params} stored values")
    if layout.norm_kind == "layer":  # centre: every row written into the stream loses its mean
        C = torch.eye(d, dtype=torch.float64) - 1.0 / d
        for name in layout.embeddings:
            mod = model.get_submodule(name)
            _set_w(mod, _get_w(mod) @ C)
        for name in layout.writers():
            mod = model.get_submodule(name)
            _set_w(mod, C @ _get_w(mod))
            b = _bias(mod)
            if b is not None:
                _set_bias(mod, b - b.mean())
    for norm_name, readers in layout.norm_readers():
        norm = model.get_submodule(norm_name)
        g, b = _norm_gain_bias(norm, layout.norm_kind, d)
        has_bias = b is not None and bool(b.abs().max() > 0)
        if norm_name == layout.final_norm and _tied(model, layout):
            continue  # a constant gain without bias (checked above): it commutes with any rotation, keep the tie
        mods = [model.get_submodule(r) for r in readers]
        fold_bias = has_bias and all(_bias(m) is not None for m in mods)
        for m in mods:
            W = _get_w(m)
            if fold_bias:
                _set_bias(m, _bias(m) + W @ b)
            _set_w(m, W * g[None, :])
        _set_gain(norm, layout.norm_kind, 1.0, norm_name)
        if layout.norm_kind == "layer" and norm.bias is not None:
            if has_bias and not fold_bias:  # a reader without a bias: the norm keeps b / g
                if bool(((g == 0) & (b != 0)).any()):
                    raise UnsupportedArchitectureError(f"{norm_name}: a zero gain with a non-zero bias read by a layer "
                                                       "without a bias cannot be folded")
                norm.bias.copy_(torch.where(g == 0, 0.0, b / torch.where(g == 0, 1.0, g)).to(norm.bias.dtype))
            else:
                norm.bias.zero_()
    return info


# -- rotate / slice -------------------------------------------------------------------------------------

def _config_set_hidden(model: nn.Module, old: int, new: int) -> None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(cfg, "num_attention_heads", None)
    if getattr(cfg, "head_dim", None) is None and heads:
        cfg.head_dim = old // int(heads)
    cfg.hidden_size = new


@torch.no_grad()
def rotate_stream(model: nn.Module, Q: torch.Tensor, layout: StreamLayout | None = None) -> None:
    """Apply ``Q (d, d')`` (orthonormal columns) to the stream of a model whose norms are folded
    (:func:`fold_norms`); ``d' < d`` slices. See the module docstring for what changes."""
    layout = layout or stream_layout(model)
    d = layout.hidden
    Q = check_orthonormal_columns(Q, d)
    k = int(Q.shape[1])
    if layout.norm_kind == "layer":
        u = torch.full((d,), 1.0 / math.sqrt(d), dtype=torch.float64)
        if not torch.allclose(u @ Q, torch.full((k,), 1.0 / math.sqrt(k), dtype=torch.float64), atol=1e-6):
            raise ConfigError("a LayerNorm model's stream transform must map the all-ones direction onto itself "
                              "(1/sqrt(d) Q = 1/sqrt(d')): pass it through rankwise.linalg.orthogonal.align_mean first")
    if k < d and layout.family == "gpt2":
        raise UnsupportedArchitectureError("GPT-2's attention width is its hidden size (config n_embd), so slicing "
                                           "the stream would change the attention too; only a square rotation is "
                                           "possible for GPT-2")
    consts = {}
    for n in layout.norms():
        g, _ = _norm_gain_bias(model.get_submodule(n), layout.norm_kind, d)
        c = _constant(g)
        if c is None:
            raise ConfigError(f"{n} still has a per-channel gain: fold the norms first (rankwise.models.stream."
                              "fold_norms), then rotate")
        consts[n] = c
    emb_scale = 1.0
    emb = model.get_submodule(layout.embeddings[0])
    if k < d and hasattr(emb, "embed_scale"):  # Gemma: sqrt(hidden_size), rebuilt from the config on load
        if abs(float(emb.embed_scale) - math.sqrt(d)) > 1e-3 * math.sqrt(d):
            raise UnsupportedArchitectureError(f"{layout.embeddings[0]} scales by {float(emb.embed_scale):g}, not "
                                               "sqrt(hidden_size): cannot slice it")
        emb_scale = math.sqrt(d / k)
    tied = _tied(model, layout)
    if tied and emb_scale != 1.0:  # the head shares the rescaled table: the final norm's constant gain undoes it
        consts[layout.final_norm] /= emb_scale
    for name in layout.embeddings:
        mod = model.get_submodule(name)
        _set_w(mod, _get_w(mod) @ Q * (emb_scale if name == layout.embeddings[0] else 1.0))
    if tied:
        head = model.get_submodule(layout.head)
        head.weight = emb.weight  # re-tie (a new Parameter when the width changed)
        head.in_features = k
    if k < d and hasattr(emb, "embed_scale"):
        emb.embed_scale.fill_(math.sqrt(k))
        if hasattr(emb, "scalar_embed_scale"):
            emb.scalar_embed_scale = math.sqrt(k)
    for name in layout.readers():
        if tied and name == layout.head:
            continue  # shares the token table, rotated above
        mod = model.get_submodule(name)
        _set_w(mod, _get_w(mod) @ Q)
    for name in layout.writers():
        mod = model.get_submodule(name)
        _set_w(mod, Q.T @ _get_w(mod))
        b = _bias(mod)
        if b is not None:
            _set_bias(mod, Q.T @ b)
    scale = math.sqrt(d / k)
    for n in layout.norms():
        norm = model.get_submodule(n)
        bias = norm.bias.detach().double() @ Q if getattr(norm, "bias", None) is not None else None
        if k < d:
            norm.weight = nn.Parameter(norm.weight.detach()[:k].clone(), requires_grad=norm.weight.requires_grad)
            if isinstance(norm, nn.LayerNorm):
                norm.normalized_shape = (k,)
            if bias is not None:
                norm.bias = nn.Parameter(bias.to(norm.weight.dtype), requires_grad=norm.weight.requires_grad)
        elif bias is not None:
            norm.bias.copy_(bias.to(norm.bias.dtype))
        _set_gain(norm, layout.norm_kind, consts[n] * scale, n)
    if k < d:
        _config_set_hidden(model, d, k)
    layout.hidden = k


def fold_and_rotate(model: nn.Module, Q: torch.Tensor | None = None, *, seed: int = 0, kind: str = "hadamard",
                    layout: StreamLayout | None = None) -> StreamInfo:
    """:func:`fold_norms` then :func:`rotate_stream` with ``Q``, or with
    :func:`rankwise.linalg.orthogonal.stream_rotation` ``(d, seed, kind)`` (random Hadamard where the order
    allows, else random orthogonal; mean-aligned for LayerNorm models) when ``Q`` is None."""
    layout = layout or stream_layout(model)
    info = fold_norms(model, layout)
    if Q is None:
        Q, used = stream_rotation(layout.hidden, seed, kind)
        if layout.norm_kind == "layer":
            Q = align_mean(Q)
            info.notes.append("rotation composed with a Householder reflection that keeps the all-ones direction "
                              "(LayerNorm)")
        if used != kind:
            info.notes.append(f"no Hadamard matrix of order {layout.hidden} is constructed here: random orthogonal")
        info.kind, info.seed = used, int(seed)
    else:
        info.kind = "given"
    rotate_stream(model, Q, layout)
    info.width = layout.hidden
    return info


__all__ = ["StreamInfo", "StreamLayout", "Sublayer", "fold_and_rotate", "fold_norms", "rotate_stream",
           "stream_layout", "verify_layout"]
