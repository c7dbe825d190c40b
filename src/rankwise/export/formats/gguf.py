"""``gguf``: one GGUF file for llama.cpp / ollama / LM Studio (Llama-family models).

Quantized layers go out in llama.cpp's block formats, bit for bit (blocks of 32 inputs of one row;
``d``, ``m`` float16, exactly rankwise's float16 ``scale`` and ``min``):

========================================== ======= =========================================== =====
rankwise layer (group size 32)             type    block (32 weights)                          bytes
========================================== ======= =========================================== =====
4-bit symmetric,  ``w = s (c - 8)``        Q4_0    ``d = s``; nibbles ``c``                     18
4-bit asymmetric, ``w = s c + min``        Q4_1    ``d = s, m = min``; nibbles ``c``            20
8-bit symmetric,  ``w = s (c - 128)``      Q8_0    ``d = s``; int8 ``c - 128``                  34
========================================== ======= =========================================== =====

(nibbles: byte ``j`` of a block holds ``c_j`` low and ``c_(j+16)`` high.) llama.cpp de-quantizes
``d q (+ m)`` in float32, which equals rankwise's ``scale * code + offset`` exactly (products of a
float16 and a small integer are exact in float32). Any grid rule maps (``--set grid=gguf`` makes the
grids llama.cpp's own: Q4_0's signed-max and Q8_0's max/127 scales; the min/max asymmetric grid *is*
Q4_1's). Other widths / group sizes / rotated layers / factorized structures are refused with the
formats that can hold them.

Everything else: 1-D tensors (norms) F32; the token embedding (and an untied output) and the weights
of linear layers left dense as ``embedding_type`` / ``dense_type``: ``f32``, ``f16``, or ``q8_0`` /
``q4_0`` quantized by gguf-py (llama.cpp's reference round-to-nearest) -- so a plain (e.g. pruned)
model exports too.

Metadata as llama.cpp's ``convert_hf_to_gguf.py`` writes it for ``LlamaForCausalLM``: hyper-parameters
(``llama.*``: block count, context, embedding and feed-forward lengths, head counts, rope base and
dimension, RMS epsilon, vocab size), the Q and K projections' rows permuted to llama.cpp's rope layout
(``permute``: per head, rows ``(2, d/2)`` -> ``(d/2, 2)``), tensor names from gguf-py's map, and the
tokenizer: ``gpt2`` (byte-level BPE) tokens, token types (added special tokens CONTROL), merges and
special token ids (``gguf.SpecialVocab``), the pre-tokenizer named by the converter's hash of a
probe text (``default`` with a note when unknown; ``tokenizer_pre`` overrides), ``add_bos_token``
as the tokenizer behaves, and the chat template.

Streaming: every tensor's type and shape is declared first, then the tensors are written in order,
one layer in memory at a time. ``max_shard_size`` splits the file as ``gguf-split`` does
(``model-0000i-of-0000n.gguf``, read by llama.cpp given the first).
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

from ...errors import ConfigError
from ...linalg.quant import unpack_codes
from ...structures.quant import QuantLinear
from ..base import FORMATS, ExportContext, Format
from ..shards import parse_size
from ..source import DirSource, Source

FILE_NAME = "model.gguf"
DENSE_TYPES = ("f32", "f16", "q8_0", "q4_0")
#: ``tokenizer.ggml.pre`` of a few byte-level BPE tokenizers, by the sha256 of ``str(encode(PROBE))`` (the
#: values llama.cpp's converter uses to recognize them).
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
}
PROBE = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 '
         '333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= '
         'нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not '
         'sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
ARCHITECTURES = ("llama",)


@dataclass
class GGUFOptions:
    """``dense_type``: type of the 2-D weights of linear layers rankwise left dense; ``embedding_type``: of the
    token embedding (and an untied output); each ``f32``, ``f16``, ``q8_0`` or ``q4_0``. ``tokenizer_pre``:
    the llama.cpp pre-tokenizer name (None = recognized from the tokenizer)."""

    dense_type: str = "f16"
    embedding_type: str = "f16"
    tokenizer_pre: str | None = None

    def __post_init__(self) -> None:
        for key in ("dense_type", "embedding_type"):
            if getattr(self, key) not in DENSE_TYPES:
                raise ConfigError(f"{key} must be one of {', '.join(DENSE_TYPES)}, got {getattr(self, key)!r}")


def layer_type(desc) -> str | None:
    """The GGUF type a quantized layer's description maps to exactly, or None."""
    spec = desc.get("spec") or {}
    if desc.get("kind") != "quant" or spec.get("rotation") or int(spec.get("group_size", 0)) != 32:
        return None
    if int(desc["shape"][1]) % 32:
        return None
    bits, sym = int(spec["bits"]), bool(spec["symmetric"])
    return {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}.get((bits, sym))


