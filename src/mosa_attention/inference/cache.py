"""The KV cache for generation: real tensors per layer, so its memory can be measured, not computed.

A batch of B sequences is stored left-padded: column c of the batch holds, for sequence b, the token at
position ``c - pad[b]`` (a column with a negative position is padding, never a key). Per layer:

* ``SparseCache`` — the MoSA heads. Each head stores keys and values of only the tokens it kept, with their
  positions (RoPE was applied there) and router scores. Heads keep different numbers of tokens, so they are
  paged: a layer has one pool of pages of ``page_size`` slots (``k, v [pages, page_size, D]``), and each
  (sequence, head) owns the pages its table lists, filled in order. A head wastes less than one page, not
  the gap to the fullest head. Under causal routing a head keeps about T/sparsity tokens, so the cache grows
  like T/sparsity, not T.
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
    """Keys and values of the tokens each MoSA head kept, in pages; see the module docstring.

    Pool: ``k, v [N, page_size, D]``, ``pos, score [N, page_size]``; page 0 is a null page that every
    unused table entry points to, never read as a key (slots at or above a head's ``count`` are masked).
    Tables: ``table [B, E, max pages]`` page ids, ``pages [B, E]`` pages owned, ``count [B, E]`` tokens held.
    """

    def __init__(self, batch: int, heads: int, head_dim: int, dtype, device, capacity: int | None = None,
                 protect_first: bool = False, page_size: int = 8):
        self.page_size = page_size
        self.k = torch.zeros(1, page_size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(1, page_size, dtype=torch.long, device=device)
        self.score = torch.zeros(1, page_size, dtype=torch.float32, device=device)
        self.used = 1  # pool pages handed out, the null page included
        self.width = 0  # the most pages any head owns, known here without a read from the device
        self.table = torch.zeros(batch, heads, 0, dtype=torch.long, device=device)
        self.pages = torch.zeros(batch, heads, dtype=torch.long, device=device)
        self.count = torch.zeros(batch, heads, dtype=torch.long, device=device)
        self.capacity = capacity
        self.protect_first = protect_first

    def _take_pages(self, want: torch.Tensor, heads) -> None:
        """Give each (sequence, head) of ``heads`` pages until it owns ``want`` [B, E']."""
        have = self.pages[:, heads]
        add = (want - have).clamp(min=0)
        total, width = torch.stack([add.sum(), want.max()]).tolist()  # one read from the device
        if total == 0:
            return
        if self.used + total > self.k.shape[0]:
            size = self.used + total + (self.used + total) // 8  # a little slack: a pool grows by copying
            self.k, self.v = _grow(self.k, 0, size), _grow(self.v, 0, size)
            self.pos, self.score = _grow(self.pos, 0, size), _grow(self.score, 0, size)
        self.width = max(self.width, width)
        if width > self.table.shape[2]:
            self.table = _grow(self.table, 2, width)
        flat = add.flatten()
        owner = torch.repeat_interleave(torch.arange(flat.numel(), device=flat.device), flat, output_size=total)
        first = torch.cumsum(flat, 0) - flat
        column = have.flatten()[owner] + torch.arange(total, device=flat.device) - first[owner]
        E = add.shape[1]
        b, e = owner // E, heads[owner % E]
        self.table[b, e, column] = torch.arange(self.used, self.used + total, device=flat.device)
        self.used += total
        self.pages[:, heads] = torch.maximum(have, want)

    def append(self, k, v, pos, score, ok, heads: torch.Tensor | None = None) -> None:
        """Store new kept tokens: k, v [B, E', m, D], pos, score, ok [B, E', m] (ok: a real token), for all
        heads or for the heads listed in ``heads`` [E']. May exceed ``capacity`` until ``evict``."""
        if heads is None:
            heads = torch.arange(self.count.shape[1], device=self.count.device)
        count = self.count[:, heads]
        new = ok.sum(-1)
        self._take_pages((count + new + self.page_size - 1) // self.page_size, heads)
        # every entry is written (no read from the device to find the kept ones): padding goes to the null page
        slot = (count[..., None] + ok.long().cumsum(-1) - 1).clamp(min=0)
        column = (slot // self.page_size).clamp(max=self.table.shape[2] - 1)
        b = torch.arange(ok.shape[0], device=ok.device)[:, None, None]
        page = torch.where(ok, self.table[b, heads[None, :, None], column], 0)
        at = slot % self.page_size
        self.k[page, at] = k
        self.v[page, at] = v
        self.pos[page, at] = pos
        self.score[page, at] = score.float()
        self.count[:, heads] = count + new

    def view(self, heads: torch.Tensor | None = None):
        """(k, v [B, E', S, D], pos [B, E', S], score, valid [B, E', S]) of all heads or of ``heads``: their
        pages gathered in order, S = their widest table times page_size."""
        table, count = (self.table, self.count) if heads is None else (self.table[:, heads], self.count[:, heads])
        table = table[..., : self.width] if self.width else table.new_zeros(*table.shape[:2], 1)
        B, E, W = table.shape
        S = W * self.page_size

        def gather(t):
            return t[table].reshape(B, E, S, *t.shape[2:])

        valid = torch.arange(S, device=count.device) < count[..., None]
        return gather(self.k), gather(self.v), gather(self.pos), gather(self.score), valid

    def held(self, b: int, e: int):
        """(positions, scores) of the tokens sequence b's head e holds, in the order stored."""
        _, _, pos, score, valid = self.view(torch.tensor([e], device=self.count.device))
        return pos[b, 0][valid[b, 0]], score[b, 0][valid[b, 0]]

    def evict(self) -> None:
        """Eviction rule: where a head holds more than ``capacity`` tokens, keep its ``capacity`` highest
        scores (token 0 first with ``include_first``), written back to its first slots."""
        if self.capacity is None or int(self.count.max()) <= self.capacity:
            return
        k, v, pos, score, valid = self.view()
        key = score.masked_fill(~valid, float("-inf"))
        if self.protect_first:
            key = key.masked_fill(valid & (pos == 0), float("inf"))
        top = key.topk(min(self.capacity, key.shape[-1]), dim=-1).indices  # descending: held tokens first
        C = top.shape[-1]
        slots = torch.arange(C, device=top.device)
        page = self.table[..., : (C + self.page_size - 1) // self.page_size][..., slots // self.page_size]
        at = (slots % self.page_size).expand_as(page)
        keep = slots < self.count.clamp(max=C)[..., None]  # heads under capacity rewrite only what they hold
        D = k.shape[-1]
        self.k[page[keep], at[keep]] = k.gather(2, top[..., None].expand(-1, -1, -1, D))[keep]
        self.v[page[keep], at[keep]] = v.gather(2, top[..., None].expand(-1, -1, -1, D))[keep]
        self.pos[page[keep], at[keep]] = pos.gather(2, top)[keep]
        self.score[page[keep], at[keep]] = score.gather(2, top)[keep]
        self.count = self.count.clamp(max=self.capacity)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v, "pos": self.pos, "score": self.score, "table": self.table,
                "pages": self.pages, "count": self.count}


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
