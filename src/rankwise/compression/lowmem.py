"""Low-memory compression: block by block from the safetensors files on disk.

The model is built as a skeleton with parameters on the ``meta`` device (no memory). Only the
tensors outside the decoder blocks (embeddings, final norm, head) are loaded. Then, for each block
``i``: load its tensors with ``safetensors.safe_open``, gather the calibration statistics of its
targeted layers on the cached hidden states (the outputs of the already compressed blocks
``0..i-1``: the sequential mode of :mod:`.pipeline`), factorize and replace them, run the compressed
block to produce the inputs of block ``i + 1``, write the block's tensors to a shard, and move the
block back to ``meta``. Peak RSS ~ embeddings + one block + the cached hidden states + one block's
statistics, instead of the whole model. The shards are finally streamed (one tensor at a time) into
one ``model.safetensors`` that :func:`rankwise.load` reads like any other compressed directory.

Everything is written inside :func:`rankwise.files.atomic_dir`: an interrupted run leaves no output
(and no temp dir), and a rerun starts clean. The result equals ``compress(..., sequential=True)``.
"""
from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..files import atomic_dir
from ..calibration.sampling import DEFAULT_CALIB_WINDOWS, DEFAULT_SEED, DEFAULT_SEQLEN
from ..calibration.stats import StatsAccumulator
from ..errors import ArtifactError, ConfigError, NumericalError
from ..models.surgery import block_prefix, decoder_blocks, find_linears, linear_shape, linear_weight
from .allocate import AllocationRequest, get_allocator
from .blocks import BlockRunner, capture_block_inputs
from .budget import check_plan, check_ratio
from .methods import ABS_MEAN, COV, LayerStats, get_method
from .report import CompressionReport

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


class _Passthrough(nn.Module):
    """Stands in for a block while recording its arguments: returns the hidden states unchanged."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))

    def forward(self, hidden_states=None, *args, **kwargs):
        return hidden_states


def weight_index(path: Path) -> dict[str, Path]:
    """``{tensor key: safetensors file}`` of a model directory (single file or sharded index)."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    if index.is_file():
        return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    raise ArtifactError(f"{path} has no model.safetensors (or sharded index); --low-memory reads safetensors only")


