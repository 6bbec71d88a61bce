"""Decoding steps of fixed shape, so that a GPU can replay each one as a CUDA graph.

``extend`` decodes a token through the paged cache of ``cache.py``: only the MoSA heads that keep the token
work, and the host reads back which heads those are and how many pages to hand out, so a step is a different
sequence of launches each time (about a thousand small ones per step of the tiny preset: the GPU idles while
the host dispatches them). ``StaticDecoder`` takes the cache after the prompt's prefill and decodes one token
per sequence with every shape fixed:

* dense heads: keys and values of all ``max_len`` columns preallocated, the new column written at the
  current column (a device tensor), the unwritten ones masked;
* local heads: the ring buffer as it is (its slot is the column modulo the window, on the device);
* MoSA heads: per (sequence, head) ``room`` slots; a head whose score passes its threshold (the causal rule of
  ``decode.keep_mask``) writes the token's key and value at slot ``count``, attends and counts it, the others
  output zero for it (``ops.decode_heads``). On a GPU the Triton backend reads the weights of the ~1/sparsity
  heads that keep the token only; the plain-torch one (the reference, and a CPU's) computes every head's
  projections. Neither reads anything back from the device.

The host keeps a bound on the fullest head (it grows by at most one per step); when the bound reaches
``room``, it reads the counts once and, where needed, doubles the room (copying the slots and recording the
graph anew). The logits equal ``extend``'s to rounding (the same math; tests/inference/test_static_decode.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers import MoSAAttention
from ..ops import apply_rope, rope_cos_sin
from ..ops.decode_heads import attend_one, decode_heads, resolve_decode_backend
from ..ops._checks import check_bool, check_positive_int
from .cache import DenseCache, KVCache, RingCache, SparseCache


# (under torch.compile of the step: a graph break, the op runs as it is)
_decode_heads = torch.compiler.disable(decode_heads)


class _Dense:
    """A dense heads' cache of ``max_len`` columns."""

    def __init__(self, cache: DenseCache, max_len: int):
        B, H, _, D = cache.k.shape
        k, v, _ = cache.keys()
        self.k = cache.k.new_zeros(B, H, max_len, D)
        self.v = torch.zeros_like(self.k)
        self.k[:, :, : k.shape[2]] = k
        self.v[:, :, : v.shape[2]] = v


class _Sparse:
    """A MoSA layer's kept keys and values in ``room`` slots per (sequence, head)."""

    def __init__(self, cache: SparseCache, room: int):
        k, v, pos, score, _ = cache.view()
        B, E, S, D = k.shape
        self.count = cache.count.clone()
        self.k = k.new_zeros(B, E, room, D)
        self.v = torch.zeros_like(self.k)
        self.pos = pos.new_zeros(B, E, room)
        self.score = score.new_zeros(B, E, room)  # (for to_cache: the paged cache keeps them)
        n = min(S, room)  # (room exceeds every head's count; slots past a count are never read)
        for name, t in (("k", k), ("v", v), ("pos", pos), ("score", score)):
            getattr(self, name)[:, :, :n] = t[:, :, :n]

    def grow(self, room: int) -> None:
        for name in ("k", "v", "pos", "score"):
            t = getattr(self, name)
            bigger = t.new_zeros(*t.shape[:2], room, *t.shape[3:])
            bigger[:, :, : t.shape[2]] = t
            setattr(self, name, bigger)


