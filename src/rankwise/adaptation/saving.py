"""Save and load adapters: PEFT's LoRA format, rankwise's own format, or a merged dense checkpoint.

PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r)) for plain-LoRA
results: lora, eva (``Delta W_0 = 0``) and the residual inits pissa, milora, olora, lora-ga. A residual
init trained to ``(A, B)`` from ``(A0, B0)`` on ``W_res = W - s B0 A0`` equals, on the ORIGINAL ``W``,
the plain LoRA of doubled rank (PEFT's conversion)::

    W_res + s B A = W + s [B | -B0] [A ; A0],   r' = 2r,  alpha' = 2 alpha  (rslora: sqrt(2) alpha)

which is the default export (``form="original"``). ``form="residual"`` writes the rank-r adapter plus
the residual base model under ``residual_base/``.

Quantized bases (``lq-lora``, ``loftq``): the frozen base is ``Q ~ W - Delta W_0``, not equal to it, so
the conversion onto the original ``W`` would change the model; only ``form="residual"`` is exact.
PEFT cannot load rankwise's packed ``QuantLinear`` (it wraps ``nn.Linear``, ``Conv1D`` and the
layers of bitsandbytes, GPTQ, AWQ, HQQ, ...): ``residual_base/`` holds the *de-quantized* base
``dequant(Q)`` as a plain transformers checkpoint, so ``PeftModel.from_pretrained(residual_base,
adapter)`` computes the same function as the rankwise model (in float32, not in 4 bits).

rankwise format (every init): ``adapt.json`` + ``adapter.safetensors`` with the trained tensors
``<module>.<tensor>`` and, for residual inits, the initial ones ``init.<module>.<tensor>``; loading onto
the original model subtracts ``Delta W_0`` again.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..files import atomic_dir, write_json
from ..errors import ArtifactError, ConfigError
from ..export.peft import lora_state, write_lora
from ..models.surgery import set_module
from ..structures.base import StructuredLinear
from ..structures.lowrank import LowRankLinear
from .attach import META_ATTR, merge_and_unload
from .inits import INITS
from .layers import (
    BMAAdapter, LDUAdapter, LoraAdapter, SaltAdapter, SBAdapter, SingAdapter, AdapterLayer, adapter_layers,
    add_to_base, is_conv1d,
)

FORMAT = "rankwise-adapter"


def peft_inits() -> list[str]:
    """The inits whose result is a plain LoRA PEFT can load (``InitSpec.peft``)."""
    return [name for name, spec in INITS.items() if spec.peft]


def _meta(model: nn.Module) -> dict:
    meta = getattr(model, META_ATTR, None)
    if meta is None or not adapter_layers(model):
        raise ConfigError("the model has no rankwise adapters; call rankwise.adapt(model, ...) first")
    return meta


def _check_peft(model: nn.Module, meta: dict) -> dict[str, LoraAdapter]:
    layers = adapter_layers(model)
    bad = [n for n, a in layers.items() if not isinstance(a, LoraAdapter)]
    if meta["init"] not in peft_inits() or bad:
        raise ConfigError(
            f"init {meta['init']!r} is not a plain LoRA (B A) and PEFT's format cannot represent it; "
            f"save it in rankwise's format (format='rankwise', CLI default for it) or merge it into a dense "
            f"checkpoint (--merge). PEFT-exportable inits: {', '.join(peft_inits())}")
    low = [n for n, a in layers.items() if isinstance(a.base, LowRankLinear)]
    if low:
        raise ConfigError(
            f"adapters on factorized (LowRankLinear) layers such as {low[0]} cannot be loaded by PEFT; "
            "save in rankwise's format (format='rankwise') or merge (--merge)")
    return layers  # type: ignore[return-value]


def peft_state(model: nn.Module, form: str = "original") -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, adapter_config)`` of the PEFT export; see the module docstring for ``form``."""
    meta = _meta(model)
    layers = _check_peft(model, meta)
    if form not in ("original", "residual"):
        raise ConfigError(f"unknown PEFT export form {form!r}; use 'original' or 'residual'")
    quant = [n for n, a in layers.items() if _quantized_base(a)]
    if quant and form == "original":
        raise ConfigError(
            f"the adapters sit on a quantized base (e.g. {quant[0]}) that only approximates W - Delta W_0, so PEFT's "
            "conversion onto the original weights would change the model; export form='residual' (--peft-form "
            "residual): the rank-r adapter plus residual_base/, the de-quantized base as a transformers checkpoint")
    convert = meta["residual"] and form == "original"
    rslora = bool(meta["rslora"])
    factors, alphas = {}, {}
    for name, a in layers.items():
        A, B = a.lora_A.detach().float(), a.lora_B.detach().float()
        r = a.rank
        alpha = a.scaling * (math.sqrt(r) if rslora else r)
        if convert:
            A = torch.cat([A, a.init_state["lora_A"].float()], 0)
            B = torch.cat([B, -a.init_state["lora_B"].float()], 1)
            alpha = alpha * (math.sqrt(2) if rslora else 2)
        factors[name], alphas[name] = (A, B), alpha
    return lora_state(factors, alphas, rslora=rslora, fan_in_fan_out=any(is_conv1d(a.base) for a in layers.values()),
                      base_model=meta.get("base_model"))


