"""``gptq``: a GPTQ checkpoint (``quant_method: gptq``, ``checkpoint_format: gptq``, ``desc_act: false``).

For runtimes that read AutoGPTQ / GPTQModel checkpoints (transformers + gptqmodel, vLLM, TGI,
ExLlama). Every linear layer of the repeated blocks must be quantized with the same width
``b`` (2, 4 or 8 bits), group size ``g`` (dividing the inputs) and *symmetric* grid, no rotation. Per
layer ``name``:

================ ============================== ==========================================================
key              shape, dtype                   content
================ ============================== ==========================================================
``qweight``      (in b / 32, out), int32        codes packed along the *input*: code of input ``i`` at bits
                                                ``b (i mod 32/b)`` of row ``i div (32/b)``
``qzeros``       (in / g, out b / 32), int32    ``z - 1 = 2^(b-1) - 1`` packed along the output (the
                                                "gptq" v1 checkpoint format stores the zero point minus 1)
``scales``       (in / g, out), float16         ``s``
``g_idx``        (in,), int32                   ``i div g`` (no act-order permutation is stored)
================ ============================== ==========================================================

and the runtime computes ``W[o, i] = s[g_idx i, o] (c[i, o] - z)`` -- rankwise's symmetric
``s (c - 2^(b-1))`` exactly, float16 scales included. :func:`read_gptq` is the reader the tests use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ...linalg.quant import unpack_codes
from ..base import FORMATS, ExportContext, Format
from ..hf import alias_copies, export_config, write_side_files
from ..shards import TensorEntry
from .compressed_tensors import dense_linears, pack_int32

BITS = (2, 4, 8)


def pack_columns(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned values ``u`` (n, cols) along dim 0 into int32 ``(n b / 32, cols)`` (GPTQ's ``qweight``)."""
    return pack_int32(u.t().contiguous(), bits).t().contiguous()