def load_tensors(index: dict[str, Path], keys: Sequence[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` read one by one with ``safe_open`` (floating ones cast to ``dtype``)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(index[k], []).append(k)
    for file, ks in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for k in ks:
                t = f.get_tensor(k)
                out[k] = t.to(dtype) if t.is_floating_point() else t
    return out


def _write_tensor(out, t: torch.Tensor) -> None:
    t = t.detach().contiguous()
    if t.numel():
        out.write(t.reshape(-1).view(torch.uint8).numpy().data)  # a view: no copy of the bytes


def stream_merge(shards: Sequence[Path | dict[str, torch.Tensor]], dest: Path,
                 metadata: dict[str, str] | None = None) -> None:
    """Concatenate safetensors ``shards`` (files, or dicts of tensors already in memory) into one file,
    holding at most one tensor read from a file in memory at a time.

    Layout (safetensors spec): u64-LE header size, JSON header ``{key: {dtype, shape, data_offsets}}``
    padded with spaces to a multiple of 8, then the raw little-endian tensor bytes.
    """
    from safetensors import safe_open

    entries, offset = [], 0
    for shard in shards:
        if isinstance(shard, dict):
            for k, t in shard.items():
                nbytes = t.numel() * t.element_size()
                entries.append((k, None, _NAMES[t.dtype], list(t.shape), offset, offset + nbytes))
                offset += nbytes
            continue
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                shape = list(sl.get_shape())
                dtype = _DTYPES[sl.get_dtype()]
                nbytes = torch.empty((), dtype=dtype).element_size() * int(torch.tensor(shape).prod().item() if shape else 1)
                entries.append((k, shard, sl.get_dtype(), shape, offset, offset + nbytes))
                offset += nbytes
    header: dict = {"__metadata__": metadata or {}}
    for k, _, dt, shape, a, b in sorted(entries, key=lambda e: e[4]):
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [a, b]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(dest, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for shard in shards:
            if isinstance(shard, dict):
                for t in shard.values():
                    _write_tensor(out, t)
                continue
            with safe_open(str(shard), framework="pt") as f:
                for k in f.keys():
                    _write_tensor(out, f.get_tensor(k))


def _save_shard(state: dict[str, torch.Tensor], file: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(file))


def compress_low_memory(
    model_arg: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    method: str | None = None,
    ratio: float = 0.4,
    calib=None,
    targets: Sequence[str] | str | None = None,
    refit: bool | None = None,
    allocate: str = "uniform",
    calib_windows: int = DEFAULT_CALIB_WINDOWS,
    calib_seqlen: int = DEFAULT_SEQLEN,
    seed: int = DEFAULT_SEED,
    batch_size: int = 4,
    progress: bool = True,
    allocate_options: dict | None = None,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
) -> CompressionReport:
    """Compress the model at ``model_arg`` (built-in name or HF directory) block by block into ``out_dir``.

    Same options and same result as ``compress(..., sequential=True)`` followed by ``save_compressed``;
    allocators that need every layer's factorization up front (spectrum, sensitivity) are not available.
    """
    import accelerate
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models.loading import load_tokenizer
    from ..models.registry import resolve_model
    from .pipeline import DEFAULT_METHOD, DEFAULT_REFIT, _Compressor, calibration_windows
    from .rankplot import write_rank_report
    from .saving import FORMAT, FORMAT_VERSION, META_FILE, WEIGHTS_FILE, versions

    t0 = time.perf_counter()
    meth = get_method(method or DEFAULT_METHOD)
    refit = DEFAULT_REFIT if refit is None else refit
    ratio = check_ratio(ratio)
    alloc = get_allocator(allocate)
    if alloc.needs_factorizations:
        raise ConfigError(f"--low-memory cannot use --allocate {allocate}: it needs every layer's spectrum before "
                          "the first block is compressed; use --allocate uniform or drop --low-memory")
    path = Path(resolve_model(model_arg))
    index = weight_index(path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    tok = load_tokenizer(path)
    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    windows, source = calibration_windows(model, calib, tok, calib_windows, calib_seqlen, seed)
    blocks = decoder_blocks(model)
    prefix = block_prefix(model) + "."
    outside = [k for k in index if not k.startswith(prefix)]
    model.load_state_dict(load_tensors(index, outside, dtype), strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix)]
    if left:
        raise ArtifactError(f"{path}: no tensor for {left[:4]} in the safetensors files")

    layers = find_linears(model, targets)
    names = list(layers)
    shapes = {n: linear_shape(m) for n, m in layers.items()}
    needs = meth.stats_needed(refit)
    if needs - {ABS_MEAN, COV}:
        raise ConfigError(f"--low-memory cannot run {meth.name}: it needs gradients of the whole model; "
                          "use svd, asvd, svd-llm or svd-llm-v2")
    request = AllocationRequest(ratio, shapes, {}, {"model": model, "windows": windows, "method": meth,
                                                   "refit": refit, "tokenizer": tok, "progress": progress,
                                                   **(allocate_options or {})})
    plan = alloc.fn(request)
    check_plan(shapes, plan)
    comp = _Compressor(model, meth, plan, refit, shapes)
    want_cov = COV in needs

    # hidden states entering block 0, and each block's extra arguments, recorded with stand-ins
    real = list(blocks)
    for i, b in enumerate(real):
        blocks[i] = _Passthrough(b)
    try:
        rec = capture_block_inputs(model, blocks, windows, batch_size)
    finally:
        for i, b in enumerate(real):
            blocks[i] = b
    runner = BlockRunner(blocks, rec.hidden, rec.extras)
    model_before = sum(int(torch.Size(s).numel()) for s in index_shapes(index).values())

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        shard_dir = tmp / ".blocks"
        shard_dir.mkdir()
        shards = []
        bar = tqdm(total=len(blocks), desc=f"low-memory {meth.name}", disable=not progress, leave=False)
        for i, block in enumerate(blocks):
            key = f"{prefix}{i}."
            state = load_tensors(index, [k for k in index if k.startswith(key)], dtype)
            block.load_state_dict({k[len(key):]: v for k, v in state.items()}, strict=False, assign=True)
            del state
            meta_left = [n for n, p in block.named_parameters() if p.is_meta]
            if meta_left:
                raise ArtifactError(f"{path}: block {i} has no tensor for {meta_left[:4]}")
            block_names = [n for n in names if n.startswith(key)]
            if block_names:
                for n in block_names:
                    if not bool(torch.isfinite(linear_weight(layers[n])).all()):
                        raise NumericalError(f"layer {n} has non-finite weights (nan/inf); fix the checkpoint")
                with StatsAccumulator({n: layers[n] for n in block_names}, cov=want_cov) as acc:
                    runner.run(i)
                for n in block_names:
                    comp.replace(n, layers[n], LayerStats(acc.stats.pop(n), None))
                    if layers[n] is not block.get_submodule(n[len(key):]):
                        layers[n].to("meta")  # the replaced dense layer: free its weights now
            if i < len(blocks) - 1:
                runner.advance(i)
            shard = shard_dir / f"{i:05d}.safetensors"
            _save_shard({key + k: v for k, v in block.state_dict().items()}, shard)
            shards.append(shard)
            block.to("meta")
            bar.update()
        bar.close()
        del runner
        rest, aliases, seen = {}, {}, {}
        for k, t in model.state_dict().items():
            if k.startswith(prefix):
                continue
            ident = (t.data_ptr(), t.dtype, tuple(t.shape))
            if ident in seen:
                aliases[k] = seen[ident]
                continue
            seen[ident] = k
            rest[k] = t
        stream_merge([rest] + shards, tmp / WEIGHTS_FILE, {"format": "pt", "rankwise": FORMAT})
        del rest
        for s in shards:
            s.unlink()
        shard_dir.rmdir()

        reports = [comp.layers[n] for n in names]
        lr_params = sum(r.params_after - r.params_before for r in reports)
        report = CompressionReport(
            method=meth.name, ratio=ratio, refit=bool(refit), allocate=alloc.name, mode="sequential",
            calibration={"source": source, "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
                         "seed": seed, "fisher_windows": 0, "low_memory": True},
            layers=reports,
            targeted_params_before=sum(r.params_before for r in reports),
            targeted_params_after=sum(r.params_after for r in reports),
            model_params_before=model_before, model_params_after=model_before + lr_params,
            seconds=time.perf_counter() - t0, allocation=request.info or None,
        )
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "layers": {r.name: {"rank": r.rank, "shape": list(r.shape),
                                    "bias": getattr(layers[r.name], "bias", None) is not None}
                           for r in reports if r.rank is not None},
                "tied": aliases, "dtype": str(dtype).replace("torch.", ""), "versions": versions(),
                "method": report.method, "ratio": report.ratio, "refit": report.refit, "allocate": report.allocate,
                "mode": report.mode, "calibration": report.calibration, "perplexity": None,
                "report": report.to_dict(), "source_model": str(path)}
        config.save_pretrained(tmp)
        if (path / "generation_config.json").is_file():
            (tmp / "generation_config.json").write_text((path / "generation_config.json").read_text())
        tok.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        write_rank_report(report, tmp)
    return report


def index_shapes(index: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor in the checkpoint, read from the headers only."""
    from safetensors import safe_open

    shapes = {}
    by_file: dict[Path, list[str]] = {}
    for k, f in index.items():
        by_file.setdefault(f, []).append(k)
    for file, ks in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for k in ks:
                shapes[k] = tuple(f.get_slice(k).get_shape())
    return shapes