def _peft_provenance(model: nn.Module, form: str) -> dict:
    """What rankwise adds beside a PEFT export (its own file: PEFT warns on unknown config keys)."""
    meta = _meta(model)
    return {"init": meta["init"], "form": form if meta["residual"] else "plain", "rank": meta["rank"]}


def _quantized_base(a: AdapterLayer) -> bool:
    return isinstance(a.base, StructuredLinear) and not isinstance(a.base, LowRankLinear)


def _model_without_adapters(model: nn.Module) -> nn.Module:
    """A deep copy with each adapter replaced by its (possibly residual) base: the residual base model.
    A quantized base is de-quantized into an ``nn.Linear`` (a plain transformers checkpoint)."""
    m = copy.deepcopy(model)
    for name, a in adapter_layers(m).items():
        if a.merged:
            a.unmerge()
        set_module(m, name, a.base.to_linear() if _quantized_base(a) else a.base)
    if hasattr(m, META_ATTR):
        delattr(m, META_ATTR)
    return m


def save_peft(model: nn.Module, out: str | os.PathLike, form: str = "original", tokenizer=None,
              overwrite: bool = False, extra: Callable[[Path], None] | None = None) -> Path:
    """Write a PEFT LoRA adapter directory that ``PeftModel.from_pretrained(base, out)`` loads.

    ``extra(tmp_dir)`` may add files (training logs) inside the atomic output directory.
    """
    tensors, config = peft_state(model, form)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if extra is not None:
            extra(tmp)
        write_lora(tmp, tensors, config)
        write_json(tmp / "rankwise_adapter.json", _peft_provenance(model, form))
        if form == "residual" and _meta(model)["residual"]:
            res = _model_without_adapters(model)
            res.save_pretrained(tmp / "residual_base", safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "residual_base")
    return Path(out)


# ---- rankwise's own format --------------------------------------------------------------------

def _layer_meta(a: AdapterLayer) -> dict:
    d = {"kind": a.kind, "scaling": a.scaling, "shape": [a.out_features, a.in_features]}
    if isinstance(a, BMAAdapter):
        d["train_outer"] = bool(a.A.requires_grad)
    if isinstance(a, SingAdapter):
        d["ramp_steps"] = a.ramp_steps
    return d


