"""``compressed-tensors``: the "pack-quantized" checkpoint vLLM and transformers read natively.

Per quantized layer ``name`` (``QuantLinear``, group-wise along the input, no rotation):

=========================== ================================ ==============================================
key                         shape, dtype                     content
=========================== ================================ ==============================================
``name.weight_packed``      (out, ceil(in B / 32)), int32    ``u = q + 2^(B-1)`` packed along the input:
                                                             value ``i`` of a row at bits ``B (i mod 32/B)``
                                                             of word ``i div (32/B)`` (B = 4: 8 per word)
``name.weight_scale``       (out, in / g), model dtype       ``s``
``name.weight_zero_point``  (ceil(out B / 32), in / g), int32 ``zp + 2^(B-1)`` packed along the output
                                                             (asymmetric only)
``name.weight_shape``       (2,), int64                      ``[out, in]``
=========================== ================================ ==============================================

and the runtime computes ``W = (q - zp) s`` (``zp = 0`` when symmetric), ``q, zp`` signed ``B``-bit.
No ``weight_g_idx`` (rankwise stores codes in the plain column order, act-order or not).

The mapping from rankwise's grid (:mod:`rankwise.linalg.quant`, codes ``c`` of ``b`` bits):

* symmetric, ``w = s (c - 2^(b-1))``: ``q = c - 2^(b-1)``, ``zp = 0`` -- exact for every grid rule;
* asymmetric, ``w = s c + min``: ``q = c - 2^(B-1)``, ``zp = z - 2^(B-1)`` with ``z = -min / s``, exact
  when ``z`` is an integer in ``0..2^b - 1`` -- which the exact integer zero point guarantees
  (``--set zero_point=exact`` of rtn / gptq); a minimum that is only the float16 *rounding* of ``-z s`` (an
  integer-zero-point grid that does not round its scale) is written with the integer ``z`` and a note
  giving the difference (at most half a float16 ulp of the minimum). The default min/max grid stores a float minimum, which
  this format cannot hold: such a layer is refused (with the fix named), or, with the option
  ``round_zero_points=true``, ``z`` is rounded to the nearest integer and the export's weights differ
  from rankwise's by ``|z - round(z)| s <= s / 2`` per weight (the largest change is noted);
* widths the format does not store natively are re-packed exactly: ``b`` = 2, 3 as ``B`` = 4 and
  ``b`` = 5, 6, 7 as ``B`` = 8 (noted), since ``q`` and ``zp`` only move by a constant offset.

Scales are written in the model's dtype (float16 scales are exact in float32 and float16; a bfloat16
model rounds them to 8 significant bits, and the export notes it). The exported weights equal
``layer.dense()`` bit for bit in float32 whenever no note says otherwise.

``quantization_config`` in ``config.json``: one config group per distinct ``(B, g, symmetric)``
targeting its layers by name, ``format: "pack-quantized"``, ``quantization_status: "compressed"``,
``ignore`` listing every linear layer left dense (``lm_head`` among them). vLLM fuses q/k/v and
gate/up projections, so it needs each fused set to share one scheme (a byte allocator that gives them
different widths produces a file transformers loads and vLLM refuses).

The per-layer functions (:func:`layer_scheme`, :func:`layer_entries`, :func:`layer_tensors`,
:func:`quantization_config`) are the writer's interface for other formats that store a quantized
base (the low-rank + quantized export).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ...linalg.quant import num_groups, unpack_codes
from ...structures.quant import QuantLinear
from ..base import FORMATS, ExportContext, Format
from ..hf import alias_copies, export_config, write_side_files
from ..shards import TensorEntry

#: Widths stored natively, and where the others go.
NATIVE_BITS = (4, 8)


def storage_bits(bits: int) -> int:
    """The width ``B`` a ``bits``-bit code is stored at: 4 for 2..4, 8 for 5..8."""
    return 4 if bits <= 4 else 8


@dataclass
class CTOptions:
    """``round_zero_points``: write asymmetric layers fitted on the default (float-minimum) grid with their
    zero points rounded (an approximation, noted with its size) instead of refusing them."""

    round_zero_points: bool = False


def _zero_points(layer: QuantLinear) -> tuple[torch.Tensor, float]:
    """``(z, largest |z - round(z)| s)``: the float zero points ``-min / s`` of an asymmetric layer."""
    s = layer.scales.double()
    mn = layer.mins.double()
    z = torch.where(s != 0, -mn / torch.where(s != 0, s, 1.0), torch.where(mn == 0, 0.0, float("nan")))
    zr = torch.round(z)
    err = float(((z - zr).abs() * s.abs()).nan_to_num(float("inf")).max()) if z.numel() else 0.0
    return z, err


def integer_zero_points(layer: QuantLinear) -> tuple[torch.Tensor, str]:
    """``(kind per group, summary)``: each group's minimum is ``"exact"`` (``-z s`` with an integer ``z``),
    ``"rounded"`` (the float16 rounding of ``-z s``: a grid fitted with an integer zero point whose
    stored minimum lost up to half a float16 ulp) or ``"float"`` (no integer zero point)."""
    s = layer.scales.double()
    mn = layer.mins.double()
    z, _ = _zero_points(layer)
    zr = torch.round(z.nan_to_num(-1.0)).clamp(0, 2 ** layer.bits - 1)
    exact = torch.isfinite(z) & (z == zr)
    rounded = (-zr * s).to(torch.float16).double() == mn
    kind = torch.where(exact, 0, torch.where(rounded, 1, 2))
    return kind, ("float" if bool((kind == 2).any()) else "rounded" if bool((kind == 1).any()) else "exact")


def layer_problem(name: str, desc: Mapping[str, Any], layer: QuantLinear | None = None,
                  round_zero_points: bool = False) -> str | None:
    """Why layer ``name`` (its description, and the layer itself for the zero-point check) cannot be
    written in this format, or None."""
    spec = desc.get("spec") or {}
    out_f, in_f = (int(x) for x in desc["shape"])
    if spec.get("rotation"):
        return f"{name} has Hadamard-rotated inputs (no runtime applies the rotation; re-fit without --set rotate=true)"
    g = int(spec.get("group_size", in_f))
    if in_f % g:
        return f"{name}: group size {g} does not divide its {in_f} inputs (use a group size that divides it)"
    if layer is not None and not spec.get("symmetric", False) and not round_zero_points:
        if integer_zero_points(layer)[1] == "float":
            return (f"{name} is asymmetric with float minimums, not integer zero points (re-fit with the default "
                    "--set zero_point=integer or zero_point=exact, or pass --set round_zero_points=true to round them)")
    return None


def layer_scheme(desc: Mapping[str, Any]) -> dict[str, Any]:
    """The compressed-tensors ``weights`` quantization args of a quantized layer's description."""
    spec = desc["spec"]
    return {"num_bits": storage_bits(int(spec["bits"])), "type": "int", "symmetric": bool(spec["symmetric"]),
            "group_size": int(spec["group_size"]), "strategy": "group", "block_structure": None, "dynamic": False,
            "actorder": None, "observer": "minmax", "observer_kwargs": {}}


