"""One Triton kernel between the dense heads' QKV projection and attention: split, RoPE, attention layout.

``split_rope_triton(qkv, n_heads, rope_dims, rope_base)`` takes the projection ``[B, T, H * 3 * D]`` (per head
``[q | k | v]``, the official layout) and returns q, k, v ``[B, H, T, D]`` (views of one token-major buffer
``[3, B, T, H, D]``, the layout SDPA's cuDNN kernels keep end to end; under torch.compile, of three
``[B, T, H, D]`` buffers, through the custom ops ``mosa_attention::split_rope_fwd`` / ``_bwd``),
q and k rotated at positions 0..T-1 exactly as ``rope.apply_rope`` does (rotate-half on the first
``rope_dims`` dims, float32 angles). Its backward is the same kernel run the other way (RoPE's inverse is
the rotation by minus the angle), writing the gradient of ``qkv`` in place of the three gradients.

In plain torch the same work is about ten launches each way (slices, ``cat`` for rotate-half and for the
rotated + passed-through parts, products, the layout copies), which took about half of a dense layer's GPU
time at T = 1024 (benchmarks/NOTES.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_positive_int
from ._host import cdiv, next_pow2, on_its_device, outside_graph_pools
from .rope import check_rope_base

_TABLES: dict = {}
_OUTGROWN: list = []  # tables replaced by longer ones (at most as much memory as the live ones: lengths double)


def rope_tables(rope_dims: int, base: float, length: int, device):
    """cos, sin [L, max(rope_dims/2, 1)] float32 at positions 0..L-1, equal to rope.rope_cos_sin's float32
    values; cached per device and grown on demand, so steady-state calls launch nothing for them."""
    half = max(rope_dims // 2, 1)
    key = (device, rope_dims, check_rope_base(base))
    hit = _TABLES.get(key)
    if hit is None or hit[0].shape[0] < length:
        n = max(length, 2 * hit[0].shape[0] if hit is not None else 1024)

        def make():
            if rope_dims:
                inv = 1.0 / (base ** (torch.arange(0, rope_dims, 2, device=device, dtype=torch.float32) / rope_dims))
                ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv
                return ang.cos().contiguous(), ang.sin().contiguous()
            z = torch.zeros(n, half, device=device, dtype=torch.float32)
            return z, z

        if hit is not None:  # outgrown, but kernels queued on any stream may still read it: never freed
            _OUTGROWN.append(hit)
        # (kept across steps: not in the memory pool of torch.compile's CUDA graphs, which would refuse it)
        hit = outside_graph_pools(make, torch.device(device))
        _TABLES[key] = hit
    return hit


@triton.jit
def _split_rope(src0, src1, src2, dst_ptr, dst1_ptr, dst2_ptr, cos_ptr, sin_ptr, B, T, H, sb0, sh0, st0, sb1, sh1, st1,
                sb2, sh2, st2, D: tl.constexpr, DP: tl.constexpr, ROPE: tl.constexpr, BT: tl.constexpr,
                BACKWARD: tl.constexpr):
    """Forward: src0 = qkv [B, T, H * 3 * D] with element strides (sb0, -, st0) over (B, T) and unit stride
    along the features (a column slice of a wider product may be passed) -> dst_ptr, dst1_ptr, dst2_ptr = q,
    k, v, each [B, T, H, D] (the parts of one [3, B, T, H, D] buffer, or three buffers), RoPE on q and k (src1,
    src2 and the other strides unused). BACKWARD: src0, src1, src2 = dq, dk, dv [B, H, T, D] with element
    strides (sb, sh, st) each and unit stride along D -> dst_ptr = [B, T, H, 3, D], rotated by minus the
    angle (dst1_ptr, dst2_ptr unused)."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    bh = tl.program_id(1)
    part = tl.program_id(2)
    b = bh // H
    hh = bh % H
    cols = tl.arange(0, DP)
    tm = t < T
    m = tm[:, None] & (cols < D)[None, :]
    if BACKWARD:
        if part == 0:
            src = src0 + b.to(tl.int64) * sb0 + hh * sh0 + t.to(tl.int64) * st0
        elif part == 1:
            src = src1 + b.to(tl.int64) * sb1 + hh * sh1 + t.to(tl.int64) * st1
        else:
            src = src2 + b.to(tl.int64) * sb2 + hh * sh2 + t.to(tl.int64) * st2
        dst = dst_ptr + ((b * T + t.to(tl.int64)) * H + hh) * (3 * D) + part * D     # [B, T, H, 3, D]
    else:
        src = src0 + b.to(tl.int64) * sb0 + t.to(tl.int64) * st0 + (hh * 3 + part) * D
        row = ((b.to(tl.int64) * T + t) * H + hh) * D                                 # [B, T, H, D]
        if part == 0:
            dst = dst_ptr + row
        elif part == 1:
            dst = dst1_ptr + row
        else:
            dst = dst2_ptr + row
    x = tl.load(src[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if ROPE > 0:
        HALF: tl.constexpr = ROPE // 2
        rot = cols < ROPE
        if part < 2:
            # rotate-half: column c < HALF pairs with c + HALF (sign -), HALF <= c < ROPE with c - HALF (+)
            partner = tl.where(cols < HALF, cols + HALF, cols - HALF)
            sign = tl.where(cols < HALF, -1.0, 1.0)
            if BACKWARD:
                sign = -sign
            y = tl.load(src[:, None] + partner[None, :], mask=m & rot[None, :], other=0.0).to(tl.float32)
            f = cols % HALF
            off = t.to(tl.int64)[:, None] * HALF + f[None, :]
            c = tl.load(cos_ptr + off, mask=tm[:, None] & rot[None, :], other=1.0)
            s = tl.load(sin_ptr + off, mask=tm[:, None] & rot[None, :], other=0.0)
            x = tl.where(rot[None, :], x * c + sign[None, :] * y * s, x)
    tl.store(dst[:, None] + cols[None, :], x.to(dst_ptr.dtype.element_ty), mask=m)


def _run(srcs, dsts, B, T, H, D, rope_dims, rope_base, backward):
    """``dsts``: q, k, v [B, T, H, D] (forward) or dqkv three times (backward)."""
    cos, sin = rope_tables(rope_dims, rope_base, T, dsts[0].device)
    BT = 32 if D <= 64 else 16
    # backward: (b, h, t) strides of dq, dk, dv; forward: qkv's (b, -, t) strides
    strides = [st for g in srcs for st in (g.stride()[:3] if backward else (g.stride(0), 0, g.stride(1)))]
    _split_rope[(cdiv(T, BT), B * H, 3)](*srcs, *dsts, cos, sin, B, T, H, *strides, D=D,
                                                DP=max(16, next_pow2(D)), ROPE=rope_dims, BT=BT,
                                                BACKWARD=backward, num_warps=4)


def _grads(dq, dk, dv, B, T, H, D, dev, dt):
    """The three gradients as the backward kernel reads them: any (b, h, t) strides, unit stride along D."""
    return [torch.zeros(B, H, T, D, device=dev, dtype=dt) if g is None
            else (g.to(dt) if g.stride(-1) == 1 else g.to(dt).contiguous()) for g in (dq, dk, dv)]


class _SplitRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, n_heads, rope_dims, rope_base):
        B, T, F = qkv.shape
        D = F // (3 * n_heads)
        # token-major [3, B, T, H, D], handed out as [B, H, T, D] views: SDPA (cuDNN) takes these strides as
        # they are and lays its output out the same way, so that o.transpose(1, 2).reshape(B, T, H * D) is a
        # view and the backward's gradients arrive in that layout too (no layout copies either way)
        out = torch.empty(3, B, T, n_heads, D, device=qkv.device, dtype=qkv.dtype)
        _run((qkv, qkv, qkv), tuple(out), B, T, n_heads, D, rope_dims, rope_base, False)
        ctx.dims = (B, T, n_heads, D, rope_dims, rope_base)
        ctx.like = (qkv.device, qkv.dtype)
        return out[0].transpose(1, 2), out[1].transpose(1, 2), out[2].transpose(1, 2)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        B, T, H, D, rope_dims, rope_base = ctx.dims
        dev, dt = ctx.like
        # any strides over (B, H, T); the kernel reads them as they are, only a non-unit D stride is copied
        dqkv = torch.empty(B, T, H * 3 * D, device=dev, dtype=dt)
        _run(_grads(dq, dk, dv, B, T, H, D, dev, dt), (dqkv,) * 3, B, T, H, D, rope_dims, rope_base, True)
        return dqkv, None, None, None


# Under torch.compile the same launches as torch.library custom ops (single nodes of the compiled graph; left
# to itself the compiler recomputed the angles' sines and cosines in every element of q and k, each way: 1.75
# ms of a 10.4 ms step of the dense tiny model on an H200, benchmarks/NOTES.md v29). q, k, v are three buffers
# here (a custom op's outputs may not share memory), each [B, T, H, D], handed out as [B, H, T, D] views.
@torch.library.custom_op("mosa_attention::split_rope_fwd", mutates_args=())
def _split_rope_fwd_op(qkv: torch.Tensor, n_heads: int, rope_dims: int, rope_base: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, F = qkv.shape
    D = F // (3 * n_heads)
    out = [torch.empty(B, T, n_heads, D, device=qkv.device, dtype=qkv.dtype) for _ in range(3)]
    _run((qkv, qkv, qkv), out, B, T, n_heads, D, rope_dims, rope_base, False)
    return tuple(out)


@_split_rope_fwd_op.register_fake
def _(qkv, n_heads, rope_dims, rope_base):
    B, T, F = qkv.shape
    D = F // (3 * n_heads)
    return tuple(qkv.new_empty(B, T, n_heads, D) for _ in range(3))


@torch.library.custom_op("mosa_attention::split_rope_bwd", mutates_args=())
def _split_rope_bwd_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, rope_dims: int, rope_base: float
                       ) -> torch.Tensor:
    B, T, H, D = dq.shape
    dqkv = torch.empty(B, T, H * 3 * D, device=dq.device, dtype=dq.dtype)
    # the gradients of the [B, T, H, D] outputs, read through (b, h, t) strides
    _run(_grads(*(g.transpose(1, 2) for g in (dq, dk, dv)), B, T, H, D, dq.device, dq.dtype), (dqkv,) * 3,
         B, T, H, D, rope_dims, rope_base, True)
    return dqkv


@_split_rope_bwd_op.register_fake
def _(dq, dk, dv, rope_dims, rope_base):
    B, T, H, D = dq.shape
    return dq.new_empty(B, T, H * 3 * D)


def _split_rope_setup(ctx, inputs, output):
    ctx.rope = (inputs[2], inputs[3])
    ctx.like = (output[0].shape, output[0].dtype, output[0].device)  # a missing gradient is zeros of this


def _split_rope_backward(ctx, dq, dk, dv):
    shape, dtype, device = ctx.like
    grads = [torch.zeros(shape, dtype=dtype, device=device) if g is None else g for g in (dq, dk, dv)]
    return _split_rope_bwd_op(*grads, *ctx.rope), None, None, None


_split_rope_fwd_op.register_autograd(_split_rope_backward, setup_context=_split_rope_setup)


@on_its_device
def split_rope_triton(qkv: torch.Tensor, n_heads: int, rope_dims: int, rope_base: float):
    """qkv [B, T, H * 3 * D] -> q, k, v [B, H, T, D] with RoPE on q and k at positions 0..T-1. qkv may be
    strided over B and T (e.g. the first columns of a wider product); it is read in place where its
    features have unit stride."""
    check_positive_int("n_heads", n_heads)
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"qkv must be float16, bfloat16 or float32, got qkv.dtype={qkv.dtype}")
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * n_heads):
        raise ValueError(f"qkv must be [B, T, {n_heads} * 3 * D], got qkv.shape={tuple(qkv.shape)}")
    D = qkv.shape[-1] // (3 * n_heads)
    if rope_dims < 0 or rope_dims % 2 or rope_dims > D:
        raise ValueError(f"rope_dims must be even and in [0, head_dim={D}], got rope_dims={rope_dims}")
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    if torch.compiler.is_compiling():
        return tuple(t.transpose(1, 2) for t in _split_rope_fwd_op(qkv, n_heads, int(rope_dims), float(rope_base)))
    return _SplitRope.apply(qkv, n_heads, int(rope_dims), float(rope_base))
