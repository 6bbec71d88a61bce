"""Triton kernel of ``combine.add_at_rows_``: dst[r] += src[r] for the rows r a mask marks."""
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
