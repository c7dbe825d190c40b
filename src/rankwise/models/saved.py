"""The saved format of a model with structured layers: safetensors + JSON, no pickle.

A directory holds:

* ``model.safetensors`` -- the state dict; tensors shared by several keys (tied embeddings, a basis
  shared across layers) are stored once, under the first key;
* ``config.json`` (and ``generation_config.json``) of the original architecture, tokenizer files;
* ``rankwise.json`` -- the manifest: ``format``, ``format_version``, ``layers`` = ``{name: {kind, shape,
  bias, spec}}`` (:meth:`StructuredLinear.describe`), ``tied`` = ``{dropped key: kept key}``, ``dtype``,
  ``versions``, ``model_class`` (the transformers class, e.g. ``BertModel``; :mod:`.architecture`), plus
  whatever the writer adds (the compression config and report).

:func:`load_structured` rebuilds the architecture (the recorded ``model_class``; a directory written
before the record existed, as the causal LM of its config) with empty parameters, swaps in each structured
layer built empty from its description (:func:`rankwise.structures.build_layer`) and loads the
tensors strictly: every tensor must be present with the shape the manifest implies.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import ArtifactError
from ..files import atomic_dir, write_json
from ..structures.base import StructuredLinear, build_layer
from .architecture import record, resolve_class
from .offline import hub_offline
from .skeleton import empty_model, meta_parameters
from .surgery import Conv1D, set_module

FORMAT = "rankwise"
FORMAT_VERSION = 2
MANIFEST = "rankwise.json"
WEIGHTS_FILE = "model.safetensors"
_V1_FORMAT = "rankwise-lowrank"


def versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {"rankwise": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def structured_layers(model: nn.Module) -> dict[str, StructuredLinear]:
    """``{name: layer}`` of the outermost structured layers, in model order."""
    found: dict[str, StructuredLinear] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, StructuredLinear) and not any(name.startswith(p + ".") for p in found):
            found[name] = mod
    return found


def dedup_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` with each shared tensor once; ``aliases = {dropped_key: kept_key}``."""
    out, aliases, seen = {}, {}, {}
    for key, t in state.items():
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        out[key] = t.detach().contiguous()
    return out, aliases


def manifest(layers: Mapping[str, Mapping[str, Any]], aliases: Mapping[str, str], dtype: torch.dtype,
             extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``rankwise.json`` content: format, layer descriptions, aliases, dtype, versions, ``extra``."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "layers": dict(layers), "tied": dict(aliases),
            "dtype": str(dtype).replace("torch.", ""), "versions": versions()}
    meta.update(extra or {})
    return meta


def write_side_files(tmp: Path, config, tokenizer=None, generation_config=None, model_class: str | None = None
                     ) -> None:
    """``config.json``, ``generation_config.json`` and the tokenizer into the (temporary) output dir;
    ``model_class`` goes into ``config.json`` as ``architectures`` (as ``save_pretrained`` writes it)."""
    if model_class is not None and list(getattr(config, "architectures", None) or []) != [model_class]:
        import copy

        config = copy.deepcopy(config)
        config.architectures = [model_class]
    config.save_pretrained(tmp)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def save_structured(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False,
                    extra: Mapping[str, Any] | None = None, after: Callable[[Path], Any] | None = None) -> Path:
    """Write ``model`` (with its structured layers) to ``out_dir`` atomically; returns the path.

    ``after(tmp)`` may add files inside the same atomic output. An existing ``out_dir`` raises
    :class:`~rankwise.errors.OutputExistsError` unless ``overwrite``.
    """
    from safetensors.torch import save_file

    layers = structured_layers(model)
    if not layers:
        raise ArtifactError("the model has no structured layers; compress it first "
                            "(a plain model is saved with rankwise.save or model.save_pretrained)")
    state, aliases = dedup_state(model.state_dict())
    kind = record(model)
    meta = manifest({n: m.describe() for n, m in layers.items()}, aliases, next(model.parameters()).dtype,
                    {**kind, **(extra or {})})
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "rankwise": FORMAT})
        write_side_files(tmp, model.config, tokenizer, getattr(model, "generation_config", None),
                         kind.get("model_class"))
        write_json(tmp / MANIFEST, meta)
        if after is not None:
            after(tmp)
    return Path(out_dir)


