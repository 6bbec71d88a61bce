"""nn.Modules: the MoSA layer, its baselines and the transformer block."""
from .dense import DenseAttention, LocalAttention
from .mosa import MoSAAttention
from .official import load_official_state_dict
from .sparse import FixedSparseAttention, RoutingAttention

__all__ = ["DenseAttention", "FixedSparseAttention", "LocalAttention", "MoSAAttention", "RoutingAttention",
           "load_official_state_dict"]
