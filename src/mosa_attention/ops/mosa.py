"""The MoSA operator: per-head sparse attention over selected tokens, and its backend switch.

``sparse_attention`` is the part every sparse head shares (MoSA and the fixed-sparse baseline): given,
per head, the kept positions and their scores, gather the tokens, project them to Q, K, V, apply RoPE at
the original positions, attend causally among them, scale each output by its score, project with W_O and
scatter-add back to the sequence. ``mosa`` adds expert-choice routing in front of it.

Weight layout (the official release's): ``w_router [E, h]``, ``w_qkv [E, h, 3D]`` with the last dim
``[q | k | v]``, ``w_o [E, D, h]``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ._checks import check_bool, check_sequences
from .rope import apply_rope, rope_cos_sin
from .routing import check_sparsity, num_selected, router_scores, select_topk

BACKENDS = ("auto", "torch", "triton")


def sparse_attention_reference(x, scores, idx, w_qkv, w_o, rope_dims: int, rope_base: float = 10000.0):
    """Plain-torch reference of ``sparse_attention``; states the math, runs anywhere.

    x [B, T, h]; scores [B, E, k]; idx [B, E, k] int64 positions in [0, T], any order; returns [B, T, h].
    A position equal to T marks a padding slot (used when heads keep different numbers of tokens): it is
    nobody's key (the causal rule excludes it, T > every real position) and its output is dropped. Positions
    outside [0, T] are taken as padding too (``sparse_attention`` rejects them on the CPU).
    """
    B, T, h = x.shape
    idx = torch.where((idx < 0) | (idx > T), T, idx)
    E, k = idx.shape[1], idx.shape[2]
    D = w_qkv.shape[-1] // 3
    flat = idx.reshape(B, E * k)
    xg = x.gather(1, flat.clamp(max=T - 1)[..., None].expand(-1, -1, h)).reshape(B, E, k, h)
    q, kk, v = torch.einsum("bekh,ehd->bekd", xg, w_qkv).split(D, dim=-1)
    cos, sin = rope_cos_sin(idx, rope_dims, rope_base, q.dtype)
    q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
    causal = idx[..., :, None] >= idx[..., None, :]
    o = F.scaled_dot_product_attention(q, kk, v, attn_mask=causal)
    o = o * scores[..., None].to(o.dtype)
    y = torch.einsum("bekd,edh->bekh", o, w_o).reshape(B * E * k, h)
    rows = (flat + torch.arange(B, device=x.device)[:, None] * (T + 1)).reshape(-1)
    # y's dtype, not x's: under autocast the projections run in bf16 while x may be float32
    return y.new_zeros(B, T + 1, h).view(-1, h).index_add_(0, rows, y).view(B, T + 1, h)[:, :T]


def _triton_backend() -> Callable | None:
    try:
        from .triton_mosa import sparse_attention_triton  # noqa: WPS433 (optional dependency)
    except ImportError:
        return None
    return sparse_attention_triton


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got backend={backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and _triton_backend() is not None else "torch"
    if backend == "triton" and _triton_backend() is None:
        raise RuntimeError("backend='triton' needs the triton package and mosa_attention.ops.triton_mosa")
    return backend


def check_sparse_inputs(x, scores, idx, w_qkv, w_o, rope_dims: int) -> None:
    """Shape and dtype checks shared by every backend, each naming the argument and the value."""
    check_sequences(x)
    B, T, h = x.shape
    if idx.dim() != 3 or idx.shape[0] != B or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx must be an integer tensor [B={B}, E, k], got idx.shape={tuple(idx.shape)}, dtype={idx.dtype}")
    E, k = idx.shape[1], idx.shape[2]
    if tuple(scores.shape) != (B, E, k) or not scores.is_floating_point():
        raise ValueError(f"scores must be floating with idx's shape {(B, E, k)}, got scores.shape="
                         f"{tuple(scores.shape)}, dtype={scores.dtype}")
    if w_qkv.dim() != 3 or w_qkv.shape[0] != E or w_qkv.shape[1] != h or w_qkv.shape[2] % 3:
        raise ValueError(f"w_qkv must be [E={E}, h={h}, 3*D], got w_qkv.shape={tuple(w_qkv.shape)}")
    D = w_qkv.shape[2] // 3
    if tuple(w_o.shape) != (E, D, h):
        raise ValueError(f"w_o must be [E={E}, D={D}, h={h}] (D = w_qkv.shape[2] / 3, w_qkv.shape="
                         f"{tuple(w_qkv.shape)}), got w_o.shape={tuple(w_o.shape)}")
    if rope_dims < 0 or rope_dims % 2 or rope_dims > D:
        raise ValueError(f"rope_dims must be even and in [0, head_dim={D}], got rope_dims={rope_dims}")


def check_positions(idx: torch.Tensor, T: int) -> None:
    """A ValueError unless every position in ``idx`` lies in [0, T] (T: a padding slot). Only where it costs no
    wait: not on a GPU (it would synchronise with the device), nor while torch.compile traces."""
    if not idx.is_cuda and idx.numel() and not torch.compiler.is_compiling():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi > T:
            raise ValueError(f"idx must hold positions in [0, T={T}] (T: a padding slot), got values from {lo} to {hi}")


def check_reference_dtypes(x, w_qkv, w_o) -> None:
    """The plain-torch reference multiplies x by the weights as they are: outside autocast their dtypes must
    match (the Triton kernels cast; see ``triton_mosa._compute_dtype``)."""
    if torch.is_autocast_enabled(x.device.type):
        return
    if not (x.dtype == w_qkv.dtype == w_o.dtype):
        raise ValueError(f"x, w_qkv and w_o must share a dtype outside autocast, got x.dtype={x.dtype}, "
                         f"w_qkv.dtype={w_qkv.dtype}, w_o.dtype={w_o.dtype}")


def sparse_attention(x, scores, idx, w_qkv, w_o, *, rope_dims: int, rope_base: float = 10000.0, backend: str = "auto",
                     deterministic: bool | None = None, beside: bool = False):
    """Sparse heads over given selections; see the module docstring. Returns [B, T, h]. ``idx`` holds positions
    in [0, T] (T marks a padding slot): checked on the CPU; on a GPU (a check would wait for the device)
    positions outside that range are taken as padding.

    ``deterministic`` (triton backend): True sums each token's contributions in a fixed order (bit-repeatable),
    False with atomics (faster), None follows ``torch.use_deterministic_algorithms``. The torch backend's
    ``index_add_`` follows that global switch itself. ``beside`` (triton backend, speed only): other kernels
    run beside this op on another stream, as a hybrid's dense heads do (``triton_mosa.mosa_triton``)."""
    check_sparse_inputs(x, scores, idx, w_qkv, w_o, rope_dims)
    check_bool("beside", beside)
    name = resolve_backend(backend, x)
    if name == "torch":  # (the triton backend checks the same itself)
        check_positions(idx, x.shape[1])
        check_reference_dtypes(x, w_qkv, w_o)
        return sparse_attention_reference(x, scores, idx, w_qkv, w_o, rope_dims, rope_base)
    return _triton_backend()(x, scores, idx, w_qkv, w_o, rope_dims, rope_base, deterministic=deterministic,
                             beside=beside)


