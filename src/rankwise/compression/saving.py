"""Save and load compressed models: safetensors + JSON only, no pickle.

A compressed directory holds:

* ``model.safetensors`` -- the state dict with ``<layer>.A.weight (k, in)``, ``<layer>.B.weight
  (out, k)``, ``<layer>.B.bias`` for every factorized layer; tensors shared by several keys (tied
  embeddings) are stored once, under the first key;
* ``config.json`` (and ``generation_config.json``) of the original architecture, tokenizer files;
* ``rankwise.json`` -- format version, method, ratio, per-layer ranks and shapes, calibration
  settings, versions, perplexity if measured, the full report.

:func:`load_compressed` rebuilds the architecture with empty weights, swaps in
:class:`LowRankLinear` at the recorded ranks and loads the tensors strictly.
:func:`export_dense` writes a plain transformers checkpoint with the factors multiplied back.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import atomic_dir
from ..errors import ArtifactError
from ..models.surgery import Conv1D, set_module
from ..structures.lowrank import LowRankLinear
from .report import CompressionReport

FORMAT = "rankwise-lowrank"
FORMAT_VERSION = 1
META_FILE = "rankwise.json"
WEIGHTS_FILE = "model.safetensors"


def versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {"rankwise": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def lowrank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _dedup_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each shared tensor once; ``aliases = {dropped_key: kept_key}``."""
    state, aliases, seen = {}, {}, {}
    for key, t in model.state_dict().items():
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        state[key] = t.detach().contiguous()
    return state, aliases


def save_compressed(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: CompressionReport | None = None,
                    overwrite: bool = False, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (with its ``LowRankLinear`` layers) to ``out_dir`` atomically; returns the path.

    An existing ``out_dir`` raises :class:`OutputExistsError` unless ``overwrite``.
    """
    from safetensors.torch import save_file

    layers = lowrank_layers(model)
    if not layers:
        raise ArtifactError("the model has no LowRankLinear layers; compress it before save_compressed "
                            "(a dense model is saved with model.save_pretrained)")
    state, aliases = _dedup_state(model)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layers": {n: {"rank": m.rank, "shape": [m.out_features, m.in_features], "bias": m.bias is not None}
                   for n, m in layers.items()},
        "tied": aliases,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "versions": versions(),
    }
    if report is not None:
        meta.update(method=report.method, ratio=report.ratio, refit=report.refit, allocate=report.allocate,
                    mode=report.mode, calibration=report.calibration, perplexity=report.perplexity,
                    report=report.to_dict())
    if extra:
        meta.update(extra)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "rankwise": FORMAT})
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return Path(out_dir)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``rankwise.json`` of a compressed directory (validated format)."""
    f = Path(path) / META_FILE
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is not a rankwise compressed model: {META_FILE} is missing") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{f} is unreadable or not valid JSON ({e}); re-run rankwise compress") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("layers"), dict):
        raise ArtifactError(f"{f} is not a {FORMAT} manifest; re-run rankwise compress")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{f} has format version {meta['format_version']}, newer than this rankwise "
                            f"supports ({FORMAT_VERSION}); upgrade rankwise")
    return meta


def _skeleton(path: Path):
    import accelerate
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}/config.json is missing or invalid ({e})") from e
    with accelerate.init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def load_compressed(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed`; every tensor is checked against ``rankwise.json``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    model = _skeleton(path)
    for name, spec in meta["layers"].items():
        try:
            model.get_submodule(name)
            out_f, in_f = (int(x) for x in spec["shape"])
            layer = LowRankLinear(in_f, out_f, int(spec["rank"]), bias=bool(spec.get("bias", True)), device="meta")
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{META_FILE} entry for layer {name!r} does not fit the model in config.json ({e})") from e
        set_module(model, name, layer)
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except FileNotFoundError:
        raise ArtifactError(f"{path / WEIGHTS_FILE} is missing; the directory is incomplete") from None
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path / WEIGHTS_FILE} is corrupted ({e}); re-run rankwise compress") from e

    aliases = meta.get("tied", {})
    expected = {k: v for k, v in model.state_dict().items() if k not in aliases}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{path}: tensors do not match {META_FILE}: missing {missing[:6]}, unexpected {unexpected[:6]}; "
            "the directory is corrupted or was edited -- re-run rankwise compress"
        )
    for key, want in expected.items():
        if tuple(state[key].shape) != tuple(want.shape):
            layer = key.rsplit(".", 2)[0] if key.endswith((".A.weight", ".B.weight", ".B.bias")) else key
            raise ArtifactError(
                f"{path}: tensor {key} has shape {tuple(state[key].shape)} but {META_FILE} / config.json "
                f"imply {tuple(want.shape)} (layer {layer}); the directory is corrupted -- re-run rankwise compress"
            )
        if not bool(torch.isfinite(state[key]).all()) and state[key].is_floating_point():
            raise ArtifactError(f"{path}: tensor {key} holds non-finite values")
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    for dropped, kept in aliases.items():
        mod_name, _, attr = dropped.rpartition(".")
        src_name, _, src_attr = kept.rpartition(".")
        src = getattr(model.get_submodule(src_name), src_attr)
        setattr(model.get_submodule(mod_name), attr, src)
    meta_left = [n for n, p in model.named_parameters() if p.is_meta]
    if meta_left:
        raise ArtifactError(f"{path}: no tensor for {meta_left[:6]}; the directory is incomplete")
    return model.eval()


def export_dense(model: nn.Module, tokenizer, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a plain transformers checkpoint: every ``LowRankLinear`` multiplied back to its original
    layer type (``nn.Linear`` or GPT-2 ``Conv1D``, weight ``B @ A``). Loadable with
    ``AutoModelForCausalLM.from_pretrained`` without rankwise. ``model`` is restored afterwards."""
    layers = lowrank_layers(model)
    skel = _skeleton_from_config(model.config)
    swapped = {}
    try:
        for name, lr in layers.items():
            orig = skel.get_submodule(name)
            if Conv1D and isinstance(orig, Conv1D):
                dense = Conv1D(lr.out_features, lr.in_features)
                with torch.no_grad():
                    dense.weight = nn.Parameter(lr.dense().t().contiguous().to(lr.A.weight.dtype))
                    dense.bias = nn.Parameter(lr.bias.detach().clone() if lr.bias is not None
                                              else torch.zeros(lr.out_features, dtype=lr.A.weight.dtype))
            else:
                dense = lr.to_linear()
            swapped[name] = set_module(model, name, dense)
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    finally:
        for name, lr in swapped.items():
            set_module(model, name, lr)
    return Path(out_dir)


def _skeleton_from_config(config):
    import accelerate
    from transformers import AutoModelForCausalLM

    with accelerate.init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def save_model(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, report: CompressionReport | None = None,
               overwrite: bool = False, extra: dict[str, Any] | None = None) -> Path:
    """:func:`save_compressed` for a model with structured layers, else an atomic ``save_pretrained``."""
    if lowrank_layers(model):
        return save_compressed(model, tokenizer, out_dir, report, overwrite=overwrite, extra=extra)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
