"""``remote-code``: a Hugging Face directory that keeps the factorized layers, with its own modeling file.

For the structures no serving format holds (lowrank, lowrank-sparse, sparse, monarch, blockdiag-lowrank,
kronecker, shared-basis) and for dense layers whose shapes differ from the config's (per-block widths
of a pruned model). The directory holds:

* ``model.safetensors`` (sharded above ``--max-shard-size``): every tensor as rankwise stores it (the
  factors, sparse values and indices), under the same names; a shared basis once, under its owner;
* ``modeling_rankwise.py``: :mod:`rankwise.export.remote.modeling_rankwise` (each kind's forward, in
  torch only) plus two generated classes: ``Rankwise<Config>`` (``model_type`` ``rankwise_<type>``, so
  that nothing loads the directory as the plain architecture by mistake) and ``Rankwise<ModelClass>``,
  the original transformers class whose ``__init__`` swaps the listed layers in;
* ``config.json``: the original config plus ``auto_map`` (``AutoConfig`` and the auto class of the model:
  ``AutoModelForCausalLM`` for a causal LM), ``architectures`` and the per-layer table
  ``rankwise_structure`` = ``{"format_version": 1, "layers": {name: {kind, shape, bias, spec}},
  "attributes": {module: {attribute: value}}}`` (``kind`` ``"linear"`` is a dense layer of another
  shape; ``attributes`` are copied from ``config.rankwise_attributes``, e.g. per-layer head counts that a
  pruning writes there). See docs/remote-code.md.

``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it anywhere transformers runs;
vLLM, llama.cpp and other runtimes with their own kernels cannot run these layers.
"""
from __future__ import annotations

import inspect
import json
from importlib import resources
from typing import Any

from torch import nn

from ...models.surgery import Conv1D
from ..base import FORMATS, ExportContext, Format
from ..hf import alias_copies, export_config, write_side_files
from ..shards import TensorEntry
from ..source import DirSource, ModelSource, Source

MODELING_FILE = "modeling_rankwise.py"
TABLE_KEY = "rankwise_structure"
ATTRIBUTES_KEY = "rankwise_attributes"
TABLE_VERSION = 1

#: transformers auto class -> the name of its mapping in ``transformers.models.auto.modeling_auto``, in the
#: order a model class is looked up (the first that lists it is written to ``auto_map``).
AUTO_CLASSES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


def modeling_source() -> str:
    """The text of the shipped modeling file's fixed part."""
    return resources.files("rankwise.export.remote").joinpath(MODELING_FILE).read_text()


def layer_kinds() -> dict[str, set[str]]:
    """``{kind: spec keys}`` the modeling file reads (from its constructors' signatures)."""
    from ..remote import modeling_rankwise as m

    out = {}
    for kind, ctor in m.KINDS.items():
        params = list(inspect.signature(ctor).parameters)
        out[kind] = set(params[3:])  # after in_features, out_features, bias
    return out


def _mapping_names(attr: str) -> set[str]:
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for v in getattr(modeling_auto, attr, {}).values():
        names.update(v if isinstance(v, (tuple, list)) else (v,))
    return names


def auto_class(model_class: type) -> str | None:
    """The transformers auto class that loads ``model_class`` (see :data:`AUTO_CLASSES`), or None."""
    for auto, attr in AUTO_CLASSES:
        if model_class.__name__ in _mapping_names(attr):
            return auto
    return None


def base_class(source: Source) -> type | None:
    """The transformers class of the source model: the model's own, the saved ``model_class``, the
    config's ``architectures``, else the causal LM of its config; None when none resolves."""
    from ...errors import ArtifactError
    from ...models.architecture import config_class, resolve_class
    from ...models.saved import read_manifest

    if isinstance(source, ModelSource):
        name = type(source.model).__name__
    elif isinstance(source, DirSource) and source.layers:
        name = read_manifest(source.path).get("model_class")
    else:
        name = None
    try:
        if name is not None:
            return resolve_class(name, source.config)
        cls = config_class(source.config)
        if cls is not None:
            return cls
        causal = _causal_names().get(source.model_type)
        return resolve_class(causal, source.config) if causal else None
    except ArtifactError:
        return None


def _causal_names() -> dict[str, Any]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _config_name(source: Source) -> str | None:
    import transformers

    name = type(source.config).__name__
    return name if getattr(transformers, name, None) is type(source.config) else None


def resized_linears(source: Source, skeleton: nn.Module) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``({name: linear description}, problems)``: the dense layers whose stored weight has another shape than
    the config's (per-block widths of a pruned model). A resized GPT-2 ``Conv1D`` is a problem."""
    stored = set(source._all_keys())
    found, problems = {}, []
    for name, mod in skeleton.named_modules():
        if name in source.layers or f"{name}.weight" not in stored:
            continue
        is_conv = Conv1D is not None and isinstance(mod, Conv1D)
        if not (isinstance(mod, nn.Linear) or is_conv):
            continue
        got = tuple(source.entry(f"{name}.weight").shape)
        want = tuple(mod.weight.shape)
        if got == want:
            continue
        if is_conv:
            problems.append(f"{name} is a resized GPT-2 Conv1D {got} (only nn.Linear layers can change shape)")
            continue
        found[name] = {"kind": "linear", "shape": [int(got[0]), int(got[1])], "bias": f"{name}.bias" in stored}
    return found, problems


