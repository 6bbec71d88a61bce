"""A hybrid layer's MoSA heads and dense heads as one op, with the two parts on two CUDA streams inside it.

Eagerly a hybrid (``layers.MoSAAttention`` with dense heads) runs its MoSA heads on a second stream beside the
dense heads, and sums the two parts only at the tokens some MoSA head kept. Under ``torch.compile`` the compiled
graph has one stream and no such sums: the fused MoSA op and the dense heads' kernels ran one after the other,
~0.1 ms per layer of the tiny perplexity-matched model on an H200 (benchmarks/NOTES.md v29.2). ``hybrid_triton``
makes both parts one pair of ``torch.library`` custom ops (``mosa_attention::hybrid_fwd`` / ``hybrid_bwd``),
each of which forks and joins the streams inside, so that a compiled step, and the CUDA graphs recorded from it,
run the eager layer's schedule.

The dense heads, written out each way: the QKV product (cuBLAS), split + RoPE (``triton_rope``'s kernel), causal
attention through the ATen kernel that SDPA would pick and that keeps the log-sum-exp for the backward (cuDNN's,
else FlashAttention's; on CPU, for tests under Triton's interpreter, the CPU flash kernel), the W_O product. Their
backward is the same in reverse: W_O's products, the attention kernel's backward, split + RoPE backward, the QKV
products. The MoSA heads are ``triton_mosa``'s routed op (router, top-k and the sparse-attention kernels, with
the router's gradient folded in). x's gradient of the two parts is summed beside the dense heads' weight
gradient product, at the kept rows only where the caller asks (``masked``). The two parts' y are not summed where
the MoSA heads' atomics add in place: their output projection adds into the dense heads' y after its W_O product
(``PROJECT_AFTER_DENSE``); where those atomics add into a buffer of their own, it is added into the dense heads'
result in one pass (``SUM_UNFINISHED``). Under autocast over wider x and weights, outside compiled graphs, the op
takes them with their compute-dtype copies and makes their gradients in their own dtypes in the products' epilogues
(``WIDE_INPUT``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._host import on_its_device, side_stream
from ._host import interpreting as _interpreting
from .attention import _mm
from .combine import add_at_rows_
from .triton_mosa import (Unfinished, _bwd_impl, _capability, _check_routed, _compute_dtype, _copies, _needs_grad,
                          _read, _routed_fwd_impl, _rows_for, _segments_like, _weight_copies, add_unfinished,
                          narrows_weights, project_into, projects_in_place)
from .triton_rope import _grads as _rope_grads
from .triton_rope import _run as _split_rope

# The streams inside the op: True runs the MoSA heads on a second stream (not in distributed runs, as in the eager
# layer); False runs both parts on the current stream (for comparison in benchmarks).
PARALLEL = True
# True: where the MoSA heads' atomics add in place (``triton_mosa.projects_in_place``), their output projection
# and scatter add into the dense heads' y, launched after the dense W_O product, instead of into a y of their own
# that a masked sum then adds (benchmarks/NOTES.md v32); False: the MoSA heads make their own y.
PROJECT_AFTER_DENSE = True
# True: where the MoSA heads' scatters add into a buffer other than the result (y's scaled float16 one, x
# gradient's float32 one: t3) and the sums are not masked, that buffer is added into the dense heads' result in one
# pass, not converted first and summed after (benchmarks/NOTES.md v32.4); False: converted, then summed.
SUM_UNFINISHED = True
# True: where autocast narrows x and the dense weights (float32 under bf16 autocast) and the op is not inside a
# compiled graph (a CUDA-graph capture of eager steps, or eager), the op takes x and the dense weights as they are,
# with their compute-dtype copies made outside it (read by its kernels and kept for the backward, as the routed op
# takes x_read), and its backward makes x's gradient and the dense weights' in their own dtypes in the epilogues of
# the dense heads' products (cuBLAS's wider output) into which the MoSA heads' share is then added: no cast pass of
# x's [B, T, h] gradient and no weight-gradient casts after the op. The copies, x's and every weight's, are made in
# one launch (``combine.cast_many``: at t2 one 17 us pass at the card's bandwidth instead of five launches, ~26 us).
# H200, bf16 autocast over float32, CUDA graphs (benchmarks/NOTES.md v33): t2 0.397 -> 0.365 ms, t3 1.139 -> 1.110.
# False: the caller's casts, whose backward widens the gradients (as inside compiled graphs, where the casts fuse
# into the kernels around the op).
WIDE_INPUT = True

_CUDNN = int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION.value)
_KINDS: dict = {}


def _attention_kind(q: torch.Tensor) -> str:
    """Which ATen attention kernel the dense heads take: "cudnn" where SDPA would pick cuDNN's, else "flash"
    (FlashAttention's), and "cpu" (the CPU flash kernel) on CPU; the choice is made once per shape."""
    if not q.is_cuda:
        return "cpu"
    key = (q.device, q.dtype, tuple(q.shape), q.stride())
    if key not in _KINDS:
        try:
            choice = torch._fused_sdp_choice(q, q, q, is_causal=True)
        except (AttributeError, RuntimeError, TypeError):  # not in this torch: FlashAttention, always there
            choice = None
        _KINDS[key] = "cudnn" if choice == _CUDNN else "flash"
    return _KINDS[key]


def _attend(q, k, v):
    """(o [B, H, T, D], log-sum-exp [B, H, T] float32) of causal attention."""
    B, H, T, _ = q.shape
    kind = _attention_kind(q)
    if kind == "cudnn":
        o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)[:2]
    elif kind == "flash":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False)[:2]
    else:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    return o, lse.reshape(B, H, T).contiguous()


