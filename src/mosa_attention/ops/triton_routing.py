"""A Triton kernel for expert-choice selection: each head's top-k positions, sorted by position, in one launch.

``topk_positions_triton(scores, k, include_first)`` returns what ``select_topk`` returns as positions: for
every row ``(b, e)`` of ``scores [B, E, T]`` the k positions of the largest scores, ascending. It replaces
``torch.topk`` + ``sort`` (two launches, a radix sort each, and their buffers) by one program per row:

1. the row is loaded once into registers and each score is mapped to an unsigned 32-bit key with the same
   order as the float (flip all bits of negatives, set the sign bit of the rest);
2. a most-significant-digit-first radix *select* finds the k-th largest key in four passes of 8 bits: each
   pass histograms (``tl.histogram``) the digit of the keys that share the prefix found so far and keeps the
   digit where the count of larger keys reaches k;
3. one compaction pass keeps every key above the k-th, and as many keys equal to it as are still needed,
   the earliest positions first, and writes their positions in order with a prefix sum.

Ties are broken towards earlier positions (``torch.topk`` leaves that choice unspecified, so among equal
scores the two may keep different tokens; the kept *scores* are the same multiset). ``include_first``
gives position 0 the largest key, so it is always kept and the other k - 1 are the best of the rest. The
row must fit in registers: T <= ``MAX_T``; longer rows (and float64 scores) stay with ``torch.topk``.
NaN scores count as the largest, as in ``torch.topk``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_T = 16384
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _radix_pass(key, inside, prefix, need, bins, SHIFT: tl.constexpr):
    """One byte of the radix select: among keys that share ``prefix`` above this byte, find the byte value
    where the count of larger keys reaches ``need``; returns the longer prefix and what is still needed."""
    if SHIFT == 24:
        cand = inside
    else:
        cand = inside & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
    digit = ((key >> SHIFT) & 0xFF).to(tl.int32)
    counts = tl.histogram(digit, 256, mask=cand)
    total = tl.sum(counts, axis=0)
    at_or_above = total - (tl.cumsum(counts, axis=0) - counts)
    chosen = tl.max(tl.where(at_or_above >= need, bins, -1), axis=0)
    above = tl.sum(tl.where(bins == chosen, at_or_above - counts, 0), axis=0)
    return prefix | (chosen.to(tl.uint32) << SHIFT), need - above


@triton.jit
def _topk_positions(s_ptr, out_ptr, T, k, stride_row, INCLUDE_FIRST: tl.constexpr, BT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    pos = tl.arange(0, BT)
    inside = pos < T
    s = tl.load(s_ptr + row * stride_row + pos, mask=inside, other=0.0).to(tl.float32)
    bits = s.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) == 1, ~bits, bits | 0x80000000)
    if INCLUDE_FIRST:
        key = tl.where(pos == 0, 0xFFFFFFFF, key)
    key = tl.where(inside, key, 0)  # never above a real key; excluded from the counts by `inside` anyway

    # radix select, most significant byte first: after the loop, `prefix` is the k-th largest key and `need`
    # how many keys equal to it are kept
    bins = tl.arange(0, 256)
    prefix = tl.zeros((), dtype=tl.uint32)
    need = k
    prefix, need = _radix_pass(key, inside, prefix, need, bins, 24)
    prefix, need = _radix_pass(key, inside, prefix, need, bins, 16)
    prefix, need = _radix_pass(key, inside, prefix, need, bins, 8)
    prefix, need = _radix_pass(key, inside, prefix, need, bins, 0)

    equal = inside & (key == prefix)
    eq_rank = tl.cumsum(equal.to(tl.int32), axis=0) - equal.to(tl.int32)
    keep = inside & ((key > prefix) | (equal & (eq_rank < need)))
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + row * k + slot, pos.to(tl.int64), mask=keep)


def topk_positions_triton(scores: torch.Tensor, k: int, include_first: bool = False) -> torch.Tensor:
    """Positions [B, E, k] (int64, ascending) of each row's k largest scores; see the module docstring."""
    if scores.dim() != 3:
        raise ValueError(f"scores must be [B, E, T], got scores.shape={tuple(scores.shape)}")
    B, E, T = scores.shape
    if not 1 <= k <= T:
        raise ValueError(f"k must be in [1, T={T}], got k={k}")
    if not supported(scores):
        raise ValueError(f"topk_positions_triton needs T <= {MAX_T} and scores in {_DTYPES}, got T={T}, "
                         f"dtype={scores.dtype}")
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    rows = scores.reshape(B * E, T)  # a view: contiguous last dim, rows equally spaced
    out = torch.empty(B, E, k, dtype=torch.int64, device=scores.device)
    if B * E == 0:
        return out
    BT = max(triton.next_power_of_2(T), 16)
    warps = 4 if BT <= 2048 else 8 if BT <= 8192 else 16
    _topk_positions[(B * E,)](rows, out, T, k, rows.stride(0), INCLUDE_FIRST=bool(include_first), BT=BT,
                              num_warps=warps)
    return out


def supported(scores: torch.Tensor) -> bool:
    return scores.dtype in _DTYPES and scores.shape[-1] <= MAX_T


@torch.library.custom_op("mosa_attention::topk_positions", mutates_args=())
def _topk_op(scores: torch.Tensor, k: int, include_first: bool) -> torch.Tensor:
    return topk_positions_triton(scores, k, include_first)


@_topk_op.register_fake
def _(scores, k, include_first):
    return scores.new_empty(*scores.shape[:-1], k, dtype=torch.int64)


def topk_positions(scores: torch.Tensor, k: int, include_first: bool = False) -> torch.Tensor:
    """``topk_positions_triton``, as an opaque custom op under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return _topk_op(scores, k, bool(include_first))
    return topk_positions_triton(scores, k, include_first)
