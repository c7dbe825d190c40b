"""The Python API: one verb per job, each a thin call into its package.

Mutation is uniform: ``compress`` and ``adapt`` return a modified **copy** of the model unless
``inplace=True``. ``load`` reverses ``save``; both take any model rankwise can write (compressed
directories, plain Hugging Face directories, built-in names).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn


def load(name_or_path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu", trust_remote_code: bool = False):
    """``(model, tokenizer, path)`` for a built-in model name, a local Hugging Face directory, or a
    directory written by :func:`save` / ``rankwise compress`` (its structured layers rebuilt). The model
    comes back as the class it was saved as (``BertModel``, ``...ForSequenceClassification``, a causal or
    seq2seq LM). ``trust_remote_code`` allows a directory that ships its own modeling code (a remote-code
    export)."""
    from .models.loading import load_model as _load

    return _load(name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


#: The same loader under its descriptive name (same arguments, same ``(model, tokenizer, path)``).
load_model = load


def save(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, report=None, overwrite: bool = False,
         extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``out_dir`` atomically (safetensors + JSON); :func:`load` reads it back.

    A model with structured layers (low rank, quantized, ...) is written in rankwise's format with a
    ``rankwise.json`` manifest; a plain model is written as an ordinary Hugging Face checkpoint.
    """
    from .compression.saving import save_model

    return save_model(model, out_dir, tokenizer=tokenizer, report=report, overwrite=overwrite, extra=extra)


def compress(model: nn.Module, structure: str | None = None, ratio: float | None = None, *,
             method: str | None = None, calib=None, tokenizer=None, inplace: bool = False, heal=None, **options):
    """Compress ``model``'s linear layers; returns ``(compressed_model, report)``.

    A deep copy is compressed unless ``inplace=True``. ``structure`` defaults to low rank, ``ratio``
    (fraction of the targeted weight values removed) to 0.4; ``method`` picks the low-rank objective.
    See :func:`rankwise.compression.compress.compress` for every option (``bits_per_weight``,
    ``options``, ``allocate``, ``mode``, ``granularity``, ``refit``, ``calib_options``, ``device``, ...).
    ``heal``: :class:`rankwise.healing.HealOptions` (or a dict, e.g. ``{"steps": 100}``) trains low-rank
    corrections of the factors on the calibration windows and merges them back (same size); a pruned
    model (``depth``, ``width``, ``slice``) is distilled from the dense model instead (KL on the logits,
    corrections of every linear layer); the report's ``healing`` records it.
    """
    from .compression.compress import calibration_windows, compress as _compress
    from .options import make_options
    from .healing import HealOptions, heal as _heal

    heal_opts = make_options(HealOptions, heal, {}, "healing")
    target = model if inplace else copy.deepcopy(model)
    teacher = None  # pruned models heal by distillation from the dense model
    if heal_opts.steps and _rewrites_architecture(structure):
        teacher = copy.deepcopy(model) if inplace else model
    if heal_opts.steps and not (isinstance(calib, torch.Tensor) and calib.ndim == 2):
        co = dict(options.get("calib_options") or {})
        calib, _ = calibration_windows(target, calib, tokenizer, co.get("windows", 64), co.get("seqlen", 512),
                                       co.get("seed", 3))
    target, report = _compress(target, structure, ratio, method=method, calib=calib, tokenizer=tokenizer, **options)
    if heal_opts.steps:
        report.healing = _heal(target, calib, heal_opts, progress=options.get("progress", True), teacher=teacher)
    return target, report


def _rewrites_architecture(structure: str | None) -> bool:
    """Whether ``structure`` prunes the architecture (depth, width, slice) rather than replacing layers."""
    from .compression.compress import DEFAULT_STRUCTURE
    from .compression.methods.base import STRUCTURES

    return bool(getattr(STRUCTURES.get(structure or DEFAULT_STRUCTURE), "rewrites_architecture", False))


def compress_low_memory(model: str | os.PathLike | None, out_dir: str | os.PathLike, **options):
    """Compress the checkpoint at ``model`` block by block from disk into ``out_dir``; returns the report."""
    from .compression.compress import compress_low_memory as _compress_low_memory

    return _compress_low_memory(model, out_dir, **options)


def evaluate(model: nn.Module, tokenizer, **options):
    """Perplexity on the default protocol (or ``text=``); returns a :class:`PerplexityResult`."""
    from .evaluation.perplexity import perplexity as _perplexity

    return _perplexity(model, tokenizer, **options)


perplexity = evaluate


def analyze(model: nn.Module, **options):
    """Per-layer spectral diagnostics; returns an :class:`~rankwise.analysis.run.AnalysisResult`."""
    from .analysis.run import analyze as _analyze

    return _analyze(model, **options)


def adapt(model: nn.Module, init: str = "pissa", rank: int = 16, inplace: bool = False, **options) -> nn.Module:
    """Attach ``init``-initialized rank-``rank`` adapters; returns the adapted model (a copy unless
    ``inplace=True``). See :func:`rankwise.adaptation.attach.adapt` for the options."""
    from .adaptation.attach import adapt as _adapt

    target = model if inplace else copy.deepcopy(model)
    return _adapt(target, init=init, rank=rank, **options)


def load_corpus(split: str = "test", text_file: str | os.PathLike | None = None) -> str:
    """The default corpus's ``calib`` / ``test`` split, or the text of ``text_file``."""
    from .calibration.corpus import load_corpus as _load_corpus

    return _load_corpus(split, text_file)


