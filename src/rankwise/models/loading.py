"""Load a model and its tokenizer from a built-in name or a local directory, as the class it was saved as.

* a rankwise directory (``rankwise.json``): :func:`~rankwise.models.saved.load_structured` (the recorded
  ``model_class``);
* a plain transformers directory: the class ``config.json``'s ``architectures`` names when transformers has
  it (:func:`~rankwise.models.architecture.config_class`: a ``BertModel`` stays a ``BertModel``), else the
  causal LM of its config;
* a remote-code directory (``auto_map`` in ``config.json``, e.g. rankwise's remote-code export): only with
  ``trust_remote_code=True``, through the auto class its ``auto_map`` names;
* a directory with a PEFT adapter in ``adapter/`` (rankwise's compressed-tensors-lora export): the base
  (de-quantized as it loads when it is compressed-tensors) with the adapter merged in (needs peft);
* a GGUF file, or a directory holding one GGUF file and no ``config.json`` (rankwise's gguf export):
  transformers' GGUF reader, which de-quantizes the weights to ``dtype``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..errors import ConfigError, ModelNotFoundError
from .architecture import config_class
from .offline import hub_offline
from .registry import resolve_model
from .saved import is_structured_dir, load_structured

log = logging.getLogger(__name__)


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    with hub_offline():
        # never the directory's own code (a remote-code export's tokenizer is a standard one)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    tok.model_max_length = int(1e9)  # we cut windows ourselves; silence length warnings
    return tok


#: The auto classes a remote-code ``auto_map`` may name, in the order one is picked.
_REMOTE_AUTO = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForSequenceClassification", "AutoModel")


def remote_code_map(path: str | os.PathLike) -> dict | None:
    """``config.json``'s ``auto_map`` (the directory ships its own modeling code), or None."""
    try:
        auto_map = json.loads((Path(path) / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return None
    return auto_map if isinstance(auto_map, dict) and auto_map else None


#: Where a base directory keeps its PEFT adapter (the compressed-tensors-lora export).
ADAPTER_DIR = "adapter"


def _with_adapter(cls, path: Path, config, adapter: Path, dtype: torch.dtype):
    """The base at ``path`` with the PEFT LoRA adapter ``adapter`` merged into its weights."""
    try:
        from peft import PeftModel
    except ImportError as e:
        raise ConfigError(f"{path} holds a PEFT adapter in {ADAPTER_DIR}/; loading it needs peft (pip install peft)") \
            from e
    kw = {}
    quant = getattr(config, "quantization_config", None)
    if isinstance(quant, dict) and quant.get("quant_method") == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)  # PEFT wraps nn.Linear layers
    base = cls.from_pretrained(str(path), config=config, dtype=dtype, local_files_only=True, **kw)
    return PeftModel.from_pretrained(base, str(adapter), is_trainable=False).merge_and_unload()


def _load_plain(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    auto_map = remote_code_map(path)
    if auto_map is not None and not trust_remote_code:
        raise ConfigError(f"{path} ships its own modeling code (auto_map in config.json: a remote-code export); "
                          "if you trust that directory, load it with trust_remote_code=True (CLI: --trust-remote-code)")
    try:
        with hub_offline():
            if auto_map is not None:
                name = next((a for a in _REMOTE_AUTO if a in auto_map), None)
                if name is None:
                    raise ConfigError(f"{path}/config.json: auto_map names none of {', '.join(_REMOTE_AUTO)}; "
                                      "it is not a model directory rankwise can load")
                return getattr(transformers, name).from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                                   trust_remote_code=True)
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            cls = config_class(config) or AutoModelForCausalLM
            adapter = path / ADAPTER_DIR
            if not (adapter / "adapter_config.json").is_file():
                return cls.from_pretrained(str(path), config=config, dtype=dtype, local_files_only=True)
            return _with_adapter(cls, path, config, adapter, dtype)
    except ImportError as e:
        raise ConfigError(f"loading {path} needs a package that is not installed ({e}); install it and retry") from e
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(
            f"could not load a model from {path}: {e}. Pass a directory written by "
            "save_pretrained (config.json + safetensors weights) or a built-in model name."
        ) from e


def gguf_file(name_or_path) -> Path | None:
    """The GGUF file to load for ``name_or_path``: the path itself when it is a ``.gguf`` file, the single
    ``.gguf`` file of a directory without ``config.json`` (the first shard when split), else None."""
    if name_or_path is None:
        return None
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(p.glob("*.gguf"))
        if len(found) > 1:
            first = [f for f in found if "-00001-of-" in f.name]
            if len(first) != 1:
                raise ModelNotFoundError(f"{p} holds several GGUF files ({', '.join(f.name for f in found[:4])}); "
                                         "pass the one to load")
            found = first
        return found[0] if found else None
    return None


def _load_gguf(file: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with hub_offline():
            model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=dtype,
                                                         local_files_only=True)
            tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name, local_files_only=True)
    except ImportError as e:
        raise ConfigError(f"loading {file} needs a package that is not installed ({e}); install it and retry") from e
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelNotFoundError(f"transformers could not load the GGUF file {file} ({type(e).__name__}: {e}); "
                                 "it reads Llama-family GGUF files of the common quantization types") from e
    tok.model_max_length = int(1e9)
    return model, tok


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Return ``(model, tokenizer, path)`` for a built-in name or a local HF directory (see the module doc).

    A directory written by ``rankwise compress`` (it holds ``rankwise.json``) is rebuilt with its
    structured layers; ``trust_remote_code`` allows a directory that ships its own modeling code.
    """
    gguf = gguf_file(name_or_path)
    if gguf is not None:
        model, tok = _load_gguf(gguf, dtype)
        return model.to(device).eval(), tok, gguf
    path = resolve_model(name_or_path)
    if is_structured_dir(path):
        model = load_structured(path, dtype=dtype)
    else:
        model = _load_plain(Path(path), dtype, trust_remote_code)
    model.to(device).eval()
    try:
        tok = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(
            f"{path} has no usable tokenizer ({e}); save the tokenizer next to the model "
            "(tokenizer.save_pretrained(dir))."
        ) from e
    return model, tok, Path(path)
