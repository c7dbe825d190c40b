"""Model surgery and loading: everything that walks a model lives here."""
from .loading import load_model, load_tokenizer
from .registry import BUILTIN_MODELS, DEFAULT_MODEL, builtin_status, resolve_model
from .surgery import (
    decoder_blocks, find_linears, find_modules, get_module, is_linear, layer_index,
    linear_bias, linear_shape, linear_weight, module_type, set_module, to_linear,
)

__all__ = [
    "BUILTIN_MODELS", "DEFAULT_MODEL", "builtin_status", "decoder_blocks", "find_modules",
    "find_linears", "get_module", "is_linear", "layer_index", "linear_bias", "linear_shape",
    "linear_weight", "load_model", "load_tokenizer", "module_type", "resolve_model",
    "set_module", "to_linear",
]
