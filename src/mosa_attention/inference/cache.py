"""The KV cache for generation: real tensors per layer, so its memory can be measured, not computed.

A batch of B sequences is stored left-padded: column c of the batch holds, for sequence b, the token at
position ``c - pad[b]`` (a column with a negative position is padding, never a key). Per layer:

* ``SparseCache`` — the MoSA heads. Each head stores keys and values of only the tokens it kept, in slots
  ``0 .. count[b, e]-1`` of ``k, v [B, E, C, D]``, with their positions (RoPE was applied there) and router
  scores. Heads keep different numbers of tokens, so C is the largest count (plus 1/8 growth slack); the slots
  above a head's count are empty. Under causal routing a head keeps about T/sparsity tokens, so the cache
  grows like T/sparsity, not T.
  ``capacity`` (optional) bounds every head's count. Eviction rule: a head's cache holds the ``capacity``
  highest-scoring tokens it has kept so far (token 0 counts as the highest when ``include_first``). A new
  token that the head keeps always attends to itself, then the lowest-score token is dropped (which may be
  the new one).
* ``DenseCache`` — ordinary heads: keys and values of every column, ``k, v [B, H, C, D]``.
* ``RingCache`` — local (sliding-window) heads: a ring buffer of the last ``window`` columns.
"""
from __future__ import annotations

import torch

_GROW = 64  # columns added at least when a dense cache grows; amortizes re-allocation while decoding


def _grow(t: torch.Tensor, dim: int, size: int, fill=0) -> torch.Tensor:
    if t.shape[dim] >= size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_full(shape, fill)], dim=dim)


