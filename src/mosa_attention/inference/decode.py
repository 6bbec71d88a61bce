"""Incremental decoding: run a chunk of new tokens through the model against its KV cache.

``extend(model, ids, cache)`` is both the prefill (the whole prompt in one parallel pass) and each decoding
step (one token per sequence). MoSA heads route with the causal threshold rule whatever ``routing`` the
layer was built with: a token is kept by a head iff its score passes the head's threshold, so the logits
equal those of a full forward pass in ``routing="threshold"`` mode at every position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..layers import DenseAttention, MoSAAttention
from ..ops import apply_rope, project_qkv, rope_cos_sin
from ..ops._checks import check_positive_int
from ..ops.routing import router_logits
from .cache import DenseCache, KVCache, RingCache, SparseCache

SUPPORTED = ("dense", "mosa", "pure_mosa", "local")
# SDPA's backends for the cache's attention, whose key length changes at every step. None: SDPA's own choice,
# with which decoding in bf16 on an H200 ran 6-12x slower than with these (likely cuDNN's kernels, planned per
# shape: benchmarks/NOTES.md v27.3).
SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def _attention(q, k, v, mask):
    if SDPA_BACKENDS is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with sdpa_kernel(list(SDPA_BACKENDS)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def check_supported(model) -> None:
    kind = model.config.attention
    if kind not in SUPPORTED:
        raise NotImplementedError(f"generation with a KV cache supports attention kinds {SUPPORTED}; this model "
                                  f"has attention={kind!r}")
    for block in model.blocks:
        attn = block.attn
        if isinstance(attn, MoSAAttention) and attn.dense is not None and attn.dense_kind == "local" \
                and attn.local_window is None:
            raise ValueError("a MoSA layer with local heads needs a fixed local_window to be cached "
                             "(models built by MoSALM set it to config.k)")


def new_cache(model, pad: torch.Tensor, capacity: int | None = None, page_size: int = 8) -> KVCache:
    """An empty cache for ``model`` and a batch whose sequences are left-padded by ``pad`` [B] columns.
    MoSA heads store their tokens in pages of ``page_size`` slots."""
    check_supported(model)
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
        raise ValueError(f"capacity must be a positive integer or None, got capacity={capacity!r}")
    check_positive_int("page_size", page_size)
    if not isinstance(pad, torch.Tensor) or pad.dim() != 1 or pad.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"pad must be an integer tensor [B] of left-padding columns, got "
                         f"{(tuple(pad.shape), pad.dtype) if isinstance(pad, torch.Tensor) else type(pad).__name__}")
    if not pad.is_cuda and pad.numel() and int(pad.min()) < 0:  # (not on a GPU: that would wait for it)
        raise ValueError(f"pad must hold column counts >= 0, got {pad.tolist()}")
    p = model.embed.weight
    B, kw = pad.shape[0], dict(dtype=p.dtype, device=p.device)
    layers = []
    for block in model.blocks:
        attn = block.attn
        sparse, dense = None, None
        if isinstance(attn, MoSAAttention):
            if attn.num_mosa_heads:
                sparse = SparseCache(B, attn.num_mosa_heads, attn.head_dim, capacity=capacity,
                                     protect_first=attn.include_first, page_size=page_size, **kw)
            if attn.dense is not None:
                window = attn.local_window if attn.dense_kind == "local" else None
                dense = _dense_cache(attn.dense, B, window, kw)
        else:
            dense = _dense_cache(attn, B, attn.window, kw)
        layers.append({"sparse": sparse, "dense": dense})
    return KVCache(layers, pad.to(p.device))


def _dense_cache(attn: DenseAttention, B: int, window: int | None, kw):
    if window is None:
        return DenseCache(B, attn.num_heads, attn.head_dim, **kw)
    return RingCache(B, attn.num_heads, attn.head_dim, window, **kw)


@torch.no_grad()
def extend(model, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed ``ids`` [B, n] (the next n columns of the batch) through ``model``; returns logits [B, n, vocab]
    and leaves their keys and values in ``cache``. Pad columns may hold any token id of the vocabulary."""
    model._check_ids("ids", ids)  # an integer [B, n] tensor of ids in [0, vocab_size)
    if ids.shape[0] != cache.pad.shape[0]:
        raise ValueError(f"ids has batch size {ids.shape[0]} but the cache was made for {cache.pad.shape[0]} "
                         f"sequences (new_cache's pad)")
    return extend_unchecked(model, ids, cache)


