"""Model surgery and loading: everything that walks a model lives here.

The names below are imported on first use, so that ``rankwise.models.registry`` (the built-in model
table and its cache check, used by ``rankwise models``) does not pull in torch and transformers.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "load_model": "loading", "load_tokenizer": "loading",
    "BUILTIN_MODELS": "registry", "DEFAULT_MODEL": "registry", "builtin_status": "registry",
    "resolve_model": "registry",
    **{n: "surgery" for n in (
        "decoder_blocks", "find_linears", "find_modules", "get_module", "is_linear", "layer_index",
        "linear_bias", "linear_shape", "linear_weight", "module_type", "set_module", "to_linear")},
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = sorted(_WHERE)