def _attend_backward(do, q, k, v, o, lse):
    """(dq, dk, dv) of ``_attend`` (same kernel family as the forward took)."""
    kind = _attention_kind(q)
    T = q.shape[2]
    if kind == "cudnn":
        seed = torch.empty((), dtype=torch.int64, device=q.device)  # no dropout: unread
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do, q, k, v, o, lse.unsqueeze(-1), seed, seed, None, None, None, T, T, 0.0, True)
    if kind == "flash":  # (no sequence offsets: equal lengths; the dropout's seed and offset unread without it)
        seed = torch.empty(0, dtype=torch.int64, device=q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, o, lse, None, None, T, T, 0.0, True, seed, seed)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, o, lse, 0.0, True)


def _dense_fwd(x, wq, wo, H: int, rope_dims: int, rope_base: float):
    """(y, q k v [3, B, T, H, D] after RoPE, o [B, T, H, D], lse [B, H, T]) of the dense heads."""
    B, T, h = x.shape
    D = wq.shape[0] // (3 * H)
    qkv = F.linear(x, wq)
    rot = torch.empty(3, B, T, H, D, device=x.device, dtype=x.dtype)  # token-major: SDPA's kernels keep it
    _split_rope((qkv, qkv, qkv), tuple(rot), B, T, H, D, rope_dims, rope_base, False)
    o, lse = _attend(*(t.transpose(1, 2) for t in rot))
    o = o.transpose(1, 2).contiguous()  # (a view where the kernel kept the token-major layout)
    return F.linear(o.view(B, T, H * D), wo), rot, o, lse


def _dense_bwd(dy, x, wq, wo, rot, o, lse, rope_dims: int, rope_base: float, dtypes=None):
    """(the dense heads' share of x's gradient, a function that launches w_qkv's gradient product when called, w_o's
    gradient): the caller places w_qkv's product (beside the sum of x's two gradients). ``dtypes``: (x's, w_qkv's,
    w_o's) gradient dtypes where x and the weights are narrower copies (``WIDE_INPUT``), made in the products'
    epilogues; default the copies' own."""
    _, B, T, H, D = rot.shape
    gx, gq, go = dtypes or (x.dtype, wq.dtype, wo.dtype)
    dy2 = dy.view(B * T, -1)
    dwo = _mm(dy2.t(), o.view(B * T, H * D), go)
    do = dy2.mm(wo).view(B, T, H, D).transpose(1, 2)
    dq, dk, dv = _attend_backward(do, *(t.transpose(1, 2) for t in rot), o.transpose(1, 2), lse)
    dqkv = torch.empty(B * T, 3 * H * D, device=x.device, dtype=x.dtype)
    _split_rope(_rope_grads(dq, dk, dv, B, T, H, D, x.device, x.dtype), (dqkv,) * 3, B, T, H, D, rope_dims,
                rope_base, True)
    dx = _mm(dqkv, wq, gx).view(B, T, -1)
    return dx, (lambda: _mm(dqkv.t(), x.view(B * T, -1), gq)), dwo


