"""The paper's sparse baselines: fixed (strided) sparse attention and Routing Transformer attention."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import apply_rope, num_selected, rope_cos_sin, rope_dims_for, sparse_attention, strided_positions
from ..ops.rope import check_rope_base
from ..ops.routing import check_sparsity
from ._checks import check_input, check_optional_bool, check_positive_int, exact_float


class FixedSparseAttention(nn.Module):
    """Every head attends among the same strided tokens 0, ρ, 2ρ, … (score 1); other tokens get no output.

    MoSA with the router replaced by a fixed pattern: same parameters per head (W_QKV [E, h, 3D], W_O [E, D, h]).
    ``deterministic``: as in ``MoSAAttention``.
    """

    sparsity = exact_float("sparsity")
    rope_base = exact_float("rope_base")

    def __init__(self, d_model: int, num_heads: int, sparsity: float, head_dim: int = 64, rope_fraction: float = 0.5,
                 rope_base: float = 10000.0, backend: str = "auto", deterministic: bool | None = None):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.head_dim = check_positive_int("head_dim", head_dim)
        self.sparsity = check_sparsity(sparsity)
        self.stride = max(int(round(self.sparsity)), 1)
        self.rope_dims = rope_dims_for(head_dim, rope_fraction)
        self.rope_base = check_rope_base(rope_base)
        self.backend = backend
        self.deterministic = check_optional_bool("deterministic", deterministic)
        self.W_QKV = nn.Parameter(torch.empty(num_heads, d_model, 3 * head_dim))
        self.W_O = nn.Parameter(torch.empty(num_heads, head_dim, d_model))
        nn.init.uniform_(self.W_QKV, -1 / math.sqrt(3 * head_dim), 1 / math.sqrt(3 * head_dim))
        nn.init.uniform_(self.W_O, -1 / math.sqrt(d_model * num_heads), 1 / math.sqrt(d_model * num_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model, self.W_QKV.dtype)
        B, T, _ = x.shape
        idx = strided_positions(T, self.stride, x.device).expand(B, self.num_heads, -1)
        scores = torch.ones(idx.shape, dtype=x.dtype, device=x.device)
        return sparse_attention(x, scores, idx, self.W_QKV, self.W_O, rope_dims=self.rope_dims,
                                rope_base=self.rope_base, backend=self.backend, deterministic=self.deterministic)


class RoutingAttention(nn.Module):
    """Routing Transformer attention as the MoSA paper describes it.

    Per head, a shared projection serves as both query and key (Q = K) and another gives V. Each head has
    ``n_clusters = round(T / k)`` centroids (k = T // sparsity); every centroid takes the k tokens whose
    normalised query is most similar to it, and those tokens attend causally among themselves (RoPE at their
    positions). A token taken by several centroids gets the sum of their outputs. While training, centroids
    follow the mean of the normalised queries nearest to them (exponential moving average, no gradient).
    """

    sparsity = exact_float("sparsity")
    rope_base = exact_float("rope_base")

    def __init__(self, d_model: int, num_heads: int, sparsity: float, head_dim: int = 64, rope_fraction: float = 0.5,
                 rope_base: float = 10000.0, seq_len: int = 1024, ema_decay: float = 0.999):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.head_dim = check_positive_int("head_dim", head_dim)
        self.sparsity = check_sparsity(sparsity)
        self.rope_dims = rope_dims_for(head_dim, rope_fraction)
        self.rope_base = check_rope_base(rope_base)
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be a number in [0, 1), got ema_decay={ema_decay!r}")
        self.ema_decay = float(ema_decay)
        k = num_selected(check_positive_int("seq_len", seq_len), self.sparsity)
        self.n_clusters = max(1, round(seq_len / k))
        self.W_QV = nn.Parameter(torch.empty(num_heads, d_model, 2 * head_dim))
        self.W_O = nn.Parameter(torch.empty(num_heads, head_dim, d_model))
        nn.init.uniform_(self.W_QV, -1 / math.sqrt(2 * head_dim), 1 / math.sqrt(2 * head_dim))
        nn.init.uniform_(self.W_O, -1 / math.sqrt(d_model * num_heads), 1 / math.sqrt(d_model * num_heads))
        self.register_buffer("centroids", F.normalize(torch.randn(num_heads, self.n_clusters, head_dim), dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model, self.W_QV.dtype)
        B, T, h = x.shape
        E, C, D = self.num_heads, self.n_clusters, self.head_dim
        k = num_selected(T, self.sparsity)
        q, v = torch.einsum("bth,ehd->betd", x, self.W_QV).split(D, dim=-1)  # [B, E, T, D]
        qn = F.normalize(q.float(), dim=-1)
        sim = torch.einsum("betd,ecd->bect", qn, self.centroids.float())  # [B, E, C, T]
        idx = sim.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values  # [B, E, C, k]
        if self.training:
            self._update_centroids(qn, sim)
        gather = idx.reshape(B, E, C * k, 1).expand(-1, -1, -1, D)
        qg = q.gather(2, gather).view(B, E, C, k, D)
        vg = v.gather(2, gather).view(B, E, C, k, D)
        cos, sin = rope_cos_sin(idx, self.rope_dims, self.rope_base, qg.dtype)
        qg = apply_rope(qg, cos, sin)
        causal = idx[..., :, None] >= idx[..., None, :]
        o = F.scaled_dot_product_attention(qg, qg, vg, attn_mask=causal)  # [B, E, C, k, D]
        per_token = q.new_zeros(B, E, T, D).scatter_add_(2, gather, o.reshape(B, E, C * k, D))
        return torch.einsum("betd,edh->bth", per_token, self.W_O)

    @torch.no_grad()
    def _update_centroids(self, qn: torch.Tensor, sim: torch.Tensor) -> None:
        E, C, D = self.centroids.shape
        nearest = sim.argmax(dim=2)  # [B, E, T]
        onehot = F.one_hot(nearest, C).to(qn.dtype)  # [B, E, T, C]
        sums = torch.einsum("betc,betd->ecd", onehot, qn)
        counts = onehot.sum(dim=(0, 2))[..., None]
        means = torch.where(counts > 0, sums / counts.clamp(min=1), self.centroids.float())
        new = self.ema_decay * self.centroids.float() + (1 - self.ema_decay) * means
        self.centroids.copy_(F.normalize(new, dim=-1).to(self.centroids.dtype))
