"""Models that refuse to merge: function-preserving random transforms of attention ("Model Unmerging").

Attention reads its weights only through the products ``q^T k`` (per head) and ``W_o v``. For each
KV group ``g`` (one head without grouped-query attention) a random well-conditioned ``A_g`` and
``B_g`` (:mod:`rankwise.linalg.invertible`: orthogonal times a diagonal bounded in ``[1/r, r]``) are
folded into the weights:

    W_q,h <- A_g W_q,h   (every query head h of the group)      W_k,g <- A_g^{-T} W_k,g
    W_v,g <- B_g W_v,g                                          W_o[:, h] <- W_o[:, h] B_g^{-1}

so ``(A q)^T (A^{-T} k) = q^T k`` and ``W_o B^{-1} B v = W_o v``: the logits are unchanged (up to
float rounding). With rotary embeddings ``A_g`` is a per-plane scaled rotation, which commutes with
them. Biases move with their weights. A model with per-head query/key norms (Gemma 3, Qwen 3) cannot
take a query-key transform (the norm does not commute with it): only its value-output pairs are
locked, and the report says so.

The locked weights are far from the original's (a task vector of a locked fine-tune is mostly the
transform), so task-vector merging with it collapses; permutation matching cannot undo it, since it
searches permutations only. The seed is not written anywhere in the output: it would undo the lock.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..linalg.invertible import conditioned, rope_commuting
from ..models.surgery import decoder_blocks


@dataclass
class LockReport:
    blocks: int = 0
    query_key: bool = True
    value_output: bool = True
    scale_bound: float = 2.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _llama(block: nn.Module, config, g: torch.Generator, r: float, qk: bool) -> None:
    attn = block.self_attn
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    hd = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    group = heads // kv

    def rows(lin: nn.Linear, n: int):
        W = lin.weight.data.to(torch.float64).view(n, hd, -1)
        b = None if lin.bias is None else lin.bias.data.to(torch.float64).view(n, hd)
        return W, b

    Wq, bq = rows(attn.q_proj, heads)
    Wk, bk = rows(attn.k_proj, kv)
    Wv, bv = rows(attn.v_proj, kv)
    Wo = attn.o_proj.weight.data.to(torch.float64).view(-1, heads, hd)
    for j in range(kv):
        qs = range(j * group, (j + 1) * group)
        if qk:
            M, Minv = rope_commuting(hd, g, r)
            for h in qs:
                Wq[h] = M @ Wq[h]
                if bq is not None:
                    bq[h] = M @ bq[h]
            Wk[j] = Minv.T @ Wk[j]
            if bk is not None:
                bk[j] = Minv.T @ bk[j]
        B, Binv = conditioned(hd, g, r)
        Wv[j] = B @ Wv[j]
        if bv is not None:
            bv[j] = B @ bv[j]
        for h in qs:
            Wo[:, h] = Wo[:, h] @ Binv
    for lin, W, b in ((attn.q_proj, Wq, bq), (attn.k_proj, Wk, bk), (attn.v_proj, Wv, bv), (attn.o_proj, Wo, None)):
        lin.weight.data.copy_(W.reshape(lin.weight.shape).to(lin.weight.dtype))
        if b is not None:
            lin.bias.data.copy_(b.reshape(lin.bias.shape).to(lin.bias.dtype))


def _gpt2(block: nn.Module, config, g: torch.Generator, r: float) -> None:
    attn = block.attn
    heads, d = int(config.n_head), int(config.n_embd)
    hd = d // heads
    W = attn.c_attn.weight.data.to(torch.float64)          # (d, 3d), y = x W + b
    b = attn.c_attn.bias.data.to(torch.float64)
    Wo = attn.c_proj.weight.data.to(torch.float64)         # (d, d), rows = heads' outputs
    for h in range(heads):
        q, k, v = (slice(s * d + h * hd, s * d + (h + 1) * hd) for s in range(3))
        A, Ainv = conditioned(hd, g, r)
        W[:, q], b[q] = W[:, q] @ A.T, A @ b[q]
        W[:, k], b[k] = W[:, k] @ Ainv, Ainv.T @ b[k]
        B, Binv = conditioned(hd, g, r)
        W[:, v], b[v] = W[:, v] @ B.T, B @ b[v]
        Wo[h * hd:(h + 1) * hd] = Binv.T @ Wo[h * hd:(h + 1) * hd]
    attn.c_attn.weight.data.copy_(W.to(attn.c_attn.weight.dtype))
    attn.c_attn.bias.data.copy_(b.to(attn.c_attn.bias.dtype))
    attn.c_proj.weight.data.copy_(Wo.to(attn.c_proj.weight.dtype))


def lock(model: nn.Module, seed: int = 0, scale_bound: float = 2.0, inplace: bool = False
         ) -> tuple[nn.Module, LockReport]:
    """A copy of ``model`` (unless ``inplace``) with every attention layer locked (module docstring)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError("lock works on transformers models (Llama-family and GPT-2); this model has no config")
    if float(getattr(config, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise ConfigError("lock: partial rotary embeddings are not supported (the query-key transform would not "
                          "commute with them)")
    out = model if inplace else copy.deepcopy(model)
    g = torch.Generator().manual_seed(int(seed))
    blocks = decoder_blocks(out)
    report = LockReport(blocks=len(blocks), scale_bound=float(scale_bound))
    with torch.no_grad():
        for block in blocks:
            attn = getattr(block, "self_attn", None)
            if attn is not None and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
                qk = not (hasattr(attn, "q_norm") or hasattr(attn, "k_norm"))
                report.query_key = report.query_key and qk
                _llama(block, config, g, scale_bound, qk)
            elif hasattr(getattr(block, "attn", None), "c_attn"):
                _gpt2(block, config, g, scale_bound)
            else:
                raise ConfigError(f"lock: {type(block).__name__} is not a Llama-family or GPT-2 attention block; "
                                  "lock supports those families")
    if not report.query_key:
        report.notes.append("per-head query/key norms: only the value-output pairs are locked")
    return out, report


__all__ = ["LockReport", "lock"]
