"""One decoding step of a layer's MoSA heads over fixed-size per-head caches: the reference in plain torch and
Triton kernels with the same signature, whose programs skip the heads that do not keep the token.

For each sequence b, with the new token's row x[b] (already normalised) at position pos[b], and each head e with
``count`` tokens cached in slots [0, count): the router score r = sigmoid(x[b] W_r[e]); the head keeps the token
where r passes its threshold (position 0 always, with ``include_first``; never at a negative position, i.e.
padding), the causal rule of ``inference.decode.keep_mask``. Every head writes the position and score at slot
``count`` (read only where it keeps the token). A keeping head makes q, k, v = x[b] W_QKV[e] with RoPE at the
token's position (``cos``/``sin`` of that position), writes k and v at slot ``count``, attends over slots
[0, count], and adds r * o W_O[e] to y[b]; then its count grows by one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .rope import apply_rope

BACKENDS = ("auto", "torch", "triton")


def attend_one(q, k, v, mask):
    """Attention of one query per (sequence, head) over its keys, q [..., 1, D], k and v [..., S, D], mask
    [..., 1, S] (True: seen): two batched products and a softmax in float32, which spread over the keys. (SDPA with
    a mask took 3.5 ms a decoding step of the tiny dense model at 4,032 tokens on an H200, these 0.7 ms: its
    kernels split the work by queries, of which there is one.)"""
    s = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.matmul(p.to(v.dtype), v)


def decode_heads_reference(x, w_router, threshold, pos, count, w_qkv, w_o, cos, sin, k_cache, v_cache, pos_cache,
                           score_cache, include_first: bool = False) -> torch.Tensor:
    """x [B, h], w_router [E, h], threshold [E], pos [B] (int64), count [B, E] (int64), w_qkv [E, h, 3D],
    w_o [E, D, h], cos and sin [B, R] (R rotated dims), k_cache and v_cache [B, E, room, D], pos_cache [B, E, room]
    (int64) and score_cache [B, E, room] (float32) -> y [B, h]; the caches and ``count`` are updated in place.
    Every head computes its projections and writes its slot (one that does not keep the token writes past its
    count, never read)."""
    B, h = x.shape
    E, room, D = w_qkv.shape[0], k_cache.shape[2], w_o.shape[1]
    scores = torch.sigmoid(F.linear(x, w_router))  # [B, E]
    keep = scores > threshold.to(scores.dtype)
    if include_first:
        keep |= (pos == 0)[:, None]
    keep &= (pos >= 0)[:, None]
    slot = count.clamp(max=room - 1)[..., None]  # [B, E, 1]
    pos_cache.scatter_(2, slot, pos[:, None, None].expand(B, E, 1))
    score_cache.scatter_(2, slot, scores.float()[..., None])
    # the heads as the batch of one product, so that the weights are read in place
    qkv = torch.bmm(x.unsqueeze(0).expand(E, B, h), w_qkv)  # [E, B, 3D]
    q, k, v = qkv.transpose(0, 1)[:, :, None].split(D, dim=-1)  # [B, E, 1, D]
    q, k = apply_rope(q, cos[:, None, None], sin[:, None, None]), apply_rope(k, cos[:, None, None], sin[:, None, None])
    kv_slot = slot[..., None].expand(-1, -1, 1, D)
    k_cache.scatter_(2, kv_slot, k)
    v_cache.scatter_(2, kv_slot, v)
    seen = torch.arange(room, device=x.device) <= count[..., None]  # slots [0, count]
    o = attend_one(q, k_cache, v_cache, seen[:, :, None])[:, :, 0]  # [B, E, D]
    o = o * (scores * keep).to(o.dtype)[..., None]
    count += keep
    return torch.bmm(o.transpose(0, 1), w_o).sum(0)  # [E, B, h] -> [B, h]


def _triton_importable() -> bool:
    try:
        from . import triton_decode_heads  # noqa: F401, WPS433 (optional dependency)
    except ImportError:
        return False
    return True


def resolve_decode_backend(backend: str, x: torch.Tensor) -> str:
    """"torch" or "triton" for ``backend`` on ``x``'s device: "auto" takes the kernels on CUDA where triton imports
    (on an H200 the tiny MoSA models' steps take 2-7 times less time with them: benchmarks/NOTES.md v28)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got backend={backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and _triton_importable() else "torch"
    return backend


NAMES = ("x", "w_router", "threshold", "pos", "count", "w_qkv", "w_o", "cos", "sin", "k_cache", "v_cache",
         "pos_cache", "score_cache")


def check_decode_args(*args) -> None:
    """The shapes, dtypes and device ``decode_heads`` takes (see the reference), or a ValueError naming the
    argument and what it got. (Host-side metadata only: nothing waits for the device.)"""
    if len(args) != len(NAMES) or not all(isinstance(t, torch.Tensor) for t in args):
        raise ValueError(f"decode_heads takes the tensors {', '.join(NAMES)}")
    x, w_router, threshold, pos, count, w_qkv, w_o, cos, sin, k_cache, v_cache, pos_cache, score_cache = args
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor [B, h], got x.shape={tuple(x.shape)}, dtype={x.dtype}")
    B, h = x.shape
    if w_qkv.dim() != 3 or w_qkv.shape[1] != h or w_qkv.shape[2] % 3:
        raise ValueError(f"w_qkv must be [E, h={h}, 3*D], got w_qkv.shape={tuple(w_qkv.shape)}")
    E, D = w_qkv.shape[0], w_qkv.shape[2] // 3
    room = k_cache.shape[2] if k_cache.dim() == 4 else -1
    R = cos.shape[-1] if cos.dim() == 2 else -1
    want = {"w_router": (E, h), "threshold": (E,), "pos": (B,), "count": (B, E), "w_o": (E, D, h),
            "cos": (B, R), "sin": (B, R), "k_cache": (B, E, room, D), "v_cache": (B, E, room, D),
            "pos_cache": (B, E, room), "score_cache": (B, E, room)}
    for name, t in zip(NAMES, args):
        if name in want and tuple(t.shape) != want[name]:
            raise ValueError(f"{name} must have shape {want[name]} (B={B}, E={E}, h={h}, D={D}, room={room}), "
                             f"got {name}.shape={tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"every tensor must be on x's device {x.device}, got {name} on {t.device}")
    if room < 1 or R > D or R % 2:
        raise ValueError(f"k_cache needs room >= 1 slot and cos an even number of rotated dims <= D={D}, got "
                         f"k_cache.shape={tuple(k_cache.shape)}, cos.shape={tuple(cos.shape)}")
    for name in ("w_router", "w_qkv", "w_o", "cos", "sin", "k_cache", "v_cache"):
        t = args[NAMES.index(name)]
        if t.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype}, got {name}.dtype={t.dtype}")
    for name, dtype in (("pos", torch.int64), ("count", torch.int64), ("pos_cache", torch.int64),
                        ("score_cache", torch.float32)):
        t = args[NAMES.index(name)]
        if t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {name}.dtype={t.dtype}")
    if not threshold.is_floating_point():
        raise ValueError(f"threshold must be floating, got threshold.dtype={threshold.dtype}")


def decode_heads(x, w_router, threshold, pos, count, w_qkv, w_o, cos, sin, k_cache, v_cache, pos_cache, score_cache,
                 include_first: bool = False, backend: str = "auto"):
    """``decode_heads_reference`` (``backend="torch"``) or its Triton kernels (``"triton"``: CUDA tensors, or any
    under Triton's interpreter); "auto": the kernels on CUDA where triton imports, else the reference. Arguments
    are checked first (``check_decode_args``)."""
    args = (x, w_router, threshold, pos, count, w_qkv, w_o, cos, sin, k_cache, v_cache, pos_cache, score_cache)
    check_decode_args(*args)
    if resolve_decode_backend(backend, x) == "torch":
        return decode_heads_reference(*args, include_first=include_first)
    from .triton_decode_heads import decode_heads_triton

    return decode_heads_triton(*args, include_first=include_first)
