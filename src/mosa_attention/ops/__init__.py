"""Functional math. Every operator has a plain-torch reference; fast kernels share its signature."""
from .attention import (causal_attention, linear_sharing_input, local_attention, local_attention_reference, project_qkv,
                        sliding_window_mask)
from .combine import add_at_rows
from .mosa import BACKENDS, mosa, resolve_backend, sparse_attention, sparse_attention_reference
from .rope import apply_rope, rope_cos_sin, rope_dims_for, rotate_half
from .routing import num_selected, router_scores, select_topk, strided_positions

__all__ = [
    "BACKENDS", "add_at_rows", "apply_rope", "causal_attention", "linear_sharing_input", "local_attention",
    "local_attention_reference", "mosa", "num_selected",
    "project_qkv", "resolve_backend", "rope_cos_sin", "rope_dims_for", "rotate_half", "router_scores",
    "select_topk", "sliding_window_mask", "sparse_attention", "sparse_attention_reference", "strided_positions",
]