def save_rankwise(model: nn.Module, out: str | os.PathLike, overwrite: bool = False,
                  extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``adapt.json`` + ``adapter.safetensors`` (any init); :func:`load_rankwise` reverses it."""
    from safetensors.torch import save_file

    meta = _meta(model)
    layers = adapter_layers(model)
    if any(_quantized_base(a) for a in layers.values()):
        raise ConfigError("rankwise's adapter format reloads adapters onto the original dense model; adapters on a "
                          "quantized base (lq-lora, loftq) export to PEFT's format with form='residual' (adapter + "
                          "de-quantized residual_base/) or merge into a dense checkpoint (--merge)")
    tensors = {}
    for name, a in layers.items():
        for k, v in a.adapter_state().items():
            tensors[f"{name}.{k}"] = v.float().contiguous().cpu()
        if meta["residual"]:
            for k, v in a.init_state.items():
                tensors[f"init.{name}.{k}"] = v.float().contiguous().cpu()
    config = {"format": FORMAT, "version": 1, **meta, "layers": {n: _layer_meta(a) for n, a in layers.items()}}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if extra is not None:
            extra(tmp)
        save_file(tensors, str(tmp / "adapter.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "adapt.json", config)
    return Path(out)


def _build(kind: str, base: nn.Module, t: dict[str, torch.Tensor], lm: dict) -> AdapterLayer:
    s = lm["scaling"]
    if kind == "lora":
        return LoraAdapter(base, t["lora_A"], t["lora_B"], s)
    if kind == "sb":
        return SBAdapter(base, t["A"], t["B"], t["R"], s)
    if kind == "bma":
        return BMAAdapter(base, t["A"], t["M"], t["B"], s, train_outer=lm.get("train_outer", True))
    if kind == "ldu":
        return LDUAdapter(base, t["L"], t["d"], t["U"])
    if kind == "salt":
        a = SaltAdapter(base, t["Ur"], t["sigma"], t["Vh"], t["lora_A"], t["lora_B"], s)
        with torch.no_grad():
            a.scale.copy_(t["scale"])
            a.shift.copy_(t["shift"])
        return a
    if kind == "sing":
        a = SingAdapter(base, t["A"], s, lm.get("ramp_steps", 0))
        a.ramp.fill_(float(t["ramp"]))
        return a
    raise ArtifactError(f"unknown adapter kind {kind!r} in adapt.json")


def load_rankwise(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Attach the adapters saved by :func:`save_rankwise` to the ORIGINAL base ``model`` (in place)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, st_file = path / "adapt.json", path / "adapter.safetensors"
    if not cfg_file.is_file() or not st_file.is_file():
        raise ArtifactError(f"{path} is not a rankwise adapter directory (needs adapt.json and adapter.safetensors)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("format") != FORMAT:
        raise ArtifactError(f"{cfg_file} is not a rankwise adapter config (format={cfg.get('format')!r})")
    tensors = load_file(str(st_file))
    for name, lm in cfg["layers"].items():
        try:
            base = model.get_submodule(name)
        except AttributeError as e:
            raise ArtifactError(f"the model has no layer {name!r} that the adapter in {path} targets") from e
        trained = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        if cfg.get("residual"):
            init = {k[len(name) + 6:]: v for k, v in tensors.items() if k.startswith(f"init.{name}.")}
            a = _build(lm["kind"], base, init, lm)
            if [a.out_features, a.in_features] != lm["shape"]:
                raise ArtifactError(f"layer {name} has shape {[a.out_features, a.in_features]}, adapter expects {lm['shape']}")
            add_to_base(base, a.delta(), -1.0)
            with torch.no_grad():
                for k, v in trained.items():
                    getattr(a, k).copy_(v) if k != "ramp" else a.ramp.fill_(float(v))
        else:
            a = _build(lm["kind"], base, trained, lm)
        a.init_state = {k[len(name) + 6:]: v for k, v in tensors.items() if k.startswith(f"init.{name}.")} or \
            {k: v.clone() for k, v in a.adapter_state().items()}
        w = next(base.parameters())
        set_module(model, name, a.to(w.device))
    keep = {id(p) for a in adapter_layers(model).values() for n, p in a.named_parameters()
            if not n.startswith("base.") and p.requires_grad}   # as constructed (IntTune freezes A, B)
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    setattr(model, META_ATTR, {k: cfg[k] for k in ("init", "rank", "alpha", "rslora", "seed", "svd", "targets",
                                                  "ranks", "residual", "options") if k in cfg})
    return model


def save_merged(model: nn.Module, out: str | os.PathLike, tokenizer=None, overwrite: bool = False,
                extra: Callable[[Path], None] | None = None) -> Path:
    """Fold the adapters into the weights of a copy of ``model`` and save it: a plain transformers
    checkpoint, or for a compressed model a rankwise compressed checkpoint with rank-(k + r) layers
    (``rankwise.load_model`` reads both)."""
    merged = merge_and_unload(copy.deepcopy(model))
    for p in merged.parameters():
        p.requires_grad_(True)
    if any(isinstance(m, LowRankLinear) for m in merged.modules()):
        from ..models.saved import save_structured

        return save_structured(merged, out, tokenizer, overwrite=overwrite, extra={"healed": True}, after=extra)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if extra is not None:
            extra(tmp)
        merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)
