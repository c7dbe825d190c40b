"""Compression methods: one module per method, registered in :data:`.base.STRUCTURES`."""
from .lowrank import METHODS, CompressionMethod, get_method, truncate  # noqa: F401  (engine rewrite in progress)
from ...calibration.stats import ABS_MEAN, COV, FISHER, LayerStats  # noqa: F401