def match(model_a: nn.Module, model_b: nn.Module, data=None, method: str | None = None, **options):
    """``model_b`` permuted into ``model_a``'s basis (a copy with the same function) and a
    :class:`~rankwise.merging.matching.MatchResult`; weight matching, or activation matching with ``data``."""
    from .merging.matching import match as _match

    return _match(model_a, model_b, data=data, method=method, **options)


def barrier(model_a: nn.Module, model_b: nn.Module, data, alphas=11, **options):
    """The loss (and accuracy) along the linear path between two models and the barrier height; see
    :func:`rankwise.merging.barrier.barrier`."""
    from .merging.barrier import barrier as _barrier

    return _barrier(model_a, model_b, data, alphas, **options)


def merge(base, models, method: str = "task-arithmetic", out: str | os.PathLike | None = None, **options):
    """Merge fine-tunes of ``base`` (models, directories or PEFT adapters) with ``method`` (average,
    task-arithmetic, ties, opcm); see :func:`rankwise.merging.merge.merge`."""
    from .merging.merge import merge as _merge

    return _merge(base, models, method, out, **options)


def lock(model: nn.Module, seed: int = 0, **options):
    """A copy of ``model`` whose attention layers carry random function-preserving transforms, so that
    task-vector merging with it collapses; see :func:`rankwise.merging.lock.lock`."""
    from .merging.lock import lock as _lock

    return _lock(model, seed=seed, **options)


def export(model_or_dir, format: str, out: str | os.PathLike, *, tokenizer=None, options=None,
           max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = True):
    """Write a model in memory, or a saved directory (read tensor by tensor), in ``format`` to ``out``;
    returns an :class:`~rankwise.export.base.ExportResult` (files, notes). Formats:
    ``rankwise.export.FORMATS`` (``compressed-tensors``, ``gptq``, ``gguf``, ``dense``, ...)."""
    from .export import export as _export

    return _export(model_or_dir, format, out, tokenizer=tokenizer, options=options, max_shard_size=max_shard_size,
                   overwrite=overwrite, progress=progress)


def structurize(model: nn.Module, structure: str, ratio: float = 0.5, *, inplace: bool = False, **options) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with its block linears replaced by trainable ``structure`` layers
    (lowrank, monarch, blockdiag-lowrank, kronecker, sltrain, blast) of at most ``(1 - ratio) m n`` values
    each, structure-aware initialized. See :func:`rankwise.training.structurize.structurize`."""
    from .training.structurize import structurize as _structurize

    return _structurize(model, structure, ratio, inplace=inplace, **options)


def init_(model: nn.Module, method: str, data: torch.Tensor | None = None, **options) -> dict:
    """Initialize ``model``'s linear and structured layers in place: ``lsuv`` (needs ``data``), ``idinit``,
    ``spectral``, ``orthogonal``. See :mod:`rankwise.training.init`."""
    from .training.init import init_ as _init

    return _init(model, method, data=data, **options)


def train(model: nn.Module, tokenizer=None, *, text_file: str | os.PathLike | None = None,
          train_ids: torch.Tensor | None = None, eval_ids: torch.Tensor | None = None, progress: bool = True,
          checkpoint_dir: str | os.PathLike | None = None, resume: bool = False, **config):
    """Train ``model`` in place (``optim="adamw" | "galore" | "dct" | "randomized" | "random"``, ``rank``,
    ``steps``, ``lr``, ...: :class:`rankwise.training.loop.TrainConfig`) on ``train_ids`` or the default
    corpus / ``text_file`` tokenized with ``tokenizer``; returns a :class:`~rankwise.training.loop.TrainResult`."""
    from .options import make_options
    from .training.build import token_streams
    from .training.loop import TrainConfig, train as _train

    cfg = make_options(TrainConfig, None, config, "train")
    if train_ids is None:
        if tokenizer is None:
            from .errors import ConfigError

            raise ConfigError("pass train_ids, or a tokenizer to read the default corpus / text_file")
        train_ids, held = token_streams(tokenizer, text_file)
        eval_ids = held if eval_ids is None else eval_ids
    return _train(model, train_ids, cfg, eval_ids=eval_ids, checkpoint_dir=checkpoint_dir, resume=resume,
                  progress=progress)


def prepare_inference(model: nn.Module, dtype: torch.dtype | None = None):
    """Build every structured layer's runtime form now (packed int4 / int8 kernels, de-quantize-once
    caches, sparse layers merged to dense on CPU) for inputs of ``dtype`` (default: the model's) and
    return one :class:`~rankwise.models.runtime.LayerRuntime` row per linear layer (kernel path, stored
    and runtime bytes); :func:`rankwise.models.runtime.runtime_table` prints them."""
    from .models.runtime import prepare_inference as _prepare

    return _prepare(model, dtype)


def generate(model: nn.Module, tokenizer, prompt: str | None = None, max_new_tokens: int = 64, *,
             temperature: float = 0.0, seed: int = 0, chat: bool | None = None, stream=None):
    """Continue ``prompt`` (through the tokenizer's chat template when it has one) with up to
    ``max_new_tokens`` tokens, greedy unless ``temperature > 0``; ``stream(text)`` receives the text as
    it is decoded. Returns a :class:`~rankwise.evaluation.generation.GenerationResult` (text, tokens,
    decode tokens/s, time to the first token)."""
    from .evaluation.generation import DEFAULT_PROMPT, generate_text

    return generate_text(model, tokenizer, DEFAULT_PROMPT if prompt is None else prompt, max_new_tokens,
                         temperature=temperature, seed=seed, chat=chat, write=stream)
