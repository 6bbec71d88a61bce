"""A Triton kernel for expert-choice selection: each head's top-k positions, sorted by position, in one launch.

``topk_positions_triton(scores, k, include_first)`` returns what ``select_topk`` returns as positions: for
every row ``(b, e)`` of ``scores [B, E, T]`` the k positions of the largest scores, ascending. It replaces
``torch.topk`` + ``sort`` (two launches, radix sorts, their buffers) by one launch. A program takes a
[T, BE] tile (BE heads of one sequence, read where they lie, so router logits [B, T, E] need no transpose):

1. each score becomes an unsigned 32-bit key with the order of the float (flip all bits of negatives, set
   the sign bit of the rest);
2. the k-th largest key of every column is found bit by bit from the top (32 counting passes over the
   tile in registers, 16 for bfloat16 and 19 for float16 input, whose other bits are constant: keep a bit
   if at least k keys reach the prefix with that bit set);
3. one compaction pass keeps the keys above the k-th and as many keys equal to it as are still needed,
   earliest positions first, and writes the positions in order with a prefix sum.

With ``apply_sigmoid`` the kernel reads router *logits* and also writes the kept scores sigmoid(logit)
(computed in float32, stored in ``kept``'s dtype): since sigmoid is increasing, the top-k of the logits
are the top-k of the scores. Ties go to earlier positions (``torch.topk`` leaves that choice unspecified,
so among equal scores the two may keep different tokens; the kept *scores* are the same multiset).
``include_first`` gives position 0 the largest key, so it is always kept and the other k - 1 are the best
of the rest. The tile must fit in registers: T <= ``MAX_T``; longer rows (and float64) stay with torch.
NaN scores count as the largest, as in ``torch.topk``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_pow2, on_its_device

MAX_T = 16384
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _topk_select(s_ptr, idx_ptr, kept_ptr, T, E, k, stride_b, stride_t, stride_e, n_bits,
                 INCLUDE_FIRST: tl.constexpr, SIGMOID: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                 KEY_BITS: tl.constexpr = 32, UNROLL: tl.constexpr = False, TWO_LEVEL: tl.constexpr = False):
    # the tile is [1, BT, BE]: positions on the middle axis (the leading axis of one lets the compaction's
    # scans be written in two levels, below)
    b = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BE + tl.arange(0, BE)
    pos = tl.arange(0, 1)[:, None, None] * BT + tl.arange(0, BT)[None, :, None]
    inside = (pos < T) & (e < E)[None, None, :]
    s_row = s_ptr + b * stride_b + e * stride_e
    bits = tl.load(s_row[None, None, :] + pos * stride_t, mask=inside, other=0.0).to(tl.float32)
    bits = bits.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) == 1, ~bits, bits | 0x80000000)
    if INCLUDE_FIRST:
        key = tl.where(pos == 0, 0xFFFFFFFF, key)
    # a 16-bit float widened to float32 varies only in its top KEY_BITS bits (16 for bfloat16, 19 for
    # float16): keep those, so the search below takes KEY_BITS passes instead of 32
    key = tl.where(inside, key >> (32 - KEY_BITS), 0)

    # the k-th largest key per column, from the top bit down: keep a bit when >= k keys reach the prefix
    # (a 256-bin histogram per eight bits instead was slower on an H200: benchmarks/NOTES.md v9.0).
    # The trip count n_bits (= KEY_BITS) is a runtime value so that the passes stay one loop: unrolled, they
    # made 43 % of a straight-line kernel of 61 KB of code, whose warps stalled on instruction fetch
    # (benchmarks/NOTES.md v19.0); UNROLL keeps the unrolled form for comparison
    prefix = tl.zeros([BE], dtype=tl.uint32)
    one = tl.full([BE], 1, dtype=tl.uint32)
    for i in range(KEY_BITS if UNROLL else n_bits):
        cand = prefix | (one << (KEY_BITS - 1 - i))
        reach = tl.sum(tl.sum((key >= cand[None, None, :]).to(tl.int32), axis=1), axis=0)  # outside keys: 0
        prefix = tl.where(reach >= k, cand, prefix)

    above = inside & (key > prefix[None, None, :])
    need = k - tl.sum(tl.sum(above.to(tl.int32), axis=1), axis=0)  # keys equal to the k-th that are kept
    equal = (inside & (key == prefix[None, None, :])).to(tl.int32)
    if TWO_LEVEL:
        # the same ranks written as a scan along the positions plus the scanned totals of the leading axis
        # (of length one, so zero): Triton then lays the scans out with fewer shuffles (at T = 1024 on one
        # warp 48 against 184; 13-23 % fewer instructions in the sm_90 build, benchmarks/NOTES.md v19.4)
        eq_tot = tl.sum(equal, axis=1)
        eq_rank = tl.cumsum(equal, axis=1) - equal + (tl.cumsum(eq_tot, axis=0) - eq_tot)[:, None, :]
        keep = (above | ((equal == 1) & (eq_rank < need[None, None, :]))).to(tl.int32)
        k_tot = tl.sum(keep, axis=1)
        slot = tl.cumsum(keep, axis=1) - 1 + (tl.cumsum(k_tot, axis=0) - k_tot)[:, None, :]
    else:
        eq_rank = tl.cumsum(equal, axis=1) - equal
        keep = (above | ((equal == 1) & (eq_rank < need[None, None, :]))).to(tl.int32)
        slot = tl.cumsum(keep, axis=1) - 1
    tl.store(idx_ptr + (b * E + e[None, None, :]) * k + slot, pos.to(tl.int64) + tl.zeros([1, BT, BE], tl.int64),
             mask=keep == 1)
    if SIGMOID:
        # the kept logits gathered again through the positions just written (the barrier makes them visible
        # to the whole program): computing sigmoid over the tile in registers and storing it through the
        # same masked addresses spilled registers (255 per thread at T = 1024)
        tl.debug_barrier()
        base = (b * E + e) * k
        for j0 in range(0, k, 16):
            j = j0 + tl.arange(0, 16)
            m = (e < E)[:, None] & (j < k)[None, :]
            p = tl.load(idx_ptr + base[:, None] + j[None, :], mask=m, other=0)
            lg = tl.load(s_row[:, None] + p * stride_t, mask=m, other=0.0).to(tl.float32)
            tl.store(kept_ptr + base[:, None] + j[None, :], (1.0 / (1.0 + tl.exp(-lg))).to(kept_ptr.dtype.element_ty),
                     mask=m)


# (BE columns per program, num_warps) override, for tuning only (benchmarks/bench_layer.py); None in normal use
TILE_OVERRIDE = None
# True: the counting passes unrolled, as before v19 (for A/B timing only; bench_layer.py --tune-topk)
UNROLL_PASSES = False
# the compaction's scans in two levels (TWO_LEVEL above): None chooses by the shape (two levels except for few
# rows of at most 1024 keys, t1's class, where they were ~2 us slower in the layer on an H200: NOTES.md v19.4);
# True / False force them (for A/B timing)
TWO_LEVEL_SCANS = None


FEW_ROWS = 512  # at most this many rows: t1's class (more warps per row; flat compaction scans)


def _tiles(T: int, rows: int):
    """[BT, BE] tile and warps for ``rows`` rows of length T. Many rows: one row per program, about 32 keys
    per thread, so that the 16-33 counting passes reduce in registers and warp shuffles (t3's 16 x 505 rows
    of 1024 on an H200: one warp per row 54 us, two rows on two warps 61 us; 64 keys per thread spilled,
    95 us; 8 warps per row went through shared memory and a barrier every pass, 213 us). Few rows (t1's
    272) leave SMs idle: one row per program on more warps (16 us against 22 us for two rows on two warps;
    benchmarks/NOTES.md, v6, v7)."""
    BT = max(next_pow2(T), 16)
    if rows <= FEW_ROWS:
        BE, warps = 1, max(1, min(8, BT // 256))
    else:
        BE, warps = 1, max(1, min(8, BT // 1024))
    if TILE_OVERRIDE is not None:
        BE, warps = TILE_OVERRIDE
    return BT, BE, warps


def _select(s, E, T, k, include_first, sigmoid, strides, kept_dtype):
    """s: scores/logits; strides (b, t, e) of s in elements."""
    B = s.shape[0]
    idx = torch.empty(B, E, k, dtype=torch.int64, device=s.device)
    kept = torch.empty(B, E, k, dtype=kept_dtype, device=s.device) if sigmoid else idx
    if B * E:
        BT, BE, warps = _tiles(T, B * E)
        bits = {torch.bfloat16: 16, torch.float16: 19}.get(s.dtype, 32)
        two = TWO_LEVEL_SCANS if TWO_LEVEL_SCANS is not None else not (B * E <= FEW_ROWS and BT <= 1024)
        _topk_select[(B, cdiv(E, BE))](s, idx, kept, T, E, k, *strides, bits, INCLUDE_FIRST=bool(include_first),
                                              SIGMOID=sigmoid, BT=BT, BE=BE, KEY_BITS=bits,
                                              UNROLL=bool(UNROLL_PASSES), TWO_LEVEL=bool(two), num_warps=warps)
    return idx, (kept if sigmoid else None)


def _check(name, t, k, T):
    if not 1 <= k <= T:
        raise ValueError(f"k must be in [1, T={T}], got k={k}")
    if t.dtype not in _DTYPES or T > MAX_T:
        raise ValueError(f"the fused top-k kernel needs T <= {MAX_T} and {name} in {_DTYPES}, got T={T}, "
                         f"dtype={t.dtype}")


@on_its_device
def topk_positions_triton(scores: torch.Tensor, k: int, include_first: bool = False) -> torch.Tensor:
    """Positions [B, E, k] (int64, ascending) of each row's k largest scores; scores [B, E, T], any strides."""
    if scores.dim() != 3:
        raise ValueError(f"scores must be [B, E, T], got scores.shape={tuple(scores.shape)}")
    B, E, T = scores.shape
    _check("scores", scores, k, T)
    sb, se, st = scores.stride()
    return _select(scores, E, T, k, include_first, False, (sb, st, se), None)[0]


@on_its_device
def route_logits_triton(logits: torch.Tensor, k: int, include_first: bool = False, kept_dtype=None):
    """From router logits [B, T, E] (any strides): (positions [B, E, k] ascending, kept scores
    sigmoid(logit) [B, E, k] in ``kept_dtype``, default the logits' dtype). Not differentiable."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, E], got logits.shape={tuple(logits.shape)}")
    B, T, E = logits.shape
    _check("logits", logits, k, T)
    if kept_dtype is not None and kept_dtype not in _DTYPES:
        raise ValueError(f"kept_dtype must be one of {_DTYPES} or None, got kept_dtype={kept_dtype}")
    sb, st, se = logits.stride()
    return _select(logits, E, T, k, include_first, True, (sb, st, se), kept_dtype or logits.dtype)


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
