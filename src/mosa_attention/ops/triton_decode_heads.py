"""The Triton kernels of ``decode_heads``: a head that does not keep the token reads none of its weights, so a step
reads the weights of the ~1/sparsity heads that keep it. The reference is ``decode_heads.decode_heads_reference``.

Four kernels; each keeping head's work is spread over several programs, so that the few keeping heads' weights are
read by many SMs at once (one program per head, v27.5's form, read a head's 0.5 MB of float32 weights on one SM:
72 us per layer of the tiny preset on an H200, against ~17 for the two split kernels; benchmarks/NOTES.md v28):

* ``_route``: per sequence and block of heads, the router scores, which heads keep the token, the position and
  score written at every head's slot, and the list of the keeping (sequence, head) rows (``COMPACT``);
* ``_qkv_parts``: per listed row and slice of x's dims, the slice's share of q, k, v (partial products, float32);
* ``_attend_out``: per listed row and slice of the output's columns, the sum of the parts, RoPE, the slot's
  write (slice 0 only), attention over the head's slots and the new token, the router score, and the slice's
  columns of the W_O product;
* ``_sum_heads``: per sequence and block of columns, the keeping heads' rows summed in head order (no atomics: the
  same bits at every run), and (block 0) the counts advanced.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_pow2, on_its_device
from .decode_heads import NAMES

# (benchmarks/NOTES.md v28) COMPACT: the per-head kernels run over a list of the keeping (sequence, head) rows made by
# _route, on PROGRAMS programs per slice, instead of one program per (sequence, head) of which ~1/sparsity work;
# SLICE: rows of x's dims per program of _qkv_parts
COMPACT = True
PROGRAMS = 64
SLICE = 64



@triton.jit
def _route(x_ptr, wr_ptr, thr_ptr, pos_ptr, count_ptr, keep_ptr, sc_ptr, posc_ptr, scc_ptr, list_ptr, n_ptr, E, h,
           room, FIRST: tl.constexpr, COMPACT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr):
    """Program (b, j), heads [j·BE, j·BE + BE): score = sigmoid(x[b] W_r[e]) rounded as x's dtype rounds it
    (``sc``); ``keep`` where it passes the head's threshold (position 0 always with FIRST; never at a negative
    position); the position and the score (float32) at slot ``count`` of every head's caches. COMPACT: the
    keeping (sequence, head) rows b·E + e also appended to ``list`` (their order there varies from run to run;
    nothing computed depends on it), ``n`` counting them."""
    b = tl.program_id(0)
    ee = tl.program_id(1) * BE + tl.arange(0, BE)
    em = ee < E
    acc = tl.zeros([BE], tl.float32)
    for k0 in range(0, h, BK):
        rr = k0 + tl.arange(0, BK)
        rm = rr < h
        xk = tl.load(x_ptr + b * h + rr, mask=rm, other=0.0).to(tl.float32)
        w = tl.load(wr_ptr + ee.to(tl.int64)[:, None] * h + rr[None, :], mask=em[:, None] & rm[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * xk[None, :], 1)
    DT = sc_ptr.dtype.element_ty
    logit = acc.to(DT).to(tl.float32)  # (the product's output dtype, as F.linear's)
    score = (1.0 / (1.0 + tl.exp(-logit))).to(DT).to(tl.float32)
    thr = tl.load(thr_ptr + ee, mask=em, other=0.0).to(DT).to(tl.float32)
    p = tl.load(pos_ptr + b)
    keep = (score > thr).to(tl.int32)
    if FIRST:
        keep = tl.maximum(keep, (p == 0).to(tl.int32))
    keep = keep * (p >= 0).to(tl.int32)
    row = b * E + ee
    tl.store(keep_ptr + row, keep.to(tl.int8), mask=em)
    tl.store(sc_ptr + row, score.to(DT), mask=em)
    c = tl.load(count_ptr + row, mask=em, other=0)
    at = row.to(tl.int64) * room + tl.minimum(c, room - 1)
    tl.store(posc_ptr + at, tl.zeros([BE], tl.int64) + p, mask=em)
    tl.store(scc_ptr + at, score, mask=em)
    if COMPACT:
        kk = tl.where(em, keep, 0)
        first = tl.atomic_add(n_ptr, tl.sum(kk, 0))
        tl.store(list_ptr + first + tl.cumsum(kk, 0) - kk, row, mask=kk != 0)


@triton.jit
def _qkv_parts(x_ptr, keep_ptr, wqkv_ptr, part_ptr, list_ptr, n_ptr, E, h, HS, NS, P, COMPACT: tl.constexpr,
               D: tl.constexpr, DP: tl.constexpr, BK: tl.constexpr):
    """Program (i, j): part[b, e, j] = x[b, rows] W_QKV[e, rows] over the j-th slice of HS rows of x's dims,
    [3, DP] (q, k, v; columns past D zero), for (b, e) = i (where head e keeps b's token) or, COMPACT, for the
    listed rows i, i + P, ... (nothing else is read)."""
    j = tl.program_id(1)
    if COMPACT:
        for i in range(tl.program_id(0), tl.load(n_ptr), P):
            _qkv_part(x_ptr, wqkv_ptr, part_ptr, tl.load(list_ptr + i), j, E, h, HS, NS, D, DP, BK)
    else:
        be = tl.program_id(0)
        if tl.load(keep_ptr + be) != 0:
            _qkv_part(x_ptr, wqkv_ptr, part_ptr, be, j, E, h, HS, NS, D, DP, BK)


@triton.jit
def _qkv_part(x_ptr, wqkv_ptr, part_ptr, be, j, E, h, HS, NS, D: tl.constexpr, DP: tl.constexpr, BK: tl.constexpr):
    b = be // E
    e = be % E
    cols = tl.arange(0, DP)
    cm = cols < D
    q = tl.zeros([DP], tl.float32)
    k = tl.zeros([DP], tl.float32)
    v = tl.zeros([DP], tl.float32)
    wbase = wqkv_ptr + e.to(tl.int64) * h * 3 * D
    for k0 in range(j * HS, j * HS + HS, BK):
        rr = k0 + tl.arange(0, BK)
        rm = (rr < h) & (rr < j * HS + HS)
        xk = tl.load(x_ptr + b * h + rr, mask=rm, other=0.0).to(tl.float32)[:, None]
        wrow = wbase + rr[:, None] * (3 * D) + cols[None, :]
        m2 = rm[:, None] & cm[None, :]
        q += tl.sum(xk * tl.load(wrow, mask=m2, other=0.0).to(tl.float32), 0)
        k += tl.sum(xk * tl.load(wrow + D, mask=m2, other=0.0).to(tl.float32), 0)
        v += tl.sum(xk * tl.load(wrow + 2 * D, mask=m2, other=0.0).to(tl.float32), 0)
    out = part_ptr + (be.to(tl.int64) * NS + j) * 3 * DP + cols
    tl.store(out, q)
    tl.store(out + DP, k)
    tl.store(out + 2 * DP, v)


@triton.jit
def _attend_out(sc_ptr, keep_ptr, count_ptr, part_ptr, wo_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, yh_ptr, list_ptr, n_ptr,
                E, h, room, NS, HO, P, qk_scale, COMPACT: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                RD: tl.constexpr, NSP: tl.constexpr, BS: tl.constexpr, BH: tl.constexpr):
    """Program (i, j), for (b, e) = i where head e keeps b's token or, COMPACT, for the listed rows i, i + P, ...:
    q, k, v from the parts, RoPE, k and v written at the head's slot ``count`` (j = 0), attention over slots
    [0, count) and the new token, times the score, and columns [j·HO, j·HO + HO) of that row's W_O product, into
    yh[b, e]."""
    j = tl.program_id(1)
    if COMPACT:
        for i in range(tl.program_id(0), tl.load(n_ptr), P):
            _attend_row(sc_ptr, count_ptr, part_ptr, wo_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, yh_ptr,
                        tl.load(list_ptr + i), j, E, h, room, NS, HO, qk_scale, D, DP, RD, NSP, BS, BH)
    else:
        be = tl.program_id(0)
        if tl.load(keep_ptr + be) != 0:
            _attend_row(sc_ptr, count_ptr, part_ptr, wo_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, yh_ptr, be, j, E, h,
                        room, NS, HO, qk_scale, D, DP, RD, NSP, BS, BH)


@triton.jit
def _attend_row(sc_ptr, count_ptr, part_ptr, wo_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, yh_ptr, be, j, E, h, room, NS,
                HO, qk_scale, D: tl.constexpr, DP: tl.constexpr, RD: tl.constexpr, NSP: tl.constexpr,
                BS: tl.constexpr, BH: tl.constexpr):
    b = be // E
    e = be % E
    cols = tl.arange(0, DP)
    cm = cols < D
    half: tl.constexpr = RD // 2
    partner = tl.where(cols < half, cols + half, tl.where(cols < RD, cols - half, cols))
    sign = tl.where(cols < half, -1.0, 1.0)
    # the NS parts as one [NSP, DP] tile each (one round trip, not NS), summed the same way in every program
    sl = tl.arange(0, NSP)
    pp = part_ptr + (be.to(tl.int64) * NS + sl)[:, None] * 3 * DP
    pm = (sl < NS)[:, None]
    q = tl.sum(tl.load(pp + cols[None, :], mask=pm, other=0.0), 0)
    qp = tl.sum(tl.load(pp + partner[None, :], mask=pm, other=0.0), 0)
    k = tl.sum(tl.load(pp + DP + cols[None, :], mask=pm, other=0.0), 0)
    kp = tl.sum(tl.load(pp + DP + partner[None, :], mask=pm, other=0.0), 0)
    v = tl.sum(tl.load(pp + 2 * DP + cols[None, :], mask=pm, other=0.0), 0)
    if RD > 0:
        rot = cols < RD
        cos = tl.load(cos_ptr + b * RD + cols, mask=rot, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + b * RD + cols, mask=rot, other=0.0).to(tl.float32)
        q = q * cos + sign * qp * sin
        k = k * cos + sign * kp * sin
    DT = k_ptr.dtype.element_ty
    # rounded as the cache holds them, so that the new token scores against itself as it will later
    q = q.to(DT).to(tl.float32)
    k = k.to(DT).to(tl.float32)
    v = v.to(DT).to(tl.float32)
    c = tl.load(count_ptr + be)
    if j == 0:  # (the other programs read slots [0, c) only: no race with this write)
        slot = tl.minimum(c, room - 1)
        tl.store(k_ptr + (be.to(tl.int64) * room + slot) * D + cols, k.to(DT), mask=cm)
        tl.store(v_ptr + (be.to(tl.int64) * room + slot) * D + cols, v.to(DT), mask=cm)
    s_new = tl.sum(q * k, 0) * qk_scale
    m_i = s_new
    l_i = s_new * 0.0 + 1.0
    acc = v
    base = be.to(tl.int64) * room * D
    for s0 in range(0, c, BS):
        ss = s0 + tl.arange(0, BS)
        sm = ss < c
        m2 = sm[:, None] & cm[None, :]
        kt = tl.load(k_ptr + base + ss[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + base + ss[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        s = tl.where(sm, tl.sum(kt * q[None, :], 1) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.exp2(s - m_new)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * vt, 0)
        m_i = m_new
    o = acc / l_i * tl.load(sc_ptr + be).to(tl.float32)
    o = o.to(DT).to(tl.float32)
    wo = wo_ptr + e.to(tl.int64) * D * h
    yrow = yh_ptr + be.to(tl.int64) * h
    for n0 in range(j * HO, j * HO + HO, BH):
        nn = n0 + tl.arange(0, BH)
        nm = (nn < h) & (nn < j * HO + HO)
        w = tl.load(wo + cols[:, None] * h + nn[None, :], mask=cm[:, None] & nm[None, :], other=0.0)
        tl.store(yrow + nn, tl.sum(o[:, None] * w.to(tl.float32), 0), mask=nm)


@triton.jit
def _sum_heads(keep_ptr, count_ptr, yh_ptr, y_ptr, E, h, BE: tl.constexpr, BH: tl.constexpr):
    """Program (b, j): y[b, cols] = the sum over the heads that keep b's token of yh[b, e, cols], in blocks of BE
    heads taken in order (the rows of the other heads are not read: they were never written); program (b, 0)
    also advances the keeping heads' counts (after ``_attend_out`` read them)."""
    b = tl.program_id(0)
    nn = tl.program_id(1) * BH + tl.arange(0, BH)
    nm = nn < h
    acc = tl.zeros([BH], tl.float32)
    for e0 in range(0, E, BE):
        ee = e0 + tl.arange(0, BE)
        kept = tl.load(keep_ptr + b * E + ee, mask=ee < E, other=0) != 0
        if tl.program_id(1) == 0:
            c = tl.load(count_ptr + b * E + ee, mask=ee < E, other=0)
            tl.store(count_ptr + b * E + ee, c + kept.to(tl.int64), mask=ee < E)
        rows = yh_ptr + (b * E + ee).to(tl.int64)[:, None] * h + nn[None, :]
        acc += tl.sum(tl.load(rows, mask=kept[:, None] & nm[None, :], other=0.0), 0)
    tl.store(y_ptr + b * h + nn, acc.to(y_ptr.dtype.element_ty), mask=nm)


@on_its_device
def decode_heads_triton(x, w_router, threshold, pos, count, w_qkv, w_o, cos, sin, k_cache, v_cache, pos_cache,
                        score_cache, include_first: bool = False) -> torch.Tensor:
    """``decode_heads_reference``'s signature and result (to rounding); the caches and ``count`` are updated in
    place the same way (k and v only in the keeping heads' slots)."""
    B, h = x.shape
    E, _, D3 = w_qkv.shape
    D, room, RD = D3 // 3, k_cache.shape[2], cos.shape[-1]
    tensors = (x, w_router, threshold, pos, count, w_qkv, w_o, cos, sin, k_cache, v_cache, pos_cache, score_cache)
    strided = [name for name, t in zip(NAMES, tensors) if not t.is_contiguous()]
    if strided:
        raise ValueError(f"decode_heads_triton needs contiguous tensors, got strided {', '.join(strided)}")
    DP = max(16, next_pow2(D))
    keep = torch.empty(B, E, device=x.device, dtype=torch.int8)
    scores = torch.empty(B, E, device=x.device, dtype=x.dtype)
    rows = torch.empty(B * E if COMPACT else 1, device=x.device, dtype=torch.int32)
    n = torch.zeros(1, device=x.device, dtype=torch.int32)
    BK = min(512, max(16, next_pow2(h)))
    BE = max(1, 4096 // BK)
    _route[(B, cdiv(E, BE))](x, w_router, threshold, pos, count, keep, scores, pos_cache, score_cache, rows, n, E, h,
                             room, FIRST=bool(include_first), COMPACT=COMPACT, BE=BE, BK=BK, num_warps=4)
    # slices of x's dims (8 of 64 rows at h = 512) and of the output's columns (8 of 64), at most 16 each
    HS = cdiv(cdiv(h, min(16, cdiv(h, SLICE))), SLICE) * SLICE
    NS = cdiv(h, HS)
    HO = cdiv(cdiv(h, min(16, cdiv(h, 64))), 64) * 64
    NO = cdiv(h, HO)
    P = min(B * E, PROGRAMS) if COMPACT else B * E
    part = torch.empty(B * E * NS * 3 * DP, device=x.device, dtype=torch.float32)
    yh = torch.empty(B, E, h, device=x.device, dtype=torch.float32)
    y = torch.empty(B, h, device=x.device, dtype=x.dtype)
    _qkv_parts[(P, NS)](x, keep, w_qkv, part, rows, n, E, h, HS, NS, P, COMPACT=COMPACT, D=D, DP=DP, BK=SLICE,
                        num_warps=4)
    _attend_out[(P, NO)](scores, keep, count, part, w_o, cos, sin, k_cache, v_cache, yh, rows, n, E, h, room, NS, HO,
                         P, 1.4426950408889634 / D ** 0.5, COMPACT=COMPACT, D=D, DP=DP, RD=RD,
                         NSP=max(2, next_pow2(NS)), BS=64, BH=64, num_warps=4)
    BE = min(512, max(16, next_pow2(E)))  # (every head in one tile up to 512 heads: one round trip)
    BH = max(16, min(64, 8192 // BE, next_pow2(h)))
    _sum_heads[(B, cdiv(h, BH))](keep, count, yh, y, E, h, BE=BE, BH=BH, num_warps=4)
    return y