def structure_table(source: Source, skeleton: nn.Module) -> dict[str, Any]:
    """The ``rankwise_structure`` of ``config.json`` (module docstring)."""
    layers = dict(resized_linears(source, skeleton)[0])
    layers.update({n: {"kind": d["kind"], "shape": [int(x) for x in d["shape"]], "bias": bool(d.get("bias", False)),
                       "spec": dict(d.get("spec") or {})} for n, d in source.layers.items()})
    attributes = getattr(source.config, ATTRIBUTES_KEY, None) or {}
    return {"format_version": TABLE_VERSION, "layers": layers, "attributes": dict(attributes)}


def tensor_plan(source: Source) -> dict[str, str]:
    """``{written key: stored key}`` of every tensor: the plain ones, the alias copies, each layer's storage
    (a shared basis once, under its group's owner: non-owners read it there)."""
    plan = {k: k for k in source.keys()}
    plan.update(alias_copies(source))
    for name, desc in source.layers.items():
        if desc["kind"] != "shared-basis":
            plan.update({k: k for k in source.layer_keys(name)})
            continue
        plan[f"{name}.coef"] = f"{name}.coef"
        if (desc.get("spec") or {}).get("owner", True):
            key = f"{name}.basis"
            plan[key] = key if key in set(source._all_keys()) else source.aliases[key]
    return plan


def model_code(model_class: type, config_name: str, model_type: str) -> tuple[str, str, str]:
    """``(file text, config class name, model class name)`` of the shipped modeling file."""
    cfg, mdl = f"Rankwise{config_name}", f"Rankwise{model_class.__name__}"
    tail = (f"from transformers import {config_name} as _BaseConfig\n"
            f"from transformers import {model_class.__name__} as _BaseModel\n\n\n"
            f"class {cfg}(_BaseConfig):\n"
            f"    model_type = {model_type!r}\n\n\n"
            f"class {mdl}(_BaseModel):\n"
            f"    config_class = {cfg}\n\n"
            f"    def __init__(self, config, *args, **kwargs):\n"
            f"        super().__init__(config, *args, **kwargs)\n"
            f"        structurize(self, config.{TABLE_KEY})\n")
    return modeling_source() + "\n" + tail, cfg, mdl


@FORMATS.register("remote-code")
class RemoteCode(Format):
    name = "remote-code"
    summary = ("Hugging Face remote-code directory: factorized layers kept as stored plus a self-contained modeling "
               "file (transformers with trust_remote_code=True; not vLLM or llama.cpp)")
    holds = ("lowrank, lowrank-sparse, sparse, monarch, blockdiag-lowrank, kronecker and shared-basis layers and "
             "resized dense layers, in a transformers model class")
    runtimes = "transformers (trust_remote_code=True)"

    def unsupported(self, source) -> list[str]:
        reasons = []
        cls = base_class(source)
        if cls is None:
            reasons.append(f"the model's class (model type {source.model_type!r}) is not a transformers model class")
        elif _config_name(source) is None:
            reasons.append(f"the config class {type(source.config).__name__} is not exported by transformers")
        elif auto_class(cls) is None:
            reasons.append(f"{cls.__name__} has no transformers auto class")
        kinds = layer_kinds()
        for name, desc in source.layers.items():
            kind = desc.get("kind")
            if kind not in kinds:
                hint = " (export it with --format compressed-tensors, gguf or gptq)" if "quant" in str(kind) else ""
                reasons.append(f"{name} is a {kind!r} layer{hint}")
            elif set(desc.get("spec") or {}) - kinds[kind]:
                reasons.append(f"{name}: {kind} options {sorted(set(desc['spec']) - kinds[kind])} are newer than "
                               "this format reads")
        if cls is not None and not reasons:
            from ...models.skeleton import empty_model

            resized, problems = resized_linears(source, empty_model(source.config, cls))
            reasons += problems
            if not source.layers and not resized and not problems:
                reasons.append("the model has no structured or resized layer (a plain model goes out as --format "
                               "dense)")
        return reasons

    def write(self, source, ctx: ExportContext) -> None:
        from ...files import write_json
        from ...models.skeleton import empty_model

        cls = base_class(source)
        table = structure_table(source, empty_model(source.config, cls))
        plan = tensor_plan(source)
        entries = [TensorEntry(k, source.entry(v).dtype, source.entry(v).shape) for k, v in plan.items()]
        with ctx.safetensors(entries) as w:
            for k, v in plan.items():
                w.write(k, source.tensor(v))
        model_type = f"rankwise_{source.model_type}"
        code, cfg_name, model_name = model_code(cls, _config_name(source), model_type)
        (ctx.dir / MODELING_FILE).write_text(code)
        config = export_config(source)
        if hasattr(config, ATTRIBUTES_KEY):
            delattr(config, ATTRIBUTES_KEY)
        write_side_files(source, ctx.dir, config)
        data = json.loads((ctx.dir / "config.json").read_text())
        data.update({"model_type": model_type, "architectures": [model_name], TABLE_KEY: table,
                     "auto_map": {"AutoConfig": f"{MODELING_FILE[:-3]}.{cfg_name}",
                                  auto_class(cls): f"{MODELING_FILE[:-3]}.{model_name}"}})
        write_json(ctx.dir / "config.json", data)
        kinds = sorted({d["kind"] for d in table["layers"].values()})
        ctx.note(f"{len(table['layers'])} layers ({', '.join(kinds)}) kept in their structured form: load with "
                 "trust_remote_code=True in transformers; vLLM and llama.cpp cannot run them")


__all__ = ["RemoteCode", "auto_class", "base_class", "layer_kinds", "model_code", "modeling_source",
           "resized_linears", "structure_table", "tensor_plan"]
