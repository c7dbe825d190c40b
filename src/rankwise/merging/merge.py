"""Merge fine-tunes of one base through their task vectors, one tensor at a time.

``merge(base, [ft_1, ..., ft_T], method)`` reads, for every tensor of the base ``theta_0``, the task
vectors ``tau_t = theta_t - theta_0`` (full models, or PEFT LoRA adapters on the base: ``scaling B A``)
in the order given, lets the method (:data:`rankwise.merging.methods.base.MERGE_METHODS`) combine them
and writes ``theta_0 + scale tau``. A directory output is streamed: per tensor, the base, the method's
running state and one task vector are in memory (a method that rescales globally -- OPCM -- first
writes its merged task vectors beside the output and rescales them in a second pass).

Checks before any work: every full model has the base's tensors with the base's shapes (else the first
mismatching tensor is named), the same architecture, and -- unless ``check_base=False`` -- looks like a
fine-tune of the base (the cosine between sampled weight matrices and the base's stays above 0.5;
independently trained or locked models fall far below it).
"""
from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..files import atomic_dir, write_json
from ..models.saved import is_structured_dir
from ..models.streaming import ShardWriter, load_tensors, weight_index
from ..options import make_options
from .methods.base import MERGE_METHODS
from .sources import AdapterSource, DirSource, ModelSource, open_source

#: Fine-tunes keep their weight matrices close to the base's; below this cosine a model is refused.
MIN_BASE_COSINE = 0.5
_SIDE_FILES_SKIP = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".gguf")


@dataclass
class MergeReport:
    method: str
    options: dict[str, Any]
    base: str
    models: list[str]
    scale: float = 1.0
    tensors: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resolve(item):
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.exists():
            from ..models.registry import resolve_model

            return resolve_model(str(item))
        if is_structured_dir(path):
            raise ConfigError(f"{path} holds compressed (structured) layers; merging works on dense weights: write "
                              "a dense copy first (rankwise compress ... --export-dense) and merge that")
    return item


def _unique_keys(src) -> list[str]:
    """The source's tensor keys, tied duplicates (one storage, several keys) once."""
    if isinstance(src, ModelSource):
        seen, out = set(), []
        for k, t in src.state.items():
            ident = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else (k,)
            if ident not in seen:
                seen.add(ident)
                out.append(k)
        return out
    return src.keys()


def _matrix_keys(base_src, keys: list[str]) -> set[str]:
    """Keys that are linear-layer weights (``nn.Linear`` or GPT-2 ``Conv1D``), found from the module
    structure (a skeleton on ``meta`` for a directory)."""
    from ..models.surgery import is_linear

    if isinstance(base_src, ModelSource):
        model = base_src.model
    else:
        from ..models.skeleton import empty_model

        model = empty_model(base_src.config)
    out = set()
    for name, mod in model.named_modules():
        if is_linear(mod) and f"{name}.weight" in keys:
            out.add(f"{name}.weight")
    return out


def _arch(config) -> str:
    return str(getattr(config, "model_type", None) or "?")


def check_compatible(base_src, sources: Sequence, keys: list[str]) -> None:
    """Same architecture, the base's tensors with the base's shapes (the first mismatch is named)."""
    for src in sources:
        if isinstance(src, AdapterSource):
            continue
        if base_src.config is not None and src.config is not None and _arch(base_src.config) != _arch(src.config):
            raise ConfigError(f"{src.name} is a {_arch(src.config)} model but the base is {_arch(base_src.config)}; "
                              "merge models of one architecture")
        have = set(src.keys())
        for k in keys:
            if k not in have:
                raise ConfigError(f"{src.name} has no tensor {k} (the first of the base's tensors it lacks); merge "
                                  "models of one architecture and size")
            if tuple(src.shape(k)) != tuple(base_src.shape(k)):
                raise ConfigError(f"{src.name}: tensor {k} has shape {tuple(src.shape(k))} but the base's is "
                                  f"{tuple(base_src.shape(k))} (the first mismatching tensor); merge models of one "
                                  "architecture and size")


