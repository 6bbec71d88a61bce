"""Summing a hybrid's heads where only some rows of one part can be nonzero.

The fused MoSA op's output, and its heads' share of x's gradient, are zero at every token no MoSA head
kept. ``add_at_rows_(dst, src, rows)`` adds ``src`` into ``dst`` at the rows ``rows`` marks only, so a
hybrid's two [B, T, h] sums read and write the kept tokens' rows instead of every row (at the
perplexity-matched hybrid's shape 17 heads keep about 42 % of the tokens).

``linear_add_at_rows(a, w, src, rows)`` is ``a @ w^T`` plus that sum, as one product whose epilogue adds the
marked rows of ``src`` (the dense heads' output projection of a hybrid, with the MoSA heads' y): the sum
then costs no pass of its own over [B, T, h].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._host import interpreting


def _check(dst: torch.Tensor, src: torch.Tensor, rows: torch.Tensor) -> None:
    if dst.shape != src.shape or dst.device != src.device or not (dst.is_floating_point() and src.is_floating_point()):
        raise ValueError(f"dst and src must be floating tensors of one shape on one device, got dst "
                         f"{tuple(dst.shape)} {dst.dtype} {dst.device} and src {tuple(src.shape)} {src.dtype} {src.device}")
    if rows.dtype != torch.bool or rows.shape != dst.shape[:-1] or rows.device != dst.device:
        raise ValueError(f"rows must be a bool mask of shape {tuple(dst.shape[:-1])} on {dst.device}, got "
                         f"rows {tuple(rows.shape)} {rows.dtype} {rows.device}")


def add_at_rows_reference_(dst: torch.Tensor, src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """dst[rows] += src[rows] in place (rows: bool over dst's leading dims; src may have another float dtype,
    its rows are cast to dst's); returns dst."""
    _check(dst, src, rows)
    d, s = dst.view(-1, dst.shape[-1]), src.reshape(-1, src.shape[-1])
    i = rows.reshape(-1).nonzero().squeeze(1)
    d.index_add_(0, i, s.index_select(0, i).to(d.dtype))
    return dst


def add_at_rows_(dst: torch.Tensor, src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """dst[rows] += src[rows] in place, on one Triton kernel where triton runs (no host synchronisation: the
    marked rows are not counted on the host), else (and for float64 or strided tensors) the reference;
    returns dst."""
    if dst.is_cuda or interpreting():
        _check(dst, src, rows)
        if dst.is_contiguous() and src.is_contiguous() and torch.float64 not in (dst.dtype, src.dtype):
            # (the kernel adds in float32)
            from .triton_combine import add_at_rows_triton  # noqa: WPS433 (optional dependency)
            return add_at_rows_triton(dst, src, rows)
    return add_at_rows_reference_(dst, src, rows)


class _AddAtRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dst, src, rows):
        ctx.mark_dirty(dst)
        return add_at_rows_(dst, src, rows)

    @staticmethod
    def backward(ctx, dy):
        return dy, dy, None


def add_at_rows(dst: torch.Tensor, src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``dst + src`` for a ``src`` that is zero off the rows ``rows`` marks, computed in place in ``dst``
    (which must not be needed by its own backward, e.g. a linear layer's output); differentiable in both."""
    return _AddAtRows.apply(dst, src, rows)


def linear_add_at_rows_reference(a: torch.Tensor, w: torch.Tensor, src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """a @ w^T, plus src at the rows ``rows`` marks (a [..., K], w [N, K], src [..., N], rows bool [...])."""
    return add_at_rows_reference_(F.linear(a, w), src, rows)


def _linear_add_at_rows(a: torch.Tensor, w: torch.Tensor, src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``linear_add_at_rows_reference`` without autograd: one Triton kernel on CUDA for a, w of one 16-bit dtype
    (src any float dtype; float32 too under the interpreter), else the reference (cuBLAS's float32 product
    beats the kernel's, which has no tensor cores in float32)."""
    if a.dim() < 2 or w.dim() != 2 or a.shape[-1] != w.shape[1]:
        raise ValueError(f"a [..., K] and w [N, K] must agree on K, got a {tuple(a.shape)} and w {tuple(w.shape)}")
    y_shape = (*a.shape[:-1], w.shape[0])
    if src.shape != y_shape or not src.is_floating_point() or src.device != a.device:
        raise ValueError(f"src must be a floating tensor of shape {y_shape} on {a.device}, got src "
                         f"{tuple(src.shape)} {src.dtype} {src.device}")
    if rows.dtype != torch.bool or rows.shape != a.shape[:-1] or rows.device != a.device:
        raise ValueError(f"rows must be a bool mask of shape {tuple(a.shape[:-1])} on {a.device}, got "
                         f"rows {tuple(rows.shape)} {rows.dtype} {rows.device}")
    sixteen = a.dtype in (torch.float16, torch.bfloat16)
    if a.dtype == w.dtype and ((a.is_cuda and sixteen) or (interpreting() and (sixteen or a.dtype == torch.float32))):
        from .triton_combine import linear_add_at_rows_triton  # noqa: WPS433 (optional dependency)
        a2 = a.reshape(-1, a.shape[-1])
        if a2.stride(-1) != 1:
            a2 = a2.contiguous()
        y = linear_add_at_rows_triton(a2, w.contiguous(), src.contiguous().view(-1, y_shape[-1]), rows.reshape(-1))
        return y.view(y_shape)
    return linear_add_at_rows_reference(a, w, src, rows)


class _LinearAddAtRows(torch.autograd.Function):
    """a @ w^T + src at the marked rows; under autocast the product runs in the autocast dtype (as ``F.linear``
    would). Backward: the linear product's two gradients (cuBLAS), and dy itself for src."""

    @staticmethod
    def forward(ctx, a, w, src, rows):
        dev = a.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else a.dtype
        with torch.autocast(dev, enabled=False):
            ac, wc = a.to(cdt), w.to(cdt)
            y = _linear_add_at_rows(ac, wc, src, rows)
        ctx.save_for_backward(ac, wc)
        ctx.dtypes = (a.dtype, w.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        ac, wc = ctx.saved_tensors
        a_dtype, w_dtype = ctx.dtypes
        dy2 = dy.reshape(-1, dy.shape[-1]).to(wc.dtype)
        da = dw = None
        if ctx.needs_input_grad[0]:
            da = dy2.mm(wc).view(ac.shape).to(a_dtype)
        if ctx.needs_input_grad[1]:
            dw = dy2.t().mm(ac.reshape(-1, ac.shape[-1])).to(w_dtype)
        return da, dw, dy if ctx.needs_input_grad[2] else None, None


def linear_add_at_rows(a: torch.Tensor, w: torch.Tensor, src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``F.linear(a, w) + src`` for a ``src`` that is zero off the rows ``rows`` marks, as one product whose
    epilogue adds src's marked rows; differentiable in a, w and src. a [..., K], w [N, K], src [..., N],
    rows bool [...]; the result has a's dtype (the autocast dtype under autocast)."""
    return _LinearAddAtRows.apply(a, w, src, rows)
