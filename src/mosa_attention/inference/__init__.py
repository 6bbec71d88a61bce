"""Generation with MoSA: causal routing, a per-head sparse KV cache, sampling, and the `mosa generate` command."""
from .cache import DenseCache, KVCache, RingCache, SparseCache
from .decode import extend, new_cache
from .generate import RoutingWarning, generate
from .routing import calibrate_thresholds, routing_mode, routing_report, set_routing
from .sampling import check_sampling, sample
from .static import StaticDecoder

__all__ = [
    "DenseCache", "KVCache", "RingCache", "RoutingWarning", "SparseCache", "StaticDecoder", "calibrate_thresholds",
    "check_sampling", "extend", "generate", "new_cache", "routing_mode", "routing_report", "sample", "set_routing",
]
