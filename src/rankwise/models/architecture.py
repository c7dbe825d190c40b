"""Which transformers class a model is: recorded by name when saving, resolved back safely when loading.

A saved model records ``model_class`` (``type(model).__name__``, e.g. ``BertModel``,
``BertForSequenceClassification``, ``LlamaForCausalLM``, ``T5ForConditionalGeneration``) in
``rankwise.json`` and as ``architectures`` in ``config.json`` (what ``save_pretrained`` writes).
Loading rebuilds exactly that class. A name is resolved only as a model class that transformers
itself exports (``transformers.<Name>``, a :class:`~transformers.PreTrainedModel` subclass defined
inside ``transformers.models``, whose ``config_class`` matches the saved config): no other module
is imported, no pickle is read, no remote code runs. A directory without the record (written before
it existed) rebuilds as the causal LM of its config, as it always did.
"""
from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..errors import ArtifactError, ConfigError

_NAME = re.compile(r"[A-Z][A-Za-z0-9_]*\Z")


def class_name(model: nn.Module) -> str | None:
    """The name under which :func:`resolve_class` finds ``type(model)`` again, or None when the model is not
    a transformers model class (a custom ``nn.Module``, a remote-code class)."""
    cls = type(model)
    try:
        return cls.__name__ if _transformers_class(cls.__name__) is cls else None
    except ArtifactError:
        return None


def _transformers_class(name: str) -> type:
    import transformers
    from transformers import PreTrainedModel

    if not isinstance(name, str) or not _NAME.match(name):
        raise ArtifactError(f"{name!r} is not a transformers model class name")
    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)
            and cls.__module__.startswith("transformers.models.")):
        raise ArtifactError(f"{name!r} is not a model class of transformers {transformers.__version__}")
    return cls


def resolve_class(name: str, config: Any, where: str = "the saved model") -> type:
    """The transformers model class called ``name``, checked against ``config`` (see the module doc).

    Raises :class:`ArtifactError` naming the fix when ``name`` is not such a class or does not fit the config.
    """
    try:
        cls = _transformers_class(name)
    except ArtifactError as e:
        raise ArtifactError(f"{where} records model class {name!r}, which rankwise cannot rebuild ({e}); "
                            "upgrade transformers, or re-save the model with this version") from None
    want = getattr(cls, "config_class", None)
    if want is not None and not isinstance(config, want):
        raise ArtifactError(f"{where} records model class {name!r}, which needs a {want.__name__} but config.json "
                            f"holds a {type(config).__name__}; the directory is inconsistent -- re-save the model")
    return cls


def config_class(config: Any) -> type | None:
    """The class ``config.architectures`` names (what ``save_pretrained`` wrote), or None when it names none
    that :func:`resolve_class` accepts (no entry, a remote-code class, a class this transformers lacks)."""
    names = getattr(config, "architectures", None) or []
    if len(names) != 1:
        return None
    try:
        return resolve_class(names[0], config)
    except ArtifactError:
        return None


def record(model: nn.Module) -> dict[str, str]:
    """What a saved directory's manifest records of the model's class: ``{"model_class": name}`` (or ``{}``)."""
    name = class_name(model)
    return {} if name is None else {"model_class": name}


def is_language_model(model: nn.Module) -> bool:
    """False for a transformers model whose ``model(input_ids).logits`` does not score the next token (a bare
    encoder, a masked LM, a classifier, an encoder-decoder): it cannot ``generate`` as a decoder-only model.
    Any other module (not a transformers model) is taken at its word: True."""
    can = getattr(model, "can_generate", None)
    if not callable(can):
        return True
    enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    return bool(can()) and not enc_dec


def check_language_model(model: nn.Module, purpose: str) -> None:
    """Raise :class:`ConfigError` when ``model`` is a transformers model that is not a causal LM
    (``purpose``: what needs one, e.g. ``"perplexity"``)."""
    if not is_language_model(model):
        raise ConfigError(f"{purpose} needs a causal language model, but this is a {type(model).__name__} "
                          "(an encoder, a classifier or a sequence-to-sequence model); pass a causal LM, such as "
                          "the built-in smollm2-135m-instruct")


__all__ = ["check_language_model", "class_name", "config_class", "is_language_model", "record", "resolve_class"]