def fused_topk_available(x: torch.Tensor, backend: str) -> bool:
    """Whether ``mosa_topk_fused`` runs here: the triton backend on this input and a dtype the kernels take."""
    return resolve_backend(backend, x) == "triton" and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def mosa_topk_fused(x, w_router, w_qkv, w_o, k: int, *, include_first: bool = False, rope_dims: int,
                    rope_base: float = 10000.0, deterministic: bool | None = None, mark_rows=None,
                    rows_only: bool = False, x_read=None, beside: bool = False):
    """Top-k routing + ``sparse_attention`` as one Triton op whose backward also makes the router's
    gradients (``triton_mosa.mosa_triton``). Returns (y, (kept scores, positions)); the selection carries
    no gradient. ``mark_rows``: a [B, T] bool tensor in which the kept tokens are set to True;
    ``rows_only``: y and x's gradient are then defined at those rows only; ``x_read``: x in the compute
    dtype for the kernels to read; ``beside``: other kernels run beside the op on another stream (both: see
    ``mosa_triton``). Check ``fused_topk_available`` first."""
    from .triton_mosa import mosa_triton  # noqa: WPS433 (optional dependency)
    y, kept, idx = mosa_triton(x, w_router, w_qkv, w_o, k, include_first, rope_dims, rope_base, deterministic,
                               mark_rows, rows_only, x_read, beside)
    return y, (kept, idx)


