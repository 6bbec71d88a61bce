"""Dense and sliding-window causal multi-head attention with RoPE (the hybrid's other heads and baselines).

Weight layout (the official release's): ``w_qkv [3*D*H, h]`` as an ``nn.Linear`` weight whose output features
are grouped per head as ``[q | k | v]``, and ``w_o [h, D*H]``.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ._checks import check_positive_int, check_sequences
from ._host import side_stream
from .combine import add_at_rows_
from .rope import apply_rope, rope_cos_sin


BACKENDS = ("auto", "torch", "triton")
# With ``rows`` (a hybrid's masked sums), ``linear_sharing_input`` hands the other readers x in the product's
# dtype, the copy the product reads anyway (under autocast over float32: bf16), so that they gather half the
# bytes and skip their own cast; their gradient of x then comes back in that dtype, as autocast's own ops
# would give it, and is added at the marked rows into the product's float32 one. False: x as it is.
NARROW_SHARED_X = True
# Local heads up to this length attend through one [T, T] mask (``local_attention_reference``), longer ones in
# chunks (``local_attention``): on an H200 (4 heads of dim 64, 16384 tokens, bf16, forward + backward, eager)
# the mask took 0.58 ms against 1.11 at T = 1024, the two 1.27 / 1.25 at T = 4096, and the chunks 1.36
# against 6.33 ms at T = 16384 and 1.81 against 97.5 ms (466 MiB against 44 GiB) at T = 65536
# (benchmarks/bench_local.py, RESULTS.md).
LOCAL_MASK_MAX_T = 4096
# Local heads on CUDA through FlexAttention (``torch.nn.attention.flex_attention``, compiled into fused Triton
# kernels) with a block mask that lists only the key blocks inside each query block's window: O(T * window)
# with no mask tensor and no chunk copies. H200, 4 heads of dim 64, B * T = 16384, bf16, forward + backward
# in one CUDA graph: 0.14 ms at T = 1024 (one mask 0.31, chunks 0.37), 0.17 at T = 16384 (chunks 0.32,
# mask 6.2), 0.66 ms and 230 MiB at T = 65536 (chunks 1.16 ms and 467 MiB); benchmarks/NOTES.md v12.3.
# None: on CUDA where torch has it; True: everywhere (on CPU unfused and forward only: for tests); False:
# never (the chunks and the one mask below). Should compiling fail, a warning says so and the chunks take over.
LOCAL_FLEX = None
FLEX_BLOCK = 128
_FLEX_MASKS: dict = {}
_FLEX_COMPILED = None


# Under torch.compile the dense heads' split + RoPE runs as the Triton kernel's custom ops (True) or as the torch
# ops for the compiler to fuse (False, for comparison in benchmarks/profile_train.py).
COMPILED_SPLIT_ROPE = True


def _fused_split(qkv: torch.Tensor, backend: str) -> bool:
    """Use ``triton_rope.split_rope_triton``: asked for ("triton"), or "auto" on CUDA (under torch.compile too,
    as custom ops: the compiler's own fusion of the torch ops recomputed the angles per element and took ~5x
    as long); never without triton."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got backend={backend!r}")
    if backend == "torch" or (backend == "auto" and not qkv.is_cuda):
        return False
    if torch.compiler.is_compiling() and not COMPILED_SPLIT_ROPE:
        return False
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    try:
        from . import triton_rope  # noqa: F401, WPS433 (optional dependency)
    except ImportError:
        return False
    return True


class _SharedInputLinear(torch.autograd.Function):
    """(x @ w^T, x or its copy in the product's dtype): see ``linear_sharing_input``."""

    @staticmethod
    def forward(ctx, x, w, rows, x_cast=None):
        ctx.rows = rows  # (may be filled in after this call: kept as it is, not saved for a version check)
        dev = x.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            xc = x_cast if x_cast is not None and x_cast.dtype == cdt else x.to(cdt)
            wc = w.to(cdt)
            y = F.linear(xc, wc)
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, w.dtype)
        return y, (xc if rows is not None and NARROW_SHARED_X else x)

    @staticmethod
    def backward(ctx, dy, dx_other):
        xc, wc = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        dy2 = dy.reshape(-1, dy.shape[-1]).to(wc.dtype)
        dx = dw = after_dx = None
        masked = ctx.needs_input_grad[0] and dx_other is not None and ctx.rows is not None \
            and dx_other.dtype == wc.dtype
        if ctx.needs_input_grad[0]:
            if dx_other is None:
                dx = dy2.mm(wc).to(x_dtype)
            elif masked:
                dx = _mm(dy2, wc, x_dtype).view(xc.shape)
                after_dx = torch.cuda.current_stream(dx.device).record_event() if dx.is_cuda else None
            else:
                dx = _addmm(dx_other.reshape(-1, dx_other.shape[-1]), dy2, wc)
            dx = dx.view(xc.shape)
        if ctx.needs_input_grad[1]:
            dw = dy2.t().mm(xc.reshape(-1, xc.shape[-1])).to(w_dtype)
        if masked:
            # the masked sum needs only the input-gradient product: on CUDA it runs on a side stream beside
            # the weight-gradient product, launched after it so that the product's tiles are placed first
            _beside(after_dx, add_at_rows_, dx, dx_other.contiguous(), ctx.rows)
        return dx, dw, None, None