def check_config_shapes(model: nn.Module) -> None:
    """:class:`ArtifactError` unless every tensor of ``model`` has the shape its ``config.json`` implies
    (a model pruned to different widths per block does not: no plain config can describe it)."""
    skel = empty_model(model.config)
    want = {k: tuple(v.shape) for k, v in skel.state_dict().items()}
    for key, t in model.state_dict().items():
        if key in want and tuple(t.shape) != want[key]:
            raise ArtifactError(
                f"tensor {key} has shape {tuple(t.shape)} but config.json implies {want[key]}: the model's blocks have "
                "different widths, which a plain config.json cannot express; prune with uniform widths "
                "(--set widths=uniform) or export through HF remote code, whose per-layer table holds per-block widths")


def save_plain(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False,
               extra: Mapping[str, Any] | None = None, after: Callable[[Path], Any] | None = None,
               max_shard_size: int | str | None = None) -> Path:
    """Write a model without structured layers (a pruned one) as a plain Hugging Face directory --
    ``config.json``, safetensors (sharded above ``max_shard_size``, default as transformers), the
    tokenizer -- plus ``rankwise.json`` recording how it was made (``layers`` empty), atomically.
    ``from_pretrained`` loads it without rankwise; the model must match its config (checked first)."""
    check_config_shapes(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    meta = manifest({}, {}, dtype, extra)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **kw)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / MANIFEST, meta)
        if after is not None:
            after(tmp)
    return Path(out_dir)


def is_structured_dir(path: str | os.PathLike) -> bool:
    """A directory with a ``rankwise.json`` that lists structured layers (or cannot be read: loading then
    says why). A pruned model's directory lists none: it is a plain Hugging Face directory."""
    if not (Path(path) / MANIFEST).is_file():
        return False
    try:
        return bool(read_manifest(path)["layers"])
    except ArtifactError:
        return True