def pack_blocks(layer: QuantLinear, qtype: str) -> np.ndarray:
    """The layer's codes and grid as llama.cpp blocks: uint8 (out, in / 32 * block bytes); table in the module doc."""
    m, n = layer.out_features, layer.in_features
    c = unpack_codes(layer.codes, layer.bits, n).to(torch.int64).view(m, n // 32, 32)
    d = layer.scales.view(torch.int16).numpy().view(np.uint8).reshape(m, n // 32, 2)
    if qtype == "Q8_0":
        qs = (c - 128).to(torch.int8).numpy().view(np.uint8)
        parts = [d, qs]
    else:
        nib = (c[..., :16] | (c[..., 16:] << 4)).to(torch.uint8).numpy()
        parts = [d]
        if qtype == "Q4_1":
            parts.append(layer.mins.view(torch.int16).numpy().view(np.uint8).reshape(m, n // 32, 2))
        parts.append(nib)
    return np.concatenate(parts, axis=-1).reshape(m, -1)


def permute_rows(x, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's rope layout for Q / K rows (``convert_hf_to_gguf.LlamaModel.permute``): per head, rows
    ``(2, d/2) -> (d/2, 2)``; ``n_head_kv`` heads for K."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = x.shape
    return x.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _dense_array(t: torch.Tensor, qtype: str) -> tuple[np.ndarray, object]:
    """``(data, GGMLQuantizationType)`` of a dense tensor stored as ``qtype`` (gguf-py's quantizers)."""
    from gguf import GGMLQuantizationType as T, quants

    a = t.detach().to(torch.float32).numpy()
    if qtype == "f32" or a.ndim < 2:
        return a.astype(np.float32), T.F32
    if qtype == "f16":
        return a.astype(np.float16), T.F16
    qt = {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[qtype]
    if a.shape[-1] % 32:
        return a.astype(np.float16), T.F16
    return quants.quantize(a, qt), qt


class _Vocab:
    """The tokenizer as llama.cpp's converter writes a ``gpt2`` (byte-level BPE) vocabulary."""

    def __init__(self, source: Source, pre: str | None) -> None:
        tok = source.tokenizer
        if tok is None:
            raise ConfigError("gguf needs the model's tokenizer: save it beside the model (or pass tokenizer=)")
        self.tok = tok
        vocab_size = int(getattr(source.config, "vocab_size", len(tok.get_vocab())))
        rev = {i: t for t, i in tok.get_vocab().items()}
        added = tok.get_added_vocab()
        dec = getattr(tok, "added_tokens_decoder", {})
        from gguf import TokenType

        self.tokens, self.types = [], []
        for i in range(vocab_size):
            t = rev.get(i)
            if t is None:
                self.tokens.append(f"[PAD{i}]")
                self.types.append(TokenType.UNUSED)
            elif t in added:
                special = getattr(dec.get(i), "special", True)
                self.tokens.append(t)
                self.types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
            else:
                self.tokens.append(t)
                self.types.append(TokenType.NORMAL)
        digest = sha256(str(tok.encode(PROBE)).encode()).hexdigest()
        self.pre = pre or KNOWN_PRE.get(digest)
        self.pre_known = self.pre is not None
        self.pre = self.pre or "default"
        probe = tok("a").input_ids
        self.add_bos = bool(tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id)

    def write(self, w, source: Source) -> None:
        import gguf

        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        with tempfile.TemporaryDirectory() as td:
            d = source.path if isinstance(source, DirSource) else Path(td)
            if not isinstance(source, DirSource):
                self.tok.save_pretrained(td)
            special = gguf.SpecialVocab(d, load_merges=True, n_vocab=len(self.tokens))
            special.add_to_gguf(w, quiet=True)
        w.add_add_bos_token(self.add_bos)
        if getattr(self.tok, "chat_template", None) and not special.chat_template:
            w.add_chat_template(self.tok.chat_template)


def _check_tokenizer(source: Source) -> str | None:
    tok = source.tokenizer
    if tok is None:
        return "the model has no tokenizer (save it beside the model)"
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return "the tokenizer is not a fast (tokenizers) tokenizer"
    import json

    model = json.loads(backend.to_str()).get("model", {})
    if model.get("type") != "BPE":
        return f"the tokenizer is a {model.get('type')} model (only byte-level BPE tokenizers, GGUF 'gpt2')"
    return None


@FORMATS.register("gguf")
class GGUF(Format):
    name = "gguf"
    summary = ("one GGUF file (llama.cpp, ollama, LM Studio; Llama-family): 4-bit g32 -> Q4_0/Q4_1, 8-bit g32 -> "
               "Q8_0 bit-exact, dense weights F16/F32/Q8_0/Q4_0")
    holds = ("Llama-family models whose quantized layers are 4-bit (symmetric or not) or 8-bit symmetric with group "
             "size 32 and no rotation, and plain (dense, e.g. pruned) Llama-family models")
    runtimes = "llama.cpp, ollama, LM Studio, transformers (gguf_file=, de-quantized on load)"
    Options = GGUFOptions

    def unsupported(self, source) -> list[str]:
        reasons = []
        if source.model_type not in ARCHITECTURES:
            reasons.append(f"model type {source.model_type!r} (only {', '.join(ARCHITECTURES)}: Llama-family)")
        for name, desc in source.layers.items():
            if layer_type(desc) is None:
                spec = desc.get("spec") or {}
                what = (f"a {desc.get('kind')!r} layer" if desc.get("kind") != "quant" else
                        f"{spec.get('bits')}-bit {'symmetric' if spec.get('symmetric') else 'asymmetric'} with group "
                        f"size {spec.get('group_size')}{' and rotated inputs' if spec.get('rotation') else ''}")
                reasons.append(f"{name} is {what}")
        if not reasons:
            why = _check_tokenizer(source)
            if why:
                reasons.append(why)
        return reasons

    def write(self, source, ctx: ExportContext) -> None:
        import gguf

        cfg = source.config
        n_layer = int(cfg.num_hidden_layers)
        n_head = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
        shard = parse_size(ctx.max_shard_size)
        logging.getLogger("gguf.gguf_writer").setLevel(logging.ERROR)  # "fails split requirements" = one file
        w = gguf.GGUFWriter(None, "llama", split_max_size=shard)
        self._metadata(w, source)
        vocab = _Vocab(source, self.options.tokenizer_pre)
        vocab.write(w, source)
        if not vocab.pre_known:
            ctx.note("the tokenizer's pre-tokenizer is not one llama.cpp's converter recognizes: written as 'default' "
                     "(pass --set tokenizer_pre=NAME to name it)")

        def gguf_name(key: str) -> str:
            new = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise ConfigError(f"gguf: no llama.cpp tensor name for {key}; this model is not Llama-family")
            return new

        def permute(key: str, x):
            if key.endswith(("q_proj.weight", "q_proj.bias")):
                return permute_rows(x, n_head, n_head)
            if key.endswith(("k_proj.weight", "k_proj.bias")):
                return permute_rows(x, n_head, n_kv)
            return x

        # the plan: (gguf name, producer) in file order; the info of each declared before any data
        plan = []
        for key in source.keys():
            e = source.entry(key)
            linear = key.endswith(".weight") and len(e.shape) == 2
            qt = self.options.embedding_type if ("embed" in key or key.endswith("lm_head.weight")) else \
                self.options.dense_type
            plan.append((gguf_name(key), key, None, qt if linear else "f32"))
        for name, desc in source.layers.items():
            plan.append((gguf_name(f"{name}.weight"), f"{name}.weight", layer_type(desc), None))
        counts: dict[str, int] = {}
        for gname, key, lt, dense in plan:
            e = source.entry(key) if lt is None else None
            if lt is not None:
                out_f, in_f = (int(x) for x in source.layers[key[:-len('.weight')]]["shape"])
                qt = getattr(gguf.GGMLQuantizationType, lt)
                bs, ts = gguf.GGML_QUANT_SIZES[qt]
                w.add_tensor_info(gname, (out_f, in_f // bs * ts), np.dtype(np.uint8), out_f * in_f // bs * ts, qt)
                counts[lt] = counts.get(lt, 0) + 1
            else:
                qt, nbytes, shape = self._dense_info(e, dense)
                if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                    w.add_tensor_info(gname, shape, np.dtype(np.float32 if qt == gguf.GGMLQuantizationType.F32
                                                             else np.float16), nbytes)
                else:
                    bs, ts = gguf.GGML_QUANT_SIZES[qt]
                    w.add_tensor_info(gname, (shape[0], shape[1] // bs * ts), np.dtype(np.uint8), nbytes, qt)
        w.add_file_type(self._file_type(counts, plan))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.write_header_to_file(ctx.dir / FILE_NAME)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        bar = ctx.progress_bar(len(plan), "gguf")
        for gname, key, lt, dense in plan:
            if lt is not None:
                layer = source.layer(key[:-len(".weight")])
                data = permute(key, pack_blocks(layer, lt))
                del layer
            else:
                data, _ = _dense_array(permute(key, source.tensor(key)), dense)
            w.write_tensor_data(np.ascontiguousarray(data))
            bar.update(1)
        bar.close()
        w.close()
        ctx.files.extend(sorted(p.name for p in ctx.dir.glob("*.gguf")))

    @staticmethod
    def _dense_info(e, dense: str):
        import gguf

        T = gguf.GGMLQuantizationType
        shape = tuple(int(s) for s in e.shape)
        n = int(np.prod(shape)) if shape else 1
        if dense == "f32" or len(shape) < 2:
            return T.F32, 4 * n, shape
        if dense == "f16" or shape[-1] % 32:
            return T.F16, 2 * n, shape
        qt = T.Q8_0 if dense == "q8_0" else T.Q4_0
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        return qt, n // bs * ts, shape

    @staticmethod
    def _file_type(counts: dict[str, int], plan) -> int:
        import gguf

        F = gguf.LlamaFileType
        if counts:
            top = max(counts, key=counts.get)
            return {"Q4_0": F.MOSTLY_Q4_0, "Q4_1": F.MOSTLY_Q4_1, "Q8_0": F.MOSTLY_Q8_0}[top]
        dense = [d for _, _, lt, d in plan if d not in (None, "f32")]
        top = max(set(dense), key=dense.count) if dense else "f32"
        return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0}[top]

    @staticmethod
    def _metadata(w, source: Source) -> None:
        cfg = source.config
        n_head = int(cfg.num_attention_heads)
        hidden = int(cfg.hidden_size)
        w.add_name(str(getattr(cfg, "_name_or_path", "") or "rankwise export").split("/")[-1] or "rankwise export")
        w.add_block_count(int(cfg.num_hidden_layers))
        w.add_context_length(int(cfg.max_position_embeddings))
        w.add_embedding_length(hidden)
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_head_count(n_head)
        w.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or n_head))
        theta = getattr(cfg, "rope_theta", None)
        if theta is None:
            theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        w.add_rope_freq_base(float(theta))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(int(cfg.vocab_size))
        head_dim = int(getattr(cfg, "head_dim", None) or hidden // n_head)
        w.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        scaling = getattr(cfg, "rope_scaling", None) or {}
        if scaling.get("type", scaling.get("rope_type")) == "linear" and "factor" in scaling:
            import gguf

            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(scaling["factor"]))


__all__ = ["GGUF", "GGUFOptions", "layer_type", "pack_blocks", "permute_rows"]
