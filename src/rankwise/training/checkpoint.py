"""Resumable training checkpoints without pickle: safetensors + JSON, replaced atomically.

A checkpoint directory holds ``model.safetensors`` (the model's state, shared tensors once),
``optimizer.safetensors`` (every optimizer state tensor as ``state.<param index>.<key>``) and
``trainer.json``: the step reached, the loss curve, the optimizer's param-group hyperparameters, the
scheduler's state and the run's *fingerprint* (everything that fixes the trajectory: model source,
structure, init, optimizer and its options, learning rate, batch, seed, ...). Resuming checks the
fingerprint first and names every difference; batches are a function of ``(seed, step)``, so a
resumed run continues exactly where the interrupted one stopped.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError, ConfigError
from ..files import atomic_dir, write_json
from ..models.saved import dedup_state

TRAINER = "trainer.json"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    step: int, losses: list[float], fingerprint: dict[str, Any]) -> Path:
    """Write (replace) the checkpoint at ``path`` atomically."""
    from safetensors.torch import save_file

    state, aliases = dedup_state(model.state_dict())
    osd = optimizer.state_dict()
    tensors, plain = {}, {}
    for pid, st in osd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = v.detach().contiguous()
            else:
                plain.setdefault(str(pid), {})[key] = v
    meta = {"step": int(step), "losses": list(losses), "fingerprint": fingerprint, "aliases": aliases,
            "param_groups": osd["param_groups"], "plain_state": plain,
            "scheduler": scheduler.state_dict() if scheduler is not None else None}
    with atomic_dir(path, overwrite=True) as tmp:
        save_file(state, str(tmp / MODEL))
        save_file(tensors, str(tmp / OPTIMIZER))
        write_json(tmp / TRAINER, meta)
    return Path(path)


def read_trainer(path: str | os.PathLike) -> dict[str, Any]:
    f = Path(path) / TRAINER
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is not a training checkpoint ({TRAINER} is missing); drop --resume or pass the "
                            "checkpoint directory a run wrote with --checkpoint-every") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{f} is unreadable ({e}); the checkpoint is corrupted") from None


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``["rank: checkpoint 8, this run 16", ...]`` for every key that differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{key}: checkpoint {a!r}, this run {b!r}")
    return out


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    fingerprint: dict[str, Any]) -> tuple[int, list[float]]:
    """Restore model, optimizer and scheduler from ``path``; returns ``(step, losses)``. A checkpoint of
    another configuration is a :class:`ConfigError` naming the differences (nothing is loaded then)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_trainer(path)
    diff = fingerprint_differences(meta.get("fingerprint", {}), fingerprint)
    if diff:
        raise ConfigError(f"checkpoint {path} is of another configuration ({'; '.join(diff)}); resume with the "
                          "same options or start a new run (another --out, or drop --resume)")
    try:
        state = load_file(str(Path(path) / MODEL))
        tensors = load_file(str(Path(path) / OPTIMIZER))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise ArtifactError(f"checkpoint {path} is incomplete or corrupted ({e})") from None
    for dropped, kept in meta.get("aliases", {}).items():
        state[dropped] = state[kept]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"checkpoint {path} does not fit the model: missing {missing[:4]}, unexpected "
                            f"{unexpected[:4]}")
    st: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        st.setdefault(int(pid), {})[name] = v
    for pid, extra in meta.get("plain_state", {}).items():
        st.setdefault(int(pid), {}).update(extra)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": st, "param_groups": groups})
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    return int(meta["step"]), list(meta.get("losses", []))
