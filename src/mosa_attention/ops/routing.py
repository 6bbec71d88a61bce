"""Expert-choice token selection: which tokens each MoSA head keeps."""
from __future__ import annotations

import math

import torch

from ._checks import check_bool, check_positive_int


def num_selected(seq_len: int, sparsity: float) -> int:
    """k = min(max(T // sparsity, 2), T), the paper's number of tokens each head keeps."""
    check_positive_int("seq_len", seq_len)
    return min(max(int(seq_len // check_sparsity(sparsity)), 2), seq_len)


def check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity) or sparsity < 1:
        raise ValueError(f"sparsity must be a finite number >= 1, got sparsity={sparsity!r}")
    return float(sparsity)


def router_logits(x: torch.Tensor, w_router: torch.Tensor) -> torch.Tensor:
    """Router logits x W_r for every token and head: [B, T, h] x [E, h] -> [B, E, T].

    A plain linear layer then a transposed view: its gradient for x is one contiguous GEMM, where an einsum
    gave a strided add that cost half a millisecond at T = 65536 (benchmarks/NOTES.md)."""
    return torch.nn.functional.linear(x, w_router).transpose(1, 2)


def router_scores(x: torch.Tensor, w_router: torch.Tensor) -> torch.Tensor:
    """Router scores r = sigmoid(x W_r) for every token and head: [B, T, h] x [E, h] -> [B, E, T]."""
    return torch.sigmoid(router_logits(x, w_router))


def select_topk(scores: torch.Tensor, k: int, include_first: bool = False, backend: str = "auto"):
    """Top-k tokens per head and sequence, returned sorted by position.

    scores: [B, E, T] router scores. Returns (kept scores [B, E, k], positions [B, E, k] int64, ascending).
    With ``include_first`` token 0 is always kept and the other k-1 are the best among tokens 1..T-1.
    Sorting by position makes the causal mask among kept tokens plain lower-triangular.

    ``backend``: "torch" (``torch.topk`` then a sort), "triton" (one fused kernel, ``triton_routing``; ties
    go to earlier positions; rows longer than its ``MAX_T`` and float64 scores fall back to torch) or "auto"
    (triton for CUDA scores, else torch).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3 or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating tensor [B, E, T], got "
                         f"{(tuple(scores.shape), scores.dtype) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    T = scores.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= T:
        raise ValueError(f"k must be an integer in [1, T={T}], got k={k!r}")
    check_bool("include_first", include_first)
    fused = _fused_topk(scores, backend)
    if fused is not None:
        idx = fused(scores, k, include_first)
    elif include_first:
        if k == 1:
            idx = torch.zeros(*scores.shape[:-1], 1, dtype=torch.long, device=scores.device)
        else:
            tail = torch.topk(scores[..., 1:], k - 1, dim=-1, sorted=False).indices + 1
            idx = torch.cat([torch.zeros_like(tail[..., :1]), tail], dim=-1)
        idx = idx.sort(dim=-1).values
    else:
        idx = torch.topk(scores, k, dim=-1, sorted=False).indices.sort(dim=-1).values
    return scores.gather(-1, idx), idx


SELECT_BACKENDS = ("auto", "torch", "triton")


def _fused_topk(scores: torch.Tensor, backend: str):
    """The fused top-k kernel if ``backend`` asks for it (or "auto" allows it), else None."""
    if backend not in SELECT_BACKENDS:
        raise ValueError(f"backend must be one of {SELECT_BACKENDS}, got backend={backend!r}")
    if backend == "torch" or (backend == "auto" and not scores.is_cuda):
        return None
    try:
        from . import triton_routing  # noqa: WPS433 (optional dependency)
    except ImportError:
        if backend == "triton":
            raise RuntimeError("backend='triton' needs the triton package") from None
        return None
    if not triton_routing.supported(scores):  # T > MAX_T or float64: torch.topk (documented fallback)
        return None
    return triton_routing.topk_positions


def strided_positions(seq_len: int, stride: int, device=None) -> torch.Tensor:
    """The fixed-sparse baseline's kept positions 0, stride, 2*stride, ... < seq_len."""
    check_positive_int("stride", stride)
    return torch.arange(0, seq_len, stride, device=device)


def select_threshold(scores: torch.Tensor, threshold: torch.Tensor, include_first: bool = False):
    """Causal selection: a head keeps a token iff its score exceeds the head's threshold.

    The decision depends on that token alone, so a prefix gets the same selection as the whole sequence.
    scores [B, E, T], threshold [E]. Heads keep different numbers of tokens, so the result is padded to the
    largest count: (kept scores [B, E, n], positions [B, E, n] ascending, padding slots at position T).
    Finding n reads one number back from the device.
    """
    B, E, T = scores.shape
    keep = scores > threshold.to(scores.dtype)[None, :, None]
    if include_first:
        keep[..., 0] = True
    n = max(int(keep.sum(-1).max()), 1)
    pos = torch.arange(T, device=scores.device).expand(B, E, T)
    # kept positions first (ascending), the rest become padding at T
    key = torch.where(keep, pos, pos + T)
    idx = key.sort(dim=-1).values[..., :n]
    idx = torch.where(idx >= T, torch.full_like(idx, T), idx)
    kept = scores.gather(-1, idx.clamp(max=T - 1)) * (idx < T)
    return kept, idx


def topk_membership(scores: torch.Tensor, k: int, include_first: bool = False) -> torch.Tensor:
    """Boolean [B, E, T]: which tokens ``select_topk`` keeps."""
    _, idx = select_topk(scores, k, include_first)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def router_aux_loss(logits: torch.Tensor, k: int, include_first: bool = False) -> torch.Tensor:
    """Teach each head's sigmoid score to predict its own top-k membership (Mixture-of-Depths' auxiliary
    router loss): binary cross-entropy of the logits against the top-k decisions of the same sequence.

    Once learnt, ``score > 0.5`` keeps about the top-k tokens, a rule that needs no future token, so
    threshold routing at 0.5 can stand in for top-k when generating. logits [B, E, T] -> scalar.
    """
    target = topk_membership(logits.detach(), k, include_first).to(logits.dtype)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
