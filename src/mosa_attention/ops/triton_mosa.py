"""Fused Triton kernels for ``sparse_attention`` (the MoSA heads), forward and backward.

``sparse_attention_triton`` has the signature and the semantics of ``sparse_attention_reference`` (see
``mosa.py``): gather the kept tokens, project them to Q, K, V, RoPE at the original positions, causal
attention among them, scale by the router score, project with W_O and scatter-add back.

Layout. Head ``e`` owns ``R = B*k`` packed rows: row ``r`` is slot ``r % k`` of sequence ``r // k``. Every
kernel works on blocks of these rows, so one block may hold several short sequences (k = 16 heads fill a
64-row tile with four sequences) and one weight tile serves all of them: the projections are grouped GEMMs
over heads. Attention masks on ``same sequence and pos_q >= pos_k``, which is the reference's rule for any
order of ``idx``; when a sequence's positions are strictly ascending (``select_topk`` sorts them; padding
slots at T may repeat) the kernels also skip the key blocks after the query block. Sortedness is checked on
the device, per block, so unsorted input is slower, never wrong, and nothing is read back to the host (CUDA
graphs can capture the op).

Forward: ``_qkv_fwd`` (gather + QKV projection + RoPE), ``_attn_fwd`` (flash attention + score + W_O
projection) and the scatter-add. Backward: ``_out_bwd`` (dO, d score), ``_dwo``, ``_attn_bwd_dkdv``,
``_attn_bwd_dq`` (both with RoPE backward; where k <= 64, ``_attn_bwd_seqs`` makes all three from one
score tile per block of whole sequences instead, and where k fits ``_out_bwd``'s block and the op runs alone,
``_out_bwd`` itself: ``ATTN_IN_OUT_BWD``), ``_qkv_bwd_dx`` (each kept token's share of dx) and the
scatter-add again, ``_dwqkv``. Weight gradients are reductions inside one program (no atomics). The two
scatter-adds (y, dx) have two modes. Atomics: ``_attn_fwd`` / ``_qkv_bwd_dx`` add their tiles into a
[B, T, h] buffer (nothing per kept token is written out, no sort; the order of the additions may differ
from run to run), 16 bytes per ``red.global.add`` on sm_90 (``_add_tile``). The buffer is float32 and
cast at the end, or the 16-bit result itself where its rounding allows (``_atomic_plan``: float16
always, bfloat16 at up to one kept row per token); y in bfloat16 with more kept rows per token goes
through a float16 buffer under a power-of-two scale set on the device (``_half_scale``). Rows: they
write one row per kept token, and ``_segment_sum`` sums each token's rows in head order through a stable
sort of the destinations (computed once in the forward), writing the zeros of unselected tokens too; the
same input then gives the same bits. ``deterministic=True`` (or
``torch.use_deterministic_algorithms(True)``) takes the rows, ``False`` the atomics, and the default the
faster for the shape (``use_rows``): atomics, except where they would need a float32 buffer (bfloat16
results above one kept row per token, or GPUs without bfloat16 atomics) and the kept tokens are few next to
T (there the buffer's fill and cast would cost more than the rows).

``mosa_triton`` runs the router in front of the same kernels as one autograd node: the router product
(w_r x^T, one cuBLAS call), the top-k kernel of ``triton_routing`` (positions sorted, kept scores in
float32), then the kernels above. Its backward folds the router's gradients into them: ``_out_bwd``
stores d logit = d score * s (1 - s) per kept slot, ``_qkv_bwd_dx`` adds d logit * w_router[e] to each
kept token's row of dx (the scatter sums it with the rest), and ``_dwqkv`` reduces d logit * x[b, pos]
into w_router's gradient from the same gathered x tiles as w_qkv's where its grid is small, ``_dwr``
where it is large (``DWR_IN_DWQKV``). Top-k passes no gradient to unkept tokens, so nothing of size
[B, E, T] is made.

Supported: x, w_qkv, w_o all float16, bfloat16 or float32 (float32 runs exact fp32 dots, no tf32);
head dim D <= 128 (any D, padded to a power of two in registers); any k >= 1. Non-contiguous inputs are
copied. Float64 falls back to the reference. Under autocast the products run in the autocast dtype
while x and the weights are read in their own dtypes, tile by tile: the result is in the autocast dtype,
x's gradient in x's and each weight's gradient in its own (float32 parameters need no 16-bit copies and no
gradient casts).
A launch whose pipeline does not fit in the GPU's shared memory is retried with fewer stages (``_launch``).
Positions must lie in [0, T]; T marks a padding slot (no real query's key, output dropped). Other bad
input (shapes, devices, dtype mixes, head dim > 128, odd rope_dims) raises ValueError naming it.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ._checks import check_bool
from ._host import Fork, cdiv, next_pow2, on_its_device
from ._host import interpreting as _interpreting
from .mosa import check_positions, check_reference_dtypes, check_sparse_inputs, sparse_attention_reference
from .triton_rope import rope_tables as _rope_tables

_MAX_HEAD_DIM = 128
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------- helpers
@triton.jit
def _rot(t, R: tl.constexpr, DP: tl.constexpr, TRANSPOSE: tl.constexpr, PREC: tl.constexpr):
    """rotate_half on the first R columns of t [M, DP], as a product with a signed permutation matrix
    (exact: one nonzero term per output). TRANSPOSE applies its transpose (= its inverse = minus it)."""
    H: tl.constexpr = R // 2
    i = tl.arange(0, DP)[:, None]
    c = tl.arange(0, DP)[None, :]
    if TRANSPOSE:
        i, c = c, i
    p = tl.where((c < H) & (i == c + H), -1.0, tl.where((c >= H) & (c < R) & (i == c - H), 1.0, 0.0))
    return tl.dot(t, p.to(t.dtype), input_precision=PREC)


@triton.jit
def _rope(t, pos, cos_ptr, sin_ptr, R: tl.constexpr, DP: tl.constexpr, DT: tl.constexpr,
          BACKWARD: tl.constexpr, PREC: tl.constexpr):
    """RoPE of t [M, DP] (fp32) at positions pos [M]; BACKWARD gives the gradient map (the transpose)."""
    H: tl.constexpr = R // 2
    cols = tl.arange(0, DP)
    f = cols % H
    m = (cols < R)[None, :]
    off = pos.to(tl.int64)[:, None] * H + f[None, :]
    cs = tl.load(cos_ptr + off, mask=m, other=1.0)
    sn = tl.load(sin_ptr + off, mask=m, other=0.0)
    if BACKWARD:
        return t * cs + _rot((t * sn).to(DT), R, DP, True, PREC)
    return t * cs + _rot(t.to(DT), R, DP, False, PREC) * sn


def _red_asm(cols: int, ty: str) -> str:
    """PTX for one predicated 16-byte (or, four 16-bit columns, 8-byte) atomic add of ``cols`` float32
    operands $2.. at address $1, predicate last: as they are (``ty`` f32) or rounded in pairs to
    ``ty`` (f16x2 / bf16x2, low column in the low half)."""
    pred = f"${cols + 2}"
    if ty == "f32":
        regs = ", ".join(f"${i + 2}" for i in range(cols))
        return (f"{{ .reg .pred p; setp.ne.b32 p, {pred}, 0; @p red.global.add.v{cols}.f32 [$1], {{{regs}}}; "
                "mov.b32 $0, 0; }")
    names = "abcd"[:cols // 2]
    cvt = " ".join(f"cvt.rn.{ty}.f32 {r}, ${2 * i + 3}, ${2 * i + 2};" for i, r in enumerate(names))
    return (f"{{ .reg .pred p; .reg .b32 {', '.join(names)}; setp.ne.b32 p, {pred}, 0; {cvt} "
            f"@p red.global.add.noftz.v{cols // 2}.{ty} [$1], {{{', '.join(names)}}}; mov.b32 $0, 0; }}")


_RED4_F32 = tl.constexpr(_red_asm(4, "f32"))
_RED4_BF16 = tl.constexpr(_red_asm(4, "bf16x2"))
_RED4_F16 = tl.constexpr(_red_asm(4, "f16x2"))
_RED8_BF16 = tl.constexpr(_red_asm(8, "bf16x2"))
_RED8_F16 = tl.constexpr(_red_asm(8, "f16x2"))


@triton.jit
def _add_tile(out_ptr, rowoff, n0, vals, live, h, VEC: tl.constexpr):
    """out[rowoff + n0 + j] += vals[:, j] for rows where live, columns n0 + j < h; vals float32, out float32,
    float16 or bfloat16 (rounded once per addition). VEC (sm_90): one 16-byte red.global.add per four columns
    (float32) or per eight (16-bit; VEC = 4 gives eight bytes per four), the tile split into its column
    phases so that the grouping does not depend on the register layout (needs h and n0 multiples of VEC: a
    group lies wholly inside the row and is aligned); VEC = 0: one relaxed atomic per element."""
    M: tl.constexpr = vals.shape[0]
    N: tl.constexpr = vals.shape[1]
    ODT: tl.constexpr = out_ptr.dtype.element_ty
    if VEC == 0:
        nn = n0 + tl.arange(0, N)
        tl.atomic_add(out_ptr + rowoff[:, None] + nn[None, :], vals.to(ODT),
                      mask=live[:, None] & (nn < h)[None, :], sem="relaxed")
    else:
        g = n0 + VEC * tl.arange(0, N // VEC)
        ptr = (out_ptr + rowoff[:, None] + g[None, :]).to(tl.int64)
        ok = (live[:, None] & (g < h)[None, :]).to(tl.int32)
        if VEC == 4:
            t0, t1 = tl.split(tl.reshape(vals, [M, N // 4, 2, 2]))  # columns 4g + 2i and 4g + 2i + 1
            v0, v2 = tl.split(t0)
            v1, v3 = tl.split(t1)
            if ODT == tl.float32:
                asm: tl.constexpr = _RED4_F32
            elif ODT == tl.bfloat16:
                asm: tl.constexpr = _RED4_BF16
            else:
                asm: tl.constexpr = _RED4_F16
            tl.inline_asm_elementwise(asm, "=r,l,f,f,f,f,r", [ptr, v0, v1, v2, v3, ok], dtype=tl.int32,
                                      is_pure=False, pack=1)
        else:  # VEC == 8, 16-bit out: columns 8g + 4i + 2j + l
            t0, t1 = tl.split(tl.reshape(vals, [M, N // 8, 2, 2, 2]))
            t00, t01 = tl.split(t0)
            t10, t11 = tl.split(t1)
            v0, v4 = tl.split(t00)
            v2, v6 = tl.split(t01)
            v1, v5 = tl.split(t10)
            v3, v7 = tl.split(t11)
            if ODT == tl.bfloat16:
                asm8: tl.constexpr = _RED8_BF16
            else:
                asm8: tl.constexpr = _RED8_F16
            tl.inline_asm_elementwise(asm8, "=r,l,f,f,f,f,f,f,f,f,r", [ptr, v0, v1, v2, v3, v4, v5, v6, v7, ok],
                                      dtype=tl.int32, is_pure=False, pack=1)


# The scaled float16 scatter of y (``_atomic_plan``): a bfloat16 y that takes several rows per token adds
# them into a float16 buffer (half the bytes of a float32 one, three bits more than bfloat16) multiplied by a
# power of two s, chosen on the device from maxima that ``_qkv_fwd`` records (int32 bits of non-negative
# float32 values, ``tl.atomic_max``) so that no partial sum can exceed 2^13 (float16 reaches 65504) and
# typical values lie far above float16's smallest normal; y is the buffer times 1 / s (``_unscale``).
# Slots of the stats, then one count per token from ``_ST_COUNTS`` where positions may repeat:
_ST_N = tl.constexpr(0)       # most rows kept on one token
_ST_V = tl.constexpr(1)       # max |v|
_ST_SC = tl.constexpr(2)      # max |score|
_ST_WO = tl.constexpr(3)      # max |w_o|
_N_STATS = 16
_ST_COUNTS = tl.constexpr(_N_STATS)


@triton.jit
def _absmax(t):
    """max |t| over a 2-D tile, float32."""
    return tl.max(tl.max(tl.abs(t.to(tl.float32)), 1), 0)


@triton.jit
def _stat(ptr):
    return tl.load(ptr).to(tl.float32, bitcast=True)


@triton.jit
def _half_scale(stats_ptr, D: tl.constexpr):
    """(s, 1 / s), powers of two, for the scaled float16 scatter of y. A token's sum is at most n (the most
    rows kept on one token) times the largest row, |o * score @ w_o| <= D max|v| max|score| max|w_o| (o
    averages rows of v); s puts that bound under 2^13, eight times under float16's largest value (room for
    the roundings of the 16-bit operands). Exponent arithmetic only, so every kernel that asks gets the same
    s; s and 1 / s stay within float32's normal range."""
    bound = D * _stat(stats_ptr + _ST_V) * _stat(stats_ptr + _ST_SC) * _stat(stats_ptr + _ST_WO)
    bound = bound * _stat(stats_ptr + _ST_N)
    ex = ((bound.to(tl.int32, bitcast=True) >> 23) & 255) - 127  # bound < 2^(ex + 1)
    p = tl.minimum(tl.maximum(12 - ex, -126), 126)
    return ((p + 127) << 23).to(tl.float32, bitcast=True), ((127 - p) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _unscale(src_ptr, dst_ptr, n, stats_ptr, D: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr = False,
             SCALED: tl.constexpr = True):
    """dst = src / s: the scaled float16 scatter's buffer to y's dtype; ADD: dst += src / s (rounded once);
    SCALED = False: s = 1 (a float32 buffer; stats_ptr unread)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    v = tl.load(src_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if SCALED:
        s_unused, inv = _half_scale(stats_ptr, D)
        v = v * inv
    if ADD:
        v += tl.load(dst_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(dst_ptr + offs, v.to(dst_ptr.dtype.element_ty), mask=m)


@triton.jit
def _seqs_sorted(idx_ptr, e, E, K, T, s_first, s_last, BS: tl.constexpr):
    """True iff the positions of head e in sequences s_first..s_last are strictly ascending (repeats
    allowed only for padding slots, pos >= T, whose outputs are dropped): then every key a query may see
    comes before it, and a repeated position cannot hide across a block boundary."""
    bad = tl.sum(tl.zeros([BS], tl.int32), 0)
    end = (s_last + 1) * K
    for r0 in range(s_first * K, end, BS):
        r = r0 + tl.arange(0, BS)
        j = r % K
        m = (r < end) & (j < K - 1)
        p = idx_ptr + ((r // K) * E + e) * K + j
        a = tl.load(p, mask=m, other=0)
        b = tl.load(p + 1, mask=m, other=0)
        bad += tl.sum(((a > b) | ((a == b) & (a < T))).to(tl.int32), 0)
    return bad == 0


@triton.jit
def _row_info(idx_ptr, rows, e, E, K, R):
    """Sequence, slot offset into [B, E, k] and position of packed rows."""
    m = rows < R
    b = rows // K
    sel = (b * E + e) * K + rows % K
    pos = tl.load(idx_ptr + sel, mask=m, other=0)
    return m, b, sel, pos


@triton.jit
def _key_range(idx_ptr, e, E, K, R, T, r0, BLOCK: tl.constexpr, BS: tl.constexpr):
    """Keys that queries r0..r0+BLOCK-1 may see: from their first sequence's start to the block's end when
    positions are ascending, else to their last sequence's end."""
    last = tl.minimum(r0 + BLOCK, R) - 1
    start = (r0 // K) * K
    seq_end = (last // K + 1) * K
    if _seqs_sorted(idx_ptr, e, E, K, T, r0 // K, last // K, BS):
        end = last + 1
    else:
        end = seq_end
    return start, end


@triton.jit
def _query_range(idx_ptr, e, E, K, R, T, n0, BLOCK: tl.constexpr, BS: tl.constexpr):
    """Queries that may see keys n0..n0+BLOCK-1 (the mirror of _key_range)."""
    last = tl.minimum(n0 + BLOCK, R) - 1
    end = (last // K + 1) * K
    if _seqs_sorted(idx_ptr, e, E, K, T, n0 // K, last // K, BS):
        start = n0
    else:
        start = (n0 // K) * K
    return start, end


@triton.jit
def _visible(qm, km, bq, bk, posq, posk):
    """[queries, keys] mask of the causal rule among kept tokens: both live, same sequence, pos_q >= pos_k."""
    return qm[:, None] & km[None, :] & (bq[:, None] == bk[None, :]) & (posq[:, None] >= posk[None, :])


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, ok, qk_scale, PREC: tl.constexpr):
    """(P, dS) of one [queries, keys] tile in the backward: the probabilities recomputed from the saved
    log2-sum-exp (zero where not ``ok``) and the scores' gradient P * (dO V^T - delta), softmax scale not
    yet applied."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    return p, p * (dp - delta[:, None])


@triton.jit
def _zero_share(ptr, n, BLOCK: tl.constexpr):
    """This program's share of zeroing ptr[0:n]: the atomic scatter's buffer is cleared by the kernel that
    runs before the scatter (its stores drain while the program computes) instead of by a fill launch."""
    n_prog = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    pid = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
    per = tl.cdiv(tl.cdiv(n, n_prog), BLOCK) * BLOCK
    start = tl.multiple_of(pid.to(tl.int64) * per, BLOCK)
    zeros = tl.zeros([BLOCK], ptr.dtype.element_ty)
    for i in range(0, per, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        tl.store(ptr + offs, zeros, mask=offs < n)


@triton.jit
def _zero_rows(ptr, rowoff, live, h, BH: tl.constexpr):
    """Clear ptr[rowoff[i] : rowoff[i] + h] for the rows i where live: a rows-only scatter's buffer, cleared
    at the rows the scatter will add into (the rows of the tokens some head keeps) instead of everywhere."""
    zeros = tl.zeros([rowoff.shape[0], BH], ptr.dtype.element_ty)
    for c0 in range(0, h, BH):
        c = c0 + tl.arange(0, BH)
        tl.store(ptr + rowoff[:, None] + c[None, :], zeros, mask=live[:, None] & (c < h)[None, :])


# --------------------------------------------------------------------------------------------- forward
@triton.jit
def _qkv_fwd(x_ptr, idx_ptr, w_ptr, cos_ptr, sin_ptr, qkv_ptr, T, h, E, R, K, zero_ptr, zero_n, mark_ptr,
             sc_ptr, wo_ptr, stats_ptr,
             D: tl.constexpr, DP: tl.constexpr, ROPE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
             PREC: tl.constexpr, FUSED: tl.constexpr, ZERO: tl.constexpr = 0, MARK: tl.constexpr = False,
             STATS: tl.constexpr = False, COUNT: tl.constexpr = False):
    """qkv[part, e, rows] = RoPE(x[b, pos] @ w_qkv[e][:, part*D:(part+1)*D]) for part in q, k, v.
    FUSED: one program makes all three from one load of the gathered rows (grid axis 2 has size 1);
    else one program per part (less register and shared memory for large head dims or fp32).
    ZERO = 1: also clear zero_ptr[0:zero_n] (the [B, T, h] buffer ``_attn_fwd`` adds y into), shared by all
    programs; 2: clear only its rows of the kept tokens (rows-only output). MARK: set mark[b, pos] = 1 for
    the kept tokens (a [B, T] mask). STATS: record the stats of the scaled float16 scatter of y in the
    zeroed int32 stats (``_fwd_stats``; COUNT: count the rows kept per token from ``_ST_COUNTS``)."""
    if ZERO == 1:
        _zero_share(zero_ptr, zero_n, 1024)
    pid = tl.program_id(0)
    e = tl.program_id(1)
    part = tl.program_id(2)
    DT: tl.constexpr = qkv_ptr.dtype.element_ty
    rows = pid * BM + tl.arange(0, BM)
    rm, b, sel, pos = _row_info(idx_ptr, rows, e, E, K, R)
    if ZERO == 2 or MARK:  # (unfused: the three parts' programs each do it; same values)
        live = rm & (pos >= 0) & (pos < T)
        if MARK:
            tl.store(mark_ptr + b * T + pos, tl.full([BM], 1, tl.uint8), mask=live)
        if ZERO == 2:
            _zero_rows(zero_ptr, (b * T + pos).to(tl.int64) * h, live, h, 64)
    xoff = (b * T + tl.minimum(tl.maximum(pos, 0), T - 1)).to(tl.int64) * h
    cols = tl.arange(0, DP)
    cm = cols < D
    wbase = w_ptr + e.to(tl.int64) * h * 3 * D + part * D
    acc = tl.zeros([BM, DP], tl.float32)
    acc_k = tl.zeros([BM, DP], tl.float32)
    acc_v = tl.zeros([BM, DP], tl.float32)
    for k0 in range(0, h, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < h
        xa = tl.load(x_ptr + xoff[:, None] + kk[None, :], mask=rm[:, None] & km[None, :], other=0.0).to(DT)
        wp = wbase + kk[:, None] * (3 * D) + cols[None, :]
        wm = km[:, None] & cm[None, :]
        acc = tl.dot(xa, tl.load(wp, mask=wm, other=0.0).to(DT), acc, input_precision=PREC)
        if FUSED:
            acc_k = tl.dot(xa, tl.load(wp + D, mask=wm, other=0.0).to(DT), acc_k, input_precision=PREC)
            acc_v = tl.dot(xa, tl.load(wp + 2 * D, mask=wm, other=0.0).to(DT), acc_v, input_precision=PREC)
    v_max = 0.0
    if STATS:
        if FUSED:
            v_max = _absmax(acc_v)
        else:
            v_max = tl.where(part == 2, _absmax(acc), 0.0)
    rope_pos = tl.minimum(tl.maximum(pos, 0), T)
    om = rm[:, None] & cm[None, :]
    out = qkv_ptr + ((part * E + e) * R + rows).to(tl.int64)[:, None] * D + cols[None, :]
    if FUSED:
        if ROPE > 0:
            acc = _rope(acc, rope_pos, cos_ptr, sin_ptr, ROPE, DP, DT, False, PREC)
            acc_k = _rope(acc_k, rope_pos, cos_ptr, sin_ptr, ROPE, DP, DT, False, PREC)
        tl.store(out, acc.to(DT), mask=om)
        tl.store(out + E * R * D, acc_k.to(DT), mask=om)
        tl.store(out + 2 * E * R * D, acc_v.to(DT), mask=om)
    else:
        if ROPE > 0:
            if part < 2:
                acc = _rope(acc, rope_pos, cos_ptr, sin_ptr, ROPE, DP, DT, False, PREC)
        tl.store(out, acc.to(DT), mask=om)
    if STATS:  # (after the stores, where the accumulators are dead)
        _fwd_stats(stats_ptr, sc_ptr, wo_ptr, rm, b, sel, pos, T, h, E, pid, e, part, v_max, D, DP, COUNT)


@triton.jit
def _fwd_stats(stats_ptr, sc_ptr, wo_ptr, rm, b, sel, pos, T, h, E, pid, e, part, v_max,
               D: tl.constexpr, DP: tl.constexpr, COUNT: tl.constexpr):
    """``_qkv_fwd``'s share of the scaled scatter's stats, in one vector atomic per program (a scalar one
    would hold every thread of the program): n, the most rows on one token (counted where positions may
    repeat, COUNT; else E, each head keeping a token at most once), max |v| (given), |score| of its rows and
    |w_o[e]|, the programs of a head taking its column tiles in turn."""
    n = 0.0
    sc_max = 0.0
    wo_max = 0.0
    if part == 0:  # once per row
        if COUNT:
            live = rm & (pos >= 0) & (pos < T)
            seen = tl.atomic_add(stats_ptr + _ST_COUNTS + b * T + tl.minimum(tl.maximum(pos, 0), T - 1),
                                 tl.full(rm.shape, 1, tl.int32), mask=live, sem="relaxed")
            n = tl.max(tl.where(live, seen + 1, 0), 0).to(tl.float32)
        else:
            n = E * 1.0
        sc_max = tl.max(tl.abs(tl.load(sc_ptr + sel, mask=rm, other=0.0).to(tl.float32)), 0)
        d = tl.arange(0, DP)
        c = tl.arange(0, 256)
        for c0 in range(pid * 256, h, tl.num_programs(0) * 256):
            wo = tl.load(wo_ptr + e.to(tl.int64) * D * h + d[:, None] * h + (c0 + c)[None, :],
                         mask=(d < D)[:, None] & (c0 + c < h)[None, :], other=0.0)
            wo_max = tl.maximum(wo_max, _absmax(wo))
    i = tl.arange(0, 4)  # slots _ST_N .. _ST_WO
    vals = tl.where(i == 0, n, tl.where(i == 1, v_max, tl.where(i == 2, sc_max, wo_max)))
    tl.atomic_max(stats_ptr + i, vals.to(tl.int32, bitcast=True), sem="relaxed")


@triton.jit
def _attn_fwd(qkv_ptr, idx_ptr, sc_ptr, wo_ptr, o_ptr, lse_ptr, out_ptr, T, h, E, R, K, qk_scale, stats_ptr,
              D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr,
              BS: tl.constexpr, PREC: tl.constexpr, ATOMIC: tl.constexpr = False, VEC: tl.constexpr = 0,
              SCALED: tl.constexpr = False, ATTN: tl.constexpr = True, PROJ: tl.constexpr = True,
              SPLIT_H: tl.constexpr = False):
    """Causal attention of one block of query rows, then its rows of y = (o * score) @ w_o[e]: stored as
    per-kept-token rows for the deterministic scatter, or (ATOMIC) added straight into out[b, pos]
    (padding slots dropped); SCALED: times ``_half_scale``'s s (out is the scaled float16 buffer).
    ATTN = False: the rows' o read from o_ptr instead (the projection alone, ``project_into``); PROJ = False:
    the attention alone (o and lse stored, out untouched). SPLIT_H: each program makes one BH-column block of
    its rows (grid axis 2), not all h columns."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    DT: tl.constexpr = qkv_ptr.dtype.element_ty
    r0 = pid * BM
    rows = r0 + tl.arange(0, BM)
    rm, bq, sel, posq = _row_info(idx_ptr, rows, e, E, K, R)
    cols = tl.arange(0, DP)
    cm = cols < D
    if ATTN:
        q_ptr = qkv_ptr + (e * R).to(tl.int64) * D
        k_ptr = qkv_ptr + ((E + e) * R).to(tl.int64) * D
        v_ptr = qkv_ptr + ((2 * E + e) * R).to(tl.int64) * D
        q = tl.load(q_ptr + rows[:, None] * D + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
        start, end = _key_range(idx_ptr, e, E, K, R, T, r0, BM, BS)
        m_i = tl.full([BM], -1.0e30, tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, DP], tl.float32)
        for n0 in range(start, end, BN):
            kr = n0 + tl.arange(0, BN)
            km = kr < end
            bk = kr // K
            posk = tl.load(idx_ptr + (bk * E + e) * K + kr % K, mask=km, other=0)
            kt = tl.load(k_ptr + kr[None, :] * D + cols[:, None], mask=km[None, :] & cm[:, None], other=0.0)
            s = tl.dot(q, kt, input_precision=PREC) * qk_scale
            s = tl.where(_visible(rm, km, bq, bk, posq, posk), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kr[:, None] * D + cols[None, :], mask=km[:, None] & cm[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DT), v, input_precision=PREC)
            m_i = m_new
        l_i = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_i[:, None]
        tl.store(o_ptr + (e * R + rows).to(tl.int64)[:, None] * D + cols[None, :], o.to(DT),
                 mask=rm[:, None] & cm[None, :])
        tl.store(lse_ptr + e * R + rows, m_i + tl.log2(l_i), mask=rm)
    else:
        o = tl.load(o_ptr + (e * R + rows).to(tl.int64)[:, None] * D + cols[None, :],
                    mask=rm[:, None] & cm[None, :], other=0.0).to(tl.float32)
    if PROJ:
        if SPLIT_H:
            n_lo = tl.program_id(2) * BH
            n_hi = n_lo + BH
        else:
            n_lo = 0
            n_hi = h
        _project_rows(o, rows, rm, bq, sel, posq, e, sc_ptr, wo_ptr, out_ptr, T, h, R, stats_ptr, cols, cm, n_lo,
                      n_hi, D, BH, PREC, ATOMIC, VEC, SCALED, DT)


@triton.jit
def _project_rows(o, rows, rm, bq, sel, posq, e, sc_ptr, wo_ptr, out_ptr, T, h, R, stats_ptr, cols, cm, n_lo, n_hi,
                  D: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr, ATOMIC: tl.constexpr, VEC: tl.constexpr,
                  SCALED: tl.constexpr, DT: tl.constexpr):
    """``_attn_fwd``'s rows of y = (o * score) @ w_o[e], columns n_lo to n_hi (at most h), stored or added (see
    there)."""
    # score scaling + output projection + scatter-add; padding slots (pos == T) are dropped
    sc = tl.load(sc_ptr + sel, mask=rm, other=0.0).to(tl.float32)
    os = (o.to(DT).to(tl.float32) * sc[:, None]).to(DT)
    if ATOMIC:
        orow = (bq * T + tl.minimum(tl.maximum(posq, 0), T - 1)).to(tl.int64) * h
        live = rm & (posq >= 0) & (posq < T)
    else:
        orow = (e * R + rows).to(tl.int64) * h
        live = rm
    wbase = wo_ptr + e.to(tl.int64) * D * h
    s = 1.0
    if SCALED:
        s, inv_unused = _half_scale(stats_ptr, D)
    for n0 in range(n_lo, n_hi, BH):
        nn = n0 + tl.arange(0, BH)
        nm = nn < h
        w = tl.load(wbase + cols[:, None] * h + nn[None, :], mask=cm[:, None] & nm[None, :], other=0.0).to(DT)
        y = tl.dot(os, w, input_precision=PREC)
        if ATOMIC:
            if SCALED:
                y = y * s
            _add_tile(out_ptr, orow, n0, y, live, h, VEC)
        else:
            tl.store(out_ptr + orow[:, None] + nn[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=live[:, None] & nm[None, :])


@triton.jit
def _segment_sum(rows_ptr, perm_ptr, starts_ptr, out_ptr, N, NP, T, h, BT: tl.constexpr, BH: tl.constexpr):
    """out[b, t] = sum of the per-head rows that land on (b, t), in head order: a scatter-add without
    atomics (deterministic), which also writes the zeros of unselected tokens (no separate fill)."""
    pid = tl.program_id(0)
    pn = tl.program_id(1)
    o = pid * BT + tl.arange(0, BT)  # b * T + t
    om = o < N
    key = o + o // T  # b * (T + 1) + t
    s = tl.load(starts_ptr + key, mask=om, other=0).to(tl.int32)
    n = tl.load(starts_ptr + key + 1, mask=om, other=0).to(tl.int32) - s
    nn = pn * BH + tl.arange(0, BH)
    nm = nn < h
    acc = tl.zeros([BT, BH], tl.float32)
    for i in range(0, tl.max(n, 0)):
        live = (i < n)[:, None]
        # 2-D index loads: a 1-D masked load here trips Triton 3.6's layout pass
        src = tl.load(perm_ptr + tl.minimum(s + i, NP - 1)[:, None])
        acc += tl.load(rows_ptr + src * h + nn[None, :], mask=live & nm[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + o.to(tl.int64)[:, None] * h + nn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=om[:, None] & nm[None, :])


# --------------------------------------------------------------------------------------------- backward
@triton.jit
def _out_bwd(dy_ptr, idx_ptr, sc_ptr, wo_ptr, o_ptr, do_ptr, delta_ptr, dsc_ptr, T, h, E, R, K,
             zero_ptr, zero_n, dlf_ptr, dlf_stride, dwo_ptr, qkv_ptr, lse_ptr, dqkv_ptr, cos_ptr, sin_ptr, NR,
             qk_scale, sm_scale, dl16_ptr, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
             BH: tl.constexpr, PREC: tl.constexpr, DLOGIT: tl.constexpr = False, ZERO: tl.constexpr = 0,
             DENSE_DL: tl.constexpr = False, DWO: tl.constexpr = False, ATTN: tl.constexpr = False,
             ROPE: tl.constexpr = 0, DL16: tl.constexpr = False):
    """dO = score * (dy[b, pos] @ w_o[e]^T); d score = rowsum(dy[b, pos] @ w_o[e]^T * o); delta = rowsum(dO*o).
    DLOGIT: the scores are sigmoid(router logits); store d logit = d score * score * (1 - score) instead.
    ZERO = 1: also clear zero_ptr[0:zero_n] (the [B, T, h] buffer ``_qkv_bwd_dx`` adds dx into), shared by all
    programs; 2: clear only its rows of the kept tokens (rows-only output).
    DENSE_DL: also write d logit into the zeroed [E, B * T] matrix dlf (row stride dlf_stride) at column
    b * T + pos, for the router's weight gradient as one dense product (``_router_grad_dense``).
    DWO: the program holds all R rows of its head (BM >= R) and also makes ``_dwo``'s dw_o[e] from the same
    dy tiles, each column tile of it once: one gather of dy instead of two, one launch less.
    ATTN: each program holds NR = (BM // K) * K rows, whole sequences (K <= BM), and goes on to their
    attention backward (``_seqs_bwd``: dq, dk, dv into dqkv) instead of storing dO and delta for
    ``_attn_bwd_seqs``: one launch less, and dO never leaves the registers.
    DL16: also write d logit as the first of 16 columns of dl16 [E, R, 16] (zero elsewhere and at padding
    slots), in the compute dtype: the tile ``_dwqkv`` multiplies for the router's weight gradient."""
    if ZERO == 1:
        _zero_share(zero_ptr, zero_n, 1024)
    pid = tl.program_id(0)
    e = tl.program_id(1)
    DT: tl.constexpr = o_ptr.dtype.element_ty
    if ATTN:
        i = tl.arange(0, BM)
        rows = pid * NR + i
        rm, b, sel, pos = _row_info(idx_ptr, rows, e, E, K, R)
        rm = rm & (i < NR)
    else:
        rows = pid * BM + tl.arange(0, BM)
        rm, b, sel, pos = _row_info(idx_ptr, rows, e, E, K, R)
    keep = rm & (pos >= 0) & (pos < T)
    grow = (b * T + pos).to(tl.int64) * h
    if ZERO == 2:
        _zero_rows(zero_ptr, grow, keep, h, 64)
    cols = tl.arange(0, DP)
    cm = cols < D
    wbase = wo_ptr + e.to(tl.int64) * D * h
    sc = tl.load(sc_ptr + sel, mask=rm, other=0.0).to(tl.float32)
    if DWO:  # (o * score)^T, [DP, BM]: the left factor of every column tile of dw_o[e]
        ost = (tl.load(o_ptr + (e * R + rows).to(tl.int64)[None, :] * D + cols[:, None],
                       mask=rm[None, :] & cm[:, None], other=0.0).to(tl.float32) * sc[None, :]).to(DT)
    acc = tl.zeros([BM, DP], tl.float32)
    for n0 in range(0, h, BH):
        nn = n0 + tl.arange(0, BH)
        nm = nn < h
        g = tl.load(dy_ptr + grow[:, None] + nn[None, :], mask=keep[:, None] & nm[None, :], other=0.0)
        wt = tl.load(wbase + cols[None, :] * h + nn[:, None], mask=cm[None, :] & nm[:, None], other=0.0).to(DT)
        acc = tl.dot(g, wt, acc, input_precision=PREC)
        if DWO:
            dw = tl.dot(ost, g, input_precision=PREC)
            tl.store(dwo_ptr + e.to(tl.int64) * D * h + cols[:, None] * h + nn[None, :],
                     dw.to(dwo_ptr.dtype.element_ty), mask=cm[:, None] & nm[None, :])
    ooff = (e * R + rows).to(tl.int64)[:, None] * D + cols[None, :]
    o = tl.load(o_ptr + ooff, mask=rm[:, None] & cm[None, :], other=0.0).to(tl.float32)
    dsc = tl.sum(acc * o, 1)
    if DLOGIT:
        dsc = dsc * sc * (1.0 - sc)
    tl.store(dsc_ptr + sel, dsc, mask=rm)
    if DL16:
        c16 = tl.arange(0, 16)
        tl.store(dl16_ptr + (e * R + rows).to(tl.int64)[:, None] * 16 + c16[None, :],
                 tl.where((c16 == 0)[None, :] & keep[:, None], dsc[:, None], 0.0).to(DT), mask=rm[:, None])
    if DENSE_DL:
        tl.store(dlf_ptr + e.to(tl.int64) * dlf_stride + b * T + pos, dsc.to(dlf_ptr.dtype.element_ty), mask=keep)
    do = (acc * sc[:, None]).to(DT)
    delta = tl.sum(do.to(tl.float32) * o, 1)
    if ATTN:
        lse = tl.load(lse_ptr + e * R + rows, mask=rm, other=0.0)
        _seqs_bwd(qkv_ptr, dqkv_ptr, cos_ptr, sin_ptr, e, E, R, T, rows, rm, b, pos, do, lse, delta, qk_scale,
                  sm_scale, D, DP, ROPE, PREC)
    else:
        tl.store(do_ptr + ooff, do, mask=rm[:, None] & cm[None, :])
        tl.store(delta_ptr + e * R + rows, delta, mask=rm)


@triton.jit
def _dwo(dy_ptr, idx_ptr, sc_ptr, o_ptr, dwo_ptr, T, h, E, R, K,
         D: tl.constexpr, DP: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
         SPLIT: tl.constexpr = 1, VEC: tl.constexpr = 0):
    """dw_o[e][:, cols] = sum over rows of (o * score)^T dy[b, pos]. SPLIT > 1: the rows in SPLIT slices
    (grid axis 2), each program adding its partial sum into the zeroed float32 dw_o (``_add_tile``)."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    DT: tl.constexpr = o_ptr.dtype.element_ty
    nn = pid * BH + tl.arange(0, BH)
    nm = nn < h
    cols = tl.arange(0, DP)
    cm = cols < D
    r_start, r_end = _row_slice(R, BR, SPLIT)
    acc = tl.zeros([DP, BH], tl.float32)
    for r0 in range(r_start, r_end, BR):
        rows = r0 + tl.arange(0, BR)
        rm, b, sel, pos = _row_info(idx_ptr, rows, e, E, K, r_end)
        keep = rm & (pos >= 0) & (pos < T)
        g = tl.load(dy_ptr + (b * T + pos).to(tl.int64)[:, None] * h + nn[None, :],
                    mask=keep[:, None] & nm[None, :], other=0.0)
        ot = tl.load(o_ptr + (e * R + rows).to(tl.int64)[None, :] * D + cols[:, None],
                     mask=rm[None, :] & cm[:, None], other=0.0).to(tl.float32)
        sc = tl.load(sc_ptr + sel, mask=rm, other=0.0).to(tl.float32)
        acc = tl.dot((ot * sc[None, :]).to(DT), g, acc, input_precision=PREC)
    if SPLIT > 1:
        _add_tile(dwo_ptr, e.to(tl.int64) * D * h + cols * h, pid * BH, acc, cm, h, VEC)
    else:
        tl.store(dwo_ptr + e.to(tl.int64) * D * h + cols[:, None] * h + nn[None, :],
                 acc.to(dwo_ptr.dtype.element_ty), mask=cm[:, None] & nm[None, :])


@triton.jit
def _row_slice(R, BR: tl.constexpr, SPLIT: tl.constexpr):
    """[start, end) of the rows this program reduces over: slice program_id(2) % SPLIT of R, whole blocks of
    BR rows each (the weight gradients' split reduction)."""
    if SPLIT == 1:
        return 0, R
    per = tl.cdiv(tl.cdiv(R, SPLIT), BR) * BR
    start = (tl.program_id(2) % SPLIT) * per
    return start, tl.minimum(start + per, R)


@triton.jit
def _attn_bwd_dkdv(qkv_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, cos_ptr, sin_ptr, T, E, R, K,
                   qk_scale, sm_scale, D: tl.constexpr, DP: tl.constexpr, ROPE: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    e = tl.program_id(1)
    DT: tl.constexpr = qkv_ptr.dtype.element_ty
    n0 = pid * BN
    kr = n0 + tl.arange(0, BN)
    km, bk, _, posk = _row_info(idx_ptr, kr, e, E, K, R)
    cols = tl.arange(0, DP)
    cm = cols < D
    q_ptr = qkv_ptr + (e * R).to(tl.int64) * D
    koff = kr.to(tl.int64)[:, None] * D + cols[None, :]
    kmask = km[:, None] & cm[None, :]
    k = tl.load(qkv_ptr + ((E + e) * R).to(tl.int64) * D + koff, mask=kmask, other=0.0)
    v = tl.load(qkv_ptr + ((2 * E + e) * R).to(tl.int64) * D + koff, mask=kmask, other=0.0)
    dk = tl.zeros([BN, DP], tl.float32)
    dv = tl.zeros([BN, DP], tl.float32)
    start, end = _query_range(idx_ptr, e, E, K, R, T, n0, BN, BS)
    for m0 in range(start, end, BM):
        qr = m0 + tl.arange(0, BM)
        qm = qr < end
        bq = qr // K
        posq = tl.load(idx_ptr + (bq * E + e) * K + qr % K, mask=qm, other=0)
        qoff = qr.to(tl.int64)[:, None] * D + cols[None, :]
        qmask = qm[:, None] & cm[None, :]
        q = tl.load(q_ptr + qoff, mask=qmask, other=0.0)
        do = tl.load(do_ptr + (e * R).to(tl.int64) * D + qoff, mask=qmask, other=0.0)
        lse = tl.load(lse_ptr + e * R + qr, mask=qm, other=0.0)
        delta = tl.load(delta_ptr + e * R + qr, mask=qm, other=0.0)
        p, ds = _probs_and_dscores(q, k, v, do, lse, delta, _visible(qm, km, bq, bk, posq, posk), qk_scale, PREC)
        dv = tl.dot(tl.trans(p.to(DT)), do, dv, input_precision=PREC)
        dk = tl.dot(tl.trans(ds.to(DT)), q, dk, input_precision=PREC)
    dk = dk * sm_scale
    if ROPE > 0:
        dk = _rope(dk, tl.minimum(tl.maximum(posk, 0), T), cos_ptr, sin_ptr, ROPE, DP, DT, True, PREC)
    tl.store(dqkv_ptr + ((E + e) * R).to(tl.int64) * D + koff, dk.to(DT), mask=kmask)
    tl.store(dqkv_ptr + ((2 * E + e) * R).to(tl.int64) * D + koff, dv.to(DT), mask=kmask)


@triton.jit
def _attn_bwd_dq(qkv_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, cos_ptr, sin_ptr, T, E, R, K,
                 qk_scale, sm_scale, D: tl.constexpr, DP: tl.constexpr, ROPE: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    e = tl.program_id(1)
    DT: tl.constexpr = qkv_ptr.dtype.element_ty
    r0 = pid * BM
    rows = r0 + tl.arange(0, BM)
    rm, bq, _, posq = _row_info(idx_ptr, rows, e, E, K, R)
    cols = tl.arange(0, DP)
    cm = cols < D
    qoff = rows.to(tl.int64)[:, None] * D + cols[None, :]
    qmask = rm[:, None] & cm[None, :]
    q = tl.load(qkv_ptr + (e * R).to(tl.int64) * D + qoff, mask=qmask, other=0.0)
    do = tl.load(do_ptr + (e * R).to(tl.int64) * D + qoff, mask=qmask, other=0.0)
    lse = tl.load(lse_ptr + e * R + rows, mask=rm, other=0.0)
    delta = tl.load(delta_ptr + e * R + rows, mask=rm, other=0.0)
    k_ptr = qkv_ptr + ((E + e) * R).to(tl.int64) * D
    v_ptr = qkv_ptr + ((2 * E + e) * R).to(tl.int64) * D
    dq = tl.zeros([BM, DP], tl.float32)
    start, end = _key_range(idx_ptr, e, E, K, R, T, r0, BM, BS)
    for n0 in range(start, end, BN):
        kr = n0 + tl.arange(0, BN)
        km = kr < end
        bk = kr // K
        posk = tl.load(idx_ptr + (bk * E + e) * K + kr % K, mask=km, other=0)
        koff = kr.to(tl.int64)[:, None] * D + cols[None, :]
        kmask = km[:, None] & cm[None, :]
        k = tl.load(k_ptr + koff, mask=kmask, other=0.0)
        v = tl.load(v_ptr + koff, mask=kmask, other=0.0)
        # (not "_": that name holds _row_info's int tensor above, and a loop may not change its type)
        p_unused, ds = _probs_and_dscores(q, k, v, do, lse, delta, _visible(rm, km, bq, bk, posq, posk), qk_scale,
                                          PREC)
        dq = tl.dot(ds.to(DT), k, dq, input_precision=PREC)
    dq = dq * sm_scale
    if ROPE > 0:
        dq = _rope(dq, tl.minimum(tl.maximum(posq, 0), T), cos_ptr, sin_ptr, ROPE, DP, DT, True, PREC)
    tl.store(dqkv_ptr + (e * R).to(tl.int64) * D + qoff, dq.to(DT), mask=qmask)


@triton.jit
def _seqs_bwd(qkv_ptr, dqkv_ptr, cos_ptr, sin_ptr, e, E, R, T, rows, live, b, pos, do, lse, delta, qk_scale, sm_scale,
              D: tl.constexpr, DP: tl.constexpr, ROPE: tl.constexpr, PREC: tl.constexpr):
    """dq, dk and dv of the packed rows ``rows`` of head e, which hold whole sequences (every query that sees
    one of their keys is among them), from one tile of scores, in any order of positions (the mask is same
    sequence and pos_q >= pos_k); do, lse and delta are the rows' own."""
    DT: tl.constexpr = qkv_ptr.dtype.element_ty
    cols = tl.arange(0, DP)
    off = rows.to(tl.int64)[:, None] * D + cols[None, :]
    mask = live[:, None] & (cols < D)[None, :]
    q = tl.load(qkv_ptr + (e * R).to(tl.int64) * D + off, mask=mask, other=0.0)
    k = tl.load(qkv_ptr + ((E + e) * R).to(tl.int64) * D + off, mask=mask, other=0.0)
    v = tl.load(qkv_ptr + ((2 * E + e) * R).to(tl.int64) * D + off, mask=mask, other=0.0)
    p, ds = _probs_and_dscores(q, k, v, do, lse, delta, _visible(live, live, b, b, pos, pos), qk_scale, PREC)
    dv = tl.dot(tl.trans(p.to(DT)), do, input_precision=PREC)
    ds = ds.to(DT)
    dk = tl.dot(tl.trans(ds), q, input_precision=PREC) * sm_scale
    dq = tl.dot(ds, k, input_precision=PREC) * sm_scale
    if ROPE > 0:
        rp = tl.minimum(tl.maximum(pos, 0), T)
        dk = _rope(dk, rp, cos_ptr, sin_ptr, ROPE, DP, DT, True, PREC)
        dq = _rope(dq, rp, cos_ptr, sin_ptr, ROPE, DP, DT, True, PREC)
    tl.store(dqkv_ptr + (e * R).to(tl.int64) * D + off, dq.to(DT), mask=mask)
    tl.store(dqkv_ptr + ((E + e) * R).to(tl.int64) * D + off, dk.to(DT), mask=mask)
    tl.store(dqkv_ptr + ((2 * E + e) * R).to(tl.int64) * D + off, dv.to(DT), mask=mask)


@triton.jit
def _attn_bwd_seqs(qkv_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, cos_ptr, sin_ptr, T, E, R, K, NR,
                   qk_scale, sm_scale, D: tl.constexpr, DP: tl.constexpr, ROPE: tl.constexpr,
                   BLK: tl.constexpr, PREC: tl.constexpr):
    """dq, dk and dv of NR = (BLK // K) * K rows that hold whole sequences (K <= BLK), one program per block
    (``_seqs_bwd``). Replaces ``_attn_bwd_dkdv`` + ``_attn_bwd_dq`` (which each recompute the scores and
    dO V^T) where sequences are short; ``_out_bwd`` does the same work itself where ``ATTN_IN_OUT_BWD``."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    i = tl.arange(0, BLK)
    rows = pid * NR + i
    live = (i < NR) & (rows < R)
    b = rows // K
    pos = tl.load(idx_ptr + (b * E + e) * K + rows % K, mask=live, other=0)
    cols = tl.arange(0, DP)
    off = rows.to(tl.int64)[:, None] * D + cols[None, :]
    mask = live[:, None] & (cols < D)[None, :]
    do = tl.load(do_ptr + (e * R).to(tl.int64) * D + off, mask=mask, other=0.0)
    lse = tl.load(lse_ptr + e * R + rows, mask=live, other=0.0)
    delta = tl.load(delta_ptr + e * R + rows, mask=live, other=0.0)
    _seqs_bwd(qkv_ptr, dqkv_ptr, cos_ptr, sin_ptr, e, E, R, T, rows, live, b, pos, do, lse, delta, qk_scale,
              sm_scale, D, DP, ROPE, PREC)


@triton.jit
def _qkv_bwd_dx(dqkv_ptr, idx_ptr, w_ptr, dx_ptr, T, h, E, R, K, dl_ptr, wr_ptr,
                D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
                ROUTER: tl.constexpr = False, ATOMIC: tl.constexpr = False, VEC: tl.constexpr = 0):
    """Rows of [dq | dk | dv] @ w_qkv[e]^T (each kept token's share of dx), one block of rows and columns,
    stored per kept token for the deterministic scatter or (ATOMIC) added in float32 into dx[b, pos].
    ROUTER: each row also gets d logit * w_router[e], the router's share of dx (nonzero only at kept tokens:
    top-k passes no gradient to the others), so the scatter that follows sums both."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    pn = tl.program_id(2)
    rows = pid * BM + tl.arange(0, BM)
    rm, b, sel, pos = _row_info(idx_ptr, rows, e, E, K, R)
    cols = tl.arange(0, DP)
    cm = cols < D
    nn = pn * BH + tl.arange(0, BH)
    nm = nn < h
    wbase = w_ptr + e.to(tl.int64) * h * 3 * D
    acc = tl.zeros([BM, BH], tl.float32)
    for part in range(3):
        d = tl.load(dqkv_ptr + ((part * E + e) * R + rows).to(tl.int64)[:, None] * D + cols[None, :],
                    mask=rm[:, None] & cm[None, :], other=0.0)
        wt = tl.load(wbase + nn[None, :] * (3 * D) + part * D + cols[:, None], mask=cm[:, None] & nm[None, :],
                     other=0.0).to(d.dtype)
        acc = tl.dot(d, wt, acc, input_precision=PREC)
    if ROUTER:
        dl = tl.load(dl_ptr + sel, mask=rm & (pos >= 0) & (pos < T), other=0.0)
        wr = tl.load(wr_ptr + e.to(tl.int64) * h + nn, mask=nm, other=0.0).to(tl.float32)
        acc += dl[:, None] * wr[None, :]
    if ATOMIC:
        live = rm & (pos >= 0) & (pos < T)
        drow = (b * T + tl.minimum(tl.maximum(pos, 0), T - 1)).to(tl.int64) * h
        _add_tile(dx_ptr, drow, pn * BH, acc, live, h, VEC)
    else:
        tl.store(dx_ptr + (e * R + rows).to(tl.int64)[:, None] * h + nn[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=rm[:, None] & nm[None, :])


@triton.jit
def _dwqkv(x_ptr, idx_ptr, dqkv_ptr, dw_ptr, T, h, E, R, K, dl_ptr, dwr_ptr,
           D: tl.constexpr, DP: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
           FUSED: tl.constexpr = False, ROUTER: tl.constexpr = False, SPLIT: tl.constexpr = 1,
           VEC: tl.constexpr = 0, DL16: tl.constexpr = False):
    """dw_qkv[e][rows of h, part] = sum over rows of x[b, pos]^T d_part. SPLIT > 1: the rows in SPLIT slices
    (grid axis 2: part * SPLIT + slice), each program adding its partial sums into the zeroed float32 dw_qkv
    (and dw_router) with atomics. FUSED: one program makes all three parts from one load of the gathered x
    tile (one part on grid axis 2); else one program per part.
    ROUTER: also dw_router[e][rows of h] = sum over kept rows of x[b, pos] * d logit (top-k passes gradient
    only to kept tokens), as one more product of the same x tile with a 16-column matrix whose first column
    is d logit (rounded to the compute dtype, like d_part): no second gather of x. DL16: that matrix is read
    from dl_ptr [E, R, 16] as ``_out_bwd`` wrote it (a tile loaded for the product keeps the loop's products
    in flight on sm_90; one made in registers from d logit made each step wait for them: Triton 3.6,
    ``benchmarks/wgmma_waits.py``), else made from d logit [B, E, k]. Where the parts have one
    program each, part 0's program writes it."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    part = tl.program_id(2) // SPLIT
    DT: tl.constexpr = dqkv_ptr.dtype.element_ty
    nn = pid * BH + tl.arange(0, BH)
    nm = nn < h
    cols = tl.arange(0, DP)
    cm = cols < D
    c16 = tl.arange(0, 16)
    r_start, r_end = _row_slice(R, BR, SPLIT)
    acc = tl.zeros([BH, DP], tl.float32)
    acc_k = tl.zeros([BH, DP], tl.float32)
    acc_v = tl.zeros([BH, DP], tl.float32)
    acc_r = tl.zeros([BH, 16], tl.float32)
    for r0 in range(r_start, r_end, BR):
        rows = r0 + tl.arange(0, BR)
        rm, b, sel, pos = _row_info(idx_ptr, rows, e, E, K, r_end)
        xrow = (b * T + tl.minimum(tl.maximum(pos, 0), T - 1)).to(tl.int64)
        xt = tl.load(x_ptr + xrow[None, :] * h + nn[:, None], mask=rm[None, :] & nm[:, None], other=0.0)
        xt = xt.to(DT)
        dp = dqkv_ptr + ((part * E + e) * R + rows).to(tl.int64)[:, None] * D + cols[None, :]
        dm = rm[:, None] & cm[None, :]
        acc = tl.dot(xt, tl.load(dp, mask=dm, other=0.0), acc, input_precision=PREC)
        if FUSED:
            acc_k = tl.dot(xt, tl.load(dp + E * R * D, mask=dm, other=0.0), acc_k, input_precision=PREC)
            acc_v = tl.dot(xt, tl.load(dp + 2 * E * R * D, mask=dm, other=0.0), acc_v, input_precision=PREC)
        if ROUTER:
            if DL16:  # d logit as the first of 16 columns [E, R, 16] in the compute dtype, written so by _out_bwd
                g = tl.load(dl_ptr + (e * R + rows).to(tl.int64)[:, None] * 16 + c16[None, :], mask=rm[:, None],
                            other=0.0)
            else:
                dl = tl.load(dl_ptr + sel, mask=rm & (pos >= 0) & (pos < T), other=0.0)
                g = tl.where((c16 == 0)[None, :], dl[:, None], 0.0).to(DT)
            acc_r = tl.dot(xt, g, acc_r, input_precision=PREC)
    if SPLIT > 1:
        rowoff = e.to(tl.int64) * h * 3 * D + nn.to(tl.int64) * (3 * D) + part * D
        _add_tile(dw_ptr, rowoff, 0, acc, nm, D, VEC)
        if FUSED:
            _add_tile(dw_ptr, rowoff + D, 0, acc_k, nm, D, VEC)
            _add_tile(dw_ptr, rowoff + 2 * D, 0, acc_v, nm, D, VEC)
    else:
        out = dw_ptr + e.to(tl.int64) * h * 3 * D + nn[:, None] * (3 * D) + part * D + cols[None, :]
        om = nm[:, None] & cm[None, :]
        tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=om)
        if FUSED:
            tl.store(out + D, acc_k.to(dw_ptr.dtype.element_ty), mask=om)
            tl.store(out + 2 * D, acc_v.to(dw_ptr.dtype.element_ty), mask=om)
    if ROUTER:
        dwr = tl.sum(tl.where((c16 == 0)[None, :], acc_r, 0.0), 1)
        if part == 0:
            if SPLIT > 1:
                tl.atomic_add(dwr_ptr + e.to(tl.int64) * h + nn, dwr, mask=nm, sem="relaxed")
            else:
                tl.store(dwr_ptr + e.to(tl.int64) * h + nn, dwr.to(dwr_ptr.dtype.element_ty), mask=nm)


@triton.jit
def _dwr(x_ptr, idx_ptr, dl_ptr, dwr_ptr, T, h, E, R, K, BR: tl.constexpr, BH: tl.constexpr):
    """dw_router[e][cols] = sum over kept tokens of d logit * x[b, pos] (the fused router's weight gradient:
    top-k passes gradient only to kept tokens). Products accumulate elementwise; one reduction at the end."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    nn = pid * BH + tl.arange(0, BH)
    nm = nn < h
    acc = tl.zeros([BR, BH], tl.float32)
    for r0 in range(0, R, BR):
        rows = r0 + tl.arange(0, BR)
        rm, b, sel, pos = _row_info(idx_ptr, rows, e, E, K, R)
        keep = rm & (pos >= 0) & (pos < T)
        xrow = (b * T + tl.minimum(tl.maximum(pos, 0), T - 1)).to(tl.int64)
        xt = tl.load(x_ptr + xrow[:, None] * h + nn[None, :], mask=keep[:, None] & nm[None, :], other=0.0)
        dl = tl.load(dl_ptr + sel, mask=keep, other=0.0)
        acc += xt.to(tl.float32) * dl[:, None]
    tl.store(dwr_ptr + e.to(tl.int64) * h + nn, tl.sum(acc, 0).to(dwr_ptr.dtype.element_ty), mask=nm)


# --------------------------------------------------------------------------------------------- launchers
def _cfg(D: int, dtype: torch.dtype):
    DP = max(16, next_pow2(D))
    prec = "ieee" if dtype == torch.float32 else "tf32"
    big = DP >= 128 or dtype == torch.float32
    c = dict(DP=DP, PREC=prec, BM=32 if big else 64, BN=32 if big else 64, BK=32 if big else 64,
             BH=64, BS=128, BR=32 if big else 64)
    # per-kernel tiles for 16-bit heads of dim <= 64, picked by `bench_layer.py --tune` on an H200 over the
    # issue's three shapes (benchmarks/NOTES.md, v4); the rest keep the generic tiles
    c.update(QKV_BM=c["BM"], ATT_BN=c["BN"], DWO_BH=64, DQ_BN=c["BN"], DX_BH=64, DW_BH=64, SEG_BT=32, SEG_BH=256,
             QKV_STAGES=3, DW_STAGES=3, DX_ATOMIC_WARPS=4, DW_FUSED=False)
    if not big:  # (v5: pipeline depths and the atomic dx kernel's warps from the same search, NOTES.md)
        c.update(QKV_BM=128, ATT_BN=32, DWO_BH=128, DQ_BN=32, DX_BH=128, DW_BH=128, SEG_BT=16, SEG_BH=512,
                 QKV_STAGES=4, DW_STAGES=2, DX_ATOMIC_WARPS=8, DW_FUSED=True)
    return c


# Launch overrides per kernel, for tuning only (benchmarks/bench_layer.py --tune): {kernel name: {key: value}},
# keys among the kernel's block sizes (BM, BN, BK, BH, BR) and num_warps / num_stages. Empty in normal use.
TILE_OVERRIDES: dict = {}


# Pipeline depth that fitted in shared memory, per kernel and launch signature, where the asked one did not
# (wide float32 tiles under autocast, GPUs with less shared memory than an H100)
_STAGES_THAT_FIT: dict = {}


def _launch(kernel, grid_fn, args, blocks: dict, **meta):
    """kernel[grid](*args, **blocks, **meta) with this kernel's overrides applied; grid_fn(blocks) -> grid.
    A launch whose pipeline does not fit in the GPU's shared memory is retried with fewer stages (down to
    one), and the depth that fitted is remembered for the same kernel, tiles and dtypes."""
    name = kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__
    over = TILE_OVERRIDES.get(name)
    if over:
        blocks = dict(blocks)
        for key, val in over.items():
            if key in ("num_warps", "num_stages"):
                meta[key] = val
            else:
                blocks[key] = val
    stages = meta.get("num_stages", 3)
    key = None
    if _STAGES_THAT_FIT:  # the key costs host time: only once some launch did not fit
        key = _stages_key(name, blocks, meta, args)
        stages = min(stages, _STAGES_THAT_FIT.get(key, stages))
    while True:
        try:
            kernel[grid_fn(blocks)](*args, **blocks, **dict(meta, num_stages=stages))
            return
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            _STAGES_THAT_FIT[key or _stages_key(name, blocks, meta, args)] = stages


def _stages_key(name, blocks, meta, args):
    return (name, tuple(blocks.items()), tuple((k, v) for k, v in meta.items() if k != "num_stages"),
            tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))


def _vector_atomics(dev, h: int) -> bool:
    """Whether the atomic scatter adds four columns (or more) per instruction (sm_90 and later, h a multiple
    of four; not under the interpreter, which runs no inline PTX)."""
    if _interpreting() or dev.type != "cuda" or h % 4 or not VECTOR_ATOMICS:
        return False
    return _capability(dev) >= (9, 0)


_CAPABILITY: dict = {}


def _capability(dev) -> tuple[int, int]:
    """The GPU's compute capability, read once per device (torch reads the device's properties on every
    call; the op asks four times per step)."""
    if dev not in _CAPABILITY:
        _CAPABILITY[dev] = tuple(torch.cuda.get_device_capability(dev))
    return _CAPABILITY[dev]


def _atomics_in_place(dev, h: int, dtypes, overlap: float) -> bool:
    """Whether the atomic scatters into results of these dtypes add into the results themselves (no float32
    buffer to fill and cast: ``_atomic_plan``)."""
    return all(_atomic_plan(dev, h, dt, overlap)[0] == dt for dt in dtypes)


def _atomic_plan(dev, h: int, dtype: torch.dtype, overlap: float, scaled_ok: bool = True) -> tuple[torch.dtype, int]:
    """(dtype of the buffer the atomic scatter adds into, columns per atomic instruction: ``VEC`` of
    ``_add_tile``) for a result of ``dtype`` that receives ``overlap`` kept rows per token on average.
    A 16-bit result can take the additions itself: half the bytes of a float32 buffer, no fill of one and
    no cast pass (t1 in bf16 on an H200: 0.184 -> 0.132 ms), where the GPU adds 16-bit floats natively (bfloat16
    from sm_90, eight columns per 16-byte instruction; float16 on every CUDA GPU and under the
    interpreter). Each addition then rounds to the result's dtype, so bfloat16 does it only where a token
    gets about one row (overlap <= ``NARROW_MAX_OVERLAP``: as many roundings as the float32 buffer's final
    cast); with 8 rows per token (t3) its error doubled (dx 1.3e-2 against float64, float32 buffer 4.6e-3).
    float16 keeps three more bits and always adds in place. With ``scaled_ok`` (y's scatter), bfloat16 at
    more rows per token takes the scaled float16 buffer where the additions are vectors
    (``SCALED_HALF_ATOMICS``: half the bytes of a float32 buffer, ``_half_scale``; the plan then names
    float16 for a bfloat16 result). Otherwise, or with ``NARROW_ATOMICS = False``, a float32 buffer.
    (x's gradient stays float32: its bound needs max |w_qkv|, whose reading cost what the narrower buffer
    saved, H200 t3, benchmarks/NOTES.md v18.)"""
    vec = _vector_atomics(dev, h)
    few = overlap <= NARROW_MAX_OVERLAP
    narrow = NARROW_ATOMICS and (dtype == torch.float16 or (dtype == torch.bfloat16 and few))
    if narrow:
        if vec:
            return dtype, 8 if h % 8 == 0 else 4
        if dtype == torch.float16:
            return dtype, 0
    if scaled_ok and dtype != torch.float16 and (SCALED_HALF_ATOMICS or (
            SCALED_HALF_ATOMICS is None and NARROW_ATOMICS and vec and dtype == torch.bfloat16)):
        return torch.float16, (8 if h % 8 == 0 else 4) if vec else 0
    return torch.float32, 4 if vec else 0


# False: scalar atomics everywhere (for comparison in benchmarks)
VECTOR_ATOMICS = True
# False: 16-bit results are summed in a float32 buffer and cast (for comparison in benchmarks)
NARROW_ATOMICS = True
# y in bfloat16 with more than NARROW_MAX_OVERLAP rows per token: None (default), the scaled float16 buffer
# where the GPU adds float16 vectors (sm_90), else float32; False: float32 (for comparison in benchmarks);
# True: the scaled float16 buffer for every y but a float16 one (which adds in place), at any overlap, on any
# GPU (for tests: the interpreter runs it with float32 products, whose dots it gets right)
SCALED_HALF_ATOMICS = None
# bfloat16 results take their atomic additions in place up to this many kept rows per token on average
NARROW_MAX_OVERLAP = 1.0
# Where the router's weight gradient is made: True, inside ``_dwqkv`` as one more product of the gathered
# x tiles (no second gather, one launch less); False, in its own kernel ``_dwr``; None, inside ``_dwqkv``
# when its grid has at most one program per SM. The fused program needs more registers (170 against 126
# per thread at head dim 64: one program per SM instead of two), which costs more than it saves on a
# grid of many waves (t3 on an H200: 186 us against 100 + 36) and less on a small one (t1: 19 against
# 15 + 13).
DWR_IN_DWQKV = None
_SM_COUNT: dict = {}


# Attention backward for k <= 64 (32 for wide heads and float32): one kernel over blocks of whole
# sequences (``_attn_bwd_seqs``) instead of the dk/dv and dq kernels (H200, bf16, graph: t1 0.113 -> 0.104 ms,
# t3 1.063 -> 1.021; benchmarks/NOTES.md v8.0). False: the two kernels everywhere (for comparison).
SEQ_BLOCK_BWD = True


# Where the router's weight gradient is not made inside ``_dwqkv`` and heads keep at least this many rows per
# token on average, it can be one dense product dw_router = dL [E, B*T] @ x [B*T, h] over a d-logit matrix
# that is zero off the kept tokens (``_out_bwd`` writes it): x is read once instead of gathered once per
# kept row by ``_dwr`` (t3 keeps 7.9 rows per token: 132 MB gathered against 16 MB of x and 16.5 MB of dL).
# Measured on an H200 (NOTES.md v8.2): t3 bf16 1.028 against 1.032 ms, autocast 1.370 against 1.390, for
# 16 / 32 MiB more peak memory (the dL matrix, its zero fill). Not worth it there: None (off), _dwr always;
# a number turns it on from that overlap.
DENSE_ROUTER_GRAD_MIN_OVERLAP = None


def _dense_router_grad(overlap: float) -> bool:
    return DENSE_ROUTER_GRAD_MIN_OVERLAP is not None and overlap >= DENSE_ROUTER_GRAD_MIN_OVERLAP


def _router_grad_dense(dl: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """dw_router = dl @ x.view(B*T, h) for dl [E, B*T] in the compute dtype (rows may be strided): one GEMM
    in that dtype (x cast to it, as the kernels read x), float32 accumulation, the result in out_dtype."""
    xm = x.reshape(-1, x.shape[-1])
    if xm.dtype != dl.dtype:
        xm = xm.to(dl.dtype)
    if dl.is_cuda and out_dtype == torch.float32 and dl.dtype != torch.float32:
        try:
            return torch.mm(dl, xm, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # no mixed-dtype GEMM in this torch build
            pass
    if not dl.is_cuda and dl.dtype != torch.float32:  # CPU: no 16-bit GEMM with float32 accumulation
        return dl.float().mm(xm.float()).to(out_dtype)
    return torch.mm(dl, xm).to(out_dtype)


def _dwr_in_dwqkv(dev, programs: int) -> bool:
    if DWR_IN_DWQKV is not None:
        return DWR_IN_DWQKV
    if dev.type != "cuda":
        return True
    return programs <= _sm_count(dev)


def _sm_count(dev) -> int:
    if dev not in _SM_COUNT:
        _SM_COUNT[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _SM_COUNT[dev]


# dw_o made inside ``_out_bwd`` by programs that each hold all R rows of a head (``DWO``), so that dy is
# gathered once and one launch goes: None (default) for 16-bit heads of dim <= 64 with R <= 256 rows where
# the grid of one program per head has at least ``DWO_IN_OUT_BWD_MIN_WAVES`` programs per SM (t3's 505
# heads, not t1's 17, which would leave most SMs idle); True: wherever R <= 256 (any dtype: for tests and
# comparisons); False: never (``_dwo`` after ``_out_bwd``).
DWO_IN_OUT_BWD = None
DWO_IN_OUT_BWD_MIN_WAVES = 2.0


def _dwo_in_out_bwd(dev, R: int, E: int, c: dict) -> bool:
    if DWO_IN_OUT_BWD is False or R > 256:
        return False
    if DWO_IN_OUT_BWD:
        return True
    if c["DP"] > 64 or c["PREC"] == "ieee" or dev.type != "cuda":
        return False
    return E >= DWO_IN_OUT_BWD_MIN_WAVES * _sm_count(dev)


# The attention backward of short sequences inside ``_out_bwd`` (``ATTN``): each program holds whole
# sequences (k <= its row block; not the one-program-per-head form of DWO_IN_OUT_BWD) and makes dq, dk, dv
# from the dO it has just made, where ``_attn_bwd_seqs`` would otherwise run after it. None (default): where
# the op has the GPU to itself, not ``beside`` other kernels; True: also beside them; False: never (for
# comparisons). Measured on an H200 (bf16 graphs, benchmarks/NOTES.md v21): alone it saves a launch and dO's
# round trip (t1 0.1032 -> 0.1003 ms with the 32-row block below), but its programs hold 150-255 registers
# for longer, and beside a hybrid's dense heads the products waiting for SMs lose more than that (t2
# 0.3312 -> 0.3376 ms with the 64-row block, 0.3383 with 32 rows).
ATTN_IN_OUT_BWD = None
# _out_bwd's row block where the op has the GPU to itself (16-bit heads of dim <= 64; wider ones keep 32):
# twice the programs of the 64-row block (H200: t4, 60 heads of 64 rows, 0.3333 -> 0.3244 ms; T = 16384
# 0.1600 -> 0.1566). Beside a hybrid's dense heads 64 (t2 0.3312 against 0.3353 ms with 32).
OUT_BWD_ALONE_BM = 32


def _out_bwd_block(c: dict, beside: bool) -> int:
    """Rows per ``_out_bwd`` program where the program does not hold a whole head (DWO_IN_OUT_BWD)."""
    return _tile("_out_bwd", "BM", c["BM"] if beside else min(c["BM"], OUT_BWD_ALONE_BM))


def _attn_in_out_bwd(whole: bool, K: int, bm: int, beside: bool) -> bool:
    if ATTN_IN_OUT_BWD is False or not SEQ_BLOCK_BWD or whole or K > bm:
        return False
    return bool(ATTN_IN_OUT_BWD) or not beside


# The router's weight gradient inside ``_dwqkv`` multiplies a [rows, 16] tile whose first column is d logit:
# True (default): ``_out_bwd`` writes that tile, and ``_dwqkv`` loads it for the product; False: ``_dwqkv``
# makes it in registers from d logit, which on sm_90 made every step of its loop wait for the step's products
# (Triton 3.6; ``benchmarks/wgmma_waits.py``). H200, bf16 graphs, 17 heads (benchmarks/NOTES.md v22.4): t1
# 0.0982 -> 0.0971 ms, sparsity 8 0.3173 -> 0.3086, sparsity 4 0.5634 -> 0.5499; t2 unchanged.
DL16_TILE = True


# The weight gradients' reduction over a head's R rows in slices (``SPLIT``), each program adding its partial
# sums into zeroed float32 with atomics, where the grid of one program per (column block, head) leaves SMs idle
# and R is long. None (default): where R has at least WGRAD_SPLIT_MIN_BLOCKS row blocks, as many slices as bring
# the grid to WGRAD_SPLIT_WAVES programs per SM, at most WGRAD_MAX_SPLIT; not with deterministic scatters (the
# atomics' order varies), nor beside a hybrid's dense heads, nor where the weight gradients run on a stream of
# their own (``WGRAD_SIDE_STREAM``, which since v23 is what fills those SMs, faster: sparsity 4 0.485 -> 0.463 ms
# without slices). An int: that many slices wherever R allows (tests and comparisons). Measured on an H200
# (bf16 graphs, benchmarks/NOTES.md v22.4), 17 heads at h = 512, T = 1024, B = 16: a sparsity of 4 (R = 4096,
# 68 programs of 32 steps) 0.550 -> 0.527 ms with four slices; 8 (R = 2048) 0.309 -> 0.311; t1 (R = 512) 0.097 ->
# 0.116 with two (the atomics, the buffers' clears and casts cost more than the shorter reductions save); beside
# t2's dense heads +30 us.
WGRAD_SPLIT = None
WGRAD_SPLIT_MIN_BLOCKS = 32
WGRAD_SPLIT_WAVES = 2
WGRAD_MAX_SPLIT = 8


# The weight gradients on a second stream where the op runs alone in a CUDA graph: forked after ``_out_bwd`` (w_o's,
# where it has a kernel of its own, ``_dwo``, and the router's, where it has one, ``_dwr``) and after the
# attention's backward (w_qkv's and, on small grids, the router's inside it, ``_dwqkv``, launched ahead of x's
# gradient), joined at the end of the backward (``_host.Fork``). Nothing else waits for them, so they run beside
# the attention's and x's backward instead of after them, in the SMs those leave idle (t1's grids: 68 programs
# each on 132 SMs) and in their tails. True: always; False: never; None (default): where the op runs alone, on a
# GPU, while a CUDA graph is being captured (``torch.cuda.graph``, ``torch.compile(mode="reduce-overhead")``),
# and a head has at least WGRAD_SIDE_MIN_ROWS rows. Not beside a hybrid's dense heads (the GPU is shared already:
# there it was slower), not eagerly (an eager step of this size is bound by the host, 1.2-1.8 ms for t1 on the
# H200's host against 0.09 ms of GPU time, so the fork's GPU time cannot show and its host calls are all cost: two
# calls measured it ~0.1 ms slower in all 16 rounds, a third, in another order, within the rounds' spread), not for
# heads of 64 rows (kernels too short to gain the join's cost). H200, bf16 graphs (benchmarks/NOTES.md v23.1):
# 17 heads at h = 512, T = 1024, B = 16: t1 0.0981 -> 0.0906 ms, sparsity 8 0.308 -> 0.266, sparsity 4 0.519 ->
# 0.461 (with the rows in one slice: the second stream fills the SMs that WGRAD_SPLIT's slices did); t3's 505 MoSA
# heads alone 0.735 -> 0.718; t2's MoSA heads beside its dense heads (forced) 0.330 -> 0.338; 60 heads of 64 rows
# (T = 16384 and 65536, h = 1024) 0.1544 -> 0.1575 and 0.3268 -> 0.3275.
WGRAD_SIDE_STREAM = None
WGRAD_SIDE_MIN_ROWS = 128


def _wgrad_side_stream(dev, beside: bool, R: int):
    """The weight gradients' fork from the current stream (``_host.Fork``), or None (see WGRAD_SIDE_STREAM)."""
    if dev.type != "cuda":
        return None
    on = WGRAD_SIDE_STREAM
    if on is None:
        on = not beside and R >= WGRAD_SIDE_MIN_ROWS and torch.cuda.is_current_stream_capturing()
    return Fork(dev, "mosa weight gradients") if on else None


def _wgrad_split(dev, programs: int, R: int, BR: int, deterministic: bool, beside: bool, fork=None) -> int:
    """Row slices of ``_dwqkv`` / ``_dwo`` (see WGRAD_SPLIT); ``fork``: the stream they run on beside x's
    gradient (``WGRAD_SIDE_STREAM``), whose programs then fill the SMs instead."""
    blocks = cdiv(R, BR)
    if WGRAD_SPLIT is not None:
        return max(1, min(int(WGRAD_SPLIT), blocks))
    if deterministic or beside or fork is not None or dev.type != "cuda" or blocks < WGRAD_SPLIT_MIN_BLOCKS:
        return 1
    want = cdiv(WGRAD_SPLIT_WAVES * _sm_count(dev), programs)
    return max(1, min(want, WGRAD_MAX_SPLIT, blocks // 2))


def _wgrad_buffer(grad, split: int):
    """Where a weight gradient is summed: ``grad`` itself (one slice), else zeroed float32 (``grad`` itself
    when it is float32), copied into ``grad`` after the kernel."""
    if split == 1:
        return grad
    if grad.dtype == torch.float32:
        return grad.zero_()
    return torch.zeros(grad.shape, device=grad.device, dtype=torch.float32)


def _tile(name: str, key: str, default):
    """Kernel ``name``'s block size ``key``: its tuning override (``TILE_OVERRIDES``), else ``default``; for a
    launcher that needs the final size before the launch (``_launch`` applies the same overrides)."""
    return TILE_OVERRIDES.get(name, {}).get(key, default)


def _tiles(name: str, blocks: dict) -> dict:
    """``blocks`` with the kernel's tuning overrides of those keys (``_tile``)."""
    return {k: _tile(name, k, v) for k, v in blocks.items()}


def _atomic_buffer(shape, dtype, dev):
    """The [B, T, h] buffer an atomic scatter adds into, left uncleared: the kernel before the scatter
    clears it (``_zero_share``)."""
    return torch.empty(shape, device=dev, dtype=dtype)


def _dims(x, idx, w_qkv):
    B, T, h = x.shape
    E, K = idx.shape[1], idx.shape[2]
    D = w_qkv.shape[-1] // 3
    return B, T, h, E, K, D, B * K


def _segments(idx, T):
    """Where each (b, t) finds its rows among the head-major rows [E, B*k]: perm lists the rows sorted by
    destination b*(T+1)+pos (stable, so in head order), and starts[key] .. starts[key+1] is key's range."""
    B, E, K = idx.shape
    kt = torch.int32 if B * (T + 1) < 2 ** 31 else torch.int64  # fewer radix passes
    keys = idx.clamp(0, T).to(kt).transpose(0, 1) + (torch.arange(B, device=idx.device, dtype=kt) * (T + 1))[None, :, None]
    sorted_keys, perm = torch.sort(keys.reshape(-1), stable=True)
    starts = torch.searchsorted(sorted_keys, torch.arange(B * (T + 1) + 1, device=idx.device, dtype=kt))
    return perm, starts


def _scatter(rows, perm, starts, B, T, h, dtype, c):
    out = torch.empty(B, T, h, device=rows.device, dtype=dtype)
    _launch(_segment_sum, lambda t: (cdiv(B * T, t["BT"]), cdiv(h, t["BH"])),
            (rows, perm, starts, out, B * T, perm.numel(), T, h),
            dict(BT=c["SEG_BT"], BH=min(c["SEG_BH"], max(16, next_pow2(h)))), num_warps=4)
    return out


def _fwd_impl(x, scores, idx, w_qkv, w_o, rope_dims: int, rope_base: float, deterministic: bool, cdt: torch.dtype,
              mark=None, rows_only: bool = False, distinct: bool = False, project: bool = True,
              finish: bool = True):
    """(y, qkv, o, lse, perm, starts). Deterministic: per-kept-token rows of y, summed by ``_segment_sum``
    through the destination sort (perm, starts); else added with atomics (``_atomic_plan``: into y itself, a
    float32 buffer or the scaled float16 one; perm, starts empty, which tells the backward to do the same). ``mark``: a [B, T] bool
    tensor in which ``_qkv_fwd`` sets the kept tokens. ``rows_only`` (atomics only): y is written at the kept
    tokens' rows only, its other rows are left undefined (the atomic buffer is cleared at those rows only).
    ``distinct``: no head keeps a token twice in one sequence (top-k's positions), so no token gets more than
    E rows (else the scaled scatter's bound counts them). ``project=False`` (atomics that add in place only,
    ``projects_in_place``): the attention alone, y None; the caller adds the heads' rows into a y of its own
    later (``project_into``). ``finish=False``: where the atomics add into a buffer other than y (float32, or the
    scaled float16 one), y is that buffer as an ``Unfinished``, which the caller adds into a y of its own in one
    pass (``add_unfinished``) instead of a conversion pass here and a sum there."""
    # cdt is the compute dtype (the autocast dtype, else the weights'); x and the weights may be wider
    # (float32 under autocast): their tiles are cast as they are loaded, so no 16-bit copy of the sequence or
    # of the weights is made, and the weight gradients come out in the weights' dtype
    B, T, h, E, K, D, R = _dims(x, idx, w_qkv)
    c = _cfg(D, cdt)
    dev = x.device
    cos, sin = _rope_tables(rope_dims, rope_base, T + 1, dev)
    qkv = torch.empty(3, E, R, D, device=dev, dtype=cdt)
    o = torch.empty(E, R, D, device=dev, dtype=cdt)
    lse = torch.empty(E, R, device=dev, dtype=torch.float32)
    fused = c["DP"] <= 64 and cdt != torch.float32
    adt, vec = _atomic_plan(dev, h, cdt, E * R / (B * T))
    if not project and (deterministic or adt != cdt):
        raise ValueError(f"project=False needs atomics that add in place (projects_in_place), got "
                         f"deterministic={deterministic} and y's {cdt} adding into {adt} at {E * R / (B * T):.2f} "
                         f"kept rows per token")
    scaled = not deterministic and adt == torch.float16 and cdt != torch.float16
    # the scaled scatter's stats (and, where positions may repeat, a count per token)
    stats = torch.zeros(_N_STATS + (0 if distinct else B * T), device=dev, dtype=torch.int32) if scaled else idx
    if not project:
        out = qkv  # (unread)
    elif deterministic:
        out = torch.empty(E * R, h, device=dev, dtype=cdt)
    else:  # cleared by _qkv_fwd
        out = _atomic_buffer((B, T, h), adt, dev)
    _launch(_qkv_fwd, lambda t: (cdiv(R, t["BM"]), E, 1 if fused else 3),
            (x, idx, w_qkv, cos, sin, qkv, T, h, E, R, K, out, out.numel(),
             idx if mark is None else mark.view(torch.uint8), scores, w_o, stats),
            dict(BM=c["QKV_BM"], BK=c["BK"]),
            D=D, DP=c["DP"], ROPE=rope_dims, PREC=c["PREC"], FUSED=fused,
            ZERO=0 if deterministic or not project else 2 if rows_only else 1, MARK=mark is not None, STATS=scaled,
            COUNT=not distinct, num_warps=8 if fused else 4, num_stages=c["QKV_STAGES"])
    _launch(_attn_fwd, lambda t: (cdiv(R, t["BM"]), E),
            (qkv, idx, scores, w_o, o, lse, out, T, h, E, R, K, math.log2(math.e) / math.sqrt(D), stats),
            dict(BM=c["BM"], BN=c["ATT_BN"], BH=c["BH"]), D=D, DP=c["DP"], BS=c["BS"], PREC=c["PREC"],
            ATOMIC=not deterministic, VEC=vec, SCALED=scaled, PROJ=project, num_warps=4)
    if not project:
        return (None, qkv, o, lse, *_segments_like(idx, B, T, E, R, False))
    if not deterministic:
        if not finish and adt != cdt:
            y = Unfinished(out, stats if scaled else None, D)
        else:
            y = _unscaled(out, cdt, stats, D) if scaled else out.to(cdt)
        return (y, qkv, o, lse, *_segments_like(idx, B, T, E, R, False))
    perm, starts = _segments(idx, T)
    return _scatter(out, perm, starts, B, T, h, cdt, c), qkv, o, lse, perm, starts


def projects_in_place(dev, h: int, dtype: torch.dtype, overlap: float, deterministic: bool) -> bool:
    """Whether the heads' rows of y can be added into a y of ``dtype`` made elsewhere (``project_into``): atomics
    whose plan adds into the result itself (``_atomic_plan``), at ``overlap`` kept rows per token."""
    return not deterministic and _atomic_plan(dev, h, dtype, overlap)[0] == dtype


# ``project_into``'s launch: rows per program (None: the attention's block, 64 at head dim 64) and one program per
# block of BH columns, each then one product and one atomic tile (the kernel sits on a hybrid's critical path right
# after the dense heads' W_O product: t2 on an H200, bf16 graphs, 0.3333 ms against 0.3346 with 32 rows and 0.3362
# with whole rows per program; benchmarks/NOTES.md v32.2)
PROJECT_BM = None
PROJECT_SPLIT_H = True


def project_into(y, o, idx, scores, w_o):
    """y[b, idx[b, e, j]] += (o[e, b * K + j] * scores[b, e, j]) @ w_o[e] for every kept row (padding slots
    dropped), by atomics into y itself [B, T, h] (``projects_in_place``): the output projection and scatter of
    ``_fwd_impl(..., project=False)``'s attention, launched where the caller's y is ready. Returns y."""
    B, T, h = y.shape
    E, R, D = o.shape
    K = idx.shape[2]
    c = _cfg(D, o.dtype)
    vec = _atomic_plan(y.device, h, y.dtype, E * R / (B * T))[1]
    split = bool(PROJECT_SPLIT_H)
    _launch(_attn_fwd, lambda t: (cdiv(R, t["BM"]), E, cdiv(h, t["BH"]) if split else 1),
            (o, idx, scores, w_o, o, scores, y, T, h, E, R, K, 1.0, idx),
            dict(BM=PROJECT_BM or c["BM"], BN=c["ATT_BN"], BH=c["BH"]), D=D, DP=c["DP"], BS=c["BS"],
            PREC=c["PREC"], ATOMIC=True, VEC=vec, SCALED=False, ATTN=False, SPLIT_H=split, num_warps=4)
    return y


class Unfinished(NamedTuple):
    """A result still in its scatter's buffer (``_fwd_impl(..., finish=False)``, ``_bwd_impl``'s x gradient
    likewise): ``buf`` float32, or the scaled float16 one with ``stats`` its scale's statistics (else None); ``D``
    the head dim the scale was bounded with."""
    buf: torch.Tensor
    stats: Optional[torch.Tensor]
    D: int

    def tensors(self):
        return (self.buf,) if self.stats is None else (self.buf, self.stats)


def add_unfinished(dst: torch.Tensor, part: Unfinished) -> torch.Tensor:
    """dst += the result ``part`` holds, in one pass (read both, write dst, one rounding); returns dst."""
    n = dst.numel()
    scaled = part.stats is not None
    # (torch's own add_ of a float32 tensor into a bfloat16 one takes its unvectorised path: 56 against ~20 us
    # for t3's x gradient on an H200, benchmarks/NOTES.md v32.4)
    _unscale[(cdiv(n, 4096),)](part.buf, dst, n, part.stats if scaled else part.buf, D=part.D, BLOCK=4096, ADD=True,
                               SCALED=scaled, num_warps=8)
    return dst


def _unscaled(buf, dtype, stats, D: int):
    """The scaled float16 scatter's buffer divided by its scale, in ``dtype`` (``_unscale``)."""
    out = torch.empty(buf.shape, device=buf.device, dtype=dtype)
    n = buf.numel()
    _unscale[(cdiv(n, 4096),)](buf, out, n, stats, D=D, BLOCK=4096, num_warps=8)
    return out


def _bwd_impl(dy, x, scores, idx, w_qkv, w_o, qkv, o, lse, perm, starts, rope_dims: int, rope_base: float,
              w_router=None, rows_only: bool = False, dx_dtype=None, beside: bool = False, w_dtypes=None,
              finish: bool = True):
    """Gradients for x, scores, w_qkv, w_o; with ``w_router`` (the fused router: scores are sigmoid(x w_r^T)
    at the kept tokens) the second is w_router's gradient and x's includes the router's share.
    ``rows_only`` (atomics only): x's gradient is written at the kept tokens' rows only (see ``_fwd_impl``).
    ``dx_dtype``: the dtype of x's gradient where x is a narrower copy of the op's input (default x's);
    ``w_dtypes``: likewise (w_qkv's, w_o's) for their gradients (``_narrow_weights``).
    ``beside``: other kernels run beside these on another stream (``_out_bwd_block``). ``finish=False``: x's
    gradient, where its atomics add into a float32 buffer, is that buffer (no cast pass: the caller adds it into
    a gradient of its own, ``add_unfinished``)."""
    B, T, h, E, K, D, R = _dims(x, idx, w_qkv)
    cdt = qkv.dtype  # the forward's compute dtype
    c = _cfg(D, cdt)
    dev = x.device
    dy = dy.to(cdt).contiguous()
    cos, sin = _rope_tables(rope_dims, rope_base, T + 1, dev)
    dsc = torch.empty(B, E, K, device=dev, dtype=torch.float32)
    deterministic = perm.numel() > 0  # the forward's choice
    gdt = dx_dtype or x.dtype
    adt, vec = _atomic_plan(dev, h, gdt, E * R / (B * T), scaled_ok=False)
    if deterministic:
        rows = torch.empty(E * R, h, device=dev, dtype=cdt)
    else:  # x's dtype takes the sums in place where it can (_atomic_plan); cleared by _out_bwd
        rows = _atomic_buffer((B, T, h), adt, dev)
    fused = c["DW_FUSED"]
    in_dw = w_router is not None and _dwr_in_dwqkv(dev, cdiv(h, c["DW_BH"]) * E * (1 if fused else 3))
    # the router's weight gradient as one dense product where heads overlap much (see _router_grad_dense)
    dense_dl = w_router is not None and not in_dw and _dense_router_grad(E * R / (B * T))
    dlf = torch.zeros(E, B * T + 8, device=dev, dtype=cdt) if dense_dl else dsc
    dwo = torch.empty(w_o.shape, device=dev, dtype=w_dtypes[1] if w_dtypes else w_o.dtype)
    # d logit as the router's product tile of _dwqkv (see DL16_TILE), else a stand-in pointer
    dl16 = torch.empty(E, R, 16, device=dev, dtype=cdt) if in_dw and DL16_TILE else dsc
    whole = _dwo_in_out_bwd(dev, R, E, c)
    if whole and _tile("_out_bwd", "BM", R) < R:
        raise ValueError(f"TILE_OVERRIDES['_out_bwd']['BM'] must hold a head's R={R} rows where dw_o is made "
                         f"inside _out_bwd (DWO_IN_OUT_BWD), got {TILE_OVERRIDES['_out_bwd']['BM']}")
    dqkv = torch.empty_like(qkv)
    qk_scale, sm_scale = math.log2(math.e) / math.sqrt(D), 1.0 / math.sqrt(D)
    # the attention backward inside _out_bwd where its row block holds whole sequences (_out_bwd_block); a
    # tuning override of _out_bwd's block sets the rows each program covers too
    bm = max(16, next_pow2(R)) if whole else _out_bwd_block(c, beside)
    attn_inside = _attn_in_out_bwd(whole, K, bm, beside)
    nr = (bm // K) * K if attn_inside else bm
    # dO and delta only for a kernel after _out_bwd (else stand-in pointers the kernel does not touch)
    do = qkv if attn_inside else torch.empty(E, R, D, device=dev, dtype=cdt)
    delta = lse if attn_inside else torch.empty(E, R, device=dev, dtype=torch.float32)
    _launch(_out_bwd, lambda t: (1 if whole else cdiv(R, nr), E),
            (dy, idx, scores, w_o, o, do, delta, dsc, T, h, E, R, K, rows, rows.numel(), dlf,
             dlf.stride(0) if dense_dl else 0, dwo, qkv, lse, dqkv, cos, sin, nr, qk_scale, sm_scale, dl16),
            dict(BM=bm, BH=c["BH"]), D=D, DP=c["DP"], PREC=c["PREC"],
            DLOGIT=w_router is not None, ZERO=0 if deterministic else 2 if rows_only else 1, DENSE_DL=dense_dl,
            DWO=whole, ATTN=attn_inside, ROPE=rope_dims, DL16=in_dw and DL16_TILE,
            num_warps=8 if whole and R > 128 else 4)
    # the weight gradients reduce over a head's R rows: 128 per step where R is long and the grid small (t1's
    # 512 rows on an H200: _dwo 14.0 -> 9.7 us, _dwqkv 15.4 -> 13.6 us); t3's 256 keep the tuned 64.
    # 16-bit tiles only (wider ones would not fit the pipeline in shared memory)
    long_r = R >= 512 and c["DP"] <= 64 and cdt != torch.float32
    # the weight gradients' stream (joined below, before any tensor they read can be freed), or None
    fork = _wgrad_side_stream(dev, beside, R)
    dwr = None if w_router is None or dense_dl else torch.empty_like(w_router)
    dwqkv = torch.empty(w_qkv.shape, device=dev, dtype=w_dtypes[0] if w_dtypes else w_qkv.dtype)

    def wgrad_o():
        blocks = _tiles("_dwo", dict(BR=128 if long_r else c["BR"], BH=c["DWO_BH"]))
        split = _wgrad_split(dev, cdiv(h, blocks["BH"]) * E, R, blocks["BR"], deterministic, beside, fork)
        dwo_acc = _wgrad_buffer(dwo, split)
        _launch(_dwo, lambda t: (cdiv(h, t["BH"]), E, split), (dy, idx, scores, o, dwo_acc, T, h, E, R, K),
                blocks, D=D, DP=c["DP"], PREC=c["PREC"], SPLIT=split, VEC=4 if _vector_atomics(dev, h) else 0,
                num_warps=4)
        if dwo_acc is not dwo:
            dwo.copy_(dwo_acc)

    def wgrad_router():
        # The router's weight gradient, where it has a kernel of its own (t3's 505 heads, t4; not t1's 17, where
        # _dwqkv makes it), needs only d logit: launched before x's gradient, not last, where its programs held
        # the SMs that a hybrid's dense heads' last products were waiting for (H200, t3 bf16 graph: median 1.010
        # -> 1.002 ms, near the runs' spread; t4 unchanged; benchmarks/NOTES.md v16.1).
        _launch(_dwr, lambda t: (cdiv(h, t["BH"]), E), (x, idx, dsc, dwr, T, h, E, R, K),
                dict(BR=32, BH=min(128, max(16, next_pow2(h)))), num_warps=4)

    def wgrad_qkv():
        blocks = _tiles("_dwqkv", dict(BR=128 if long_r and x.element_size() == 2 else c["BR"], BH=c["DW_BH"]))
        parts = 1 if fused else 3
        split = _wgrad_split(dev, cdiv(h, blocks["BH"]) * E * parts, R, blocks["BR"], deterministic, beside, fork)
        dw_acc, dwr_acc = _wgrad_buffer(dwqkv, split), _wgrad_buffer(dwr, split) if in_dw else dsc
        _launch(_dwqkv, lambda t: (cdiv(h, t["BH"]), E, parts * split),
                (x, idx, dqkv, dw_acc, T, h, E, R, K, dl16 if in_dw and DL16_TILE else dsc, dwr_acc), blocks, D=D,
                DP=c["DP"], PREC=c["PREC"], FUSED=fused, ROUTER=in_dw, DL16=in_dw and DL16_TILE, SPLIT=split,
                VEC=4 if _vector_atomics(dev, D) else 0,
                num_warps=8 if fused else 4, num_stages=c["DW_STAGES"])
        if dw_acc is not dwqkv:
            dwqkv.copy_(dw_acc)
        if in_dw and dwr_acc is not dwr:
            dwr.copy_(dwr_acc)

    # what needs only _out_bwd's results: w_o's gradient (unless _out_bwd made it) and the router's (where it has
    # a kernel of its own), on the fork where there is one, else in this order on this stream
    first = ([] if whole else [wgrad_o]) + ([wgrad_router] if dwr is not None and not in_dw else [])
    if fork is not None and first:
        fork.run(lambda: [fn() for fn in first])
    elif not whole:
        wgrad_o()
    common = dict(D=D, DP=c["DP"], ROPE=rope_dims, BS=c["BS"], PREC=c["PREC"], num_warps=4)
    args = (qkv, idx, do, lse, delta, dqkv, cos, sin, T, E, R, K, qk_scale, sm_scale)
    # 64, or 32 for wide heads and float32 (a tuning override of the block sets the rows per program too)
    blk = _tile("_attn_bwd_seqs", "BLK", c["BM"])
    if attn_inside:
        pass  # done by _out_bwd
    elif SEQ_BLOCK_BWD and K <= blk:  # short sequences: one program per block of whole sequences
        nr_seqs = (blk // K) * K
        _launch(_attn_bwd_seqs, lambda t: (cdiv(R, nr_seqs), E),
                (qkv, idx, do, lse, delta, dqkv, cos, sin, T, E, R, K, nr_seqs, qk_scale, sm_scale), dict(BLK=blk),
                D=D, DP=c["DP"], ROPE=rope_dims, PREC=c["PREC"], num_warps=4)
    else:
        _launch(_attn_bwd_dkdv, lambda t: (cdiv(R, t["BN"]), E), args, dict(BM=c["BM"], BN=c["BN"]),
                **common)
        _launch(_attn_bwd_dq, lambda t: (cdiv(R, t["BM"]), E), args, dict(BM=c["BM"], BN=c["DQ_BN"]),
                **common)
    if dense_dl:
        dwr = _router_grad_dense(dlf[:, :B * T], x, w_router.dtype)
    elif fork is None and dwr is not None and not in_dw:
        wgrad_router()
    if fork is not None:  # w_qkv's gradient launched ahead of x's, beside it; the fork waits again only where
        # this stream has launched dqkv's kernels since its first wait (else dqkv came from _out_bwd)
        fork.run(wgrad_qkv, wait=not (first and attn_inside and not dense_dl))
    _launch(_qkv_bwd_dx, lambda t: (cdiv(R, t["BM"]), E, cdiv(h, t["BH"])),
            (dqkv, idx, w_qkv, rows, T, h, E, R, K, dsc, dsc if w_router is None else w_router),
            dict(BM=c["BM"], BH=c["DX_BH"]), D=D, DP=c["DP"], PREC=c["PREC"], ROUTER=w_router is not None,
            ATOMIC=not deterministic, VEC=vec,
            num_warps=4 if deterministic else c["DX_ATOMIC_WARPS"])
    # in x's dtype: no cast pass in autograd
    if deterministic:
        dx = _scatter(rows, perm, starts, B, T, h, gdt, c)
    else:
        dx = Unfinished(rows, None, D) if not finish and rows.dtype != gdt else rows.to(gdt)
    if fork is None:
        wgrad_qkv()
    else:  # the fork's work done before the gradients (and the tensors it reads) are handed back
        fork.join()
    return dx, (dsc.to(scores.dtype) if w_router is None else dwr), dwqkv, dwo


# Under autocast over wider tensors (float32 parameters, a float32 residual stream), the op's kernels cast x's
# and the weights' tiles as they load them. Where the same tiles are loaded many times that costs bytes. Where
# gradients are taken: the routed op casts x for its router product anyway, and with NARROW_X its kernels read
# that copy, and its backward saves it instead of x (half the bytes; in a model, whose norm output x would
# otherwise be kept for this op alone, less memory; in a benchmark that keeps x alive, the copy's size more).
# NARROW_WEIGHTS: w_qkv and w_o cast once per call (as autocast casts a linear layer's weight), the copies read
# by every kernel of the forward and the backward and saved for it; the gradients stay in the weights' dtype.
# True: always; False: never; None: where a head's rows are read by enough programs (R >= NARROW_WEIGHTS_MIN_ROWS)
# that the copy (one read, a half write) costs less than the reads it halves. H200, bf16 autocast over float32,
# graphs (benchmarks/NOTES.md v24.1): t1 0.141 -> 0.121 ms, 17 heads at sparsity 4 0.601 -> 0.470, t3 1.160 ->
# 1.121, t4 0.507 -> 0.493 (x's copy only: the weights' copy cost more there, 0.499). A forward without gradients
# makes no copies (they saved little there, 0.072 -> 0.068 ms at t1, for up to 142 MiB more at the peak). The same
# numbers either way: the kernels cast the tiles they load to the same values.
NARROW_X = True
NARROW_WEIGHTS = None
NARROW_WEIGHTS_MIN_ROWS = 256
# True: the eager op's copies (x's, the weights', the router weight's for its product), and the wide hybrid op's
# (``triton_hybrid.WIDE_INPUT``), in one launch (``combine.cast_many``): t1 under autocast on an H200, graphs, ~8 us
# faster in each of 9 rounds (0.128 against 0.136 ms in the faster rounds; benchmarks/NOTES.md v33.4); False: one
# cast each.
CAST_TOGETHER = True


def _copies(tensors, cdt) -> list:
    """For each of ``tensors`` (None allowed): its contiguous copy in ``cdt``, without autograd history, where it
    is a tensor of another dtype, else None; the copies made in one launch where ``CAST_TOGETHER``
    (``combine.cast_many``), else one ``.to`` each."""
    wide = [t.detach().contiguous() for t in tensors if t is not None and t.dtype != cdt]
    if CAST_TOGETHER:
        from .combine import cast_many
        made = iter(cast_many(wide, cdt))
    else:
        made = iter([t.to(cdt) for t in wide])
    return [next(made) if t is not None and t.dtype != cdt else None for t in tensors]


def _needs_grad(*tensors) -> bool:
    """Whether autograd will take gradients through an op on these tensors (the copies above pay only then)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _narrow_weights(w_qkv, w_o, cdt, rows: int):
    """(w_qkv, w_o) in the compute dtype ``cdt`` where NARROW_WEIGHTS says so, else as they are."""
    if w_qkv.dtype == cdt and w_o.dtype == cdt:
        return w_qkv, w_o
    return (w_qkv.to(cdt), w_o.to(cdt)) if narrows_weights(rows) else (w_qkv, w_o)


def narrows_weights(rows: int) -> bool:
    """Whether the op reads compute-dtype copies of wider weights for heads of ``rows`` rows (``NARROW_WEIGHTS``)."""
    return rows >= NARROW_WEIGHTS_MIN_ROWS if NARROW_WEIGHTS is None else bool(NARROW_WEIGHTS)


def _weight_copies(w_qkv, w_o, cdt, rows: int, grad: bool):
    """(w_qkv's, w_o's) copies for the custom ops' ``wq_read``, ``wo_read`` (the compiled graph makes them),
    or (None, None) where ``_narrow_weights`` makes none or no gradient is taken."""
    if not grad:
        return None, None
    wq, wo = _narrow_weights(w_qkv.detach(), w_o.detach(), cdt, rows)
    return (wq, wo) if (wq.dtype, wo.dtype) != (w_qkv.dtype, w_o.dtype) else (None, None)


# --------------------------------------------------------------------------------------------- torch ops
# Two wrappers of the same launchers: torch.library custom ops, which torch.compile sees as single nodes,
# and an autograd.Function with less Python overhead per call for eager mode.
# (``wq_read``, ``wo_read``: the weights' copies in the compute dtype, ``_narrow_weights``, made by the caller so
# that the compiled graph holds the casts; read and saved instead of w_qkv, w_o; ``x_read`` likewise for x)
@torch.library.custom_op("mosa_attention::sparse_attention_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, scores: torch.Tensor, idx: torch.Tensor, w_qkv: torch.Tensor, w_o: torch.Tensor,
            rope_dims: int, rope_base: float, deterministic: bool, compute_dtype: torch.dtype,
            wq_read: Optional[torch.Tensor] = None, wo_read: Optional[torch.Tensor] = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    w_qkv, w_o = _read(w_qkv, wq_read), _read(w_o, wo_read)
    return _fwd_impl(x, scores, idx, w_qkv, w_o, rope_dims, rope_base, deterministic, compute_dtype)


def _read(t: torch.Tensor, copy: torch.Tensor | None) -> torch.Tensor:
    """What the kernels read of ``t``: its copy where there is one."""
    return t if copy is None else copy


def _segments_like(idx, B, T, E, R, deterministic):
    """Stand-ins for (perm, starts) of the given mode (fake tensors for torch.compile)."""
    if not deterministic:
        return idx.new_empty(0, dtype=torch.int64), idx.new_empty(0, dtype=torch.int64)
    return idx.new_empty(E * R, dtype=torch.int64), idx.new_empty(B * (T + 1) + 1, dtype=torch.int64)


@_fwd_op.register_fake
def _(x, scores, idx, w_qkv, w_o, rope_dims, rope_base, deterministic, compute_dtype, wq_read=None, wo_read=None):
    B, T, h, E, K, D, R = _dims(x, idx, w_qkv)
    cdt = compute_dtype
    return (x.new_empty(B, T, h, dtype=cdt), x.new_empty(3, E, R, D, dtype=cdt), x.new_empty(E, R, D, dtype=cdt),
            x.new_empty(E, R, dtype=torch.float32), *_segments_like(idx, B, T, E, R, deterministic))


# (``wq_dtype``, ``wo_dtype``: the weights' gradients' dtypes, where w_qkv and w_o are their copies)
@torch.library.custom_op("mosa_attention::sparse_attention_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, scores: torch.Tensor, idx: torch.Tensor, w_qkv: torch.Tensor,
            w_o: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, perm: torch.Tensor,
            starts: torch.Tensor, rope_dims: int, rope_base: float, wq_dtype: torch.dtype, wo_dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(dy, x, scores, idx, w_qkv, w_o, qkv, o, lse, perm, starts, rope_dims, rope_base,
                     w_dtypes=(wq_dtype, wo_dtype))


@_bwd_op.register_fake
def _(dy, x, scores, idx, w_qkv, w_o, qkv, o, lse, perm, starts, rope_dims, rope_base, wq_dtype, wo_dtype):
    return (torch.empty_like(x), torch.empty_like(scores), torch.empty_like(w_qkv, dtype=wq_dtype),
            torch.empty_like(w_o, dtype=wo_dtype))


def _setup_context(ctx, inputs, output):
    x, scores, idx, w_qkv, w_o, rope_dims, rope_base, _, _, wq_read, wo_read = inputs
    ctx.save_for_backward(x, scores, idx, _read(w_qkv, wq_read), _read(w_o, wo_read), *output[1:])
    ctx.rope = (rope_dims, rope_base)
    ctx.w_dtypes = (w_qkv.dtype, w_o.dtype)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved outputs (see triton_hybrid)


def _backward(ctx, dy, *_):
    if dy is None:  # y took no part in the loss
        return (None,) * 11
    dx, dsc, dwqkv, dwo = _bwd_op(dy, *ctx.saved_tensors, *ctx.rope, *ctx.w_dtypes)
    return dx, dsc, None, dwqkv, dwo, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scores, idx, w_qkv, w_o, rope_dims, rope_base, deterministic, cdt, beside=False,
                narrow=False):
        ctx.w_dtypes = (w_qkv.dtype, w_o.dtype)
        if narrow:
            w_qkv, w_o = _narrow_weights(w_qkv, w_o, cdt=cdt, rows=idx.shape[0] * idx.shape[2])
        out = _fwd_impl(x, scores, idx, w_qkv, w_o, rope_dims, rope_base, deterministic, cdt)
        ctx.save_for_backward(x, scores, idx, w_qkv, w_o, *out[1:])
        ctx.rope = (rope_dims, rope_base)
        ctx.beside = beside
        return out[0]

    @staticmethod
    def backward(ctx, dy):
        dx, dsc, dwqkv, dwo = _bwd_impl(dy, *ctx.saved_tensors, *ctx.rope, beside=ctx.beside, w_dtypes=ctx.w_dtypes)
        return dx, dsc, None, dwqkv, dwo, None, None, None, None, None, None


class _EagerRouted(torch.autograd.Function):
    """Router + top-k + sparse attention as one autograd node: the router's backward is fused into the
    kernels (d logit at the kept tokens only, added into dx by the scatter and reduced into dw_router by
    the weight-gradient kernel), so no [B, T, E] gradient, no router GEMMs and no add of two dx exist."""

    @staticmethod
    def forward(ctx, x, w_router, w_qkv, w_o, k, include_first, rope_dims, rope_base, deterministic, cdt,
                mark_rows=None, rows_only=False, x_read=None, beside=False, narrow=False):
        # what the kernels read (the same values after their cast): x_read, else x or its copy in the compute
        # dtype, which the router product makes anyway (NARROW_X)
        xr = x if x_read is None else x_read
        ctx.w_dtypes = (w_qkv.dtype, w_o.dtype)
        wr = w_router
        if narrow:
            # the copies in one launch where CAST_TOGETHER (x's, the weights', and with them the router weight's
            # for its product; the backward keeps the router weight itself), else each cast on its own
            ws = narrows_weights(x.shape[0] * k)
            wanted = [x if xr.dtype != cdt and NARROW_X else None, w_qkv if ws else None, w_o if ws else None]
            with_router = CAST_TOGETHER and any(t is not None and t.dtype != cdt for t in wanted)
            cx, cq, co, cr = _copies(wanted + [w_router if with_router else None], cdt)
            xr, w_qkv, w_o, wr = _read(xr, cx), _read(w_qkv, cq), _read(w_o, co), _read(w_router, cr)
        y, kept, idx, *saved = _routed_fwd_impl(xr, wr, w_qkv, w_o, k, include_first, rope_dims, rope_base,
                                                deterministic, cdt, mark_rows, rows_only)
        ctx.save_for_backward(xr, kept, idx, w_qkv, w_o, *saved, w_router)
        ctx.rope = (rope_dims, rope_base)
        ctx.rows_only = rows_only
        ctx.beside = beside
        ctx.x_dtype = x.dtype
        ctx.mark_non_differentiable(kept, idx)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for kept and idx (two launches)
        return y, kept, idx

    @staticmethod
    def backward(ctx, dy, _kept, _idx):
        if dy is None:  # y took no part in the loss (grads are not materialised)
            return (None,) * 15
        *saved, w_router = ctx.saved_tensors
        dx, dwr, dwqkv, dwo = _bwd_impl(dy, *saved, *ctx.rope, w_router=w_router, rows_only=ctx.rows_only,
                                        dx_dtype=ctx.x_dtype, beside=ctx.beside, w_dtypes=ctx.w_dtypes)
        return dx, dwr, dwqkv, dwo, None, None, None, None, None, None, None, None, None, None, None


def _routed_fwd_impl(x, w_router, w_qkv, w_o, k: int, include_first: bool, rope_dims: int, rope_base: float,
                     deterministic: bool, cdt: torch.dtype, mark_rows=None, rows_only: bool = False,
                     project: bool = True, finish: bool = True):
    """(y, kept, idx, qkv, o, lse, perm, starts): routing, then the sparse-attention forward. ``mark_rows``:
    a [B, T] bool tensor in which the kept tokens are set to True (by ``_qkv_fwd``); ``rows_only``,
    ``project``, ``finish``: see ``_fwd_impl``."""
    idx, kept = _route(x, w_router, k, include_first, cdt)
    y, qkv, o, lse, perm, starts = _fwd_impl(x, kept, idx, w_qkv, w_o, rope_dims, rope_base, deterministic, cdt,
                                             mark_rows, rows_only and not deterministic, distinct=True,
                                             project=project, finish=finish)
    return y, kept, idx, qkv, o, lse, perm, starts


def _route(x, w_router, k: int, include_first: bool, cdt: torch.dtype):
    """Router logits [B, E, T] = (w_r x^T) (one GEMM in the compute dtype), then (each head's top-k positions,
    ascending; kept scores sigmoid(logit) in float32): the fused kernel where T allows, else torch.
    Float32 scores keep the sigmoid's derivative s (1 - s) accurate for scores near 1, which top-k keeps
    (in bfloat16, 1 - s of a kept score can be off by half)."""
    from . import triton_routing
    from .routing import select_topk
    B, T, h = x.shape
    E = w_router.shape[0]
    with torch.autocast(x.device.type, enabled=False):
        # w_r x^T, [E, B*T]: each head's row of logits is contiguous per sequence (the top-k kernel reads it
        # coalesced), and the product's leading dimension B*T keeps cuBLAS on its tensor-core kernels (x w_r^T
        # has leading dimension E, odd for E = 17 or 505, which sent it to an sm75 fallback kernel)
        lt = torch.mm(w_router.to(cdt), x.reshape(B * T, h).to(cdt).t()).view(E, B, T).permute(1, 0, 2)
    if T <= triton_routing.MAX_T:
        idx, kept = triton_routing.route_logits_triton(lt.transpose(1, 2), k, include_first, kept_dtype=torch.float32)
    else:
        idx = select_topk(lt, k, include_first, backend="torch")[1]
        kept = torch.sigmoid(lt.gather(-1, idx).float())
    return idx, kept


@torch.library.custom_op("mosa_attention::mosa_routed_fwd", mutates_args=())
def _routed_fwd_op(x: torch.Tensor, w_router: torch.Tensor, w_qkv: torch.Tensor, w_o: torch.Tensor, k: int,
                   include_first: bool, rope_dims: int, rope_base: float, deterministic: bool,
                   compute_dtype: torch.dtype, x_read: Optional[torch.Tensor] = None,
                   wq_read: Optional[torch.Tensor] = None, wo_read: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor, torch.Tensor]:
    return _routed_fwd_impl(_read(x, x_read), w_router, _read(w_qkv, wq_read), _read(w_o, wo_read), k, include_first,
                            rope_dims, rope_base, deterministic, compute_dtype)


@_routed_fwd_op.register_fake
def _(x, w_router, w_qkv, w_o, k, include_first, rope_dims, rope_base, deterministic, compute_dtype, x_read=None,
      wq_read=None, wo_read=None):
    B, T, h = x.shape
    E, D, R = w_qkv.shape[0], w_qkv.shape[2] // 3, B * k
    idx = x.new_empty(B, E, k, dtype=torch.int64)
    cdt = compute_dtype
    return (x.new_empty(B, T, h, dtype=cdt), x.new_empty(B, E, k, dtype=torch.float32), idx,
            x.new_empty(3, E, R, D, dtype=cdt), x.new_empty(E, R, D, dtype=cdt), x.new_empty(E, R, dtype=torch.float32),
            *_segments_like(idx, B, T, E, R, deterministic))


# (``x_dtype``, ``wq_dtype``, ``wo_dtype``: the gradients' dtypes, where x, w_qkv and w_o are their copies)
@torch.library.custom_op("mosa_attention::mosa_routed_bwd", mutates_args=())
def _routed_bwd_op(dy: torch.Tensor, x: torch.Tensor, kept: torch.Tensor, idx: torch.Tensor, w_qkv: torch.Tensor,
                   w_o: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, perm: torch.Tensor,
                   starts: torch.Tensor, w_router: torch.Tensor, rope_dims: int, rope_base: float,
                   x_dtype: torch.dtype, wq_dtype: torch.dtype, wo_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(dy, x, kept, idx, w_qkv, w_o, qkv, o, lse, perm, starts, rope_dims, rope_base,
                     w_router=w_router, dx_dtype=x_dtype, w_dtypes=(wq_dtype, wo_dtype))


@_routed_bwd_op.register_fake
def _(dy, x, kept, idx, w_qkv, w_o, qkv, o, lse, perm, starts, w_router, rope_dims, rope_base, x_dtype, wq_dtype,
      wo_dtype):
    return (torch.empty_like(x, dtype=x_dtype), torch.empty_like(w_router), torch.empty_like(w_qkv, dtype=wq_dtype),
            torch.empty_like(w_o, dtype=wo_dtype))


def _routed_setup_context(ctx, inputs, output):
    x, w_router, w_qkv, w_o, k, include_first, rope_dims, rope_base, _, _, x_read, wq_read, wo_read = inputs
    y, kept, idx, *rest = output
    ctx.save_for_backward(_read(x, x_read), kept, idx, _read(w_qkv, wq_read), _read(w_o, wo_read), *rest, w_router)
    ctx.rope = (rope_dims, rope_base)
    ctx.dtypes = (x.dtype, w_qkv.dtype, w_o.dtype)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved outputs (see triton_hybrid)


def _routed_backward(ctx, dy, *_):
    if dy is None:  # y took no part in the loss
        return (None,) * 13
    dx, dwr, dwqkv, dwo = _routed_bwd_op(dy, *ctx.saved_tensors, *ctx.rope, *ctx.dtypes)
    return dx, dwr, dwqkv, dwo, None, None, None, None, None, None, None, None, None


_routed_fwd_op.register_autograd(_routed_backward, setup_context=_routed_setup_context)


def _check_routed(x, w_router, w_qkv, w_o, k: int, rope_dims: int):
    """(compute dtype, (w_router, w_qkv, w_o) as the kernels take them) of the routed op's arguments, each bad one
    named in a ValueError."""
    cdt, (w_router, w_qkv, w_o), mixed = _compute_dtype(x, w_router, w_qkv, w_o)
    if x.dtype not in _DTYPES:
        raise ValueError(f"x.dtype must be one of {_DTYPES}, got x.dtype={x.dtype}")
    B, T, h = x.shape if x.dim() == 3 else (0, 0, 0)
    E = w_qkv.shape[0]
    if tuple(w_router.shape) != (E, h) or w_router.dtype != w_qkv.dtype or w_router.device != x.device:
        raise ValueError(f"w_router must be [E={E}, h={h}] with w_qkv's dtype {w_qkv.dtype} on {x.device}, got "
                         f"w_router.shape={tuple(w_router.shape)}, dtype={w_router.dtype}, device={w_router.device}")
    if not 1 <= k <= T:
        raise ValueError(f"k must be in [1, T={T}], got k={k}")
    # shape stand-ins for the shared checks (views of one element: nothing is filled or launched)
    idx_like = torch.empty((), dtype=torch.int64, device=x.device).expand(B, E, k)
    sc_like = torch.empty((), dtype=w_qkv.dtype, device=x.device).expand(B, E, k)
    _check(x, sc_like, idx_like, w_qkv, w_o, int(rope_dims), mixed)
    return cdt, (w_router, w_qkv, w_o)


@on_its_device
def mosa_triton(x, w_router, w_qkv, w_o, k: int, include_first: bool, rope_dims: int, rope_base: float = 10000.0,
                deterministic: bool | None = None, mark_rows: torch.Tensor | None = None, rows_only: bool = False,
                x_read: torch.Tensor | None = None, beside: bool = False):
    """MoSA heads with top-k routing fused in: router GEMM, the fused top-k kernel and ``sparse_attention``'s
    kernels, the router's backward folded into them. Returns (y [B, T, h], kept scores [B, E, k] float32,
    positions [B, E, k] ascending); the last two carry no gradient. Same math as
    ``sparse_attention_reference(x, *select_topk(sigmoid(x w_r^T)), ...)``; differentiable in x and the
    three weights. Under torch.compile it is one custom op (forward and backward), like the others.
    ``deterministic``: see ``sparse_attention_triton``. ``mark_rows``: a [B, T] contiguous bool tensor in
    which every kept token is set to True (before the attention kernels run). ``rows_only`` (needs
    ``mark_rows``): y, and in the backward x's gradient, are defined only at the marked rows; the other rows
    are left unwritten (uninitialised memory), which saves clearing the whole [B, T, h] scatter buffers. For
    a caller that reads the marked rows only (``ops.add_at_rows``); ignored under torch.compile and with
    deterministic scatters, which write every row. ``x_read``: x already in the compute dtype (under autocast
    over float32, e.g. the copy a preceding product made), which the kernels then read instead of x: the
    same values after the cast they apply to x's tiles, half the bytes, no copy of their own for the router
    product; gradients stay x's, in x's dtype. Ignored under torch.compile. ``beside``: other kernels run
    beside this op's on another stream (a hybrid's dense heads), so the backward takes the kernel forms that
    share the GPU better (``_bwd_impl``); a matter of speed only, ignored under torch.compile."""
    cdt, (w_router, w_qkv, w_o) = _check_routed(x, w_router, w_qkv, w_o, k, rope_dims)
    B, T, h = x.shape
    E = w_qkv.shape[0]
    x, w_router, w_qkv, w_o = (t.contiguous() for t in (x, w_router, w_qkv, w_o))
    args = (x, w_router, w_qkv, w_o, int(k), bool(include_first), int(rope_dims), float(rope_base),
            _rows_for(deterministic, x.device, h, (cdt, x.dtype), E * B * k, B * T), cdt)
    if mark_rows is not None and (mark_rows.dtype != torch.bool or tuple(mark_rows.shape) != (B, T)
                                  or mark_rows.device != x.device or not mark_rows.is_contiguous()):
        raise ValueError(f"mark_rows must be a contiguous bool tensor [B={B}, T={T}] on {x.device}, got "
                         f"{tuple(mark_rows.shape)} {mark_rows.dtype} on {mark_rows.device}"
                         + ("" if mark_rows.is_contiguous() else " (not contiguous)"))
    if rows_only and mark_rows is None:
        raise ValueError("rows_only=True needs mark_rows (the rows it leaves defined), got mark_rows=None")
    if x_read is not None and (x_read.shape != x.shape or x_read.device != x.device or x_read.dtype != cdt
                               or not x_read.is_contiguous()):
        raise ValueError(f"x_read must be a contiguous copy of x {tuple(x.shape)} in the compute dtype {cdt} on "
                         f"{x.device}, got {tuple(x_read.shape)} {x_read.dtype} on {x_read.device}")
    if torch.compiler.is_compiling():
        # the copies the eager op makes (NARROW_X, NARROW_WEIGHTS), here in the compiled graph
        narrow = _needs_grad(x, w_router, w_qkv, w_o)
        xr = x.detach().to(cdt) if narrow and NARROW_X and x.dtype != cdt else None
        y, kept, idx = _routed_fwd_op(*args, xr, *_weight_copies(w_qkv, w_o, cdt, B * k, narrow))[:3]
        if mark_rows is not None:
            mark_rows.scatter_(1, idx.view(B, -1), True)
        return y, kept, idx
    return _EagerRouted.apply(*args, mark_rows, bool(rows_only), x_read, check_bool("beside", beside),
                              _needs_grad(x, w_router, w_qkv, w_o))


# --------------------------------------------------------------------------------------------- entry point
# Default scatter when nothing asks for determinism: atomics, except where they would add into a float32
# buffer (to fill, then cast: ``_atomic_plan``) and the kept rows (E * B * k) are fewer than this fraction of
# the output's rows (B * T); there the rows + segment sum move fewer bytes. Measured on an H200: with float32
# buffers (benchmarks/NOTES.md, v5) atomics were faster at 0.53 (t1, t2) and 7.9 (t3) kept rows per token,
# slower at 0.23 (T = 16384) and 0.06 (t4); adding in place into the results themselves (16-bit results from
# v6, float32 x's gradient under autocast) they are faster at both (v12.4: bf16 graph t4 0.372 -> 0.333 ms,
# T = 16384 0.209 -> 0.167; autocast 0.545 -> 0.502, 0.292 -> 0.249).
ATOMIC_MIN_ROWS = 0.4


def use_rows(deterministic: bool | None, kept_rows: int, out_rows: int, in_place: bool = False) -> bool:
    """Whether the scatter-adds take the deterministic rows + segment sum (True) or atomics (False).
    True: always; False: always atomics; None: True under ``torch.use_deterministic_algorithms``, else the
    faster one for the shape: atomics where they add into the results themselves (``in_place``), else from
    ``ATOMIC_MIN_ROWS`` kept rows per output row."""
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled() or (
            not in_place and kept_rows < ATOMIC_MIN_ROWS * out_rows)
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be True, False or None, got deterministic={deterministic!r}")
    return deterministic


def _rows_for(deterministic: bool | None, dev, h: int, dtypes, kept_rows: int, out_rows: int) -> bool:
    """``use_rows`` for the op's scatters into results of ``dtypes`` (whether the atomics would add in place is
    asked only when the choice is left to the shape)."""
    in_place = deterministic is None and _atomics_in_place(dev, h, dtypes, kept_rows / max(out_rows, 1))
    return use_rows(deterministic, kept_rows, out_rows, in_place)


def _compute_dtype(x, *weights):
    """(compute dtype, weights, mixed). Under autocast: the autocast dtype, and the weights as they are: the
    kernels cast x's and the weights' tiles as they load them and write the weight gradients in the weights'
    dtype, so float32 parameters need no 16-bit copies and no gradient casts (weights of a dtype the
    kernels do not read are cast here). Otherwise the weights' dtype, which x must share."""
    dev_type = x.device.type
    if torch.is_autocast_enabled(dev_type) and x.dtype in _DTYPES:
        dt = torch.get_autocast_dtype(dev_type)
        return dt, tuple(w if w.dtype in _DTYPES else w.to(dt) for w in weights), True
    return weights[-1].dtype, weights, False


def _check(x, scores, idx, w_qkv, w_o, rope_dims, mixed=False):
    check_sparse_inputs(x, scores, idx, w_qkv, w_o, rope_dims)  # shapes, as every backend
    D = w_qkv.shape[2] // 3
    if D > _MAX_HEAD_DIM:
        raise ValueError(f"the triton backend supports head dims up to {_MAX_HEAD_DIM}, got D={D} (use backend='torch')")
    for name, t in (("scores", scores), ("idx", idx), ("w_qkv", w_qkv), ("w_o", w_o)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"the triton backend runs on CUDA tensors, got x.device={x.device} (use backend='torch')")
    if w_o.dtype != w_qkv.dtype and not mixed:
        raise ValueError(f"w_o.dtype={w_o.dtype} must match w_qkv.dtype={w_qkv.dtype} (outside autocast)")
    if w_qkv.dtype != x.dtype and not mixed:
        raise ValueError(f"w_qkv.dtype={w_qkv.dtype} must match x.dtype={x.dtype} (outside autocast)")


@on_its_device
def sparse_attention_triton(x, scores, idx, w_qkv, w_o, rope_dims: int, rope_base: float = 10000.0,
                            deterministic: bool | None = None, beside: bool = False):
    """Fused Triton ``sparse_attention``; same arguments and result as ``sparse_attention_reference``.

    Differentiable in x, scores, w_qkv and w_o. ``deterministic`` picks the scatter-add of y and of x's
    gradient: True sums each token's rows in head order (same input, same bits); False adds with atomics,
    in float32 or, where its rounding allows, in the 16-bit result (``_atomic_plan``); the order of the
    additions, hence the last bits, may change from run to run. None (default) is True under
    ``torch.use_deterministic_algorithms(True)``, else the faster of the two for the shape: atomics, except
    where they would need a float32 buffer and the kept rows are fewer than ``ATOMIC_MIN_ROWS`` of the
    output's rows (``use_rows``). ``beside``: other kernels run beside this op's on another stream (see
    ``mosa_triton``; ignored under torch.compile).
    """
    if x.dtype == torch.float64:  # documented fallback: no fp64 kernels
        check_reference_dtypes(x, w_qkv, w_o)
        return sparse_attention_reference(x, scores, idx, w_qkv, w_o, rope_dims, rope_base)
    cdt, (w_qkv, w_o), mixed = _compute_dtype(x, w_qkv, w_o)
    if x.dtype not in _DTYPES:
        raise ValueError(f"x.dtype must be one of {_DTYPES}, got x.dtype={x.dtype}")
    rope_dims = int(rope_dims)
    _check(x, scores, idx, w_qkv, w_o, rope_dims, mixed)
    B, T, h = x.shape
    check_positions(idx, T)
    if idx.is_cuda:  # (unchecked there: a check would wait for the device) negative positions as padding
        idx = torch.where(idx < 0, T, idx)
    x, scores, idx, w_qkv, w_o = (t.contiguous() for t in (x, scores, idx, w_qkv, w_o))
    args = (x, scores, idx, w_qkv, w_o, rope_dims, float(rope_base),
            _rows_for(deterministic, x.device, h, (cdt, x.dtype), idx.numel(), B * T), cdt)
    if torch.compiler.is_compiling():
        copies = _weight_copies(w_qkv, w_o, cdt, B * idx.shape[2], _needs_grad(x, scores, w_qkv, w_o))  # (as eager)
        return _fwd_op(*args, *copies)[0]
    return _Eager.apply(*args, check_bool("beside", beside), _needs_grad(x, scores, w_qkv, w_o))
