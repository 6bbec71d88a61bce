"""The Triton kernel of ``decode_heads``: one program per (sequence, head); a head that does not keep the token
reads none of its weights and only clears its row of the per-head output, so a step reads the weights of the
~1/sparsity heads that keep it. The reference is ``decode_heads.decode_heads_reference``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import on_its_device


@triton.jit
def _decode_heads(x_ptr, sc_ptr, keep_ptr, count_ptr, wqkv_ptr, wo_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, y_ptr,
                  E, h, room, qk_scale, D: tl.constexpr, DP: tl.constexpr, RD: tl.constexpr, BK: tl.constexpr,
                  BS: tl.constexpr, BH: tl.constexpr):
    b = tl.program_id(0)
    e = tl.program_id(1)
    be = b * E + e
    yrow = y_ptr + be.to(tl.int64) * h
    keep = tl.load(keep_ptr + be)
    if keep == 0:
        for n0 in range(0, h, BH):
            nn = n0 + tl.arange(0, BH)
            tl.store(yrow + nn, tl.zeros([BH], tl.float32), mask=nn < h)
    else:
        cols = tl.arange(0, DP)
        cm = cols < D
        # rotate-half on the first RD dims: dim i takes -x[i + RD/2] (first half) or x[i - RD/2] (second half)
        half: tl.constexpr = RD // 2
        partner = tl.where(cols < half, cols + half, tl.where(cols < RD, cols - half, cols))
        sign = tl.where(cols < half, -1.0, 1.0)
        q = tl.zeros([DP], tl.float32)
        qp = tl.zeros([DP], tl.float32)
        k = tl.zeros([DP], tl.float32)
        kp = tl.zeros([DP], tl.float32)
        v = tl.zeros([DP], tl.float32)
        wbase = wqkv_ptr + e.to(tl.int64) * h * 3 * D
        for k0 in range(0, h, BK):
            rr = k0 + tl.arange(0, BK)
            rm = rr < h
            xk = tl.load(x_ptr + b * h + rr, mask=rm, other=0.0).to(tl.float32)[:, None]
            wrow = wbase + rr[:, None] * (3 * D)
            m2 = rm[:, None] & cm[None, :]
            q += tl.sum(xk * tl.load(wrow + cols[None, :], mask=m2, other=0.0).to(tl.float32), 0)
            qp += tl.sum(xk * tl.load(wrow + partner[None, :], mask=m2, other=0.0).to(tl.float32), 0)
            k += tl.sum(xk * tl.load(wrow + D + cols[None, :], mask=m2, other=0.0).to(tl.float32), 0)
            kp += tl.sum(xk * tl.load(wrow + D + partner[None, :], mask=m2, other=0.0).to(tl.float32), 0)
            v += tl.sum(xk * tl.load(wrow + 2 * D + cols[None, :], mask=m2, other=0.0).to(tl.float32), 0)
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
        slot = tl.minimum(c, room - 1)
        kv = k_ptr + (be.to(tl.int64) * room + slot) * D
        tl.store(kv + cols, k.to(DT), mask=cm)
        tl.store(v_ptr + (be.to(tl.int64) * room + slot) * D + cols, v.to(DT), mask=cm)
        # attention over the cached slots [0, c) in blocks, then the new token itself (from registers)
        s_new = tl.sum(q * k, 0) * qk_scale
        m_i = s_new
        l_i = s_new * 0.0 + 1.0
        acc = v
        base = be.to(tl.int64) * room * D
        for s0 in range(0, c, BS):
            ss = s0 + tl.arange(0, BS)
            sm = ss < c
            kt = tl.load(k_ptr + base + ss[:, None] * D + cols[None, :], mask=sm[:, None] & cm[None, :],
                         other=0.0).to(tl.float32)
            s = tl.sum(kt * q[None, :], 1) * qk_scale
            s = tl.where(sm, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            p = tl.exp2(s - m_new)
            alpha = tl.exp2(m_i - m_new)
            vt = tl.load(v_ptr + base + ss[:, None] * D + cols[None, :], mask=sm[:, None] & cm[None, :],
                         other=0.0).to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * vt, 0)
            m_i = m_new
        o = acc / l_i * tl.load(sc_ptr + be).to(tl.float32)
        o = o.to(DT).to(tl.float32)
        wo = wo_ptr + e.to(tl.int64) * D * h
        for n0 in range(0, h, BH):
            nn = n0 + tl.arange(0, BH)
            nm = nn < h
            w = tl.load(wo + cols[:, None] * h + nn[None, :], mask=cm[:, None] & nm[None, :], other=0.0)
            tl.store(yrow + nn, tl.sum(o[:, None] * w.to(tl.float32), 0), mask=nm)


@on_its_device
def decode_heads_triton(x, scores, keep, count, w_qkv, w_o, cos, sin, k_cache, v_cache) -> torch.Tensor:
    """``decode_heads_reference``'s signature and result (to rounding). The per-head rows are summed in head
    order by torch (no atomics: the same bits at every run)."""
    B, h = x.shape
    E, _, D3 = w_qkv.shape
    D, room, RD = D3 // 3, k_cache.shape[2], cos.shape[-1]
    tensors = (x, scores, keep, count, w_qkv, w_o, cos, sin, k_cache, v_cache)
    if any(not t.is_contiguous() for t in tensors):
        raise ValueError("decode_heads_triton needs contiguous tensors")
    y = torch.empty(B, E, h, device=x.device, dtype=torch.float32)
    DP = max(16, triton.next_power_of_2(D))
    _decode_heads[(B, E)](x, scores, keep.to(torch.int8), count, w_qkv, w_o, cos, sin, k_cache, v_cache, y,
                          E, h, room, 1.4426950408889634 / D ** 0.5, D=D, DP=DP, RD=RD, BK=32, BS=32, BH=64,
                          num_warps=4)
    return y.sum(1).to(x.dtype)
