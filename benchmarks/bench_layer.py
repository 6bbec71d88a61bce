"""Time and check one MoSA attention layer: this project's Triton kernels against the official release
and against dense attention (SDPA), forward + backward and forward only.

    python benchmarks/bench_layer.py --check              # correctness at real shapes (needs a GPU)
    python benchmarks/bench_layer.py --official .official  # the issue-3 cases, the T sweep, JSON to --out
    python benchmarks/bench_layer.py --check --official .official --out results/  # both

Method (see the issue): bf16 autocast over float32 parameters, as the official release trains; median of
many CUDA-event timings after warm-up; eager, and where the layer allows it also one CUDA graph per step
(launch overhead removed). FLOPs and the fewest bytes are counted per case, so each time is also shown as
TFLOP/s and GB/s against the card's measured ceilings (a bf16 matrix product, a device-to-device copy).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from mosa_attention import DenseAttention, MoSAAttention  # noqa: E402
from mosa_attention.bench.layer import capture_graph, median_ms  # noqa: E402
from mosa_attention.bench.layer import make_step as _step  # noqa: E402
from mosa_attention.bench.official import official_layer  # noqa: E402
from mosa_attention.ops import num_selected  # noqa: E402
from mosa_attention.ops.mosa import sparse_attention_reference  # noqa: E402


# ----------------------------------------------------------------------------------------- measuring
def cuda_time(fn, warmup=3, iters=20, max_s=1.5):
    """Median milliseconds of fn() by CUDA events; iterations capped by max_s of wall time."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return median_ms(fn, iters, True, max_s=max_s)


def ceilings():
    n = 1 << 28  # 512 MiB of bf16 each way
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src), iters=20)
    gbs = 2 * src.numel() * 2 / ms / 1e6
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time(lambda: a @ b, iters=20)
    tflops = 2 * 8192 ** 3 / ms / 1e9
    return {"copy_GBps": gbs, "bf16_mm_TFLOPs": tflops}