@torch.no_grad()
def extend_unchecked(model, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """``extend`` for ids already known to be valid (``generate``'s prompts, checked once, and the tokens it
    samples): no checks, so a decoding step does not wait for the device to read the ids' range back."""
    n = ids.shape[1]
    cols = torch.arange(cache.length, cache.length + n, device=ids.device)
    pos = cols[None] - cache.pad[:, None]  # per-sequence positions; negative on padding
    x = model.embed(ids)
    for block, layer in zip(model.blocks, cache.layers):
        h = block.ln1(x)
        x = x + attend(block.attn, layer, h, pos, cols, cache.pad)
        x = x + block.mlp(block.ln2(x))
    cache.length += n
    return model.lm_head(model.ln_f(x))


def attend(attn, layer: dict, x, pos, cols, pad) -> torch.Tensor:
    """One attention module over new tokens x [B, n, h] and its cache ``layer``."""
    if isinstance(attn, MoSAAttention):
        y = sparse_heads(attn, layer["sparse"], x, pos) if layer["sparse"] is not None else 0
        if layer["dense"] is not None:
            window = attn.local_window if attn.dense_kind == "local" else None
            y = y + dense_heads(attn.dense, layer["dense"], x, pos, cols, pad, window)
        return y
    return dense_heads(attn, layer["dense"], x, pos, cols, pad, attn.window)


def dense_heads(attn: DenseAttention, cache, x, pos, cols, pad, window: int | None) -> torch.Tensor:
    """Causal (or sliding-window) heads: the new queries attend to the cached columns and to each other."""
    B, n, _ = x.shape
    q, k, v = project_qkv(x, attn.W_QKV.weight, attn.num_heads, attn.rope_dims, attn.rope_base,
                          positions=pos.clamp(min=0)[:, None, :])
    if isinstance(cache, DenseCache) or n == 1:
        cache.append(k, v, cols)  # then attend to the cache in place, no copy of it
        keys, values, kcol = cache.keys()
    else:  # a chunk longer than one token needs ring slots it is about to overwrite
        old_k, old_v, old_cols = cache.keys()
        keys, values, kcol = torch.cat([old_k, k], 2), torch.cat([old_v, v], 2), torch.cat([old_cols, cols])
        cache.append(k, v, cols)
    mask = (kcol[None, None, :] >= pad[:, None, None]) & (kcol <= cols[:, None]) & (kcol >= 0)  # [B, n, keys]
    if window is not None:
        mask &= kcol > cols[:, None] - window
    mask |= (cols[None, :] < pad[:, None])[..., None]  # a pad query sees anything: finite, and never read
    o = _attention(q, keys, values, mask[:, None])
    return F.linear(o.transpose(1, 2).reshape(B, n, -1), attn.W_O.weight)


def keep_mask(attn: MoSAAttention, scores: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[B, E, n]: the causal rule, score above the head's threshold (token 0 always, with include_first)."""
    keep = scores > attn.threshold.to(scores.dtype)[None, :, None]
    if attn.include_first:
        keep |= (pos == 0)[:, None, :]
    return keep & (pos >= 0)[:, None, :]


def sparse_heads(attn: MoSAAttention, cache: SparseCache, x, pos) -> torch.Tensor:
    """MoSA heads: each head keeps the new tokens that pass its threshold, computes Q, K, V for those only,
    stores their keys and values, and attends from them to its cached tokens (itself included).

    Only the heads that keep some new token work: while decoding one token, about 1/sparsity of them.
    """
    B, n, h = x.shape
    D = attn.head_dim
    scores = torch.sigmoid(router_logits(x, attn.router))  # [B, E, n]
    keep = keep_mask(attn, scores, pos)
    heads = keep.any(2).any(0).nonzero().squeeze(1)
    if heads.numel() == 0:
        return x.new_zeros(B, n, h)
    every = heads.numel() == attn.num_mosa_heads
    pick = (lambda t: t) if every else (lambda t: t.index_select(1, heads))  # [B, E, ...] -> [B, E', ...]
    w_qkv, w_o = (attn.W_QKV, attn.W_O) if every else (attn.W_QKV[heads], attn.W_O[heads])
    keep, scores = pick(keep), pick(scores)
    # the kept new tokens of each head first, in order; slots past a head's count are padding
    m = 1 if n == 1 else int(keep.sum(-1).max())
    order = torch.arange(n, device=x.device)
    j = torch.where(keep, order, order + n).sort(-1).values[..., :m]
    ok = j < n
    j = j.clamp(max=n - 1)
    E = j.shape[1]
    xg = x.gather(1, j.reshape(B, E * m, 1).expand(-1, -1, h)).view(B, E, m, h)
    q, k, v = torch.einsum("bekh,ehd->bekd", xg, w_qkv).split(D, dim=-1)
    p = pos[:, None, :].expand(-1, E, -1).gather(2, j)
    cos, sin = rope_cos_sin(p, attn.rope_dims, attn.rope_base, q.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    s = scores.gather(2, j)
    cache.append(k, v, p, s, ok, None if every else heads)
    keys, values, kpos, _, kvalid = cache.view(None if every else heads)
    mask = kvalid[..., None, :] & (kpos[..., None, :] <= p[..., :, None])  # [B, E', m, S]
    mask |= ~ok[..., None]  # padding queries: finite, dropped below
    o = _attention(q, keys, values, mask)
    cache.evict()
    o = o * (s * ok)[..., None].to(o.dtype)
    y = torch.einsum("bekd,edh->bekh", o, w_o).reshape(B, E * m, h)
    return x.new_zeros(B, n, h).scatter_add_(1, j.reshape(B, E * m, 1).expand(-1, -1, h), y)