def check_same_base(base_src, sources: Sequence, matrices: list[str], samples: int = 6) -> None:
    """Refuse a full model whose sampled weight matrices are not close to the base's (module docstring)."""
    if not matrices:
        return
    step = max(1, len(matrices) // samples)
    picked = matrices[::step][:samples]
    base = {k: base_src.get(k).to(torch.float64).flatten() for k in picked}
    for src in sources:
        if isinstance(src, AdapterSource):
            continue
        for k in picked:
            t = src.get(k).to(torch.float64).flatten()
            denom = float(base[k].norm() * t.norm())
            cos = float(base[k] @ t) / denom if denom > 0 else 1.0
            if cos < MIN_BASE_COSINE:
                raise ConfigError(f"{src.name} does not look like a fine-tune of the base: its {k} has cosine {cos:.3f} "
                                  f"with the base's (fine-tunes stay near 1); merge fine-tunes of one base, or pass "
                                  "--no-base-check (check_base=False) to merge anyway")


def _copy_side_files(base_src, tmp: Path, tokenizer) -> None:
    if isinstance(base_src, DirSource):
        for f in base_src.path.iterdir():
            if f.is_file() and not f.name.endswith(_SIDE_FILES_SKIP) and f.name != "rankwise.json":
                shutil.copy2(f, tmp / f.name)
    else:
        if base_src.config is not None:
            base_src.config.save_pretrained(tmp)
        gen = getattr(base_src.model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def merge(base, models: Sequence, method: str = "task-arithmetic", out: str | os.PathLike | None = None, *,
          options: dict | None = None, check_base: bool = True, tokenizer=None, overwrite: bool = False,
          max_shard_size: int | str = "5GB", progress: bool = False):
    """Merge ``models`` (models, model directories or PEFT adapter directories; fine-tunes of ``base``) into
    one. With ``out`` the merged model is written there (a plain Hugging Face directory) and
    ``(Path, MergeReport)`` is returned; without, ``base`` must be a model and ``(merged copy, report)``
    is returned."""
    t0 = time.perf_counter()
    if len(models) < 1:
        raise ConfigError("merge needs at least one fine-tuned model besides the base")
    cls = MERGE_METHODS.get(method)
    opts = make_options(cls.Options, options, {}, f"merge method {method!r}")
    base = _resolve(base)
    if out is None and not isinstance(base, nn.Module):
        raise ConfigError("merging without an output directory needs the base as a model in memory; pass out=DIR")
    base_src = open_source(base, name="base")
    keys = _unique_keys(base_src)
    sources = [open_source(_resolve(m), keys) for m in models]
    check_compatible(base_src, sources, keys)
    matrices = _matrix_keys(base_src, keys)
    if check_base:
        check_same_base(base_src, sources, [k for k in keys if k in matrices])
    runner = cls(opts, len(sources))
    report = MergeReport(method, asdict(opts), base_src.name, [s.name for s in sources])

    def deltas(key: str, b: torch.Tensor):
        for src in sources:
            d = src.delta(key, b)
            yield torch.zeros(b.shape, dtype=torch.float32) if d is None else d

    def merged_deltas():
        from tqdm.auto import tqdm

        for key in tqdm(keys, desc=f"merge ({method})", disable=not progress, leave=False):
            b = base_src.get(key)
            if not b.is_floating_point():
                yield key, b, None
                continue
            yield key, b, runner.merge_tensor(key, b, deltas(key, b), key in matrices)

    if out is None:
        merged = copy.deepcopy(base)
        state = merged.state_dict()
        held = {k: (b, tau) for k, b, tau in merged_deltas()}
        scale = runner.scale()
        with torch.no_grad():
            for k, (b, tau) in held.items():
                if tau is not None:
                    state[k].copy_((b.to(torch.float32) + scale * tau).to(state[k].dtype))
        report.scale, report.tensors, report.seconds = scale, len(keys), time.perf_counter() - t0
        return merged, report

    with atomic_dir(out, overwrite=overwrite) as tmp:
        if runner.rescales:
            stage = tmp / ".merged-task-vectors"
            stage.mkdir()
            writer = ShardWriter(stage, max_shard_size)
            for k, b, tau in merged_deltas():
                writer.add(k, b if tau is None else tau)
            writer.close()
            scale = runner.scale()
            index = weight_index(stage)
            final = ShardWriter(tmp, max_shard_size)
            for k in keys:
                b = base_src.get(k)
                tau = load_tensors(index, [k])[k]
                final.add(k, tau if not b.is_floating_point() else (b.to(torch.float32) + scale * tau).to(b.dtype))
            final.close()
            shutil.rmtree(stage)
        else:
            final = ShardWriter(tmp, max_shard_size)
            for k, b, tau in merged_deltas():
                final.add(k, b if tau is None else (b.to(torch.float32) + tau).to(b.dtype))
            final.close()
            scale = 1.0
        _copy_side_files(base_src, tmp, tokenizer)
        report.scale, report.tensors, report.seconds = scale, len(keys), time.perf_counter() - t0
        write_json(tmp / "merge.json", report.to_dict())
    return Path(out), report


__all__ = ["MIN_BASE_COSINE", "MergeReport", "check_compatible", "check_same_base", "merge"]
