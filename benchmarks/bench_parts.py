"""What each part of a MoSA step costs when a vendor library does it, beside what our kernels take for it
(one run, one GPU): how far each kernel is from an attainable, not a theoretical, floor; and at the issue's
hybrid shapes (t2, t3) a stand-in hybrid built from the dense heads and those parts, everything else free.

    python benchmarks/bench_parts.py --case t3 --out results/parts/
    python benchmarks/bench_parts.py --plot floors.png results/parts/parts_t2.json results/parts/parts_t3.json

Every part runs on tensors already laid out for it (gathered rows contiguous, heads batched), so the
vendor column leaves out what a fused kernel saves (the gathers, the RoPE, the per-row score) and counts
only the arithmetic a MoSA step cannot avoid: the grouped products as cuBLAS's batched GEMMs, the attention
among each head's k tokens as SDPA over B * E sequences of length k, the scatter-adds as a plain atomic pass
of precomputed rows (our own vector atomics, and torch's ``index_add_``). Each part is one CUDA graph,
timed by CUDA events (median). Our kernels are timed by the profiler over graph-free steps of the MoSA
heads alone (``--profile`` of ``bench_layer.py`` does the same). The stand-ins (``hybrid_floor``): our dense
4-head layer with, on a second stream, the six products alone (launched at the start, or at their places in
the step), then routing before them, then y's masked sum between forward and backward; the dense 9-head layer
and our hybrid layer are timed in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # bench_layer.py beside this file
from mosa_attention import MoSAAttention  # noqa: E402
from mosa_attention.bench.layer import capture_graph, make_step, median_ms  # noqa: E402
from mosa_attention.ops.triton_mosa import _add_tile, _row_info  # noqa: E402

CASES = {  # name: (B, T, h, E, sparsity)
    "t1": (16, 1024, 512, 17, 32),
    "t2": (16, 1024, 512, 17, 32),  # t1's heads; the floors beside 4 dense heads are t2's
    "t3": (16, 1024, 512, 505, 64),
    "t4": (1, 65536, 1024, 60, 1024),
}


def graph_ms(fn, iters=50):
    """Median ms of fn captured as one CUDA graph (falls back to eager timing if capture fails)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g, why = capture_graph(fn)
    if g is None:
        print(f"(not captured: {why}; timed eagerly)")
    run = g if g is not None else fn
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    return median_ms(run, iters, True, max_s=2.0)


@triton.jit
def _scatter_rows(src_ptr, at_ptr, out_ptr, N, h, BM: tl.constexpr, BH: tl.constexpr, VEC: tl.constexpr):
    """out[at[i]] += src[i] for one tile of BM rows and BH columns, additions in float32 by our atomic tile
    (vector atomics with VEC). Row blocks vary fastest over the grid, so the programs that run together add
    into one column slice of out (which stays in L2, as in ``_qkv_bwd_dx``)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    live = rows < N
    n0 = tl.program_id(1) * BH
    nn = n0 + tl.arange(0, BH)
    dst = tl.load(at_ptr + rows, mask=live, other=0).to(tl.int64) * h
    v = tl.load(src_ptr + rows.to(tl.int64)[:, None] * h + nn[None, :],
                mask=live[:, None] & (nn < h)[None, :], other=0.0).to(tl.float32)
    _add_tile(out_ptr, dst, n0, v, live, h, VEC)


@triton.jit
def _atomics_only(at_ptr, out_ptr, N, h, BM: tl.constexpr, BH: tl.constexpr, VEC: tl.constexpr):
    """The additions of one scatter without its rows: for one tile of BM kept rows and BH columns, values made in
    registers (no load but the destinations) added into out[at[i]] by our atomic tile. Grid as ``_scatter_rows``."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    live = rows < N
    n0 = tl.program_id(1) * BH
    nn = n0 + tl.arange(0, BH)
    dst = tl.load(at_ptr + rows, mask=live, other=0).to(tl.int64) * h
    v = ((rows % 7)[:, None] + (nn % 5)[None, :]).to(tl.float32) * 0.125
    _add_tile(out_ptr, dst, n0, v, live, h, VEC)


