"""FLOP accounting with the MoSA paper's formulas, and FLOP matching of sparse head counts.

Per head, with model width h, head width h', sequence length T, sparsity ρ and k = max(min(T // ρ, T), 2):
  dense    8hh'T + 4h'T²
  mosa     8hh'k + 4h'k² + 2hT + h'k     (projections of the k kept tokens, attention, router, score scaling)
  fixed    8hh'k + 4h'k²
  routing  ρ(6hh'k + 4h'k²) + 2h'T
  local    8hh'T + 4h'Tk                 (not in the paper: each query attends to a window of k keys)
A model adds 16·l·h²·T for its feed-forward layers (width 4h). Everything counts one forward pass of one
sequence; embeddings and the output layer are left out, as in the paper.
"""
from __future__ import annotations

from .ops.routing import check_sparsity, num_selected

HEAD_KINDS = ("dense", "mosa", "fixed", "routing", "local")


def head_flops(kind: str, d_model: int, head_dim: int, seq_len: int, sparsity: float = 1.0) -> float:
    """Forward FLOPs of one attention head of ``kind`` over one sequence."""
    h, d, T = d_model, head_dim, seq_len
    k = num_selected(T, check_sparsity(sparsity))
    if kind == "dense":
        return 8 * h * d * T + 4 * d * T * T
    if kind == "mosa":
        return 8 * h * d * k + 4 * d * k * k + 2 * h * T + d * k
    if kind == "fixed":
        return 8 * h * d * k + 4 * d * k * k
    if kind == "routing":
        return sparsity * (6 * h * d * k + 4 * d * k * k) + 2 * d * T
    if kind == "local":
        return 8 * h * d * T + 4 * d * T * k
    raise ValueError(f"kind must be one of {HEAD_KINDS}, got kind={kind!r}")


def model_flops(n_layer: int, d_model: int, head_dim: int, seq_len: int, heads: dict[str, int],
                sparsity: float = 1.0) -> float:
    """Forward FLOPs of a model whose every layer has ``heads`` (kind -> count) plus a 4h feed-forward."""
    attn = sum(n * head_flops(kind, d_model, head_dim, seq_len, sparsity) for kind, n in heads.items() if n)
    return n_layer * attn + 16 * n_layer * d_model * d_model * seq_len


def match_sparse_heads(kind: str, d_model: int, n_head: int, head_dim: int, seq_len: int, sparsity: float,
                       num_dense_heads: int = 0) -> int:
    """The largest number of ``kind`` heads that, beside ``num_dense_heads`` dense heads, costs no more
    FLOPs than ``n_head`` dense heads. The feed-forward layers are equal on both sides, so they cancel."""
    if not 0 <= num_dense_heads <= n_head:
        raise ValueError(f"num_dense_heads must be in [0, n_head={n_head}], got num_dense_heads={num_dense_heads}")
    dense = head_flops("dense", d_model, head_dim, seq_len)
    budget = (n_head - num_dense_heads) * dense
    per_head = head_flops(kind, d_model, head_dim, seq_len, sparsity)
    n = int(budget // per_head)
    while (n + 1) * per_head <= budget:  # guard against float rounding
        n += 1
    while n > 0 and n * per_head > budget:
        n -= 1
    return n
