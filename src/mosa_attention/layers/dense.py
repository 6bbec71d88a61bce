"""Dense and local (sliding-window) causal multi-head attention with RoPE."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import causal_attention, rope_dims_for
from ..ops.rope import check_rope_base
from ._checks import check_input, check_positive_int, exact_float


class DenseAttention(nn.Module):
    """Causal multi-head attention (SDPA: flash where available) with RoPE on part of each head.

    ``window``: when set, each query sees only the last ``window`` tokens (itself included): local attention.
    ``backend``: "auto" makes q, k, v with one Triton kernel on CUDA (split + RoPE + layout), "torch" with
    plain torch ops (the reference), "triton" with the kernel wherever triton runs.
    The parameter layout matches the official MoSA release's dense heads: ``W_QKV`` grouped per head as
    ``[q | k | v]``.
    """

    rope_base = exact_float("rope_base")

    def __init__(self, d_model: int, num_heads: int, head_dim: int = 64, rope_fraction: float = 0.5,
                 rope_base: float = 10000.0, window: int | None = None, backend: str = "auto"):
        super().__init__()
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be one of ('auto', 'torch', 'triton'), got backend={backend!r}")
        self.backend = backend
        self.d_model = check_positive_int("d_model", d_model)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.head_dim = check_positive_int("head_dim", head_dim)
        self.rope_dims = rope_dims_for(head_dim, rope_fraction)
        self.rope_base = check_rope_base(rope_base)
        self.window = None if window is None else check_positive_int("window", window)
        self.W_QKV = nn.Linear(d_model, 3 * head_dim * num_heads, bias=False)
        self.W_O = nn.Linear(head_dim * num_heads, d_model, bias=False)

    def forward(self, x: torch.Tensor, window: int | None = None, qkv: torch.Tensor | None = None) -> torch.Tensor:
        """``qkv``: ``x @ W_QKV^T`` where the caller has made it (a hybrid, ``ops.linear_sharing_input``)."""
        check_input(x, self.d_model, self.W_QKV.weight.dtype)
        return causal_attention(x, self.W_QKV.weight, self.W_O.weight, self.num_heads, rope_dims=self.rope_dims,
                                rope_base=self.rope_base, window=window if window is not None else self.window,
                                backend=self.backend, qkv=qkv)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, head_dim={self.head_dim}, window={self.window}"


class LocalAttention(DenseAttention):
    """Causal sliding-window attention: each query sees its last ``window`` tokens."""

    def __init__(self, d_model: int, num_heads: int, window: int, head_dim: int = 64, rope_fraction: float = 0.5,
                 rope_base: float = 10000.0, backend: str = "auto"):
        super().__init__(d_model, num_heads, head_dim, rope_fraction, rope_base,
                         window=check_positive_int("window", window), backend=backend)


def init_uniform_(w: torch.Tensor, fan: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan)
    return nn.init.uniform_(w, -bound, bound)
