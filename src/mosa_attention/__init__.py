"""mosa-attention: Mixture of Sparse Attention (arXiv 2505.00315) for PyTorch."""
from . import ops
from .flops import head_flops, match_sparse_heads, model_flops
from .layers import (DenseAttention, FixedSparseAttention, LocalAttention, MoSAAttention, RoutingAttention,
                     load_official_state_dict)
from .models import MoSAConfig, MoSALM

__version__ = "0.1.0"
__all__ = [
    "DenseAttention", "FixedSparseAttention", "LocalAttention", "MoSAAttention", "MoSAConfig", "MoSALM",
    "RoutingAttention", "head_flops", "load_official_state_dict", "match_sparse_heads", "model_flops", "ops",
]