def add_atomics(at, out, vec, BM=64, BH=128):
    """The atomic additions of a scatter of len(at) rows into out [B*T, h] alone (``_atomics_only``): what a kernel
    that makes the rows and adds them cannot do faster than, at the card's atomic throughput."""
    N, h = at.numel(), out.shape[-1]
    _atomics_only[(triton.cdiv(N, BM), triton.cdiv(h, BH))](at, out, N, h, BM=BM, BH=BH, VEC=vec, num_warps=4)


@triton.jit
def _dx_probe(dqkv_ptr, idx_ptr, w_ptr, dx_ptr, T, h, E, R, K, D: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr,
              VEC: tl.constexpr, DOT: tl.constexpr, ADD: tl.constexpr):
    """``_qkv_bwd_dx``'s tile (its loads, rows and grid; no router share) with parts left out: DOT, the product
    (else a sum of the loaded tiles stands in, so that every load stays); ADD, the atomic scatter into dx (else
    the tile is stored only where T < 0, never, so that the product stays)."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    pn = tl.program_id(2)
    rows = pid * BM + tl.arange(0, BM)
    rm, b, sel, pos = _row_info(idx_ptr, rows, e, E, K, R)
    cols = tl.arange(0, D)
    nn = pn * BH + tl.arange(0, BH)
    nm = nn < h
    wbase = w_ptr + e.to(tl.int64) * h * 3 * D
    acc = tl.zeros([BM, BH], tl.float32)
    for part in range(3):
        d = tl.load(dqkv_ptr + ((part * E + e) * R + rows).to(tl.int64)[:, None] * D + cols[None, :],
                    mask=rm[:, None], other=0.0)
        wt = tl.load(wbase + nn[None, :] * (3 * D) + part * D + cols[:, None], mask=nm[None, :], other=0.0)
        if DOT:
            acc = tl.dot(d, wt, acc)
        else:
            acc += tl.sum(d.to(tl.float32), 1)[:, None] + tl.sum(wt.to(tl.float32), 0)[None, :]
    live = rm & (pos >= 0) & (pos < T)
    drow = (b * T + tl.minimum(tl.maximum(pos, 0), T - 1)).to(tl.int64) * h
    if ADD:
        _add_tile(dx_ptr, drow, pn * BH, acc, live, h, VEC)
    elif T < 0:
        tl.store(dx_ptr + drow[:, None] + nn[None, :], acc, mask=live[:, None] & nm[None, :])


def dx_kernel_parts(d, B, T, h, E, D=64):
    """{what: ms}: x's gradient kernel at its t3 launch (64 rows x 128 columns, 8 warps, float32 vector atomics),
    ours, then with its product or its scatter left out (``_dx_probe``), against the atomics alone."""
    from mosa_attention.ops import triton_mosa as tm
    R, K = d.R, d.k
    dqkv = d.rnd(3, E, R, D)
    idx = d.pos.contiguous()
    dx = torch.zeros(B, T, h, device="cuda", dtype=torch.float32)
    grid = (triton.cdiv(R, 64), E, triton.cdiv(h, 128))

    def ours():
        tm._qkv_bwd_dx[grid](dqkv, idx, d.w_qkv, dx, T, h, E, R, K, dx, dx, D=D, DP=D, BM=64, BH=128, PREC="tf32",
                             ROUTER=False, ATOMIC=True, VEC=4, num_warps=8)

    def probe(dot, add):
        return lambda: _dx_probe[grid](dqkv, idx, d.w_qkv, dx, T, h, E, R, K, D=D, BM=64, BH=128, VEC=4, DOT=dot,
                                       ADD=add, num_warps=8)
    res = {}
    for i in range(3):  # ours and the probe's full form alternately (the first call of a pair ran 31 us slower once)
        res[f"  round {i}: the same tile: product + atomics (_dx_probe)"] = graph_ms(probe(True, True))
        res[f"  round {i}: x gradient kernel (_qkv_bwd_dx as launched at t3)"] = graph_ms(ours)
    return {**res, "x gradient kernel (_qkv_bwd_dx as launched at t3: product + float32 atomics)": graph_ms(ours),
            "  the same tile: product + atomics (_dx_probe)": graph_ms(probe(True, True)),
            "  the same tile: loads + atomics, no product": graph_ms(probe(False, True)),
            "  the same tile: loads + product, no atomics": graph_ms(probe(True, False)),
            "  the same tile: loads only": graph_ms(probe(False, False))}


def add_rows(src, at, out, vec, BM=64, BH=128):
    """A kernel that only adds precomputed rows [N, h] into out[at[i]] (the scatter without its product)."""
    N, h = src.shape
    _scatter_rows[(triton.cdiv(N, BM), triton.cdiv(h, BH))](src, at, out, N, h, BM=BM, BH=BH, VEC=vec,
                                                             num_warps=4)


def two_streams(side, on_side, on_main):
    """fn() running ``on_side`` on the stream ``side`` beside ``on_main`` on the current stream, joined after."""
    def fn():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            on_side()
        on_main()
        torch.cuda.current_stream().wait_stream(side)
    return fn


def router_logits(x, w_r, B, T):
    """Logits [B, E, T] from x [B * T, h] and w_r [E, h] as the fused op makes them (``triton_mosa._route``):
    w_r x^T, whose leading dimension B * T keeps cuBLAS on its tensor-core kernels (x w_r^T has the odd
    leading dimension E: 109 against 17 us at t3 on an H200)."""
    return torch.mm(w_r, x.t()).view(-1, B, T).permute(1, 0, 2)


def operands(B, T, h, E, rho, seed, D=64):
    """Random bf16 operands of a MoSA step at the case's shapes, laid out for the vendor parts: x [B*T, h], the
    weights, each head's gathered rows xg [E, R, h] (R = B * k), the q/k/v, o and dy rows of every head, and
    where the kept tokens are: ``rows_at`` [E, R] (flat row of x; each head keeps k positions per sequence,
    ascending, as top-k then a sort would give), ``at`` (the same, int32, flat) and ``kept`` [B, T] (bool)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = T // rho
    R = B * k

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
    o = SimpleNamespace(k=k, R=R, x=rnd(B * T, h), w_r=rnd(E, h) * h ** -0.5, w_qkv=rnd(E, h, 3 * D) * h ** -0.5,
                        w_o=rnd(E, D, h) * D ** -0.5, dqkv=rnd(E, R, 3 * D), o=rnd(E, R, D), dyg=rnd(E, R, h),
                        rows=rnd(E * R, h), rnd=rnd)
    pos = torch.rand(B, E, T, device="cuda", generator=g).topk(k, dim=-1).indices.sort(-1).values
    o.pos = pos
    o.rows_at = (pos + torch.arange(B, device="cuda")[:, None, None] * T).permute(1, 0, 2).reshape(E, R)
    o.at = o.rows_at.reshape(-1).to(torch.int32).contiguous()
    o.kept = torch.zeros(B * T, dtype=torch.bool, device="cuda")
    o.kept[o.rows_at.reshape(-1)] = True
    o.kept = o.kept.view(B, T)
    o.xg = o.x[o.rows_at.reshape(-1)].view(E, R, h)
    return o