def _upgrade_v1(meta: dict) -> dict:
    """Format 1 (low rank only): ``layers = {name: {rank, shape, bias}}``."""
    layers = {}
    for name, spec in meta["layers"].items():
        if not isinstance(spec, dict) or "rank" not in spec or "shape" not in spec:
            raise ArtifactError(f"{MANIFEST} entry for layer {name!r} is malformed; re-run rankwise compress")
        layers[name] = {"kind": "lowrank", "shape": spec["shape"], "bias": spec.get("bias", True),
                        "spec": {"rank": spec["rank"]}}
    return {**meta, "format": FORMAT, "format_version": FORMAT_VERSION, "layers": layers}


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed, validated ``rankwise.json`` of a saved directory (format 1 is upgraded on read)."""
    f = Path(path) / MANIFEST
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is not a rankwise model: {MANIFEST} is missing") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{f} is unreadable or not valid JSON ({e}); re-run rankwise compress") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("layers"), dict):
        raise ArtifactError(f"{f} is not a rankwise manifest; re-run rankwise compress")
    if meta.get("format") == _V1_FORMAT:
        return _upgrade_v1(meta)
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{f} is not a rankwise manifest (format {meta.get('format')!r}); re-run rankwise compress")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise ArtifactError(f"{f} has format version {meta.get('format_version')!r}, newer than this rankwise "
                            f"supports ({FORMAT_VERSION}); upgrade rankwise")
    return meta


def _skeleton(path: Path, model_class: str | None) -> nn.Module:
    """The empty model of ``config.json``: the recorded ``model_class``, else (older directories) the causal LM."""
    from transformers import AutoConfig

    try:
        with hub_offline():
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}/config.json is missing or invalid ({e})") from None
    cls = None if model_class is None else resolve_class(model_class, config, f"{path / MANIFEST}")
    return empty_model(config, cls)


def load_structured(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """Rebuild a model saved by :func:`save_structured`; every tensor is checked against the manifest.

    ``dtype`` casts floating tensors (``None`` keeps the stored dtypes); integer codes are never cast.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_manifest(path)
    model = _skeleton(path, meta.get("model_class"))
    for name, desc in meta["layers"].items():
        try:
            model.get_submodule(name)
            layer = build_layer(desc, device="meta")
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{MANIFEST} entry for layer {name!r} does not fit the model in config.json "
                                f"({type(e).__name__}: {e})") from None
        set_module(model, name, layer)
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except FileNotFoundError:
        raise ArtifactError(f"{path / WEIGHTS_FILE} is missing; the directory is incomplete") from None
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path / WEIGHTS_FILE} is corrupted ({e}); re-run rankwise compress") from None

    aliases = meta.get("tied", {})
    expected = {k: v for k, v in model.state_dict().items() if k not in aliases}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{path}: tensors do not match {MANIFEST}: missing {missing[:6]}, unexpected {unexpected[:6]}; "
            "the directory is corrupted or was edited -- re-run rankwise compress")
    for key, want in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape) or got.is_floating_point() != want.is_floating_point():
            raise ArtifactError(
                f"{path}: tensor {key} has shape {tuple(got.shape)} ({got.dtype}) but {MANIFEST} / config.json "
                f"imply {tuple(want.shape)} ({want.dtype}); the directory is corrupted -- re-run rankwise compress")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise ArtifactError(f"{path}: tensor {key} holds non-finite values")
    if dtype is not None:
        fixed = _fixed_dtype_keys(model)
        state = {k: (v.to(dtype) if v.is_floating_point() and k not in fixed else v) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    for dropped, kept in aliases.items():
        mod_name, _, attr = dropped.rpartition(".")
        src_name, _, src_attr = kept.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, getattr(model.get_submodule(src_name), src_attr))
    left = meta_parameters(model)
    if left:
        raise ArtifactError(f"{path}: no tensor for {left[:6]}; the directory is incomplete")
    return model.eval()


def _fixed_dtype_keys(model: nn.Module) -> set[str]:
    """State keys that structured layers store in a fixed precision (``fixed_dtype_keys`` of the layer
    class, e.g. float16 quantization scales): never cast on load."""
    keys: set[str] = set()
    for name, layer in structured_layers(model).items():
        for k in getattr(layer, "fixed_dtype_keys", ()):
            keys.add(f"{name}.{k}")
    return keys


def export_dense(model: nn.Module, tokenizer, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a plain transformers checkpoint: every structured layer multiplied back to its original
    layer type (``nn.Linear`` or GPT-2 ``Conv1D``). Loadable with ``from_pretrained`` without rankwise;
    ``model`` is restored afterwards."""
    layers = structured_layers(model)
    skel = empty_model(model.config, type(model) if record(model) else None)
    swapped = {}
    try:
        for name, layer in layers.items():
            orig = skel.get_submodule(name)
            lin = layer.to_linear()
            if Conv1D and isinstance(orig, Conv1D):
                dense = Conv1D(layer.out_features, layer.in_features)
                with torch.no_grad():
                    dense.weight = nn.Parameter(lin.weight.detach().t().contiguous())
                    dense.bias = nn.Parameter(lin.bias.detach().clone() if lin.bias is not None
                                              else torch.zeros(layer.out_features, dtype=lin.weight.dtype))
            else:
                dense = lin
            swapped[name] = set_module(model, name, dense)
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    finally:
        for name, layer in swapped.items():
            set_module(model, name, layer)
    return Path(out_dir)
