"""Summing a hybrid's heads where only some rows of one part can be nonzero; casting several tensors at once.

The fused MoSA op's output, and its heads' share of x's gradient, are zero at every token no MoSA head
kept. ``add_at_rows_(dst, src, rows)`` adds ``src`` into ``dst`` at the rows ``rows`` marks only, so a
hybrid's two [B, T, h] sums read and write the kept tokens' rows instead of every row (at the
perplexity-matched hybrid's shape 17 heads keep about 42 % of the tokens).
"""
from __future__ import annotations

import torch

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
    if isinstance(dst, torch.Tensor) and dst.is_leaf and dst.requires_grad and torch.is_grad_enabled():
        raise ValueError("dst is a leaf that requires grad, which add_at_rows cannot change in place; "
                         "pass a computed tensor (e.g. a layer's output) or dst.clone()")
    return _AddAtRows.apply(dst, src, rows)


def cast_many(tensors, dtype: torch.dtype) -> list:
    """Contiguous copies of ``tensors`` (of one device) in ``dtype``: in one Triton launch on CUDA (or under Triton's
    interpreter) for up to five contiguous ones (a hybrid's x and weights under autocast: one pass instead of a
    launch each, benchmarks/NOTES.md v33), else one ``.to`` each."""
    tensors = list(tensors)
    if tensors and (tensors[0].is_cuda or interpreting()) and len(tensors) <= 5 \
            and all(t.is_contiguous() and t.device == tensors[0].device and t.is_floating_point() for t in tensors):
        from .triton_combine import cast_many_triton  # noqa: WPS433 (optional dependency)
        return cast_many_triton(tensors, dtype)
    return [t.to(dtype, memory_format=torch.contiguous_format) for t in tensors]