def layer_entries(name: str, desc: Mapping[str, Any], dtype: torch.dtype) -> list[TensorEntry]:
    """The tensors :func:`layer_tensors` writes for layer ``name`` (bias excluded), without values."""
    spec = desc["spec"]
    out_f, in_f = (int(x) for x in desc["shape"])
    B = storage_bits(int(spec["bits"]))
    G = num_groups(in_f, int(spec["group_size"]))
    out = [TensorEntry(f"{name}.weight_packed", torch.int32, (out_f, -(-in_f * B // 32))),
           TensorEntry(f"{name}.weight_scale", dtype, (out_f, G))]
    if not spec["symmetric"]:
        out.append(TensorEntry(f"{name}.weight_zero_point", torch.int32, (-(-out_f * B // 32), G)))
    out.append(TensorEntry(f"{name}.weight_shape", torch.int64, (2,)))
    return out


def pack_int32(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values ``u`` (rows, n), bits in {4, 8}, packed along the last dim into int32 words:
    value ``i`` at bits ``bits * (i mod k)`` of word ``i div k``, ``k = 32 / bits`` (zero padded)."""
    k = 32 // bits
    rows, n = u.shape
    pad = (-n) % k
    v = torch.nn.functional.pad(u.to(torch.int64), (0, pad)).view(rows, -1, k)
    word = (v << (torch.arange(k, dtype=torch.int64) * bits)).sum(-1)  # < 2^32
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def layer_tensors(name: str, layer: QuantLinear, dtype: torch.dtype, round_zero_points: bool = False
                  ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``({key: tensor}, notes)`` of quantized layer ``name`` in this format (module docstring); bias excluded."""
    b = int(layer.bits)
    B = storage_bits(b)
    notes = []
    if b != B:
        notes.append(f"{b}-bit codes re-packed exactly as {B}-bit (the format stores {'/'.join(map(str, NATIVE_BITS))})")
    c = unpack_codes(layer.codes, b, layer.in_features).to(torch.int64)
    out = {}
    if layer.symmetric:
        q = c - 2 ** (b - 1)
    else:
        q = c - 2 ** (B - 1)
        z, err = _zero_points(layer)
        kind = integer_zero_points(layer)[1]
        if kind == "float":
            notes.append(f"zero points rounded to integers: weights moved by up to {err:.3g} (at most half a step)")
        elif kind == "rounded":
            notes.append(f"integer zero points whose stored float16 minimum was rounded: weights differ from "
                         f"rankwise's by up to {err:.3g} (the float16 rounding of the minimum)")
        zp = torch.round(z).clamp(0, 2 ** b - 1).to(torch.int64) - 2 ** (B - 1)
        out["weight_zero_point"] = pack_int32((zp + 2 ** (B - 1)).t().contiguous(), B).t().contiguous()
    scale = layer.scales.to(dtype)
    if not torch.equal(scale.to(torch.float16), layer.scales):
        notes.append(f"float16 scales rounded to {str(dtype).replace('torch.', '')} (the model's dtype)")
    packed = pack_int32(q + 2 ** (B - 1), B)
    ordered = {"weight_packed": packed, "weight_scale": scale.contiguous()}
    if "weight_zero_point" in out:
        ordered["weight_zero_point"] = out["weight_zero_point"]
    ordered["weight_shape"] = torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)
    return {f"{name}.{k}": v for k, v in ordered.items()}, notes


def quantization_config(schemes: Mapping[str, Mapping[str, Any]], ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json``: one group per distinct scheme, targeting layers by name."""
    groups: dict[str, dict[str, Any]] = {}
    keys: list[tuple] = []
    for name, weights in schemes.items():
        key = tuple(sorted(weights.items(), key=lambda kv: kv[0]))
        if key not in keys:
            keys.append(key)
            groups[f"group_{len(keys) - 1}"] = {"targets": [], "weights": dict(weights), "input_activations": None,
                                               "output_activations": None, "format": "pack-quantized"}
        groups[f"group_{keys.index(key)}"]["targets"].append(name)
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": list(ignore), "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}}


def dense_linears(source) -> list[str]:
    """Names of the model's linear layers that are not structured (left dense): ``lm_head`` and the rest."""
    from torch import nn

    from ...models.surgery import Conv1D

    skel = source.skeleton()
    out = []
    for name, mod in skel.named_modules():
        if name in source.layers:
            continue
        if isinstance(mod, nn.Linear) or (Conv1D is not None and isinstance(mod, Conv1D)):
            out.append(name)
    return out


@FORMATS.register("compressed-tensors")
class CompressedTensors(Format):
    name = "compressed-tensors"
    summary = "pack-quantized int4/int8 group-wise (vLLM, transformers); quantized layers only"
    holds = ("quantized layers (rtn, gptq: 2-8 bits, group size dividing the inputs, no rotation; asymmetric ones "
             "with integer zero points, the default), with any layer left dense")
    runtimes = "vLLM, transformers (compressed-tensors installed), SGLang"
    Options = CTOptions

    def unsupported(self, source) -> list[str]:
        reasons = layer_reasons(source, ("quant",), "only quantized layers", self.options.round_zero_points)
        if not source.layers:
            reasons.append("the model has no quantized layer (compress it with --structure rtn or gptq first; "
                           "a plain model goes out as --format dense)")
        return reasons

    def write(self, source, ctx: ExportContext) -> None:
        write_quantized_base(source, ctx, self.options.round_zero_points)


def layer_reasons(source, kinds: tuple[str, ...], only: str, round_zero_points: bool = False) -> list[str]:
    """Why each layer of ``source`` cannot be written: a kind outside ``kinds`` (``only`` says what the
    format takes), or :func:`layer_problem` (an asymmetric layer is loaded for its zero-point check)."""
    reasons = []
    for name, desc in source.layers.items():
        if desc.get("kind") not in kinds:
            reasons.append(f"{name} is a {desc.get('kind')!r} layer ({only})")
            continue
        spec = desc.get("spec") or {}
        layer = source.layer(name) if not spec.get("symmetric", False) else None
        why = layer_problem(name, desc, layer, round_zero_points)
        if why:
            reasons.append(why)
    return reasons


def write_quantized_base(source, ctx: ExportContext, round_zero_points: bool = False, on_layer=None) -> None:
    """Write ``source`` in pack-quantized compressed-tensors form into ``ctx.dir`` (tensors, config with its
    ``quantization_config``, side files); ``on_layer(name, desc, layer)`` sees every quantized layer once,
    while it is loaded (the ``compressed-tensors-lora`` format takes the low-rank factors there)."""
    dtype = source.dtype
    keys = source.keys()
    copies = alias_copies(source)
    entries = [source.entry(k) for k in keys]
    entries += [TensorEntry(k, source.entry(v).dtype, source.entry(v).shape) for k, v in copies.items()]
    for name, desc in source.layers.items():
        entries += layer_entries(name, desc, dtype)
    with ctx.safetensors(entries) as w:
        for k in keys:
            w.write(k, source.tensor(k))
        for k, v in copies.items():
            w.write(k, source.tensor(v))
        for name, desc in source.layers.items():
            layer = source.layer(name)
            tensors, notes = layer_tensors(name, layer, dtype, round_zero_points)
            for k, t in tensors.items():
                w.write(k, t)
            for n in notes:
                ctx.note(n)
            if on_layer is not None:
                on_layer(name, desc, layer)
            del layer
    config = export_config(source)
    config.quantization_config = quantization_config(
        {n: layer_scheme(d) for n, d in source.layers.items()}, dense_linears(source))
    write_side_files(source, ctx.dir, config)


__all__ = ["CTOptions", "CompressedTensors", "dense_linears", "layer_entries", "layer_problem", "layer_reasons",
           "layer_scheme", "layer_tensors", "pack_int32", "quantization_config", "storage_bits",
           "write_quantized_base"]
