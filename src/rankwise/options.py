"""Typed options: every configurable part of rankwise takes a dataclass, built from a dict or keywords."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .errors import ConfigError


def make_options(cls: type, options: Any, kwargs: Mapping[str, Any], owner: str) -> Any:
    """``cls`` built from an instance, a dict and/or keyword arguments; unknown keys raise ConfigError."""
    if isinstance(options, cls) and not kwargs:
        return options
    base = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options or {})
    base.update(kwargs)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(base) - fields)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {owner or cls.__name__}; valid: {sorted(fields) or 'none'}")
    try:
        return cls(**base)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad options for {owner or cls.__name__}: {e}") from None