def unpack_int32(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`~rankwise.export.formats.compressed_tensors.pack_int32` along the last dim: (rows, n) int64."""
    k = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    vals = (w[..., None] >> (torch.arange(k, dtype=torch.int64) * bits)) & (2 ** bits - 1)
    return vals.reshape(*words.shape[:-1], -1)[..., :n]


def gptq_tensors(name: str, layer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of a symmetric quantized layer (bias excluded); table in the module doc."""
    b, g = int(layer.bits), int(layer.group_size)
    n, m = layer.in_features, layer.out_features
    c = unpack_codes(layer.codes, b, n).to(torch.int64)  # (out, in)
    G = n // g
    zeros = torch.full((G, m), 2 ** (b - 1) - 1, dtype=torch.int64)
    return {f"{name}.qweight": pack_columns(c.t(), b),
            f"{name}.qzeros": pack_int32(zeros, b),
            f"{name}.scales": layer.scales.t().contiguous(),
            f"{name}.g_idx": (torch.arange(n) // g).to(torch.int32)}


def gptq_entries(name: str, desc) -> list[TensorEntry]:
    b, g = int(desc["spec"]["bits"]), int(desc["spec"]["group_size"])
    m, n = (int(x) for x in desc["shape"])
    return [TensorEntry(f"{name}.qweight", torch.int32, (n * b // 32, m)),
            TensorEntry(f"{name}.qzeros", torch.int32, (n // g, m * b // 32)),
            TensorEntry(f"{name}.scales", torch.float16, (n // g, m)),
            TensorEntry(f"{name}.g_idx", torch.int32, (n,))]


def read_gptq(path: str | Path) -> dict[str, torch.Tensor]:
    """``{layer name: W (out, in) float32}`` of every GPTQ layer in a checkpoint directory (our reader)."""
    import json

    from ...models.streaming import load_tensors, weight_index

    path = Path(path)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    b = int(qc["bits"])
    index = weight_index(path)
    out = {}
    for key in [k for k in index if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        t = load_tensors(index, [f"{name}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")])
        qw, qz, s, gi = (t[f"{name}.{x}"] for x in ("qweight", "qzeros", "scales", "g_idx"))
        n, m = int(gi.shape[0]), int(s.shape[1])
        c = unpack_int32(qw.t().contiguous(), b, n).t()  # (in, out)
        z = unpack_int32(qz, b, m) + 1  # (G, out)
        gi = gi.to(torch.int64)
        W = s.float()[gi] * (c.float() - z.float()[gi])
        out[name] = W.t().contiguous()
    return out


@FORMATS.register("gptq")
class GPTQ(Format):
    name = "gptq"
    summary = "GPTQ checkpoint (quant_method gptq, checkpoint_format gptq, desc_act false): symmetric 2/4/8-bit"
    holds = ("models whose block linear layers are all quantized symmetric with one width (2, 4 or 8 bits) and one "
             "group size dividing the inputs, no rotation")
    runtimes = "transformers + gptqmodel, vLLM, TGI, ExLlama"

    def unsupported(self, source) -> list[str]:
        reasons = []
        if not source.layers:
            return ["the model has no quantized layer (compress it with --structure gptq or rtn and --set symmetric=true)"]
        specs = set()
        for name, desc in source.layers.items():
            spec = desc.get("spec") or {}
            if desc.get("kind") != "quant":
                reasons.append(f"{name} is a {desc.get('kind')!r} layer (only quantized layers)")
                continue
            if not spec.get("symmetric"):
                reasons.append(f"{name} is asymmetric (re-fit with --set symmetric=true)")
            if spec.get("rotation"):
                reasons.append(f"{name} has rotated inputs (re-fit without --set rotate=true)")
            if int(spec["bits"]) not in BITS:
                reasons.append(f"{name} has {spec['bits']}-bit codes (GPTQ packs {', '.join(map(str, BITS))} bits)")
            n = int(desc["shape"][1])
            if n % int(spec["group_size"]) or (n * int(spec["bits"])) % 32 or (int(desc["shape"][0]) * int(spec["bits"])) % 32:
                reasons.append(f"{name}: shape {desc['shape']} does not pack with group size {spec['group_size']}")
            specs.add((int(spec["bits"]), int(spec["group_size"])))
        if len(specs) > 1:
            reasons.append(f"layers mix widths / group sizes {sorted(specs)} (one for the whole model; fix --set bits=B)")
        blocks = {n.rsplit(".", 2)[0] for n in source.layers}
        dense_in_blocks = [n for n in dense_linears(source) if any(n.startswith(b + ".") for b in blocks)]
        if dense_in_blocks:
            reasons.append(f"block layers left dense: {dense_in_blocks[:3]} (GPTQ runtimes quantize every block linear)")
        return reasons

    def write(self, source, ctx: ExportContext) -> None:
        dtype = source.dtype
        keys = source.keys()
        copies = alias_copies(source)
        entries = [source.entry(k) for k in keys]
        entries += [TensorEntry(k, source.entry(v).dtype, source.entry(v).shape) for k, v in copies.items()]
        for name, desc in source.layers.items():
            entries += gptq_entries(name, desc)
        with ctx.safetensors(entries) as w:
            for k in keys:
                w.write(k, source.tensor(k))
            for k, v in copies.items():
                w.write(k, source.tensor(v))
            for name in source.layers:
                for k, t in gptq_tensors(name, source.layer(name), dtype).items():
                    w.write(k, t)
        spec = next(iter(source.layers.values()))["spec"]
        qc = {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": int(spec["bits"]),
              "group_size": int(spec["group_size"]), "desc_act": False, "sym": True, "static_groups": False,
              "true_sequential": True, "damp_percent": 0.01, "lm_head": False}
        config = export_config(source)
        config.quantization_config = qc
        write_side_files(source, ctx.dir, config)
        from ...files import write_json

        write_json(ctx.dir / "quantize_config.json", qc)




__all__ = ["GPTQ", "gptq_entries", "gptq_tensors", "pack_columns", "read_gptq", "unpack_int32"]