def _slots(needed: int, have: int) -> int:
    return max(needed, have + max(_GROW, have // 4))


class SparseCache:
    """Keys and values of the tokens each MoSA head kept; see the module docstring."""

    def __init__(self, batch: int, heads: int, head_dim: int, dtype, device, capacity: int | None = None,
                 protect_first: bool = False):
        self.k = torch.zeros(batch, heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(batch, heads, 0, dtype=torch.long, device=device)
        self.score = torch.zeros(batch, heads, 0, dtype=torch.float32, device=device)
        self.count = torch.zeros(batch, heads, dtype=torch.long, device=device)
        self.capacity = capacity
        self.protect_first = protect_first

    def valid(self) -> torch.Tensor:
        """[B, E, C] bool: which slots hold a token."""
        return torch.arange(self.k.shape[2], device=self.k.device) < self.count[..., None]

    def append(self, k, v, pos, score, ok, heads: torch.Tensor | None = None) -> None:
        """Store new kept tokens: k, v [B, E', m, D], pos, score, ok [B, E', m] (ok: a real token), for all
        heads or for the heads listed in ``heads`` [E']. May exceed ``capacity`` until ``evict``."""
        count = self.count if heads is None else self.count[:, heads]
        new = ok.sum(-1)
        needed = int((count + new).max())
        C = self.k.shape[2]
        if needed > C:
            # a head holds about T/sparsity tokens: grow by an eighth, so the slack stays small
            size = needed if self.capacity else needed + needed // 8
            self.k, self.v = _grow(self.k, 2, size), _grow(self.v, 2, size)
            self.pos, self.score = _grow(self.pos, 2, size), _grow(self.score, 2, size)
        b, e, i = ok.nonzero(as_tuple=True)
        slot = (count[..., None] + ok.long().cumsum(-1) - 1)[b, e, i]
        h = e if heads is None else heads[e]
        self.k[b, h, slot] = k[b, e, i]
        self.v[b, h, slot] = v[b, e, i]
        self.pos[b, h, slot] = pos[b, e, i]
        self.score[b, h, slot] = score[b, e, i].float()
        if heads is None:
            self.count += new
        else:
            self.count[:, heads] = count + new

    def evict(self) -> None:
        """Apply the eviction rule where a head holds more than ``capacity`` tokens."""
        if self.capacity is not None and self.k.shape[2] > self.capacity:
            self._evict()

    def _evict(self) -> None:
        """Keep the ``capacity`` highest-scoring tokens of every head (the eviction rule)."""
        key = self.score.masked_fill(~self.valid(), float("-inf"))
        if self.protect_first:
            key = key.masked_fill(self.valid() & (self.pos == 0), float("inf"))
        top = key.topk(self.capacity, dim=-1).indices  # descending: held tokens first
        self.k = self.k.gather(2, top[..., None].expand(-1, -1, -1, self.k.shape[-1]))
        self.v = self.v.gather(2, top[..., None].expand(-1, -1, -1, self.v.shape[-1]))
        self.pos, self.score = self.pos.gather(2, top), self.score.gather(2, top)
        self.count = self.count.clamp(max=self.capacity)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v, "pos": self.pos, "score": self.score, "count": self.count}


class DenseCache:
    """Keys and values of every column for ordinary causal heads."""

    def __init__(self, batch: int, heads: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k, v, cols=None) -> None:
        n = k.shape[2]
        if self.length + n > self.k.shape[2]:
            size = _slots(self.length + n, self.k.shape[2])
            self.k, self.v = _grow(self.k, 2, size), _grow(self.v, 2, size)
        self.k[:, :, self.length:self.length + n] = k
        self.v[:, :, self.length:self.length + n] = v
        self.length += n

    def keys(self):
        """(k, v [B, H, L, D], columns [L]) of the columns held."""
        L = self.length
        return self.k[:, :, :L], self.v[:, :, :L], torch.arange(L, device=self.k.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v}


class RingCache:
    """The last ``window`` columns of local heads, in a ring buffer: column c lives in slot c % window."""

    def __init__(self, batch: int, heads: int, head_dim: int, window: int, dtype, device):
        self.window = window
        self.k = torch.zeros(batch, heads, window, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.col = torch.full((window,), -1, dtype=torch.long, device=device)  # -1: empty slot

    def append(self, k, v, cols) -> None:
        n = min(k.shape[2], self.window)
        k, v, cols = k[:, :, -n:], v[:, :, -n:], cols[-n:]
        slot = cols % self.window
        self.k[:, :, slot], self.v[:, :, slot], self.col[slot] = k, v, cols

    def keys(self):
        return self.k, self.v, self.col

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v, "col": self.col}


class KVCache:
    """The cache of a whole model for a batch: per layer a ``sparse`` and/or ``dense`` part (None when the
    layer has no such heads), the left padding of each sequence and the number of columns so far."""

    def __init__(self, layers: list[dict], pad: torch.Tensor):
        self.layers = layers
        self.pad = pad
        self.length = 0

    def parts(self):
        for layer in self.layers:
            for part in layer.values():
                if part is not None:
                    yield part

    def nbytes(self, kv_only: bool = True) -> int:
        """Bytes of the cache tensors as allocated: keys and values only, or with the bookkeeping (positions,
        scores, counts) too."""
        return sum(t.numel() * t.element_size() for p in self.parts() for name, t in p.tensors().items()
                   if not kv_only or name in ("k", "v"))

    def held(self, part) -> int:
        """Key/value pairs a part holds: one per head and real token, summed over the batch."""
        if isinstance(part, SparseCache):
            return int(part.count.sum())
        cols = torch.arange(part.length, device=self.pad.device) if isinstance(part, DenseCache) else part.col
        real = (cols[None] >= self.pad[:, None]) & (cols[None] >= 0)
        return int(real.sum()) * part.k.shape[1]

    def entries(self) -> dict[str, int]:
        """Key/value pairs held, by head kind."""
        kinds = {SparseCache: "sparse", DenseCache: "dense", RingCache: "local"}
        out = dict.fromkeys(kinds.values(), 0)
        for p in self.parts():
            out[kinds[type(p)]] += self.held(p)
        return out

    def held_bytes(self) -> int:
        """Bytes of the key/value pairs held (2 * head_dim elements each): the cache without the padding
        and growth slack of its tensors."""
        return sum(self.held(p) * 2 * p.k.shape[-1] * p.k.element_size() for p in self.parts())
