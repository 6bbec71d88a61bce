"""Measuring layers: ``layer.time_layer`` (used by ``mosa bench`` and the benchmark scripts)."""
from .layer import Timing, time_layer

__all__ = ["Timing", "time_layer"]
