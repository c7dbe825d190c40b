"""The compute device and the precision policy of a compression run.

Where things live (sequential onloading, as llm-compressor does):

* the model's weights stay at home (CPU memory, or the safetensors files in low-memory mode); one
  unit of decoder blocks at a time is moved (or read) onto the compute device, calibrated, fitted and
  moved back (or written out) with its compressed layers;
* the calibration activations (hidden states entering the current block) are cached on the CPU in
  the model's dtype and visit the device one batch at a time; the per-block extra arguments (masks,
  rotary embeddings) are recorded on the device.

Precision policy:

* forward passes run in the model's dtype (float32, bfloat16 or float16) on the compute device;
* statistics (``sum x x^T``, ``sum |x|``, ``sum x^2``, cross moments) accumulate in float64 on the
  compute device, each batch's contribution computed in float64;
* fits run on the compute device as the linalg code does: weights in float32, whitening, refit
  targets and factor maps in float64, SVDs of float64 matrices; the fitted layer is stored in the
  model's dtype.

A bf16 model therefore differs from its float32 twin (the same weights upcast) only through the bf16
forward passes that produce the activations (tested: same ranks, activation-weighted error within a
few percent).
"""
from __future__ import annotations

import torch

from ...errors import ConfigError

#: ``--dtype`` names.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``None``/``"auto"`` (the checkpoint's dtype), a name of :data:`DTYPES`, or a ``torch.dtype``."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).lower().replace("torch.", "")
    if key == "auto":
        return None
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use auto (the checkpoint's), float32, bfloat16 or float16")
    return DTYPES[key]


def resolve_device(spec: str | torch.device) -> torch.device:
    """The ``torch.device`` of ``--device`` (``cpu``, ``cuda``, ``cuda:N``), checked to exist here."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {spec!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        mod = getattr(torch, device.type, None)
        if mod is None or not hasattr(mod, "is_available") or not mod.is_available():
            raise ConfigError(f"device {spec!r} is not available in this torch build; use cpu or cuda[:N]")
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: no CUDA GPU is visible to this torch build "
                          f"(torch {torch.__version__}); use --device cpu, or install a CUDA build of torch "
                          "and check CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"--device {spec}: only {count} GPU(s) visible (cuda:0 .. cuda:{count - 1}); "
                          "pick one of those or fix CUDA_VISIBLE_DEVICES")
    return device


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """ConfigError unless ``device`` computes in ``dtype`` (a matmul is tried; bf16 needs sm80+ on CUDA)."""
    name = str(dtype).replace("torch.", "")
    if not dtype.is_floating_point:
        raise ConfigError(f"models compress in a floating dtype, got {name}; use --dtype float32, bfloat16 or float16")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError(f"--device {device}: this GPU has no native bfloat16; use --dtype float16 or float32")
    try:
        a = torch.ones(2, 2, device=device, dtype=dtype)
        (a @ a).sum().item()
    except (RuntimeError, TypeError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"device {device} cannot compute in {name} ({first[:120]}); use --dtype float32 "
                          "(or bfloat16 / float16 where the device supports them)") from None


def compute_device(spec: str | torch.device, dtype: torch.dtype | None = None) -> torch.device:
    """:func:`resolve_device` then, if given, :func:`check_dtype`."""
    device = resolve_device(spec)
    if dtype is not None:
        check_dtype(device, dtype)
    return device


__all__ = ["DTYPES", "check_dtype", "compute_device", "parse_dtype", "resolve_device"]
