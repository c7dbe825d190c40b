"""Exports: rankwise models written in the formats the runtimes users serve with read.

``rankwise.export(model_or_dir, format, out)`` / ``rankwise export IN_DIR --format FORMAT --out DIR``.
The formats are registered in :data:`FORMATS` (one module each in :mod:`rankwise.export.formats`);
the writer interface is :class:`~rankwise.export.base.Format` (see :mod:`rankwise.export.base`), the
streaming sources are in :mod:`rankwise.export.source`, the sharded safetensors writer in
:mod:`rankwise.export.shards`.

This package shares its name with the API verb ``rankwise.export(...)``: once the package is imported,
``rankwise.export`` *is* this module, so the module is callable (calling it calls :func:`export`).
"""
from __future__ import annotations

import sys
import types

from .base import FORMATS, ExportContext, ExportResult, Format, UnsupportedExportError
from .run import export


class _CallableModule(types.ModuleType):
    """``rankwise.export(...)`` keeps working after ``import rankwise.export`` made the name the package."""

    def __call__(self, *args, **kwargs) -> ExportResult:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["ExportContext", "ExportResult", "FORMATS", "Format", "UnsupportedExportError", "export"]
