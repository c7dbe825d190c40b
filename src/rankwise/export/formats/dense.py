"""``dense``: a plain Hugging Face checkpoint (any structure, any model).

Every structured layer is multiplied back, ``W = layer.dense()`` in the model's dtype (GPT-2's
``Conv1D`` stored transposed), every other tensor copied as stored; sharded safetensors. Loads with
``AutoModelForCausalLM.from_pretrained`` anywhere; no size gain (the export of a pruned model, whose
layers are already dense and smaller, keeps its gain).
"""
from __future__ import annotations

from ..base import FORMATS, ExportContext, Format
from ..hf import alias_copies, dense_entry, dense_weight, layers_in_order, plain_keys, write_side_files


@FORMATS.register("dense")
class Dense(Format):
    name = "dense"
    summary = "plain Hugging Face checkpoint, structured layers multiplied back (transformers, vLLM, any runtime)"
    holds = "every model (structured layers multiplied back to dense)"
    runtimes = "transformers, vLLM, llama.cpp's converter, any Hugging Face runtime"

    def write(self, source, ctx: ExportContext) -> None:
        dtype = source.dtype
        keys = plain_keys(source)
        copies = alias_copies(source)
        entries = [source.entry(k) for k in keys]
        entries += [source.entry(v).__class__(k, source.entry(v).dtype, source.entry(v).shape) for k, v in copies.items()]
        entries += [dense_entry(source, n, dtype) for n in source.layers]
        with ctx.safetensors(entries) as w:
            for k in keys:
                w.write(k, source.tensor(k))
            for k, v in copies.items():
                w.write(k, source.tensor(v))
            for name, layer in layers_in_order(source):
                w.write(f"{name}.weight", dense_weight(layer, source.module_kind(name), dtype))
                del layer
        write_side_files(source, ctx.dir)
