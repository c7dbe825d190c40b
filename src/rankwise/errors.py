"""Error types. Every user-facing failure is a RankwiseError with what went wrong and how to fix it."""
from __future__ import annotations


class RankwiseError(Exception):
    """Base class: a problem the user can fix. The message says what and how."""


class ModelNotFoundError(RankwiseError):
    """Unknown built-in model name, or a path that is not a model directory."""


class CorpusError(RankwiseError):
    """Missing/unreadable text, or text too short for the requested windows."""


class ConfigError(RankwiseError):
    """An option out of range (ratio, rank, seqlen, method name, ...)."""


class UnknownMethodError(ConfigError):
    """A method / init / metric / allocator name that is not in its registry."""


class NumericalError(RankwiseError):
    """Non-finite weights or activations, or a factorization that cannot be computed."""


class NoTargetLayersError(RankwiseError):
    """A model (or pattern) that selects no supported linear layer."""


class ArtifactError(RankwiseError):
    """A saved rankwise artifact is corrupted, incomplete, or does not match its config."""


class OutputExistsError(RankwiseError):
    """Refusing to overwrite an existing output directory without --overwrite."""


class UnsupportedArchitectureError(ConfigError):
    """A model-level transform (e.g. rotating the residual stream) that the model's architecture cannot take."""