def poison():
    """Fill the caching allocator's free memory with NaN, so that any output element a kernel forgets to
    write shows up as NaN in the check."""
    free, _ = torch.cuda.mem_get_info()
    big = []
    try:
        for _ in range(2):
            big.append(torch.empty(int(free * 0.35) // 4, device="cuda", dtype=torch.float32).fill_(float("nan")))
        small = [torch.empty(1 << 17, device="cuda").fill_(float("nan")) for _ in range(256)]
    except torch.OutOfMemoryError:
        small = []
    del big, small


# ----------------------------------------------------------------------------------------- counting
def mosa_flops(B, T, h, E, k, D):
    """Forward FLOPs of the MoSA heads: router, QKV, causal attention among k (half of k^2), W_O."""
    return 2 * B * T * h * E + B * E * (2 * k * h * 3 * D + 2 * k * k * D + 2 * k * D * h)


def dense_flops(B, T, h, H, D):
    return B * H * (2 * T * h * 3 * D + 2 * T * T * D + 2 * T * D * h)


def min_bytes(B, T, h, params, backward):
    """Fewest bytes (bf16): x read, y written, parameters read; backward adds dy read, dx written, x
    read again, parameters read again and their gradients written."""
    fwd = 2 * (2 * B * T * h + params)
    return fwd + (2 * (3 * B * T * h + 2 * params) if backward else 0)


# ----------------------------------------------------------------------------------------- layers
def official_module(path, h, E, sparsity, dense_heads, T, D=64):
    if not path:
        return None
    try:
        return official_layer(path, h, E, sparsity, dense_heads, T, D)
    except ValueError as err:
        print(err)
        return None


def make_step(layer, x, dy, backward):
    """One training step's attention work (``mosa_attention.bench.layer.make_step``): gradients start empty
    (as after zero_grad(set_to_none=True)); forward only (under no_grad) without ``backward``."""
    return _step(layer, x, dy if backward else None)


def graph_step(step):
    """One CUDA graph for a whole step (forward, and backward into .grad), replayed; None if capture fails."""
    return capture_graph(step)


MODE = "autocast"  # or "bf16": parameters and input in bfloat16, no autocast
DENSE_BACKEND = "auto"  # "torch": the dense heads' q, k, v by plain torch ops instead of the fused kernel
TUNE_ROUTING = False
DETERMINISTIC = None  # our layers' `deterministic`: None picks the scatter by shape, True rows, False atomics


def time_layer(name, layer, B, T, h, backward, graphs=True):
    dt = torch.bfloat16 if MODE == "bf16" else torch.float32
    layer = layer.to(dt)
    x = torch.randn(B, T, h, device="cuda", dtype=dt, requires_grad=backward)
    dy = torch.randn(B, T, h, device="cuda", dtype=torch.bfloat16)
    params = [p for p in layer.parameters()]
    ac = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False, enabled=MODE == "autocast")
    with ac, torch.set_grad_enabled(backward):
        step = make_step(layer, x, dy, backward)
        step()
        torch.cuda.synchronize()
        for p in params + [x]:
            p.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        eager = cuda_time(step)
        graph_ms, why = None, None
        if graphs:
            replay, why = graph_step(step)
            if replay is not None:
                graph_ms = cuda_time(replay)
    for p in params + [x]:
        p.grad = None
    return {"name": name, "eager_ms": eager, "graph_ms": graph_ms, "graph_error": why, "peak_MiB": peak / 2 ** 20}


# ----------------------------------------------------------------------------------------- cases
def cases(quick):
    """(label, h, E mosa heads, sparsity, dense heads in the hybrid, dense-only heads, T, B)."""
    rows = [
        ("t1 MoSA heads alone, h512 17 heads rho32", 512, 17, 32, 0, 9, 1024, 16),
        ("t2 hybrid 4 dense + 17 MoSA rho32", 512, 17, 32, 4, 9, 1024, 16),
        ("t3 hybrid 4 dense + 505 MoSA rho64", 512, 505, 64, 4, 9, 1024, 16),
        ("t4 h1024 60 MoSA k64 T65536", 1024, 60, 1024, 0, 16, 65536, 1),
        ("h1024 60 MoSA k64 T16384", 1024, 60, 256, 0, 16, 16384, 1),
    ]
    return rows[:2] if quick else rows


def run_cases(args, out):
    res = []
    only = args.cases.split(",") if args.cases else None
    for label, h, E, rho, nd, dense_h, T, B in cases(args.quick):
        if only and label.split()[0] not in only:
            continue
        k = num_selected(T, rho)
        for backward in (True, False):
            try:
                row = time_case(args, label, h, E, rho, nd, dense_h, T, B, k, backward)
            except Exception as err:  # noqa: BLE001 (report, go on with the other cases)
                print("case", label, "failed:", repr(err)[:300], flush=True)
                continue
            res.append(row)
            torch.cuda.empty_cache()
            print(fmt_row(row), flush=True)
    out["cases"] = res


def time_case(args, label, h, E, rho, nd, dense_h, T, B, k, backward):
    row = {"case": label, "h": h, "E": E, "sparsity": rho, "k": k, "dense_in_hybrid": nd, "T": T, "B": B,
           "backward": backward}
    ours = MoSAAttention(h, E, rho, num_dense_heads=nd, backend="triton", deterministic=DETERMINISTIC).cuda()
    if ours.dense is not None:
        ours.dense.backend = "torch" if DENSE_BACKEND == "torch" else "triton"
    row["ours"] = time_layer("ours", ours, B, T, h, backward)
    del ours
    off = official_module(args.official, h, E, rho, nd, T) if MODE == "autocast" else None
    if off is not None:
        row["official"] = time_layer("official", off.cuda(), B, T, h, backward, graphs=False)
        del off
    dense = DenseAttention(h, dense_h, backend=DENSE_BACKEND).cuda()
    row["dense"] = time_layer(f"dense {dense_h} heads", dense, B, T, h, backward)
    del dense
    if nd:  # the hybrid's dense heads alone: what the MoSA heads on the second stream can hide behind
        part = DenseAttention(h, nd, backend=DENSE_BACKEND).cuda()
        row["dense_part"] = time_layer(f"dense {nd} heads", part, B, T, h, backward)
        del part
    f = mosa_flops(B, T, h, E, k, 64) + dense_flops(B, T, h, nd, 64)
    row["flops"] = f * (3 if backward else 1)
    nparam = E * h * (1 + 4 * 64) + nd * 4 * 64 * h
    row["min_bytes"] = min_bytes(B, T, h, nparam, backward)
    best = min(v for v in (row["ours"]["eager_ms"], row["ours"]["graph_ms"]) if v)
    row["ours_TFLOPs"] = row["flops"] / best / 1e9
    row["ours_GBps"] = row["min_bytes"] / best / 1e6
    return row


def run_sweep(args, out):
    """Time against T at h=1024, 60 MoSA heads of k=64, B=1, and 16 dense heads (the plot)."""
    res = []
    Ts = [int(t) for t in args.sweep_T.split(",")]
    for T in Ts:
        rho = T / 64
        row = {"T": T}
        ours = MoSAAttention(1024, 60, rho, backend="triton", deterministic=DETERMINISTIC).cuda()
        row["ours"] = time_layer("ours", ours, 1, T, 1024, True)
        off = official_module(args.official, 1024, 60, rho, 0, T)
        if off is not None:
            row["official"] = time_layer("official", off.cuda(), 1, T, 1024, True, graphs=False)
        row["dense"] = time_layer("dense 16", DenseAttention(1024, 16, backend=DENSE_BACKEND).cuda(), 1, T, 1024, True)
        res.append(row)
        print("sweep T=%6d ours %.3f/%s official %s dense %.3f ms" % (
            T, row["ours"]["eager_ms"], _g(row["ours"]["graph_ms"]),
            _g(row.get("official", {}).get("eager_ms")), row["dense"]["eager_ms"]), flush=True)
    out["sweep_T"] = res


def run_grid(args, out):
    """The t1 layer (h=512, 17 MoSA heads, rho=32, T=1024, B=16) with one setting changed at a time:
    sparsity rho, batch B, head dim D (the dense layer then has h/D heads of dim D), forward + backward,
    against the dense layer of the same B and D and, under autocast, the official release."""
    res = []
    base = dict(rho=32, B=16, D=64)
    grid = [("rho", int(v)) for v in args.grid_rho.split(",") if v] + \
           [("B", int(v)) for v in args.grid_B.split(",") if v] + [("D", int(v)) for v in args.grid_D.split(",") if v]
    h, E, T = 512, 17, 1024
    for name, val in grid:
        c = dict(base, **{name: val})
        row = {"vary": name, "value": val, **c, "k": num_selected(T, c["rho"])}
        try:
            ours = MoSAAttention(h, E, c["rho"], head_dim=c["D"], backend="triton", deterministic=DETERMINISTIC).cuda()
            row["ours"] = time_layer("ours", ours, c["B"], T, h, True)
            off = official_module(args.official, h, E, c["rho"], 0, T, D=c["D"]) if MODE == "autocast" else None
            if off is not None:
                row["official"] = time_layer("official", off.cuda(), c["B"], T, h, True, graphs=False)
            dense = DenseAttention(h, h // c["D"], head_dim=c["D"], backend=DENSE_BACKEND).cuda()
            row["dense"] = time_layer(f"dense {h // c['D']} heads", dense, c["B"], T, h, True)
        except Exception as err:  # noqa: BLE001 (report, go on)
            row["error"] = repr(err)[:300]
        res.append(row)
        torch.cuda.empty_cache()
        if "error" in row:
            print("grid %s=%d failed: %s" % (name, val, row["error"]), flush=True)
            continue
        print("grid %-3s=%4d (k=%4d) ours %.3f / %s ms %.1f MiB | official %s ms | dense %.3f / %s ms" % (
            name, val, row["k"], row["ours"]["eager_ms"], _g(row["ours"]["graph_ms"]), row["ours"]["peak_MiB"],
            _g(row.get("official", {}).get("eager_ms")), row["dense"]["eager_ms"], _g(row["dense"]["graph_ms"])),
            flush=True)
    out["grid"] = res


def _g(v):
    return "-" if v is None else "%.3f" % v


def fmt_row(r):
    o = r.get("official", {})
    return ("%-42s %s ours %7.3f eager %7s graph %8.1f MiB | official %7s ms %8s MiB | dense %7.3f / %7s ms"
            " %8.1f MiB | %.1f TFLOP/s %.0f GB/s") % (
        r["case"], "f+b" if r["backward"] else "fwd", r["ours"]["eager_ms"], _g(r["ours"]["graph_ms"]),
        r["ours"]["peak_MiB"], _g(o.get("eager_ms")), "%.1f" % o["peak_MiB"] if o else "-",
        r["dense"]["eager_ms"], _g(r["dense"]["graph_ms"]), r["dense"]["peak_MiB"], r["ours_TFLOPs"], r["ours_GBps"]) + (
        " | its %d dense heads alone %s ms graph" % (r["dense_in_hybrid"], _g(r["dense_part"]["graph_ms"]))
        if "dense_part" in r else "")


def profiled(fn, warmup: int, runs: int, cpu: bool = False, sync_each: bool = False):
    """torch.profiler over ``runs`` calls of ``fn`` after ``warmup`` unprofiled ones (CUDA activity, and the
    CPU's with ``cpu``); ``sync_each``: synchronise after every call, so that the runs do not overlap."""
    from torch.profiler import ProfilerActivity, profile as prof
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if cpu else [ProfilerActivity.CUDA]) as p:
        for _ in range(runs):
            fn()
            if sync_each:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
    return p


def profile():
    """GPU time per kernel over a few forward + backward steps of our MoSA heads (where the time goes)."""
    for label, h, E, rho, T, B, nd in (("t1", 512, 17, 32, 1024, 16, 0), ("t2 hybrid", 512, 17, 32, 1024, 16, 4),
                                       ("dense 9 heads", 512, 0, 32, 1024, 16, 9),
                                       ("t3 mosa part", 512, 505, 64, 1024, 16, 0), ("t4", 1024, 60, 1024, 65536, 1, 0)):
        dt = torch.bfloat16 if MODE == "bf16" else torch.float32
        layer = (MoSAAttention(h, E, rho, num_dense_heads=nd, backend="triton", deterministic=DETERMINISTIC)
                 if E else DenseAttention(h, nd)).cuda().to(dt)
        x = torch.randn(B, T, h, device="cuda", dtype=dt, requires_grad=True)
        # a dense dy, as in the timings (y.sum().backward() hands an expanded one, which costs a copy)
        dy = torch.randn(B, T, h, device="cuda", dtype=torch.bfloat16)
        step = make_step(layer, x, dy, True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=MODE == "autocast"):
            p = profiled(step, 3, 5, cpu=True)
        print(f"== profile {label} ({MODE}), 5 steps ==")
        try:
            print(p.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
        except Exception:  # noqa: BLE001 (newer torch names it device time)
            print(p.key_averages().table(sort_by="device_time_total", row_limit=22, max_name_column_width=60))


def replay_timeline(replay, label: str, path: str) -> None:
    """Profile 3 calls of ``replay`` (a CUDA graph's), write the Chrome trace to ``path`` and print, for the last
    call, each kernel's start and end (us from its first kernel) and stream, and the busy time per stream."""
    p = profiled(replay, 5, 3, sync_each=True)
    p.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")),
                     key=lambda e: e["ts"])
    if not kernels:
        print(f"== timeline {label}: the trace holds no kernels")
        return
    # the last of the three replays (each launches the same kernels; both streams' kernels interleave, so
    # a gap between starts does not mark a replay's end)
    last = kernels[-(len(kernels) // 3):]
    t0 = last[0]["ts"]
    end = max(e["ts"] + e["dur"] for e in last)
    print(f"== timeline {label}, one graph replay: {end - t0:.1f} us, {len(last)} kernels")
    busy: dict = {}
    for e in last:
        stream = e.get("args", {}).get("stream", "?")
        busy[stream] = busy.get(stream, 0.0) + e["dur"]
        print(f"  {e['ts'] - t0:8.1f} {e['ts'] - t0 + e['dur']:8.1f}  s{stream:<4} {e['name'][:90]}")
    print("  busy us per stream:", {k: round(v, 1) for k, v in busy.items()}, flush=True)


def timeline(folder):
    """Kernel timeline of graph-replayed f+b steps (what runs beside what, and where the GPU idles): the
    hybrids t2 / t3, the t2 hybrid's 4 dense heads alone and the dense 9-head layer, 3 replays each. Writes
    a Chrome trace per case into ``folder`` and prints, for the last replay, each kernel's start and end
    (us from the replay's first kernel) and stream, and the busy time per stream."""
    os.makedirs(folder, exist_ok=True)
    dt = torch.bfloat16 if MODE == "bf16" else torch.float32
    for label, E, rho, nd in (("t2", 17, 32, 4), ("t2 dense part", 0, 32, 4), ("dense 9 heads", 0, 32, 9),
                              ("t3", 505, 64, 4)):
        torch.manual_seed(0)
        layer = (MoSAAttention(512, E, rho, num_dense_heads=nd, backend="triton", deterministic=DETERMINISTIC)
                 if E else DenseAttention(512, nd)).cuda().to(dt)
        x = torch.randn(16, 1024, 512, device="cuda", dtype=dt, requires_grad=True)
        dy = torch.randn(16, 1024, 512, device="cuda", dtype=torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False, enabled=MODE == "autocast"):
            replay = graph_step(make_step(layer, x, dy, True))[0]
        if replay is None:
            print(f"== timeline {label}: capture failed")
            continue
        replay_timeline(replay, f"{label} ({MODE})",
                        os.path.join(folder, "trace_" + label.replace(" ", "_") + ".json"))


def host_profile():
    """Where the host's time goes in eager steps (bf16, f+b) of t1 and of the t2 hybrid: the step timed without
    a profiler, then cProfile over 50 steps, the GPU synchronised once at the end, so the time is the host's."""
    import cProfile
    import pstats
    for label, nd in (("t1", 0), ("t2 hybrid", 4)):
        layer = MoSAAttention(512, 17, 32, num_dense_heads=nd, backend="triton",
                              deterministic=DETERMINISTIC).cuda().bfloat16()
        x = torch.randn(16, 1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        step = make_step(layer, x, dy, True)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            step()
        torch.cuda.synchronize()
        plain = (time.perf_counter() - t0) * 20
        t0 = time.perf_counter()
        with cProfile.Profile() as pr:
            for _ in range(50):
                step()
            torch.cuda.synchronize()
        print("== host profile %s f+b eager, 50 steps: %.3f ms per step (%.3f without the profiler)"
              % (label, (time.perf_counter() - t0) * 20, plain))
        for key in ("tottime", "cumulative"):
            pstats.Stats(pr).sort_stats(key).print_stats(40)


# ----------------------------------------------------------------------------------------- checks
def check_one(op, B, T, h, E, k, D, rd, pad, unsorted, dt, tol):
    x = torch.randn(B, T, h, device="cuda", dtype=dt)
    sc = torch.rand(B, E, k, device="cuda", dtype=dt)
    idx = torch.rand(B, E, T, device="cuda").topk(k, dim=-1).indices.sort(-1).values
    if pad:
        idx[..., k - pad:] = T
    if unsorted:
        idx = idx[..., torch.randperm(k, device="cuda")]
    wq = (torch.randn(E, h, 3 * D, device="cuda") / h ** 0.5).to(dt)
    wo = (torch.randn(E, D, h, device="cuda") / D ** 0.5).to(dt)
    dy = torch.randn(B, T, h, device="cuda", dtype=dt)
    ref = [t.detach().double().requires_grad_() for t in (x, sc, wq, wo)]
    yr = sparse_attention_reference(ref[0], ref[1], idx, ref[2], ref[3], rd)
    yr.backward(dy.double())
    rows = []
    for det in (True, False):  # deterministic: two runs must agree bit for bit
        outs = []
        for _ in range(2):
            poison()
            leaves = [t.detach().clone().requires_grad_() for t in (x, sc, wq, wo)]
            y = op(leaves[0], leaves[1], idx, leaves[2], leaves[3], rd, deterministic=det)
            y.backward(dy)
            outs.append([y.detach()] + [t.grad for t in leaves])
        errs = {n: ((a.double() - b).norm() / b.norm()).item()
                for n, a, b in zip(("y", "dx", "dscores", "dw_qkv", "dw_o"), outs[0], [yr] + [t.grad for t in ref])}
        good = all(e <= tol for e in errs.values())  # NaN fails
        repeat = all(torch.equal(a, b) for a, b in zip(*outs)) if det else None
        good = good and repeat is not False
        row = {"shape": [B, T, h, E, k, D, rd, pad, unsorted], "deterministic": det, "errors": errs,
               "bitwise_repeat": repeat, "pass": good}
        rows.append(row)
        from mosa_attention.ops import triton_mosa
        row["narrow_atomics"] = triton_mosa.NARROW_ATOMICS
        print("check %-46s %s det=%d narrow=%d %s %s" % (row["shape"], dt, det, triton_mosa.NARROW_ATOMICS, " ".join(
            "%s=%.1e" % kv for kv in errs.items()), "PASS" if good else "FAIL"), flush=True)
    return rows


def check(out):
    """Relative error of output and every gradient against the float64 reference on fresh random inputs,
    poisoned memory before every run; deterministic mode must repeat bit for bit."""
    from mosa_attention.ops.triton_mosa import sparse_attention_triton
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    shapes = [  # B, T, h, E, k, D, rope_dims, pad, unsorted, dtypes
        (16, 1024, 512, 17, 32, 64, 32, 0, False, ("bf16", "fp32", "fp16")),
        (16, 1024, 512, 505, 16, 64, 32, 0, False, ("bf16", "bf16-wide", "fp16")),
        (1, 65536, 1024, 60, 64, 64, 32, 0, False, ("bf16",)),
        (4, 2048, 256, 8, 1024, 128, 64, 0, False, ("bf16", "fp32")),
        (2, 4096, 512, 4, 4096, 32, 16, 0, False, ("bf16",)),
        (8, 1024, 512, 17, 300, 64, 32, 20, True, ("bf16", "fp32")),
        (3, 1000, 384, 6, 250, 64, 32, 0, False, ("bf16", "fp16")),
        (2, 300, 36, 5, 40, 32, 16, 0, False, ("bf16", "fp16")),  # h % 8 != 0: four-column atomics
    ]
    # "-wide": 16-bit results summed in a float32 buffer (NARROW_ATOMICS = False), to compare the errors
    tol = {"bf16": 1e-2, "fp32": 1e-4, "fp16": 1e-2, "bf16-wide": 1e-2}
    dts = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, "bf16-wide": torch.bfloat16}
    from mosa_attention.ops import triton_mosa
    narrow = triton_mosa.NARROW_ATOMICS
    res, ok = [], True
    for B, T, h, E, k, D, rd, pad, unsorted, names in shapes:
        for name in names:
            triton_mosa.NARROW_ATOMICS = narrow and not name.endswith("-wide")
            try:
                rows = check_one(sparse_attention_triton, B, T, h, E, k, D, rd, pad, unsorted, dts[name], tol[name])
            except Exception as err:  # noqa: BLE001 (report, go on with the other shapes)
                rows = [{"shape": [B, T, h, E, k, D, rd, pad, unsorted], "error": repr(err)[:300], "pass": False}]
                print("check", rows[0], flush=True)
            finally:
                triton_mosa.NARROW_ATOMICS = narrow
            for row in rows:
                row["dtype"] = name
                ok &= row["pass"]
            res += rows
            torch.cuda.empty_cache()
    out["check"] = {"pass": ok, "rows": res}
    torch.backends.cuda.matmul.allow_tf32 = True
    return ok


def check_routed(out):
    """The op with routing fused in (``mosa_triton``: router GEMM, top-k kernel, attention, and the router's
    gradients from the attention kernels) against float64 autograd through sigmoid, gather and the router
    product, at the selection the op made (bf16 logits may order near-ties differently from float64 ones);
    the selection itself against torch.topk of the op's own logits. "autocast": float32 input and weights under
    bf16 autocast (the kernels read the float32 tiles and write float32 weight gradients), against the
    bf16-rounded inputs in float64."""
    from mosa_attention.ops.routing import select_topk
    from mosa_attention.ops.triton_mosa import mosa_triton
    torch.backends.cuda.matmul.allow_tf32 = False
    rows, ok = [], True
    for B, T, h, E, k, D, rd, first, names in ((16, 1024, 512, 17, 32, 64, 32, False, ("bf16", "fp32", "autocast")),
                                                (16, 1024, 512, 505, 16, 64, 32, True, ("bf16", "autocast")),
                                                (1, 65536, 1024, 60, 64, 64, 32, False, ("bf16",)),
                                                (4, 2048, 256, 8, 1024, 128, 64, False, ("bf16", "fp32")),
                                                (3, 1000, 384, 6, 250, 64, 32, True, ("bf16",))):
        for name, det in [(n, d) for n in names for d in (True, False)]:
            dt = {"bf16": torch.bfloat16, "fp32": torch.float32, "autocast": torch.float32}[name]
            cdt = torch.float32 if name == "fp32" else torch.bfloat16  # the compute dtype
            try:
                x = torch.randn(B, T, h, device="cuda", dtype=dt)
                ws = [(torch.randn(E, h, device="cuda") / h ** 0.5).to(dt),
                      (torch.randn(E, h, 3 * D, device="cuda") / h ** 0.5).to(dt),
                      (torch.randn(E, D, h, device="cuda") / D ** 0.5).to(dt)]
                dy = torch.randn(B, T, h, device="cuda", dtype=cdt)
                outs = []
                for _ in range(2):
                    poison()
                    leaves = [t.detach().clone().requires_grad_() for t in [x] + ws]
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=name == "autocast"):
                        y, kept, idx = mosa_triton(*leaves, k, first, rd, deterministic=det)
                    y.backward(dy)
                    assert y.dtype == cdt and all(t.grad.dtype == dt for t in leaves), "result or gradient dtypes"
                    outs.append([y.detach(), kept] + [t.grad for t in leaves])
                repeat = all(torch.equal(a, b) for a, b in zip(*outs))
                # the op's own logits (w_r x^T in the weights' dtype): F.linear may round differently, and
                # bf16 logits tie often, so a near-tie could then select differently without any error
                logits = torch.mm(ws[0].to(cdt), x.reshape(B * T, h).to(cdt).t()).view(E, B, T).transpose(0, 1)
                sel = select_topk(logits, k, first, backend="torch")[1]
                same_sel = torch.equal(sel, idx) or torch.equal(logits.gather(-1, sel).sort(-1).values,
                                                                 logits.gather(-1, idx).sort(-1).values)
                ref = [t.detach().to(cdt).double().requires_grad_() for t in [x] + ws]
                r = torch.sigmoid(torch.nn.functional.linear(ref[0], ref[1])).transpose(1, 2).gather(-1, idx)
                yr = sparse_attention_reference(ref[0], r, idx, ref[2], ref[3], rd)
                yr.backward(dy.double())
                errs = {n: ((a.double() - b).norm() / b.norm()).item() for n, a, b in zip(
                    ("y", "kept", "dx", "dw_router", "dw_qkv", "dw_o"), outs[0], [yr, r] + [t.grad for t in ref])}
                tol = 1e-2 if cdt == torch.bfloat16 else 1e-4
                good = all(e <= tol for e in errs.values()) and (repeat or not det) and same_sel
                row = {"shape": [B, T, h, E, k, D, rd, first], "dtype": name, "deterministic": det, "errors": errs,
                       "bitwise_repeat": repeat, "selection_is_topk": same_sel, "pass": good}
                print("check_routed %-40s %s det=%d %s repeat=%d topk=%d %s" % (row["shape"], name, det, " ".join(
                    "%s=%.1e" % kv for kv in errs.items()), repeat, same_sel, "PASS" if good else "FAIL"), flush=True)
            except Exception as err:  # noqa: BLE001
                row = {"shape": [B, T, h, E, k, D, rd, first], "dtype": name, "deterministic": det,
                       "error": repr(err)[:300], "pass": False}
                print("check_routed", row, flush=True)
            ok &= row["pass"]
            rows.append(row)
            torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = True
    out["check_routed"] = {"pass": ok, "rows": rows}


def check_dense(out):
    """Dense heads with the fused split + RoPE kernel against the same layer on plain-torch ops in float64."""
    torch.backends.cuda.matmul.allow_tf32 = False
    rows, ok = [], True
    for B, T, h, H, D, window in ((16, 1024, 512, 9, 64, None), (1, 4096, 1024, 16, 64, None),
                                  (2, 1000, 384, 4, 128, None), (4, 1024, 512, 4, 64, 32)):
        for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            fast = DenseAttention(h, H, head_dim=D, window=window, backend="auto").cuda().to(dt)
            ref = DenseAttention(h, H, head_dim=D, window=window, backend="torch").cuda().double()
            ref.load_state_dict(fast.state_dict())
            x = torch.randn(B, T, h, device="cuda", dtype=dt)
            dy = torch.randn(B, T, h, device="cuda", dtype=dt)
            xs = [x.clone().requires_grad_(), x.double().requires_grad_()]
            y, y_ref = fast(xs[0]), ref(xs[1])
            y.backward(dy)
            y_ref.backward(dy.double())
            errs = {n: ((a.double() - b).norm() / b.norm()).item() for n, a, b in (
                ("y", y, y_ref), ("dx", xs[0].grad, xs[1].grad),
                ("dw_qkv", fast.W_QKV.weight.grad, ref.W_QKV.weight.grad), ("dw_o", fast.W_O.weight.grad, ref.W_O.weight.grad))}
            good = all(e <= (1e-2 if name == "bf16" else 1e-4) for e in errs.values())
            ok &= good
            rows.append({"shape": [B, T, h, H, D, window], "dtype": name, "errors": errs, "pass": good})
            print("check_dense %-32s %s %s %s" % ([B, T, h, H, D, window], name, " ".join(
                "%s=%.1e" % kv for kv in errs.items()), "PASS" if good else "FAIL"), flush=True)
            del fast, ref
            torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = True
    out["check_dense"] = {"pass": ok, "rows": rows}


def _step_grads(layer, x, dy, params, autocast: bool, graphed: bool):
    """Clones of params' gradients after one forward + backward of layer (bf16 autocast if asked), run eagerly
    or captured as a CUDA graph and replayed (the replay writes into the .grad tensors made during capture);
    None where the capture failed."""
    def step():
        for p in params:
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        y.backward(dy)
        return y
    if graphed:
        replay = graph_step(step)[0]
        if replay is None:
            return None
        replay()
    else:
        step()
    torch.cuda.synchronize()
    return [p.grad.clone() for p in params]


def _max_rel_diff(got, ref) -> float:
    return max(((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
               for a, b in zip(got, ref))


def check_streams(out):
    """Hybrids with the MoSA heads on a second stream (``layers.mosa.PARALLEL_HEADS``) against one stream:
    every gradient (x and all parameters), eagerly and replayed from a CUDA graph, bf16 and autocast over
    float32 parameters. The MoSA heads run deterministic=True; the dense heads' cuDNN backward need not be
    bit-repeatable, so a second one-stream run shows the run-to-run spread, and the check asks for
    relative differences within 2e-3 (a missing synchronisation shows up as garbage, not as last bits).
    The row ``parallel="shared"`` is one stream with the MoSA heads reading x through the dense heads'
    product (``SHARED_INPUT_GRAD = True``, x's two gradients summed in its epilogue) where the default
    (None) lets autograd sum them, and the row ``"unshared"`` the other way round; ``"dense-first"``: two
    streams with the dense heads launched first (``MOSA_HEADS_FIRST = False``); ``"masked"``: two streams,
    the hybrid's sums at the kept tokens only (``MASKED_SUMS = True``, also where the rule would not take
    them), eager and graphed. Last, with atomic scatters (deterministic=False, bf16 t2 only): two streams,
    masked sums and rows-only outputs (``ROWS_ONLY``) against one stream with neither, within 1e-2."""
    import mosa_attention.layers.mosa as layer_module
    ok, rows = True, []
    for E, rho, mode in ((17, 32, "bf16"), (505, 64, "bf16"), (17, 32, "autocast")):
        torch.manual_seed(0)
        layer = MoSAAttention(512, E, rho, num_dense_heads=4, backend="triton", deterministic=True).cuda()
        dt = torch.bfloat16 if mode == "bf16" else torch.float32
        layer = layer.to(dt)
        x = torch.randn(16, 1024, 512, device="cuda", dtype=dt, requires_grad=True)
        dy = torch.randn(16, 1024, 512, device="cuda", dtype=torch.bfloat16)
        params = [x] + list(layer.parameters())
        got = {}
        for parallel, graphed in ((False, False), ("again", False), ("shared", False), ("unshared", False),
                                  (True, False), ("dense-first", False), ("masked", False), ("masked", True),
                                  (False, True), (True, True)):
            layer_module.PARALLEL_HEADS = parallel in (True, "dense-first", "masked")
            layer_module.MASKED_SUMS = parallel == "masked"
            layer_module.MOSA_HEADS_FIRST = parallel != "dense-first"
            layer_module.SHARED_INPUT_GRAD = {"shared": True, "unshared": False}.get(parallel)
            got[(parallel, graphed)] = _step_grads(layer, x, dy, params, mode == "autocast", graphed)
        layer_module.PARALLEL_HEADS, layer_module.SHARED_INPUT_GRAD, layer_module.MOSA_HEADS_FIRST = True, None, True
        layer_module.MASKED_SUMS = None
        ref = got[(False, False)]
        for key, val in got.items():
            if val is None:
                row = {"E": E, "mode": mode, "parallel": key[0], "graph": key[1], "capture_failed": True}
                good = False
            else:
                diff = _max_rel_diff(val, ref)
                same = all(torch.equal(a, b) for a, b in zip(val, ref))
                good = diff <= 2e-3
                row = {"E": E, "mode": mode, "parallel": key[0], "graph": key[1], "bitwise": same, "max_rel_diff": diff}
            rows.append(row)
            ok &= good
            print("check_streams", row, "PASS" if good else "FAIL", flush=True)
    # atomic scatters: rows-only outputs (the scatter buffers cleared at the kept rows only) on two streams
    # against one stream without (atomics are not bit-repeatable: the bf16 tolerance)
    torch.manual_seed(0)
    layer = MoSAAttention(512, 17, 32, num_dense_heads=4, backend="triton", deterministic=False).cuda().bfloat16()
    x = torch.randn(16, 1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(16, 1024, 512, device="cuda", dtype=torch.bfloat16)
    params = [x] + list(layer.parameters())
    got = {}
    for fast, graphed in ((False, False), (True, False), (True, True)):
        layer_module.PARALLEL_HEADS = layer_module.MASKED_SUMS = layer_module.ROWS_ONLY = fast
        got[(fast, graphed)] = _step_grads(layer, x, dy, params, False, graphed)
    layer_module.PARALLEL_HEADS, layer_module.ROWS_ONLY = True, True
    layer_module.MASKED_SUMS = None
    for key in ((True, False), (True, True)):
        val = got.get(key)
        if val is None:
            row, good = {"E": 17, "mode": "bf16", "parallel": "rows-only atomic", "graph": key[1],
                         "capture_failed": True}, False
        else:
            diff = _max_rel_diff(val, got[(False, False)])
            good = diff <= 1e-2 and all(bool(torch.isfinite(a).all()) for a in val)
            row = {"E": 17, "mode": "bf16", "parallel": "rows-only atomic", "graph": key[1], "max_rel_diff": diff}
        rows.append(row)
        ok &= good
        print("check_streams", row, "PASS" if good else "FAIL", flush=True)
    out["check_streams"] = {"pass": ok, "rows": rows}


def check_routing(out):
    """The fused top-k kernel against torch.topk + sort at real shapes (distinct scores, so the kept set is
    unique), and both timed (CUDA graph of one call)."""
    from mosa_attention.ops.routing import select_topk
    rows, ok = [], True
    for B, E, T, k, first in ((16, 17, 1024, 32, False), (16, 505, 1024, 16, False), (16, 505, 1024, 16, True),
                              (1, 60, 16384, 64, False), (4, 8, 2048, 1024, False), (2, 4, 4096, 4096, False),
                              (3, 6, 1000, 250, True)):
        for dt in (torch.bfloat16, torch.float32):
            if dt == torch.bfloat16 and T > 256:  # bf16 has 256 distinct values in [1, 2): use logits of x W
                logits = torch.randn(B, T, E, device="cuda").to(dt).transpose(1, 2)
            else:
                logits = torch.randn(B, T, E, device="cuda", dtype=dt).transpose(1, 2)
            sc = torch.sigmoid(logits)
            got = select_topk(sc, k, first, backend="triton")[1]
            want = select_topk(sc, k, first, backend="torch")[1]
            same = torch.equal(got, want)
            # with ties (bf16) the kept scores must still be a top-k multiset, ascending and unique
            vals_ok = torch.equal(sc.gather(-1, got).sort(-1).values, sc.gather(-1, want).sort(-1).values)
            asc = bool((got.diff(dim=-1) > 0).all()) if k > 1 else True
            good = vals_ok and asc and (same or dt == torch.bfloat16)
            ok &= good
            # GPU time of one call, launch gaps removed (CUDA graph)
            t_tri = cuda_time(graph_step(lambda: select_topk(sc, k, first, backend="triton"))[0])
            t_ref = cuda_time(graph_step(lambda: select_topk(sc, k, first, backend="torch"))[0])
            row = {"shape": [B, E, T, k, first], "dtype": str(dt), "same_positions": same, "same_scores": vals_ok,
                   "ascending": asc, "pass": good, "triton_ms": t_tri, "torch_ms": t_ref}
            if TUNE_ROUTING and dt == torch.bfloat16 and (B, E, T) in ((16, 505, 1024), (16, 17, 1024), (1, 60, 16384)):
                from mosa_attention.ops import triton_routing
                row["tile_variants_ms"] = {}
                for be, nw in ((1, 1), (2, 1), (4, 1), (2, 2), (4, 4), (8, 4), (8, 8), (1, 4)):
                    triton_routing.TILE_OVERRIDE = (be, nw)
                    try:
                        g = graph_step(lambda: select_topk(sc, k, first, backend="triton"))[0]
                        row["tile_variants_ms"]["%d,%d" % (be, nw)] = cuda_time(g)
                    except Exception as err:  # noqa: BLE001
                        row["tile_variants_ms"]["%d,%d" % (be, nw)] = repr(err)[:100]
                triton_routing.TILE_OVERRIDE = None
            rows.append(row)
            print("check_routing %-28s %s same=%d scores=%d %s  triton %.3f ms torch %.3f ms %s" % (
                row["shape"], dt, same, vals_ok, "PASS" if good else "FAIL", t_tri, t_ref,
                row.get("tile_variants_ms", "")), flush=True)
    out["check_routing"] = {"pass": ok, "rows": rows}


def tune_topk(out):
    """The routed top-k kernel (router logits in, positions and float32 kept scores out, as in training)
    at the targets' shapes in bf16, GPU time of one call (CUDA graph) for each tile ([BE heads per program,
    warps]); every variant must give the default's positions and scores."""
    import triton
    from mosa_attention.ops import triton_routing as tr
    res = []
    for B, E, T, k in ((16, 17, 1024, 32), (16, 505, 1024, 16), (4, 60, 4096, 16), (1, 60, 16384, 64)):
        x = torch.randn(B * T, 512, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(E, 512, device="cuda", dtype=torch.bfloat16) / 512 ** 0.5
        lt = torch.mm(w, x.t()).view(E, B, T).permute(1, 0, 2).transpose(1, 2)  # [B, T, E] as _route has it

        def call():
            return tr.route_logits_triton(lt, k, False, kept_dtype=torch.float32)
        want = call()
        bt = triton.next_power_of_2(T)
        row = {"shape": [B, E, T, k], "default_tile": list(tr._tiles(T, B * E)[1:]), "ms": {}}
        # (name, tile, unrolled passes, two-level scans): the default timed three times, between the forms
        # kept for A/B, then the tiles
        variants = [("default", None, False, None), ("default_unrolled", None, True, None),
                    ("default_again", None, False, None), ("flat_scans", None, False, False),
                    ("two_level_scans", None, False, True), ("default_third", None, False, None)] + [
            ("%d,%d" % (be, nw), (be, nw), False, None)
            for be in (1, 2, 4, 8) for nw in (1, 2, 4, 8) if 4 <= bt * be // (32 * nw) <= 64]
        before = tr.TILE_OVERRIDE, tr.UNROLL_PASSES, tr.TWO_LEVEL_SCANS
        for key, tile, unroll, two in variants:
            tr.TILE_OVERRIDE, tr.UNROLL_PASSES, tr.TWO_LEVEL_SCANS = tile, unroll, two
            try:
                got = call()
                same = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
                row["ms"][key] = cuda_time(graph_step(call)[0]) if same else "WRONG"
            except Exception as err:  # noqa: BLE001 (report the variant, go on)
                row["ms"][key] = repr(err)[:100]
        tr.TILE_OVERRIDE, tr.UNROLL_PASSES, tr.TWO_LEVEL_SCANS = before
        res.append(row)
        best = sorted((v, n) for n, v in row["ms"].items() if isinstance(v, float))[:4]
        print("tune_topk %-22s default %s: %s | best %s" % (
            row["shape"], row["default_tile"], " ".join("%s=%.4f" % (n, v) for n, v in row["ms"].items()
                                                         if isinstance(v, float) and "default" in n),
            ", ".join("%s %.4f" % (n, v) for v, n in best)), flush=True)
    out["tune_topk"] = res


TUNE_VARIANTS = {  # kernel -> list of overrides (the first is the default)
    "_qkv_fwd": [{}, {"BM": 128}, {"BM": 128, "num_warps": 4}, {"BK": 32}, {"num_stages": 4}, {"num_stages": 2},
                 {"BM": 128, "BK": 32, "num_stages": 4}, {"BM": 32, "num_warps": 4}, {"BM": 64},
                 # (v16: two programs per SM on an H200 by registers and shared memory, from ptxas here)
                 {"BM": 64, "num_warps": 4, "num_stages": 3}, {"BM": 64, "num_warps": 4, "num_stages": 2}],
    "_attn_fwd": [{}, {"BN": 32}, {"BM": 128, "num_warps": 8}, {"BH": 128}, {"BH": 128, "num_warps": 8},
                  {"BM": 32, "BN": 32}, {"num_stages": 2}, {"BM": 128, "BH": 128, "num_warps": 8}],
    "_out_bwd": [{}, {"BH": 128}, {"BM": 128, "num_warps": 8}, {"BM": 32}, {"num_stages": 4}, {"BH": 128, "num_warps": 8},
                 {"BM": 128, "BH": 128, "num_warps": 8}, {"num_stages": 2}],
    "_dwo": [{}, {"BR": 128}, {"BH": 128}, {"BH": 128, "num_warps": 8}, {"BR": 32}, {"num_stages": 4},
             {"BR": 128, "BH": 128, "num_warps": 8}, {"num_stages": 2}, {"BH": 64}],
    "_attn_bwd_dkdv": [{}, {"BM": 32}, {"BN": 32}, {"BM": 32, "BN": 32}, {"num_warps": 8}, {"num_stages": 2},
                       {"BM": 128, "num_warps": 8}, {"BN": 128, "num_warps": 8}],
    "_attn_bwd_dq": [{}, {"BM": 32}, {"BN": 32}, {"BM": 32, "BN": 32}, {"num_warps": 8}, {"num_stages": 2},
                     {"BM": 128, "num_warps": 8}, {"BN": 128, "num_warps": 8}],
    "_attn_bwd_seqs": [{}, {"BLK": 32}, {"num_warps": 8}, {"num_stages": 2}, {"BLK": 32, "num_stages": 2}],
    "_qkv_bwd_dx": [{}, {"BH": 128}, {"BH": 128, "num_warps": 8}, {"BM": 128, "num_warps": 8}, {"BH": 256, "num_warps": 8},
                    {"BM": 128, "BH": 128, "num_warps": 8}, {"BM": 32}, {"num_stages": 2}],
    "_dwqkv": [{}, {"BR": 128}, {"BH": 128}, {"BH": 128, "num_warps": 8}, {"BR": 32}, {"num_stages": 4},
               {"BR": 128, "BH": 128, "num_warps": 8}, {"num_stages": 2}, {"BH": 64}, {"num_warps": 4},
               {"BR": 32, "num_warps": 4}],
    "_segment_sum": [{}, {"BT": 16}, {"BT": 64}, {"BH": 512}, {"BT": 16, "BH": 512}, {"num_warps": 8},
                     {"BT": 64, "num_warps": 8}, {"BT": 8, "BH": 512}],
}


def tune(out, only=None):
    """Per-kernel GPU time (torch profiler) of ours, f+b, bf16, under each tile variant; outputs checked
    against the float64 reference for every variant (a variant that breaks a result is reported, not used)."""
    from mosa_attention.ops import triton_mosa
    from mosa_attention.ops.triton_mosa import sparse_attention_triton
    res = {}
    n = max(len(v) for v in TUNE_VARIANTS.values())
    for label, B, T, h, E, k in (("t3", 16, 1024, 512, 505, 16), ("t1", 16, 1024, 512, 17, 32),
                                 ("t4", 1, 65536, 1024, 60, 64)):
        if only and label not in only:
            continue
        x = torch.randn(B, T, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        sc = torch.rand(B, E, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        idx = torch.rand(B, E, T, device="cuda").topk(k, dim=-1).indices.sort(-1).values
        wq = (torch.randn(E, h, 192, device="cuda") / h ** 0.5).bfloat16().requires_grad_()
        wo = (torch.randn(E, 64, h, device="cuda") / 8).bfloat16().requires_grad_()
        dy = torch.randn(B, T, h, device="cuda", dtype=torch.bfloat16)
        leaves = (x, sc, wq, wo)
        ref = None
        per = {}
        for i in range(n):
            triton_mosa.TILE_OVERRIDES.clear()
            for kern, vs in TUNE_VARIANTS.items():
                if i < len(vs) and vs[i]:
                    triton_mosa.TILE_OVERRIDES[kern] = vs[i]
            try:
                def step():
                    for t in leaves:
                        t.grad = None
                    y = sparse_attention_triton(x, sc, idx, wq, wo, 32)
                    y.backward(dy)
                    return y
                y = step()
                got = [y.detach().float()] + [t.grad.float() for t in leaves]
                if ref is None:
                    ref = got
                errs = [((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(got, ref)]
                p = profiled(step, 2, 5)
                times = {}
                if i == 0:
                    print(p.key_averages().table(sort_by="device_time_total", row_limit=16, max_name_column_width=50))
                for ev in p.key_averages():
                    kern = next((kk for kk in TUNE_VARIANTS if ev.key.startswith(kk)), None)
                    if kern is not None:
                        dev_t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                        times[kern] = times.get(kern, 0.0) + dev_t / 5
            except Exception as err:  # noqa: BLE001 (a variant that does not compile: report it)
                print("tune", label, i, "failed", repr(err)[:200], flush=True)
                continue
            for kern, vs in TUNE_VARIANTS.items():
                if i < len(vs) and kern in times:
                    per.setdefault(kern, []).append({"variant": vs[i], "us": times[kern], "max_err_vs_default": max(errs)})
            print("tune %s variant %d: max err vs default %.1e | %s" % (label, i, max(errs), " ".join(
                "%s=%.0f" % (kk.strip("_"), v) for kk, v in times.items())), flush=True)
        triton_mosa.TILE_OVERRIDES.clear()
        res[label] = per
        for kern, rows in per.items():
            best = min((r for r in rows if r["max_err_vs_default"] < 2e-2), key=lambda r: r["us"], default=None)
            if best:
                print("tune %s best %-16s %7.1f us (default %7.1f) %s" % (label, kern, best["us"], rows[0]["us"], best["variant"]),
                      flush=True)
        del x, sc, wq, wo, dy, leaves, ref
        torch.cuda.empty_cache()
    out["tune"] = res


def plot(json_path, png_path):
    """Time against T (forward + backward, h=1024, 60 MoSA heads of k=64, B=1) from a results.json."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(json_path) as f:
        res = json.load(f)
    rows = res["sweep_T"]
    Ts = [r["T"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series = [("dense 16 heads (SDPA), eager", lambda r: r["dense"]["eager_ms"]),
              ("dense 16 heads (SDPA), CUDA graph", lambda r: r["dense"]["graph_ms"]),
              ("official MoSA release, eager", lambda r: r.get("official", {}).get("eager_ms")),
              ("ours (Triton), eager", lambda r: r["ours"]["eager_ms"]),
              ("ours (Triton), CUDA graph", lambda r: r["ours"]["graph_ms"])]
    for name, get in series:
        ys = [get(r) for r in rows]
        if all(y is not None for y in ys):
            ax.plot(Ts, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("ms per forward + backward")
    ax.set_title(f"one layer, h=1024, 60 MoSA heads k=64, B=1 ({res['card']}, {res['mode']})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


# an auto / on / off flag as the module switch it sets (None: the module decides by shape)
SWITCH = {"auto": None, "on": True, "off": False}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="correctness at real shapes")
    ap.add_argument("--no-bench", action="store_true", help="skip the timings")
    ap.add_argument("--no-sweep", action="store_true", help="skip the T sweep")
    ap.add_argument("--quick", action="store_true", help="fewer cases")
    ap.add_argument("--cases", default=None, help="only these cases, by the label's first word (e.g. t1,t2,t3)")
    ap.add_argument("--mode", default="autocast", choices=("autocast", "bf16"),
                    help="autocast: bf16 autocast over float32 parameters (as the official release); "
                         "bf16: parameters and input in bfloat16 (the official release cannot run so)")
    ap.add_argument("--sweep-T", default="1024,2048,4096,8192,16384,32768,65536", help="T values of the sweep")
    ap.add_argument("--grid", action="store_true",
                    help="also time the t1 layer with one of sparsity, batch, head dim changed at a time")
    ap.add_argument("--grid-rho", default="4,8,16,32,64,128,256", help="sparsities of --grid")
    ap.add_argument("--grid-B", default="1,4,16,64", help="batch sizes of --grid")
    ap.add_argument("--grid-D", default="32,64,128", help="head dims of --grid")
    ap.add_argument("--router", default="linear", choices=("linear", "einsum"),
                    help="einsum: time the layer with the earlier router logits, an einsum (strided dx in "
                         "backward); linear: F.linear, as ops/routing.py does now")
    ap.add_argument("--select", default="auto", choices=("auto", "torch"),
                    help="torch: top-k selection by torch.topk + sort instead of the fused kernel")
    ap.add_argument("--unfused", action="store_true",
                    help="route outside the Triton op (router GEMM, top-k, autograd) instead of fusing it in")
    ap.add_argument("--sdpa", default="auto", choices=("auto", "flash", "cudnn", "efficient"),
                    help="the SDPA kernels of every dense head (ours and the dense baseline alike): auto (torch's "
                         "choice: cuDNN on an H200), or only this backend (torch.backends.cuda.enable_*_sdp)")
    ap.add_argument("--blas", default="default", choices=("default", "cublas", "cublaslt"),
                    help="the library of every plain matrix product (torch.backends.cuda.preferred_blas_library)")
    ap.add_argument("--no-reduced-reduction", action="store_true",
                    help="forbid cuBLAS reductions in 16 bits (allow_bf16/fp16_reduced_precision_reduction = False)")
    ap.add_argument("--cublas-workspace", default=None, metavar="CONFIG",
                    help="CUBLAS_WORKSPACE_CONFIG for this run, e.g. :0:0 (no workspace), :4096:8")
    ap.add_argument("--dense-torch", action="store_true",
                    help="dense heads (the dense layer and the hybrids' dense part) with plain-torch split + RoPE")
    ap.add_argument("--tune", action="store_true",
                    help="time every kernel of ours under several tile configurations (t1, t3 shapes)")
    ap.add_argument("--profile", action="store_true", help="print the GPU kernels of one step of ours")
    ap.add_argument("--scalar-atomics", action="store_true",
                    help="the atomic scatter with one atomic per element instead of sm_90's four-wide red.global.add")
    ap.add_argument("--no-scaled-half", action="store_true",
                    help="a bfloat16 y with many rows per token: a float32 scatter buffer instead of the scaled "
                         "float16 one (SCALED_HALF_ATOMICS = False; for A/B runs)")
    ap.add_argument("--topk-scans", choices=("auto", "flat", "two-level"), default="auto",
                    help="the top-k kernel's compaction scans (TWO_LEVEL_SCANS; v19.4): by shape, or forced, for A/B")
    ap.add_argument("--unrolled-topk", action="store_true",
                    help="the top-k kernel's counting passes unrolled, as before v19 (UNROLL_PASSES; for A/B runs)")
    ap.add_argument("--wide-atomics", action="store_true",
                    help="16-bit results of the atomic scatter summed in a float32 buffer and cast (as up to v5.2) "
                         "instead of added in their own dtype")
    ap.add_argument("--serial-heads", action="store_true",
                    help="a hybrid's MoSA and dense heads one after the other on one stream (before v6.2)")
    ap.add_argument("--check-streams", action="store_true",
                    help="hybrids on two streams against one: every gradient bit for bit, eager and graphed")
    ap.add_argument("--shared-input", default="auto", choices=("auto", "on", "off"),
                    help="a hybrid's MoSA heads read x through the dense heads' QKV product (x's two gradients "
                         "summed in its epilogue): auto (under autocast over wider x), on, off (before v8.1)")
    ap.add_argument("--masked-sums", default="auto", choices=("auto", "on", "off"),
                    help="a hybrid on the fused op sums y and x's gradient at the kept tokens only: auto (where "
                         "the heads keep at most half of the tokens, MASKED_SUMS = None), on, off (before v9.0)")
    ap.add_argument("--no-rows-only", action="store_true",
                    help="masked hybrids: the fused op writes every row of y and x's gradient (before v10)")
    ap.add_argument("--wide-shared-x", action="store_true",
                    help="masked hybrids under autocast: the MoSA heads read float32 x, not the product's bf16 copy "
                         "(ops.attention.NARROW_SHARED_X = False; before v10.2)")
    ap.add_argument("--no-x-read", action="store_true",
                    help="hybrids without masked sums under autocast: the fused op reads float32 x, not the "
                         "product's bf16 copy (layers.mosa.X_READ = False; before v10.2)")
    ap.add_argument("--dense-first", action="store_true",
                    help="a two-stream hybrid launches its dense heads before its MoSA heads")
    ap.add_argument("--tiles", default=None, metavar="JSON",
                    help='launch overrides for the MoSA kernels, e.g. {"_qkv_fwd":{"BM":64}} (triton_mosa.TILE_OVERRIDES)')
    ap.add_argument("--attn-bwd-split", action="store_true",
                    help="attention backward as two kernels (dk/dv, dq) also for short sequences (before v8.0)")
    ap.add_argument("--tune-topk", action="store_true", help="time the routed top-k kernel's schemes and tiles")
    ap.add_argument("--dwo-in-out-bwd", default="auto", choices=("auto", "on", "off"),
                    help="w_o's gradient inside _out_bwd, one program per head (triton_mosa.DWO_IN_OUT_BWD): auto "
                         "(grids of many heads), on (wherever R <= 256), off (_dwo after _out_bwd, before v11)")
    ap.add_argument("--attn-bwd-outside", action="store_true",
                    help="short sequences' attention backward in its own kernel (_attn_bwd_seqs) also where the op "
                         "runs alone, not inside _out_bwd (triton_mosa.ATTN_IN_OUT_BWD = False; before v21)")
    ap.add_argument("--dwr-separate", action="store_true",
                    help="the router's weight gradient in its own kernel (_dwr) instead of inside _dwqkv")
    ap.add_argument("--timeline", action="store_true",
                    help="kernel timelines of graph-replayed t2 / t3 steps and dense layers (Chrome traces)")
    ap.add_argument("--check-parts", default="dense,routed,routing,ops",
                    help="with --check: which checks (dense heads, routed op, top-k, op at given selections)")
    ap.add_argument("--dense-router-grad", type=float, default=None, metavar="OVERLAP",
                    help="the router's weight gradient as one dense GEMM (not _dwr) from this many kept rows per token")
    ap.add_argument("--host-profile", action="store_true", help="cProfile of eager t1 steps (host overhead)")
    ap.add_argument("--scatter", default="auto", choices=("auto", "rows", "atomic"),
                    help="our layers' scatter-adds: auto (deterministic=None: by shape), rows (deterministic=True: "
                         "rows + sorted segment sum, bit-repeatable), atomic (deterministic=False)")
    ap.add_argument("--official", default=None, help="path holding the official release's mosa/ package")
    ap.add_argument("--plot", nargs=2, metavar=("RESULTS_JSON", "PNG"), help="only draw time against T")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for results.json")
    args = ap.parse_args()
    if args.plot:
        return plot(*args.plot)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (on a CPU, `mosa bench` times the layers)")
    import triton
    global MODE, DENSE_BACKEND, TUNE_ROUTING, DETERMINISTIC
    MODE = args.mode
    DETERMINISTIC = {"auto": None, "rows": True, "atomic": False}[args.scatter]
    if args.serial_heads:
        import mosa_attention.layers.mosa as layer_mod
        layer_mod.PARALLEL_HEADS = False
    if args.scalar_atomics or args.wide_atomics:
        from mosa_attention.ops import triton_mosa
        triton_mosa.VECTOR_ATOMICS = not args.scalar_atomics
        triton_mosa.NARROW_ATOMICS = not args.wide_atomics
    from mosa_attention.ops import triton_mosa as _tm
    if args.no_scaled_half:
        _tm.SCALED_HALF_ATOMICS = False
    from mosa_attention.ops import triton_routing as _tr
    _tr.UNROLL_PASSES = args.unrolled_topk
    _tr.TWO_LEVEL_SCANS = {"auto": None, "flat": False, "two-level": True}[args.topk_scans]
    if args.dwr_separate:
        _tm.DWR_IN_DWQKV = False
    if args.attn_bwd_split:
        _tm.SEQ_BLOCK_BWD = False
    if args.attn_bwd_outside:
        _tm.ATTN_IN_OUT_BWD = False
    _tm.DWO_IN_OUT_BWD = SWITCH[args.dwo_in_out_bwd]
    if args.tiles:
        _tm.TILE_OVERRIDES.update(json.loads(args.tiles))
    if args.dense_router_grad is not None:
        _tm.DENSE_ROUTER_GRAD_MIN_OVERLAP = args.dense_router_grad
    import mosa_attention.layers.mosa as _lm
    _lm.SHARED_INPUT_GRAD = SWITCH[args.shared_input]
    _lm.MOSA_HEADS_FIRST = not args.dense_first
    _lm.MASKED_SUMS = SWITCH[args.masked_sums]
    _lm.ROWS_ONLY = not args.no_rows_only
    from mosa_attention.ops import attention as _att
    _att.NARROW_SHARED_X = not args.wide_shared_x
    _lm.X_READ = not args.no_x_read
    DENSE_BACKEND = "torch" if args.dense_torch else "auto"
    if args.sdpa != "auto":
        for name in ("flash", "cudnn", "mem_efficient", "math"):
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(name == args.sdpa.replace("efficient", "mem_efficient"))
    if args.cublas_workspace is not None:  # read when the first cuBLAS handle is made (no product has run yet)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = args.cublas_workspace
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    if args.no_reduced_reduction:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    TUNE_ROUTING = args.tune
    import mosa_attention.layers.mosa as layer_module
    if args.router == "einsum":
        layer_module.router_logits = lambda x, w: torch.einsum("bth,eh->bet", x, w)
    if args.unfused:
        layer_module.MoSAAttention._fused = lambda self, x: False
    if args.select == "torch":
        from mosa_attention.ops import routing
        layer_module.select_topk = lambda s, k, first=False, backend="auto": routing.select_topk(s, k, first, "torch")
    out = {"mode": MODE, "scatter": args.scatter, "vector_atomics": not args.scalar_atomics, "narrow_atomics": not args.wide_atomics, "scaled_half_atomics": str(_tm.SCALED_HALF_ATOMICS), "unrolled_topk": args.unrolled_topk, "topk_scans": args.topk_scans, "parallel_heads": not args.serial_heads, "dwr_in_dwqkv": str(_tm.DWR_IN_DWQKV), "seq_block_bwd": _tm.SEQ_BLOCK_BWD, "attn_in_out_bwd": _tm.ATTN_IN_OUT_BWD, "dwo_in_out_bwd": args.dwo_in_out_bwd, "tiles": args.tiles, "dense_router_grad_min_overlap": _tm.DENSE_ROUTER_GRAD_MIN_OVERLAP, "shared_input_grad": args.shared_input, "mosa_heads_first": not args.dense_first, "masked_sums": args.masked_sums, "rows_only": not args.no_rows_only, "narrow_shared_x": not args.wide_shared_x, "x_read": not args.no_x_read, "router": args.router, "select": args.select, "fused_router": not args.unfused, "dense_backend": DENSE_BACKEND, "sdpa": args.sdpa, "blas": args.blas, "reduced_reduction": not args.no_reduced_reduction, "cublas_workspace": args.cublas_workspace, "card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": " ".join(sys.argv), "env": {k: v for k, v in os.environ.items() if k.startswith("MOSA_")}}
    print(out, flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")

    def save():
        with open(path, "w") as f:
            json.dump(out, f, indent=1)

    if args.check:
        parts = args.check_parts.split(",")
        for name, fn in (("dense", check_dense), ("routed", check_routed), ("routing", check_routing), ("ops", check)):
            if name in parts:
                fn(out)
                save()
    if args.check_streams:
        check_streams(out)
        save()
    if args.tune:
        tune(out, args.cases.split(",") if args.cases else None)
        save()
    if args.tune_topk:
        tune_topk(out)
        save()
    if args.profile:
        profile()
    if args.host_profile:
        host_profile()
    if args.timeline:
        timeline(os.path.join(args.out, "timeline"))
    if not args.no_bench:
        out["ceilings"] = ceilings()
        print(out["ceilings"], flush=True)
        run_cases(args, out)
        save()
        if not args.no_sweep:
            run_sweep(args, out)
    if args.grid:
        save()
        run_grid(args, out)
    save()
    if args.check and not all(out[c]["pass"] for c in ("check", "check_routing", "check_routed", "check_dense")
                              if c in out):
        sys.exit(1)


if __name__ == "__main__":
    main()