def products(d, scatters: str = ""):
    """(fwd, bwd): the six grouped products of a MoSA step as cuBLAS batched GEMMs on ``operands`` d: the
    forward's two (QKV, W_O), the backward's four (dO, dW_O, x's rows, dW_QKV). ``scatters``: "after", the
    atomic additions of y's scatter (scaled float16, eight columns per instruction, as our plan for a bf16 y with
    several rows per token) after the W_O product and of x's gradient (float32, four columns) after the x rows'
    product (``add_atomics``); "instead", those additions in place of the two products whose rows they add (a
    kernel that does both takes at least the longer of the two)."""
    if scatters:
        BT, h = d.x.shape
        y16 = torch.zeros(BT, h, device="cuda", dtype=torch.float16)
        dx32 = torch.zeros(BT, h, device="cuda", dtype=torch.float32)
    keep_products = scatters != "instead"

    def fwd():
        torch.bmm(d.xg, d.w_qkv)
        if keep_products:
            torch.bmm(d.o, d.w_o)
        if scatters:
            add_atomics(d.at, y16, 8)

    def bwd():
        torch.bmm(d.dyg, d.w_o.transpose(1, 2))
        torch.bmm(d.o.transpose(1, 2), d.dyg)
        if keep_products:
            torch.bmm(d.dqkv, d.w_qkv.transpose(1, 2))
        if scatters:
            add_atomics(d.at, dx32, 4)
        torch.bmm(d.xg.transpose(1, 2), d.dqkv)
    return fwd, bwd