def _side(dev):
    """The MoSA heads' stream, or None (not CUDA, ``PARALLEL`` off, or a distributed run: see the layer)."""
    if not (PARALLEL and dev.type == "cuda"):
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None
    return side_stream(dev, "mosa heads")


def _hybrid_fwd_impl(x, w_router, wq_m, wo_m, wq_d, wo_d, n_dense: int, k: int, include_first: bool, rope_dims: int,
                     rope_base: float, deterministic: bool, masked: bool, rows_only: bool):
    cdt = x.dtype
    B, T, h = x.shape
    rows = torch.zeros(B, T, device=x.device, dtype=torch.bool) if masked else x.new_empty(0, dtype=torch.bool)
    after = PROJECT_AFTER_DENSE and projects_in_place(x.device, h, cdt, wq_m.shape[0] * k / T, deterministic)
    late = SUM_UNFINISHED and not (after or masked or deterministic)  # the MoSA y handed over unfinished
    with torch.autocast(x.device.type, enabled=False):
        side = _side(x.device)
        mosa_args = (x, w_router, wq_m, wo_m, k, include_first, rope_dims, rope_base, deterministic, cdt,
                     rows if masked else None, rows_only, not after, not late)
        if side is None:
            mosa = _routed_fwd_impl(*mosa_args)
            dense = _dense_fwd(x, wq_d, wo_d, n_dense, rope_dims, rope_base)
        else:  # the MoSA heads launched first (layers.mosa.MOSA_HEADS_FIRST), on the side stream
            main = torch.cuda.current_stream(x.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                mosa = _routed_fwd_impl(*mosa_args)
            dense = _dense_fwd(x, wq_d, wo_d, n_dense, rope_dims, rope_base)
            main.wait_stream(side)
            for t in _tensors(mosa):  # made on the side stream, read or freed on this one
                t.record_stream(main)
        y_m, kept, idx, *saved = mosa
        y, rot, o, lse = dense
        if after:  # the MoSA heads' rows added into the dense heads' y
            y = project_into(y, saved[1], idx, kept, wo_m)
        else:
            y = _sum(y, y_m, rows, masked)
    return (y, kept, idx, rows, *saved, rot, o, lse)


def _tensors(parts):
    """The tensors among ``parts`` (an ``Unfinished``'s buffers; None skipped)."""
    for t in parts:
        if isinstance(t, Unfinished):
            yield from t.tensors()
        elif t is not None:
            yield t


def _sum(dst, part, rows, masked: bool):
    """dst + part (the MoSA heads' y or x's gradient, possibly ``Unfinished``) in dst's memory, at the kept rows
    only where ``masked``."""
    if isinstance(part, Unfinished):
        return add_unfinished(dst, part)
    return add_at_rows_(dst, part, rows) if masked else dst.add_(part)


def _hybrid_bwd_impl(dy, x, kept, idx, rows, wq_m, wo_m, qkv_m, o_m, lse_m, perm, starts, w_router, wq_d, wo_d, rot,
                     o, lse, rope_dims: int, rope_base: float, rows_only: bool, wq_dtype, wo_dtype, dense_dtypes=None):
    """The op's gradients; x, wq_d and wo_d are what the forward read (copies under ``WIDE_INPUT``), ``dense_dtypes``
    (x's, wq_d's, wo_d's) the dtypes of the gradients to make (default theirs)."""
    dy = dy.to(x.dtype).contiguous()
    masked = rows.numel() > 0
    dense_dtypes = dense_dtypes or (x.dtype, wq_d.dtype, wo_d.dtype)
    with torch.autocast(x.device.type, enabled=False):
        side = _side(x.device)
        mosa_args = (dy, x, kept, idx, wq_m, wo_m, qkv_m, o_m, lse_m, perm, starts, rope_dims, rope_base)
        # the MoSA heads' share of x's gradient: at the kept rows in the copy's dtype (their atomics add in place
        # there, and the masked sum adds those rows into the wider gradient), else in the gradient's own dtype (a
        # float32 buffer, added as it is where SUM_UNFINISHED)
        mosa_kw = dict(w_router=w_router, rows_only=rows_only, dx_dtype=x.dtype if masked else dense_dtypes[0],
                       beside=side is not None, w_dtypes=(wq_dtype, wo_dtype),
                       finish=not (SUM_UNFINISHED and not masked))
        if side is None:
            dx_m, dwr, dwq_m, dwo_m = _bwd_impl(*mosa_args, **mosa_kw)
            dx, dw_qkv, dwo = _dense_bwd(dy, x, wq_d, wo_d, rot, o, lse, rope_dims, rope_base, dense_dtypes)
            dwq = dw_qkv()
            dx = _sum(dx, dx_m, rows, masked)
        else:
            main = torch.cuda.current_stream(x.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                dx_m, dwr, dwq_m, dwo_m = _bwd_impl(*mosa_args, **mosa_kw)
            dx, dw_qkv, dwo = _dense_bwd(dy, x, wq_d, wo_d, rot, o, lse, rope_dims, rope_base, dense_dtypes)
            after_dx = main.record_event()
            dwq = dw_qkv()  # w_qkv's gradient on this stream, beside the sum of x's two gradients on the side one
            side.wait_event(after_dx)
            with torch.cuda.stream(side):
                dx = _sum(dx, dx_m, rows, masked)
            main.wait_stream(side)
            dx.record_stream(side)
            for t in _tensors((dx_m, dwr, dwq_m, dwo_m)):
                t.record_stream(main)
    return dx, dwr, dwq_m, dwo_m, dwq, dwo


@torch.library.custom_op("mosa_attention::hybrid_fwd", mutates_args=())
def _hybrid_fwd_op(x: torch.Tensor, w_router: torch.Tensor, w_qkv: torch.Tensor, w_o: torch.Tensor,
                   w_qkv_dense: torch.Tensor, w_o_dense: torch.Tensor, n_dense: int, k: int, include_first: bool,
                   rope_dims: int, rope_base: float, deterministic: bool, masked: bool, rows_only: bool,
                   wq_read: Optional[torch.Tensor] = None, wo_read: Optional[torch.Tensor] = None,
                   x_read: Optional[torch.Tensor] = None, wqd_read: Optional[torch.Tensor] = None,
                   wod_read: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _hybrid_fwd_impl(_read(x, x_read), w_router, _read(w_qkv, wq_read), _read(w_o, wo_read),
                            _read(w_qkv_dense, wqd_read), _read(w_o_dense, wod_read), n_dense, k, include_first,
                            rope_dims, rope_base, deterministic, masked, rows_only)


@_hybrid_fwd_op.register_fake
def _(x, w_router, w_qkv, w_o, w_qkv_dense, w_o_dense, n_dense, k, include_first, rope_dims, rope_base,
      deterministic, masked, rows_only, wq_read=None, wo_read=None, x_read=None, wqd_read=None, wod_read=None):
    x = _read(x, x_read)
    B, T, h = x.shape
    E, D, R = w_qkv.shape[0], w_qkv.shape[2] // 3, B * k
    Dd = w_qkv_dense.shape[0] // (3 * n_dense)
    idx = x.new_empty(B, E, k, dtype=torch.int64)
    return (x.new_empty(B, T, h), x.new_empty(B, E, k, dtype=torch.float32), idx,
            x.new_empty((B, T) if masked else (0,), dtype=torch.bool),
            x.new_empty(3, E, R, D), x.new_empty(E, R, D), x.new_empty(E, R, dtype=torch.float32),
            *_segments_like(idx, B, T, E, R, deterministic),
            x.new_empty(3, B, T, n_dense, Dd), x.new_empty(B, T, n_dense, Dd),
            x.new_empty(B, n_dense, T, dtype=torch.float32))


@torch.library.custom_op("mosa_attention::hybrid_bwd", mutates_args=())
def _hybrid_bwd_op(dy: torch.Tensor, x: torch.Tensor, kept: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor,
                   w_qkv: torch.Tensor, w_o: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                   perm: torch.Tensor, starts: torch.Tensor, w_router: torch.Tensor, w_qkv_dense: torch.Tensor,
                   w_o_dense: torch.Tensor, rot: torch.Tensor, o_dense: torch.Tensor, lse_dense: torch.Tensor,
                   rope_dims: int, rope_base: float, rows_only: bool, wq_dtype: torch.dtype, wo_dtype: torch.dtype,
                   x_dtype: torch.dtype, wqd_dtype: torch.dtype, wod_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _hybrid_bwd_impl(dy, x, kept, idx, rows, w_qkv, w_o, qkv, o, lse, perm, starts, w_router, w_qkv_dense,
                            w_o_dense, rot, o_dense, lse_dense, rope_dims, rope_base, rows_only, wq_dtype, wo_dtype,
                            (x_dtype, wqd_dtype, wod_dtype))


@_hybrid_bwd_op.register_fake
def _(dy, x, kept, idx, rows, w_qkv, w_o, qkv, o, lse, perm, starts, w_router, w_qkv_dense, w_o_dense, rot, o_dense,
      lse_dense, rope_dims, rope_base, rows_only, wq_dtype, wo_dtype, x_dtype, wqd_dtype, wod_dtype):
    return (torch.empty_like(x, dtype=x_dtype), torch.empty_like(w_router), torch.empty_like(w_qkv, dtype=wq_dtype),
            torch.empty_like(w_o, dtype=wo_dtype), torch.empty_like(w_qkv_dense, dtype=wqd_dtype),
            torch.empty_like(w_o_dense, dtype=wod_dtype))


def _setup_context(ctx, inputs, output):
    (x, w_router, w_qkv, w_o, w_qkv_dense, w_o_dense, _, _, _, rope_dims, rope_base, _, _, rows_only, wq_read,
     wo_read, x_read, wqd_read, wod_read) = inputs
    _, kept, idx, rows, qkv, o, lse, perm, starts, rot, o_dense, lse_dense = output
    ctx.save_for_backward(_read(x, x_read), kept, idx, rows, _read(w_qkv, wq_read), _read(w_o, wo_read), qkv, o, lse,
                          perm, starts, w_router, _read(w_qkv_dense, wqd_read), _read(w_o_dense, wod_read), rot,
                          o_dense, lse_dense)
    ctx.args = (rope_dims, rope_base, rows_only, w_qkv.dtype, w_o.dtype, x.dtype, w_qkv_dense.dtype,
                w_o_dense.dtype)
    ctx.mark_non_differentiable(*output[1:])
    # Without this, autograd hands the backward a zero-filled gradient for each of the outputs kept for it: nine
    # fills, ~22 us of a 0.37 ms t2 step on an H200 where the op runs eagerly (benchmarks/NOTES.md v32; a compiled
    # graph drops them, since the backward does not read them)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, *_):
    if dy is None:  # y took no part in the loss
        return (None,) * 19
    dx, dwr, dwq, dwo, dwq_d, dwo_d = _hybrid_bwd_op(dy, *ctx.saved_tensors, *ctx.args)
    return (dx, dwr, dwq, dwo, dwq_d, dwo_d) + (None,) * 13


_hybrid_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def attention_kernels_take(capability: tuple[int, int], head_dim: int) -> bool:
    """Whether the GPU's attention kernels the op calls take these heads: FlashAttention's (always there where
    cuDNN's are) need compute capability 8.0 or later and a head dim that is a multiple of 8 up to 256."""
    return tuple(capability) >= (8, 0) and head_dim % 8 == 0 and 8 <= head_dim <= 256


def hybrid_available(x: torch.Tensor, w_qkv: torch.Tensor, head_dim: int) -> bool:
    """Whether ``hybrid_triton`` runs on this input with dense heads of ``head_dim``: CUDA with a 16-bit compute
    dtype and heads the attention kernels take (``attention_kernels_take``), or CPU under Triton's interpreter
    (tests)."""
    if x.device.type == "cuda":
        cdt = _compute_dtype(x, w_qkv)[0]
        return cdt in (torch.float16, torch.bfloat16) and attention_kernels_take(_capability(x.device), head_dim)
    return _interpreting() and x.device.type == "cpu"


@on_its_device
def hybrid_triton(x, w_router, w_qkv, w_o, w_qkv_dense, w_o_dense, n_dense: int, k: int, *, include_first: bool,
                  rope_dims: int, rope_base: float = 10000.0, deterministic: bool | None = None, masked: bool = False,
                  rows_only: bool = True):
    """A hybrid's MoSA heads (``triton_mosa.mosa_triton``'s arguments) plus ``n_dense`` causal dense heads
    (``attention.causal_attention``'s ``w_qkv_dense [3 * D * n_dense, h]`` and ``w_o_dense [h, D * n_dense]``,
    RoPE on the first ``rope_dims`` dims of each head as the MoSA heads): returns (y = both parts' sum [B, T, h],
    kept scores [B, E, k], positions [B, E, k]), the same values as the eager layer's two parts. Differentiable
    in x and the five weights; one custom op each way, with the two parts on two CUDA streams inside.
    ``masked``: the two parts are summed at the tokens some MoSA head kept only (their y and x's gradient are
    zero elsewhere; ``layers.mosa.MASKED_SUMS``), with the MoSA heads' buffers cleared at those rows only
    (``rows_only``). Under autocast x and the dense weights are cast to the autocast dtype here (in the
    compiled graph; outside one, ``WIDE_INPUT``: the op takes them with their copies and makes their gradients in
    their own dtypes), the MoSA weights read as ``mosa_triton`` reads them. Check ``hybrid_available`` first."""
    cdt, (w_router, w_qkv, w_o) = _check_routed(x, w_router, w_qkv, w_o, k, rope_dims)
    B, T, h = x.shape
    E = w_qkv.shape[0]
    if n_dense < 1 or w_qkv_dense.dim() != 2 or w_qkv_dense.shape[0] % (3 * n_dense) \
            or tuple(w_qkv_dense.shape[1:]) != (h,) or tuple(w_o_dense.shape) != (h, w_qkv_dense.shape[0] // 3):
        raise ValueError(f"w_qkv_dense must be [3 * D * n_dense, h={h}] and w_o_dense [h, D * n_dense] with "
                         f"n_dense={n_dense}, got {tuple(w_qkv_dense.shape)} and {tuple(w_o_dense.shape)}")
    D = w_qkv_dense.shape[0] // (3 * n_dense)
    if rope_dims > D:
        raise ValueError(f"rope_dims must be at most the dense heads' head dim {D}, got rope_dims={rope_dims}")
    for name, w in (("w_qkv_dense", w_qkv_dense), ("w_o_dense", w_o_dense)):
        if w.device != x.device or w.dtype != w_qkv.dtype:
            raise ValueError(f"{name} must be on x's device {x.device} in w_qkv's dtype {w_qkv.dtype}, got "
                             f"{w.device}, {w.dtype}")
    det = _rows_for(deterministic, x.device, h, (cdt, cdt), E * B * k, B * T)
    grad = _needs_grad(x, w_router, w_qkv, w_o, w_qkv_dense, w_o_dense)
    # x and the dense weights as the op takes them: as they are, with their compute-dtype copies made here with the
    # MoSA weights' (WIDE_INPUT; in one launch, triton_mosa.CAST_TOGETHER), else cast here (inside a compiled graph
    # the casts fuse into the kernels around the op)
    if WIDE_INPUT and not torch.compiler.is_compiling():
        mosa_w = (w_qkv, w_o) if grad and narrows_weights(B * k) else (None, None)
        x_read, wqd_read, wod_read, *copies = _copies([x, w_qkv_dense, w_o_dense, *mosa_w], cdt)
        x, wqd, wod = (t.contiguous() for t in (x, w_qkv_dense, w_o_dense))
    else:
        x, wqd, wod = (t.to(cdt).contiguous() for t in (x, w_qkv_dense, w_o_dense))
        x_read = wqd_read = wod_read = None
        copies = _weight_copies(w_qkv, w_o, cdt, B * k, grad)
    y, kept, idx = _hybrid_fwd_op(x, w_router.contiguous(), w_qkv.contiguous(), w_o.contiguous(), wqd, wod,
                                  int(n_dense), int(k), bool(include_first), int(rope_dims), float(rope_base), det,
                                  bool(masked), bool(masked and rows_only and not det), *copies, x_read, wqd_read,
                                  wod_read)[:3]
    return y, kept, idx
