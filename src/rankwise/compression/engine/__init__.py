"""The one block-sequential engine: :class:`Engine` over a :class:`WeightSource` (see :mod:`.loop`)."""
from .loop import Engine, EngineOptions
from .source import ModelSource, StreamedSource, WeightSource

__all__ = ["Engine", "EngineOptions", "ModelSource", "StreamedSource", "WeightSource"]
