"""Triton kernels of ``ops.combine``: dst[r] += src[r] for the rows r a mask marks (``add_at_rows_``), and
a linear product with that sum in its epilogue (``linear_add_at_rows``)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_pow2


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


@triton.jit
def _linear_add_rows(a_ptr, w_ptr, src_ptr, rows_ptr, y_ptr, M, N, K, stride_am,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """One [BM, BN] tile of y = a @ w^T, plus src's rows where ``rows`` marks them (the GEMM's epilogue)."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BN)
    rm = (pid // n_tiles) * BM + tl.arange(0, BM)
    rn = (pid % n_tiles) * BN + tl.arange(0, BN)
    in_m, in_n = rm < M, rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rm.to(tl.int64)[:, None] * stride_am + kk[None, :],
                    mask=in_m[:, None] & (kk < K)[None, :], other=0.0)
        w = tl.load(w_ptr + rn[None, :] * K + kk[:, None], mask=in_n[None, :] & (kk < K)[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    marked = tl.load(rows_ptr + rm, mask=in_m, other=0) != 0
    off = rm.to(tl.int64)[:, None] * N + rn[None, :]
    inside = in_m[:, None] & in_n[None, :]
    acc += tl.load(src_ptr + off, mask=inside & marked[:, None], other=0.0).to(tl.float32)
    tl.store(y_ptr + off, acc.to(y_ptr.dtype.element_ty), mask=inside)


# [BM, BN, BK, warps, stages] of ``_linear_add_rows``
LINEAR_ADD_TILE = [128, 128, 64, 8, 3]


def linear_add_at_rows_triton(a: torch.Tensor, w: torch.Tensor, src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """a [M, K] (unit stride along K), w [N, K] contiguous of a's dtype, src [M, N] contiguous, rows bool [M]:
    a @ w^T + src at the marked rows, in a's dtype (accumulated in float32)."""
    M, K = a.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=a.dtype, device=a.device)
    if M and N:
        BM, BN, BK, warps, stages = LINEAR_ADD_TILE
        BK = min(BK, max(16, next_pow2(K)))
        _linear_add_rows[(cdiv(M, BM) * cdiv(N, BN),)](
            a, w, src, rows.view(torch.uint8), y, M, N, K, a.stride(0), BM=BM, BN=BN, BK=BK,
            IEEE=a.dtype == torch.float32, num_warps=warps, num_stages=stages)
    return y
