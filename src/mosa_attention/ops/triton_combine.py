"""Triton kernels of ``combine``: ``add_at_rows_`` (dst[r] += src[r] for the rows r a mask marks) and ``cast_many``
(several tensors cast in one launch)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_pow2, on_its_device


@triton.jit
def _add_at_rows(dst_ptr, src_ptr, rows_ptr, N, h, BR: tl.constexpr, BH: tl.constexpr):
    """One block of BR rows: leaves at once when none is marked, else adds the marked rows of src."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    marked = tl.load(rows_ptr + r, mask=r < N, other=0) != 0
    if tl.max(marked.to(tl.int32), 0) > 0:
        for c0 in range(0, h, BH):
            c = c0 + tl.arange(0, BH)
            m = marked[:, None] & (c < h)[None, :]
            off = r.to(tl.int64)[:, None] * h + c[None, :]
            d = tl.load(dst_ptr + off, mask=m, other=0.0).to(tl.float32)
            s = tl.load(src_ptr + off, mask=m, other=0.0).to(tl.float32)
            tl.store(dst_ptr + off, (d + s).to(dst_ptr.dtype.element_ty), mask=m)


@on_its_device
def add_at_rows_triton(dst: torch.Tensor, src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """dst, src contiguous [..., h] of one dtype, rows bool [...]: dst[rows] += src[rows]; returns dst."""
    h = dst.shape[-1]
    n = rows.numel()
    if n and h:
        BH = min(512, max(16, next_pow2(h)))
        BR = 8
        _add_at_rows[(cdiv(n, BR),)](dst, src, rows.reshape(-1).view(torch.uint8), n, h, BR=BR, BH=BH,
                                     num_warps=4)
    return dst


_CAST_SLOTS = 5


@triton.jit
def _cast_block(src_ptr, dst_ptr, n, block, BLOCK: tl.constexpr):
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=m).to(dst_ptr.dtype.element_ty), mask=m)


@triton.jit
def _cast_many(s0, d0, n0, s1, d1, n1, s2, d2, n2, s3, d3, n3, s4, d4, n4, e0, e1, e2, e3,
               BLOCK: tl.constexpr):
    """Tensor i's blocks are programs [e(i-1), e(i)) (e(-1) = 0; the last tensor's end is the grid's)."""
    pid = tl.program_id(0)
    if pid < e0:
        _cast_block(s0, d0, n0, pid, BLOCK)
    elif pid < e1:
        _cast_block(s1, d1, n1, pid - e0, BLOCK)
    elif pid < e2:
        _cast_block(s2, d2, n2, pid - e1, BLOCK)
    elif pid < e3:
        _cast_block(s3, d3, n3, pid - e2, BLOCK)
    else:
        _cast_block(s4, d4, n4, pid - e3, BLOCK)


def cast_many_triton(tensors, dtype: torch.dtype, block: int = 4096) -> list:
    """Contiguous copies of up to five contiguous tensors of one device in ``dtype``, in one launch."""
    if not 1 <= len(tensors) <= _CAST_SLOTS:
        raise ValueError(f"tensors must hold 1 to {_CAST_SLOTS} tensors, got {len(tensors)}")
    outs = [torch.empty(t.shape, device=t.device, dtype=dtype) for t in tensors]
    args, ends, total = [], [], 0
    for i in range(_CAST_SLOTS):
        if i < len(tensors):
            n = tensors[i].numel()
            args += [tensors[i], outs[i], n]
            total += cdiv(n, block)
        else:  # an empty slot: no programs
            args += [tensors[0], outs[0], 0]
        ends.append(total)
    if total:
        _launch_casts(tensors[0], args, ends[:-1], total, block)
    return outs


@on_its_device
def _launch_casts(first, args, ends, total: int, block: int):
    _cast_many[(total,)](*args, *ends, BLOCK=block, num_warps=8)
