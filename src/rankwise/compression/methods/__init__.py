"""Compression methods: one module per method, registered in :data:`.base.STRUCTURES` (``--structure``).

See :mod:`.base` for the interface; :mod:`.lowrank` is the reference implementation.
"""
from .base import STRUCTURES, LayerInput, Method, get_method

__all__ = ["LayerInput", "Method", "STRUCTURES", "get_method"]
