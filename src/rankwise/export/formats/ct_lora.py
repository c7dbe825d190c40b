"""``compressed-tensors-lora``: a low-rank + quantized model (lorc, lq) as a compressed-tensors base plus a
PEFT LoRA adapter.

A :class:`~rankwise.structures.lowrank_quant.LowRankQuantLinear` computes
``y = dequant(codes) x + L (R x) + b`` (no input rotation). Its two parts go to the two formats runtimes
read:

* the base ``dequant(codes) x + b``: the export directory itself, in compressed-tensors (the quantized
  layers written by :func:`rankwise.export.formats.compressed_tensors.layer_tensors`, exactly as that
  format writes a :class:`~rankwise.structures.quant.QuantLinear`; plain quantized layers go there too);
* the correction ``L (R x)``: ``adapter/``, a PEFT LoRA adapter with ``lora_A = R`` (k, in),
  ``lora_B = L`` (out, k) and ``alpha = k`` for every layer (``rank_pattern`` / ``alpha_pattern`` when the
  ranks differ), so PEFT's scale ``alpha / k`` is exactly 1 (:mod:`rankwise.export.peft`).

Load it with transformers (compressed-tensors installed) and peft; PEFT wraps ``nn.Linear`` layers, so the
base is de-quantized as it loads::

    base = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    model = PeftModel.from_pretrained(base, f"{out}/adapter")

vLLM serves the same pair (``--enable-lora``, the adapter's ranks within ``--max-lora-rank``).
"""
from __future__ import annotations

from ..base import FORMATS, ExportContext, Format
from ..peft import lora_state, unit_alpha, write_lora
from .compressed_tensors import CTOptions, layer_reasons, write_quantized_base

ADAPTER_DIR = "adapter"
LOWRANK_KIND = "lowrank-quant"
QUANT_KINDS = ("quant", LOWRANK_KIND)


@FORMATS.register("compressed-tensors-lora")
class CompressedTensorsLora(Format):
    name = "compressed-tensors-lora"
    summary = ("low-rank + quantized (lorc, lq): the quantized base in compressed-tensors plus the low-rank part as "
               "a PEFT LoRA adapter in adapter/ (transformers + peft, vLLM with --enable-lora)")
    holds = ("low-rank + quantized layers (lorc, lq: 2-8 bits, group size dividing the inputs, no rotation; "
             "asymmetric ones on an integer zero point) and plain quantized layers")
    runtimes = "transformers (compressed-tensors installed) + peft, vLLM (--enable-lora)"
    Options = CTOptions

    def unsupported(self, source) -> list[str]:
        reasons = layer_reasons(source, QUANT_KINDS, "only quantized and low-rank + quantized layers",
                                self.options.round_zero_points)
        if not any(d.get("kind") == LOWRANK_KIND for d in source.layers.values()):
            reasons.append("the model has no low-rank + quantized layer (compress it with --structure lorc or lq; a "
                           "quantized model goes out as --format compressed-tensors)")
        return reasons

    def write(self, source, ctx: ExportContext) -> None:
        factors, alphas = {}, {}

        def take_factors(name, desc, layer):
            if desc["kind"] == LOWRANK_KIND:
                factors[name] = (layer.right.clone(), layer.left.clone())  # lora_A = R, lora_B = L
                alphas[name] = unit_alpha(layer.rank)

        write_quantized_base(source, ctx, self.options.round_zero_points, on_layer=take_factors)
        dtype = source.dtype
        task = "CAUSAL_LM" if getattr(source.config, "is_encoder_decoder", False) is False else "SEQ_2_SEQ_LM"
        # base_model_name_or_path stays empty: the base is this directory, wherever it is moved
        tensors, adapter_config = lora_state(factors, alphas, dtype=dtype, task_type=task)
        (ctx.dir / ADAPTER_DIR).mkdir()
        write_lora(ctx.dir / ADAPTER_DIR, tensors, adapter_config)
        ranks = sorted({int(A.shape[0]) for A, _ in factors.values()})
        ctx.note(f"{len(factors)} low-rank corrections (rank {ranks[0]}-{ranks[-1]}) written as a PEFT LoRA adapter in "
                 f"{ADAPTER_DIR}/ with scale 1: PeftModel.from_pretrained(base, '<out>/{ADAPTER_DIR}')")


__all__ = ["ADAPTER_DIR", "CompressedTensorsLora"]