def route(d, B, T):
    """Our routing on ``operands`` d: the router product as the op makes it, then the top-k kernel."""
    from mosa_attention.ops.triton_routing import route_logits_triton
    return route_logits_triton(router_logits(d.x, d.w_r, B, T).transpose(1, 2), d.k, include_first=True)


def parts(B, T, h, E, rho, D=64):
    """{part: ms} for the vendor column, on random data of the case's shapes."""
    d = operands(B, T, h, E, rho, seed=0, D=D)
    k, bf = d.k, torch.bfloat16
    q, kk, v = (d.rnd(E * B, 1, k, D).requires_grad_() for _ in range(3))
    do = d.rnd(E * B, 1, k, D)
    y32 = torch.empty(B * T, h, device="cuda", dtype=torch.float32)
    y16 = torch.zeros(B * T, h, device="cuda", dtype=bf)
    logits = router_logits(d.x, d.w_r, B, T)
    dlogit = d.rnd(B * T, E)
    res = {}
    res["router product w_r x^T, as the op makes it (fwd)"] = graph_ms(lambda: router_logits(d.x, d.w_r, B, T))
    res["top-k over T per head (torch.topk on the logits, fwd)"] = graph_ms(lambda: logits.topk(k, dim=-1))
    res["gather x rows, materialised (each direction)"] = graph_ms(
        lambda: d.x.index_select(0, d.rows_at.reshape(-1)))
    res["QKV product bmm [E,R,h]@[E,h,3D] (fwd)"] = graph_ms(lambda: torch.bmm(d.xg, d.w_qkv))
    res["attention SDPA causal, B*E seqs of k (fwd)"] = graph_ms(
        lambda: F.scaled_dot_product_attention(q, kk, v, is_causal=True))

    def attn_fb():
        out = F.scaled_dot_product_attention(q, kk, v, is_causal=True)
        torch.autograd.grad(out, (q, kk, v), do)
    res["attention SDPA causal (fwd + bwd)"] = graph_ms(attn_fb)
    res["W_O product bmm [E,R,D]@[E,D,h] (fwd)"] = graph_ms(lambda: torch.bmm(d.o, d.w_o))
    res["y scatter: clear float32 [B*T,h]"] = graph_ms(lambda: y32.zero_())
    res["y scatter: rows -> float32, vector atomics (each direction)"] = graph_ms(
        lambda: add_rows(d.rows, d.at, y32, 4))
    res["y scatter: rows -> bf16 in place, vector atomics"] = graph_ms(lambda: add_rows(d.rows, d.at, y16, 8))
    res["y scatter: rows -> float32, index_add_"] = graph_ms(lambda: y32.index_add_(0, d.at, d.rows.float()))
    res["y scatter: float32 -> bf16 cast"] = graph_ms(lambda: y32.to(bf))
    res["W_O backward: dO = dy_g @ w_o^T"] = graph_ms(lambda: torch.bmm(d.dyg, d.w_o.transpose(1, 2)))
    res["W_O backward: dw_o = o^T @ dy_g"] = graph_ms(lambda: torch.bmm(d.o.transpose(1, 2), d.dyg))
    res["QKV backward: dx rows = dqkv @ w_qkv^T"] = graph_ms(lambda: torch.bmm(d.dqkv, d.w_qkv.transpose(1, 2)))
    res["QKV backward: dw_qkv = x_g^T @ dqkv"] = graph_ms(lambda: torch.bmm(d.xg.transpose(1, 2), d.dqkv))
    res["router backward: dw_r = x^T @ dlogit (dense)"] = graph_ms(lambda: d.x.t() @ dlogit)
    y16h = torch.zeros(B * T, h, device="cuda", dtype=torch.float16)
    res["y scatter's atomics alone: values in registers -> scaled float16, 8 columns per atomic"] = graph_ms(
        lambda: add_atomics(d.at, y16h, 8))
    res["x gradient scatter's atomics alone: values in registers -> float32, 4 columns per atomic"] = graph_ms(
        lambda: add_atomics(d.at, y32, 4))
    # each product beside the atomics of its scatter on a second stream: whether the card overlaps the two (a kernel
    # doing both could then take the longer of the two) or they share what bounds them (then their sum)
    side = torch.cuda.Stream()
    res["W_O product beside y's atomics (two streams)"] = graph_ms(
        two_streams(side, lambda: add_atomics(d.at, y16h, 8), lambda: torch.bmm(d.o, d.w_o)))
    res["dx rows product beside x gradient's atomics (two streams)"] = graph_ms(
        two_streams(side, lambda: add_atomics(d.at, y32, 4), lambda: torch.bmm(d.dqkv, d.w_qkv.transpose(1, 2))))
    res["dx rows product then x gradient's atomics (one stream)"] = graph_ms(
        lambda: (torch.bmm(d.dqkv, d.w_qkv.transpose(1, 2)), add_atomics(d.at, y32, 4)))
    res.update(dx_kernel_parts(d, B, T, h, E, D))
    return res