def hybrid_fused_available(x: torch.Tensor, w_qkv: torch.Tensor, head_dim: int, backend: str) -> bool:
    """Whether ``hybrid_fused`` runs here with dense heads of ``head_dim``: ``mosa_topk_fused`` does, and the dense
    heads' attention kernels take the compute dtype and the heads (``triton_hybrid.hybrid_available``)."""
    if not fused_topk_available(x, backend):
        return False
    from .triton_hybrid import hybrid_available  # noqa: WPS433 (optional dependency)
    return hybrid_available(x, w_qkv, head_dim)


def hybrid_fused(x, w_router, w_qkv, w_o, w_qkv_dense, w_o_dense, n_dense: int, k: int, *, include_first: bool = False,
                 rope_dims: int, rope_base: float = 10000.0, deterministic: bool | None = None, masked: bool = False,
                 rows_only: bool = True):
    """``mosa_topk_fused``'s MoSA heads plus ``n_dense`` causal dense heads (``attention.causal_attention``'s
    weights), summed, as one op each way with the two parts on two CUDA streams inside
    (``triton_hybrid.hybrid_triton``). Returns (y, (kept scores, positions)). Check ``hybrid_fused_available``
    first."""
    from .triton_hybrid import hybrid_triton  # noqa: WPS433 (optional dependency)
    y, kept, idx = hybrid_triton(x, w_router, w_qkv, w_o, w_qkv_dense, w_o_dense, n_dense, k,
                                 include_first=include_first, rope_dims=rope_dims, rope_base=rope_base,
                                 deterministic=deterministic, masked=masked, rows_only=rows_only)
    return y, (kept, idx)


def mosa(
    x: torch.Tensor,
    w_router: torch.Tensor,
    w_qkv: torch.Tensor,
    w_o: torch.Tensor,
    sparsity: float,
    *,
    include_first: bool = False,
    rope_dims: int,
    rope_base: float = 10000.0,
    backend: str = "auto",
    return_selection: bool = False,
    deterministic: bool | None = None,
):
    """MoSA heads: expert-choice top-k routing, then ``sparse_attention``. x [B, T, h] -> [B, T, h].

    With ``return_selection`` also returns (scores [B, E, k], positions [B, E, k]) of the kept tokens. On
    the triton backend (eager) routing and attention run as one fused op, ``mosa_topk_fused``.
    ``deterministic``: see ``sparse_attention``.
    """
    check_sequences(x)
    check_bool("include_first", include_first)
    k = num_selected(x.shape[1], check_sparsity(sparsity))
    if fused_topk_available(x, backend):
        y, selection = mosa_topk_fused(x, w_router, w_qkv, w_o, k, include_first=include_first,
                                       rope_dims=rope_dims, rope_base=rope_base, deterministic=deterministic)
        return (y, selection) if return_selection else y
    scores, idx = select_topk(router_scores(x, w_router), k, include_first, backend=backend)
    y = sparse_attention(x, scores, idx, w_qkv, w_o, rope_dims=rope_dims, rope_base=rope_base, backend=backend,
                         deterministic=deterministic)
    return (y, (scores, idx)) if return_selection else y