class StaticDecoder:
    """One-token decoding steps of ``model`` from a prefilled ``cache`` (``decode.extend`` over the prompts),
    every tensor preallocated for columns up to ``max_len``; on CUDA each step is replayed as a CUDA graph
    (``graphs``). ``backend``: the MoSA heads' step (``ops.decode_heads``): "torch" computes every head,
    "triton" only the heads that keep the token, "auto" (the default) the kernels on CUDA where triton imports.
    ``headroom``: MoSA slots per head beyond the fullest head's count at the start (at least this many steps go
    by before the host reads the counts). ``compile``: the step's torch ops through ``torch.compile`` (compiled
    at the first step, and again where the slots grow). ``step(tokens [B])`` returns the next logits
    [B, vocab]; the returned tensor is overwritten by the next step. The decoder takes ``cache`` over (local
    heads' rings are written in place, the rest copied): extend it no further."""

    @torch.no_grad()
    def __init__(self, model, cache: KVCache, max_len: int, headroom: int = 64, graphs: bool | None = None,
                 backend: str = "auto", compile: bool = False):
        if cache.length >= max_len:
            raise ValueError(f"max_len={max_len} leaves no column after the cache's {cache.length}")
        for part in cache.parts():
            if isinstance(part, SparseCache) and part.capacity is not None:
                raise ValueError("StaticDecoder keeps every token a head keeps; a cache with a capacity (eviction) "
                                 "decodes with extend")
        check_positive_int("headroom", headroom)
        check_bool("compile", compile)
        device = cache.pad.device
        self.backend = resolve_decode_backend(backend, cache.pad)
        if graphs and device.type != "cuda":
            raise ValueError(f"graphs=True needs the cache on a CUDA device, got {device}")
        self.model = model
        self.pad = cache.pad
        self.max_len = max_len
        self.graphs = device.type == "cuda" if graphs is None else bool(graphs)
        self.col = torch.full((1,), cache.length, dtype=torch.long, device=device)
        self.length = cache.length  # the same, on the host
        self.tokens = torch.zeros(cache.pad.shape[0], dtype=torch.long, device=device)
        counts = [p.count for p in cache.parts() if isinstance(p, SparseCache)]
        self.fullest = int(torch.stack([c.max() for c in counts]).max()) if counts else 0
        self.room = self.fullest + headroom
        self.layers = []
        for layer in cache.layers:
            sparse, dense = layer["sparse"], layer["dense"]
            self.layers.append({
                "sparse": _Sparse(sparse, self.room) if sparse is not None else None,
                "dense": (dense if isinstance(dense, RingCache) else _Dense(dense, max_len)
                          if dense is not None else None)})
        self.graph = None
        self.logits = None
        # compile: the step's torch ops fused by torch.compile (the MoSA heads' op stays as it is, a graph break)
        self._step = torch.compile(self._forward, dynamic=None) if compile else self._forward

    # the step, plain torch: every shape fixed, no read from the device
    def _forward(self) -> torch.Tensor:
        model, col = self.model, self.col
        pos = col - self.pad  # [B]
        self._tables = {}  # RoPE's cos and sin at pos and the dense heads' mask, made once per step (not per layer)
        x = model.embed(self.tokens[:, None])
        for block, layer in zip(model.blocks, self.layers):
            h = block.ln1(x)
            x = x + self._attend(block.attn, layer, h, pos)
            x = x + block.mlp(block.ln2(x))
        col.add_(1)
        return model.lm_head(model.ln_f(x))[:, -1]

    def _attend(self, attn, layer, x, pos):
        if isinstance(attn, MoSAAttention):
            y = self._sparse(attn, layer["sparse"], x, pos) if layer["sparse"] is not None else 0
            if layer["dense"] is not None:
                window = attn.local_window if attn.dense_kind == "local" else None
                y = y + self._dense(attn.dense, layer["dense"], x, pos, window)
            return y
        return self._dense(attn, layer["dense"], x, pos, attn.window)

    def _cos_sin(self, pos, rope_dims: int, rope_base: float, dtype):
        """``rope_cos_sin`` at the step's positions [B] (padding's at 0), once per step for each setting."""
        key = (rope_dims, rope_base, dtype)
        if key not in self._tables:
            tables = rope_cos_sin(pos.clamp(min=0), rope_dims, rope_base, dtype)
            self._tables[key] = tuple(t.contiguous() for t in tables)
        return self._tables[key]

    def _dense(self, attn, cache, x, pos, window):
        B = x.shape[0]
        col = self.col
        # (project_qkv at positions [B, 1, 1], with the step's tables; RoPE on q and k in one pass)
        qkv = F.linear(x, attn.W_QKV.weight).view(B, 1, attn.num_heads, 3, -1)  # [B, 1, H, (q, k, v), D]
        qk, v = qkv[:, :, :, :2], qkv[:, :, :, 2]
        if attn.rope_dims:
            cos, sin = self._cos_sin(pos, attn.rope_dims, attn.rope_base, qkv.dtype)
            qk = apply_rope(qk, cos[:, None, None, None], sin[:, None, None, None])
        q, k, v = qk[:, :, :, 0].transpose(1, 2), qk[:, :, :, 1].transpose(1, 2), v.transpose(1, 2)  # [B, H, 1, D]
        if isinstance(cache, RingCache):
            slot = col % cache.window
            cache.k.index_copy_(2, slot, k)
            cache.v.index_copy_(2, slot, v)
            cache.col.index_copy_(0, slot, col)
            kcol = cache.col
            mask = self._mask(kcol, window)
        else:
            cache.k.index_copy_(2, col, k)
            cache.v.index_copy_(2, col, v)
            if ("columns", window) not in self._tables:  # (the same for every layer of the step)
                self._tables["columns", window] = self._mask(torch.arange(self.max_len, device=col.device), window)
            mask = self._tables["columns", window]
        o = attend_one(q, cache.k, cache.v, mask)
        return F.linear(o.transpose(1, 2).reshape(B, 1, -1), attn.W_O.weight)

    def _mask(self, kcol, window):
        """[B, 1, 1, keys]: the key columns ``kcol`` a sequence's new token sees (not padding, not ahead, within
        ``window``)."""
        mask = (kcol[None, :] >= self.pad[:, None]) & (kcol <= self.col) & (kcol >= 0)
        if window is not None:
            mask &= kcol > self.col - window
        return mask[:, None, None, :]

    def _sparse(self, attn, cache: _Sparse, x, pos):
        # routing, the slots' writes, attention and W_O of every head that keeps the token (ops.decode_heads: the
        # Triton backend reads only those heads' weights), the counts advanced
        cos, sin = self._cos_sin(pos, attn.rope_dims, attn.rope_base, x.dtype)  # [B, rope dims]
        y = _decode_heads(x[:, 0].contiguous(), attn.router, attn.threshold, pos, cache.count, attn.W_QKV, attn.W_O,
                         cos, sin, cache.k, cache.v, cache.pos, cache.score, include_first=attn.include_first,
                         backend=self.backend)
        return y[:, None]

    @torch.no_grad()
    def to_cache(self, page_size: int = 8) -> KVCache:
        """The decoded state as a paged ``KVCache``: the keys and values each head holds, in the order the paged
        steps would have stored them, so that it measures and extends as if ``extend`` had decoded."""
        layers = []
        for layer in self.layers:
            sparse, dense = layer["sparse"], layer["dense"]
            if sparse is not None:
                B, E, room, D = sparse.k.shape
                paged = SparseCache(B, E, D, dtype=sparse.k.dtype, device=sparse.k.device, page_size=page_size)
                ok = torch.arange(room, device=sparse.k.device) < sparse.count[..., None]
                paged.append(sparse.k, sparse.v, sparse.pos, sparse.score, ok)
                sparse = paged
            if isinstance(dense, _Dense):
                B, H, _, D = dense.k.shape
                cols = DenseCache(B, H, D, dtype=dense.k.dtype, device=dense.k.device)
                cols.append(dense.k[:, :, : self.length], dense.v[:, :, : self.length])
                dense = cols
            layers.append({"sparse": sparse, "dense": dense})
        cache = KVCache(layers, self.pad)
        cache.length = self.length
        return cache

    def _ensure_room(self) -> None:
        """Before a step: every head must have a free slot. The fullest head grows by at most one per step, so
        the counts are read only when that bound reaches the room."""
        sparse = [layer["sparse"] for layer in self.layers if layer["sparse"] is not None]
        if not sparse or self.fullest + 1 < self.room:
            return
        self.fullest = int(torch.stack([s.count.max() for s in sparse]).max())
        if self.fullest + 1 < self.room:
            return
        self.room = 2 * self.room
        for s in sparse:
            s.grow(self.room)
        self.graph = None  # new buffers: record again

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B] (one new column) and return the logits [B, vocab] of the next one (no autograd)."""
        if self.length >= self.max_len:
            raise ValueError(f"the decoder was built for max_len={self.max_len} columns")
        self._ensure_room()
        self.tokens.copy_(tokens)
        if not self.graphs:
            self.logits = self._step()
        elif self.graph is None:
            self._record()
        else:
            self.graph.replay()
        self.length += 1
        self.fullest += 1
        return self.logits

    def _record(self) -> None:
        """This step run eagerly (which also warms up the libraries' handles), then recorded for the next steps:
        recording runs nothing, so the state stays the eager step's; the graph reads its inputs (the tokens,
        the column, the caches) from the same memory at every replay."""
        eager = self._step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = self._step()
        static.copy_(eager)  # this step's logits, in the tensor every replay writes
        self.graph, self.logits = graph, static