def _beside(after, fn, *tensors):
    """``fn(*tensors)``: with a CUDA event ``after``, on a side stream once the current stream has reached
    it, with the current stream then waiting for the side one (the work queued in between overlaps)."""
    if after is None:
        fn(*tensors)
        return
    main = torch.cuda.current_stream(tensors[0].device)
    side = side_stream(tensors[0].device, "beside")
    side.wait_event(after)
    with torch.cuda.stream(side):
        fn(*tensors)
    for t in tensors:  # made on the current stream, used on the side one
        t.record_stream(side)
    main.wait_stream(side)


def _mm(a, b, out_dtype):
    """a @ b in ``out_dtype``: one GEMM with a wider output where cuBLAS takes it (out_dtype), else a cast."""
    if out_dtype == a.dtype:
        return a.mm(b)
    if a.is_cuda and out_dtype == torch.float32:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # no mixed-dtype GEMM in this torch build
            pass
    return a.mm(b).to(out_dtype)


def _addmm(c, a, b):
    """c + a @ b in c's dtype, as one GEMM whose epilogue reads c (a wider c, e.g. float32 under autocast,
    through cuBLAS's out_dtype where this torch has it), else the product and one add."""
    if c.dtype == a.dtype:
        return torch.addmm(c, a, b)
    if c.is_cuda and c.dtype == torch.float32:
        try:
            return torch.addmm(c, a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # no mixed-dtype GEMM in this torch build
            pass
    return c + a.mm(b)


def linear_sharing_input(x: torch.Tensor, w: torch.Tensor, rows: torch.Tensor | None = None,
                         x_cast: torch.Tensor | None = None):
    """(x @ w^T, x): the product, and x handed out again for the other readers of x.

    A hybrid's dense heads and MoSA heads both read x, so autograd would sum their two [B, T, h] gradients
    of x in a pass of its own. When the MoSA heads read the second output instead, their gradient of x
    arrives here, and the dense product's gradient is added into it in the GEMM's epilogue (``addmm``),
    with no separate pass. Under autocast the product runs in the autocast dtype (as ``F.linear`` would)
    and x's gradient comes back in x's dtype. The other gradient is held until this backward runs, which
    can raise the peak (H200, t2 hybrid: +7 MiB in bf16, +13 under autocast; benchmarks/NOTES.md v8.1).

    ``rows``: a bool mask over x's tokens outside which the other readers' gradient is zero (the fused MoSA
    op's: only kept tokens get one), which the caller may fill in after this call, before the backward.
    The second output is then x in the product's dtype (``NARROW_SHARED_X``; the copy the product reads:
    x itself unless autocast narrows it), and where the other gradient comes back in that dtype the
    backward adds it at those rows only (``combine.add_at_rows_``) into the product's, made in x's dtype,
    on CUDA on a side stream beside the weight gradient.

    ``x_cast``: x already cast to the product's dtype (without gradient), where the caller made the copy
    (e.g. before another stream starts reading it); used in place of a cast of its own."""
    return _SharedInputLinear.apply(x, w, rows, x_cast)


def project_qkv(x, w_qkv, n_heads: int, rope_dims: int, rope_base: float, positions=None, backend: str = "auto",
                qkv=None):
    """x [B, T, h] -> q, k, v each [B, H, T, D], RoPE applied to q and k at ``positions`` (default 0..T-1).
    ``qkv``: x's projection ``x @ w_qkv^T`` where the caller has already made it (``linear_sharing_input``).

    At the default positions on CUDA the split, RoPE and layout change run as one Triton kernel each way
    (``triton_rope``); ``backend="torch"`` keeps the plain-torch ops, the reference."""
    B, T, _ = x.shape
    if qkv is None:
        qkv = F.linear(x, w_qkv)
    if positions is None and _fused_split(qkv, backend):
        from .triton_rope import split_rope_triton
        return split_rope_triton(qkv, n_heads, rope_dims, rope_base)
    q, k, v = qkv.view(B, T, n_heads, -1).transpose(1, 2).chunk(3, dim=-1)
    if rope_dims:
        pos = torch.arange(T, device=x.device) if positions is None else positions
        cos, sin = rope_cos_sin(pos, rope_dims, rope_base, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k, v


def sliding_window_mask(T: int, window: int, device=None) -> torch.Tensor:
    """Boolean [T, T]: query i sees key j iff i - window < j <= i (``window`` keys, itself included)."""
    i = torch.arange(T, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


def local_attention_reference(q, k, v, window: int) -> torch.Tensor:
    """Sliding-window causal attention through one [T, T] mask: the reference of ``local_attention``."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(q.shape[-2], window, q.device))


def _chunk_masks(n: int, C: int, window: int, device) -> torch.Tensor:
    """Bool [1, n, C, 2C]: query a of chunk c sees key b of chunks (c - 1, c) iff 0 <= a + C - b < window and,
    in chunk 0 (no previous chunk), b >= C."""
    a = torch.arange(C, device=device)[:, None]
    b = torch.arange(2 * C, device=device)[None, :]
    band = (a + C - b >= 0) & (a + C - b < window)
    masks = band.expand(n, C, 2 * C).clone()
    masks[0, :, :C] = False
    return masks[None]


def sliding_window_block_mask(T: int, window: int, device, block: int = FLEX_BLOCK):
    """FlexAttention's ``BlockMask`` of causal sliding-window attention over T positions (query i sees keys j
    with i - window < j <= i), built from its block structure (n = T / block query blocks, each listing the
    ~window / block + 1 key blocks it touches, in an [n, n] index table) with no [T, T] evaluation: the key
    blocks wholly inside the window of every query of a query block are "full" (no mask evaluated there),
    the others partial. The tables are made by a few [n, n] tensor ops on ``device`` (no host loops, no host
    tensors). Cached per (T, window, device, block) when made eagerly. A compiled model (torch.compile, also
    with ``fullgraph``) makes the mask inside its own graph on every call (a few tiny kernels) and neither
    reads nor fills the cache: tensors made in a compiled graph and kept beyond it would belong to its CUDA
    graphs' memory pool under ``mode="reduce-overhead"`` and be overwritten by the next replay; and a graph
    that took a cached mask as a constant computed the heads' output to other roundings than one that made
    it (H200, FlexAttention of torch 2.11: losses 4e-5 apart from the first step), so the same deterministic
    run gave other bits after anything in the process had called the heads eagerly (benchmarks/NOTES.md v31)."""
    if torch.compiler.is_compiling():
        return _make_sliding_window_block_mask(T, window, device, block)
    key = (T, window, str(device), block)
    mask = _FLEX_MASKS.get(key)
    if mask is None:
        mask = _make_sliding_window_block_mask(T, window, device, block)
        if len(_FLEX_MASKS) >= 32:  # (many lengths, e.g. prompts in generation: keep the newest)
            _FLEX_MASKS.pop(next(iter(_FLEX_MASKS)))
        _FLEX_MASKS[key] = mask
    return mask


def _make_sliding_window_block_mask(T: int, window: int, device, block: int):
    """``sliding_window_block_mask`` without the cache."""
    from torch.nn.attention.flex_attention import BlockMask
    nb = -(-T // block)
    i = torch.arange(nb, device=device)[:, None]  # query block
    j = torch.arange(nb, device=device)[None, :]  # key block
    q_lo, q_hi = i * block, torch.clamp((i + 1) * block, max=T) - 1
    k_lo, k_hi = j * block, torch.clamp((j + 1) * block, max=T) - 1
    # from the key block of the first query's oldest key up to the diagonal, every block holds a seen pair
    first = torch.clamp(torch.div(q_lo - window + 1, block, rounding_mode="floor"), min=0)
    touched = (j >= first) & (j <= i)
    inside = (k_hi <= q_lo) & (q_hi - k_lo < window)  # every (query, key) pair of the two blocks is seen

    def pack(sel):  # (counts [1, 1, n], indices [1, 1, n, n]: each row's blocks first, ascending)
        order = torch.argsort(torch.where(sel, j, j + nb), dim=-1)
        return sel.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]

    def in_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    kv_num, kv_idx = pack(touched & ~inside)
    full_num, full_idx = pack(touched & inside)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=in_window,
                                    seq_lengths=(T, T))


def _flex_available(q) -> bool:
    if LOCAL_FLEX is False or (LOCAL_FLEX is None and not q.is_cuda):
        return False
    D = q.shape[-1]
    if D < 16 or D & (D - 1) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if LOCAL_FLEX is None and torch.cuda.get_device_capability(q.device) < (8, 0):
        return False  # (FlexAttention's Triton kernels target Ampere and later; a backward that failed to
        # compile would surface in autograd, past the fallback below)
    try:
        from torch.nn.attention import flex_attention  # noqa: F401, WPS433 (torch >= 2.5)
    except ImportError:
        return False
    return True


def local_attention_flex(q, k, v, window: int) -> torch.Tensor:
    """Causal sliding-window attention through FlexAttention and ``sliding_window_block_mask``: on CUDA compiled,
    as FlexAttention is meant to run (torch.compile's default: the first shape static, one dynamic recompile
    when the shape changes; tens of seconds once per process), elsewhere its unfused implementation (forward
    only on CPU)."""
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention
    mask = sliding_window_block_mask(q.shape[-2], int(window), q.device)
    fn = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():
        if _FLEX_COMPILED is None:  # (torch.compile's default: static shapes, then one dynamic recompile)
            _FLEX_COMPILED = torch.compile(flex_attention)
        fn = _FLEX_COMPILED
    return fn(q, k, v, block_mask=mask)


def local_attention(q, k, v, window: int) -> torch.Tensor:
    """Causal sliding-window attention: q, k, v [B, H, T, D]; query i sees keys j with i - window < j <= i.

    On CUDA through FlexAttention (``local_attention_flex``, ``LOCAL_FLEX``). Otherwise in O(T * window) time
    and memory, against O(T^2) for one [T, T] mask (``local_attention_reference``; at T = 65536 that mask
    alone is 4 GiB), which is faster up to ``LOCAL_MASK_MAX_T`` and used there. The
    sequence is cut into n chunks of C >= window positions (C a multiple of 16); the queries of chunk c see
    only keys of chunks c - 1 and c, so one SDPA call attends each chunk (as one of n "heads" of a batch of
    B * H) over its 2C keys (overlapping windows of the keys shifted by one chunk), under an [n, C, 2C] band
    mask that also hides chunk 0's missing predecessor."""
    global LOCAL_FLEX
    B, H, T, D = q.shape
    check_positive_int("window", window)
    if window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if _flex_available(q):
        try:
            return local_attention_flex(q, k, v, window)
        except Exception as err:  # noqa: BLE001 (torch.compile unusable here: no C compiler, no triton, ...)
            if LOCAL_FLEX is not None:
                raise
            LOCAL_FLEX = False
            warnings.warn(f"local heads: FlexAttention failed ({type(err).__name__}: {str(err)[:200]}); "
                          "using the SDPA chunks from now on (ops.attention.LOCAL_FLEX = False)", stacklevel=2)
    C = -(-window // 16) * 16
    n = -(-T // C)
    if n <= 2 or T <= LOCAL_MASK_MAX_T:  # (n <= 2: the [T, T] mask is no larger than the chunks' own)
        return local_attention_reference(q, k, v, window)
    pad = n * C - T  # padded keys lie after every real query (causal: never seen); padded queries are dropped
    qc = F.pad(q, (0, 0, 0, pad)).reshape(B * H, n, C, D)
    # keys and values of chunks (c - 1, c) for every c: windows of 2C rows, one chunk apart, over the
    # sequence with one chunk of zeros in front ([B, H, n, D, 2C] from unfold, then one copy)
    kc, vc = (F.pad(t, (0, 0, C, pad)).unfold(2, 2 * C, C).transpose(-1, -2).reshape(B * H, n, 2 * C, D)
              for t in (k, v))
    o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=_chunk_masks(n, C, window, q.device))
    return o.reshape(B, H, n * C, D)[:, :, :T]


def causal_attention(x, w_qkv, w_o, n_heads: int, *, rope_dims: int, rope_base: float = 10000.0,
                     window: int | None = None, backend: str = "auto", qkv=None):
    """Causal multi-head attention; with ``window`` each query sees only the last ``window`` tokens.
    ``backend``: how q, k, v are made (see ``project_qkv``); attention itself is SDPA. ``qkv``: x's
    projection, where the caller has made it."""
    check_sequences(x)
    B, T, h = x.shape
    check_positive_int("n_heads", n_heads)
    if w_qkv.dim() != 2 or w_qkv.shape[1] != h or w_qkv.shape[0] % (3 * n_heads):
        raise ValueError(f"w_qkv must be [3 * head_dim * n_heads, h={h}] with n_heads={n_heads}, got "
                         f"w_qkv.shape={tuple(w_qkv.shape)}")
    D = w_qkv.shape[0] // (3 * n_heads)
    if tuple(w_o.shape) != (h, D * n_heads):
        raise ValueError(f"w_o must be [h={h}, head_dim * n_heads={D * n_heads}], got w_o.shape={tuple(w_o.shape)}")
    if rope_dims < 0 or rope_dims % 2 or rope_dims > D:
        raise ValueError(f"rope_dims must be even and in [0, head_dim={D}], got rope_dims={rope_dims}")
    q, k, v = project_qkv(x, w_qkv, n_heads, rope_dims, rope_base, backend=backend, qkv=qkv)
    if window is None or window >= T:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        o = local_attention(q, k, v, window)
    return F.linear(o.transpose(1, 2).reshape(B, T, -1), w_o)