def grouped_products(B, T, h, E, rho, D=64):
    """fn() running the six grouped products of a MoSA step (QKV and W_O, forward and both gradients) as
    cuBLAS batched GEMMs on pre-laid-out bf16 data: everything else a MoSA step does is left out."""
    fwd, bwd = products(operands(B, T, h, E, rho, seed=1, D=D))

    def fn():
        fwd()
        bwd()
    return fn


def staged_floor(B, T, h, E, rho, part_layer, x, dy, routing: bool, fwd_sum: bool, scatters: str = ""):
    """A step shaped like the hybrid's, with the MoSA heads reduced to what no design avoids: on a second
    stream, the router product and our top-k before the forward's two grouped products (``routing``), the
    backward's four products beside the dense heads' backward; on the caller's stream the dense heads, and
    (``fwd_sum``) y's sum at the kept tokens (our masked add) between forward and backward; ``scatters``: the two
    scatters' atomic additions (``products``). Free: attention, gathers, RoPE, the scores' and router's gradients,
    x's gradient sum (and the scatters, without ``scatters``)."""
    from mosa_attention.ops.combine import add_at_rows_
    d = operands(B, T, h, E, rho, seed=3)
    fwd, bwd = products(d, scatters)
    y_m = d.rnd(B, T, h)
    leaves = list(part_layer.parameters()) + [x]
    side = torch.cuda.Stream()

    def step():
        for p in leaves:
            p.grad = None
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            if routing:
                route(d, B, T)
            fwd()
        y = part_layer(x)
        main.wait_stream(side)
        if fwd_sum:
            with torch.no_grad():
                add_at_rows_(y, y_m, d.kept)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            bwd()
        y.backward(dy)
        main.wait_stream(side)
    return step


def routing_and_scatters(B, T, h, E, rho):
    """fn() running what a MoSA step must do besides its products, where that is cheapest to measure on its
    own: the router product, our top-k, and the two scatter-adds of precomputed rows (y, x's gradient) by
    plain atomic kernels, into float32 buffers (cleared, then cast) where the kernels' plan takes them (more
    than one kept row per token on average), else into the bf16 results in place. Left out (free here): the
    attention, the gathers, RoPE, the router's and the scores' gradients."""
    d = operands(B, T, h, E, rho, seed=2)
    wide = E * d.R / (B * T) > 1
    bufs = [torch.zeros(B * T, h, device="cuda", dtype=torch.float32 if wide else torch.bfloat16)
            for _ in range(2)]

    def fn():
        route(d, B, T)
        for buf in bufs:
            if wide:
                buf.zero_()
            add_rows(d.rows, d.at, buf, 4 if wide else 8)
            if wide:
                buf.to(torch.bfloat16)
    return fn


def hybrid_floor(B, T, h, E, rho, nd=4, dense_heads=9):
    """{what: ms}: the hybrid's dense heads (our layer, forward + backward) with the MoSA heads' six grouped
    products by cuBLAS beside them on a second stream, one CUDA graph: everything else the MoSA heads do
    (routing, attention, scatters, gathers) costs nothing there; then with routing and the scatters too
    (``routing_and_scatters``). Against the dense layer of ``dense_heads`` and our hybrid layer, same run."""
    from mosa_attention import DenseAttention
    res = {}
    x = torch.randn(B, T, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(B, T, h, device="cuda", dtype=torch.bfloat16)
    base = make_step(DenseAttention(h, dense_heads).cuda().to(torch.bfloat16), x, dy)
    part = make_step(DenseAttention(h, nd).cuda().to(torch.bfloat16), x, dy)
    gemms = grouped_products(B, T, h, E, rho)
    rest = routing_and_scatters(B, T, h, E, rho)
    side = torch.cuda.Stream()

    def beside(mosa):
        return two_streams(side, mosa, part)

    def gemms_rest():
        gemms()
        rest()
    both = beside(gemms)

    def serial():
        gemms()
        part()
    res[f"dense layer, {dense_heads} heads"] = graph_ms(base)
    ours_layer = MoSAAttention(h, E, rho, num_dense_heads=nd, backend="triton").cuda().to(torch.bfloat16)
    res[f"our hybrid layer ({nd} dense + {E} MoSA heads)"] = graph_ms(make_step(ours_layer, x, dy))
    res[f"the hybrid's {nd} dense heads alone"] = graph_ms(part)
    res["the MoSA heads' six grouped products alone (cuBLAS)"] = graph_ms(gemms)
    res[f"{nd} dense heads + the six products, two streams"] = graph_ms(both)
    res[f"{nd} dense heads + the six products, one stream"] = graph_ms(serial)
    part_layer = DenseAttention(h, nd).cuda().to(torch.bfloat16)
    for routing, fwd_sum, scatters, name in (
            (False, False, "", "products at their places"),
            (True, False, "", "routing + products at their places"),
            (True, True, "", "routing + products at their places + y's masked sum"),
            (True, True, "after", "routing + products at their places + y's masked sum + the scatters' atomics"),
            (True, True, "instead", "routing + products at their places + y's masked sum, the scatters' atomics "
                                    "instead of their products")):
        res[f"{nd} dense heads + {name}, two streams"] = graph_ms(
            staged_floor(B, T, h, E, rho, part_layer, x, dy, routing, fwd_sum, scatters))
    res["routing + the two scatters alone"] = graph_ms(rest)
    res["the six products + routing + the two scatters alone"] = graph_ms(gemms_rest)
    res[f"{nd} dense heads + the six products + routing + the two scatters, two streams"] = graph_ms(
        beside(gemms_rest))
    return res


def ours(B, T, h, E, rho):
    """{kernel: ms per step} of our Triton MoSA heads alone, bf16, forward + backward, by the profiler."""
    from bench_layer import profiled  # (this folder: the same profiler run as bench_layer.py --profile)
    layer = MoSAAttention(h, E, rho, backend="triton").cuda().to(torch.bfloat16)
    x = torch.randn(B, T, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(B, T, h, device="cuda", dtype=torch.bfloat16)
    runs = 5
    p = profiled(make_step(layer, x, dy), 3, runs)
    out = {}
    for ev in p.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            dur = getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0)
            out[ev.name] = out.get(ev.name, 0.0) + dur / 1000 / runs
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# the stand-ins drawn by --plot, in order: (label, key of hybrid_floor_ms)
STAGES = (("the 4 dense heads alone", "the hybrid's 4 dense heads alone"),
          ("+ the MoSA products (cuBLAS)", "4 dense heads + products at their places, two streams"),
          ("+ routing", "4 dense heads + routing + products at their places, two streams"),
          ("+ y's masked sum", "4 dense heads + routing + products at their places + y's masked sum, two streams"),
          ("+ the scatters' atomics, after their products",
           "4 dense heads + routing + products at their places + y's masked sum + the scatters' atomics, two streams"),
          ("the scatters' atomics instead of their products",
           "4 dense heads + routing + products at their places + y's masked sum, the scatters' atomics instead of "
           "their products, two streams"))
TARGETS = {"t2": 0.6, "t3": 1.3}


def plot(json_paths, out):
    """One panel per case: the stand-ins' and our layer's time as a ratio to the dense 9-head layer of the
    same run, with the issue's target; returns the PNG's path (written whole, then renamed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mosa_attention.plots._figure import save_png
    runs = []
    for path in json_paths:
        with open(path) as f:
            run = json.load(f)
        if not run.get("hybrid_floor_ms"):
            raise SystemExit(f"{path} has no stand-in hybrids (only t2 / t3 runs at h=512, T=1024 have them)")
        runs.append(run)
    fig, axes = plt.subplots(1, len(runs), figsize=(max(5.5 * len(runs), 9.0), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs):
        fl = run["hybrid_floor_ms"]
        dense = fl["dense layer, 9 heads"]
        ours = next(v for k, v in fl.items() if k.startswith("our hybrid layer"))
        stages = [(lab, key) for lab, key in STAGES if key in fl]  # (runs before v34 have the first four)
        labels = [lab for lab, _ in stages] + ["our hybrid layer (everything)"]
        ratios = [fl[key] / dense for _, key in stages] + [ours / dense]
        colors = ["#9aa7b8"] * len(stages) + ["#d1495b"]
        ys = list(range(len(labels)))[::-1]
        ax.barh(ys, ratios, color=colors)
        for y, r in zip(ys, ratios):
            ax.text(r, y, f" {r:.3f}×", va="center", fontsize=8)
        target = TARGETS.get(run["case"])
        if target:
            ax.axvline(target, color="#2e86ab", ls="--", lw=1.2)
            ax.text(target, len(labels) - 0.45, f" target {target}×", color="#2e86ab", fontsize=7,
                    ha="left" if target > 1 else "right")
        ax.axvline(1.0, color="black", lw=0.8)
        ax.text(1.0, len(labels) - 0.45, "dense ", fontsize=7, ha="right" if (target or 0) > 1 else "left")
        ax.set_yticks(ys, labels, fontsize=8)
        ax.set_xlim(0, max(ratios + [target or 0, 1.0]) * 1.2)
        ax.set_ylim(-0.6, len(labels) - 0.2)
        ax.set_xlabel("time / the dense 9-head layer's (same run)")
        sh = run["shape"]
        ax.set_title(f"{run['case']}: 4 dense + {sh['E']} MoSA heads (k = {sh['k']}), f+b, bf16", fontsize=9, pad=14)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{runs[0]['gpu']}, torch {runs[0]['torch']}: stand-in hybrids (the rest of MoSA left out) "
                 "against our layer", fontsize=9)
    return save_png(fig, out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="t3", choices=sorted(CASES))
    ap.add_argument("--out", default=None, help="folder for parts_<case>.json")
    ap.add_argument("--plot", nargs="+", metavar=("PNG", "JSON"), default=None,
                    help="draw the stand-ins of the given parts_<case>.json files into PNG (no GPU needed)")
    args = ap.parse_args()
    if args.plot:
        if len(args.plot) < 2:
            ap.error("--plot takes the PNG's path, then one or more parts_<case>.json files")
        print(plot(args.plot[1:], args.plot[0]))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_parts.py needs a CUDA GPU")
    B, T, h, E, rho = CASES[args.case]
    vendor = parts(B, T, h, E, rho)
    floor = hybrid_floor(B, T, h, E, rho) if T == 1024 and h == 512 else {}
    kern = ours(B, T, h, E, rho)
    print(f"== {args.case}: B={B} T={T} h={h} E={E} k={T // rho}, bf16, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    print("-- vendor parts (cuBLAS / SDPA / plain atomics on pre-laid-out data), ms")
    for name, ms in vendor.items():
        print(f"{ms:9.4f}  {name}")
    if floor:
        print("-- stand-in hybrids: the 4 dense heads with these MoSA heads' products (cuBLAS) and what is named, "
              "everything else free; ms")
        for name, ms in floor.items():
            print(f"{ms:9.4f}  {name}")
        for key in floor:
            if "two streams" in key or "our hybrid" in key:
                print(f"   {floor[key] / floor['dense layer, 9 heads']:.3f}x the dense layer: {key}")
    print("-- our kernels (MoSA heads alone, one f+b step, eager, profiler), ms")
    for name, ms in kern.items():
        print(f"{ms:9.4f}  {name[:90]}")
    print(f"{sum(kern.values()):9.4f}  sum of our step's kernels")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"parts_{args.case}.json")
        with open(path + ".tmp", "w") as f:  # written whole, then renamed: never left half-written
            json.dump({"case": args.case, "shape": dict(B=B, T=T, h=h, E=E, k=T // rho),
                       "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "vendor_ms": vendor, "hybrid_floor_ms": floor, "ours_ms": kern}, f, indent=1)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
