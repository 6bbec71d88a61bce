"""Local (sliding-window) heads on a GPU: ``ops.local_attention_flex`` (FlexAttention with a sliding-window
block mask, the default on CUDA), the chunks (``ops.local_attention`` without it, O(T * window)) and the one-mask
reference (``ops.local_attention_reference``, O(T^2)), forward + backward, bf16.

    python benchmarks/bench_local.py --out OUT        # writes OUT/local.json, prints a table
    python benchmarks/bench_local.py --layer --out OUT  # the same paths inside LocalAttention and a local hybrid

For each (T, window): milliseconds (median over timed steps, CUDA events; eagerly, and replayed from one CUDA
graph, which removes the host's launch overhead), peak memory above the inputs, the SDPA backend asked for
(the chunks and the mask; FlexAttention has its own kernels), and the relative error of the output and of q's
gradient against a float32 run of the reference on the same random inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mosa_attention.bench.layer import capture_graph, median_ms
from mosa_attention.ops import attention as attention_ops
from mosa_attention.ops import local_attention, local_attention_reference
from mosa_attention.ops.attention import local_attention_flex

# "chunks" are the chunks at every length (the op's default on CUDA: FlexAttention; without it, chunks above 4096)
attention_ops.LOCAL_FLEX = False
attention_ops.LOCAL_MASK_MAX_T = 0
PATHS = (("flex", local_attention_flex), ("chunks", local_attention), ("mask", local_attention_reference))

BACKENDS = {"default": None, "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH}


def _step(fn, q, k, v, window, g):
    o = fn(q, k, v, window)
    o.backward(g)
    return o


def _time(fn, q, k, v, window, g, steps):
    for _ in range(3):
        _step(fn, q, k, v, window, g)
    torch.cuda.synchronize()
    return median_ms(lambda: _step(fn, q, k, v, window, g), steps, cuda=True)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_case(B, H, T, D, window, backend, steps):
    torch.manual_seed(T + window)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    row = {"B": B, "H": H, "T": T, "D": D, "window": window, "backend": backend}
    for name, fn in PATHS:
        if name == "flex" and backend != "default":  # (FlexAttention does not use SDPA's backends)
            continue
        ctx = sdpa_kernel(BACKENDS[backend]) if BACKENDS[backend] is not None else None
        try:
            if ctx is not None:
                ctx.__enter__()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            ms = _time(fn, q, k, v, window, g, steps)
            row[f"{name}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            row[f"{name}_ms"] = ms
            replay, why = capture_graph(lambda: _step(fn, q, k, v, window, g))
            row[f"{name}_graph_ms"] = median_ms(replay, steps, cuda=True) if replay is not None else None
            if why:
                row[f"{name}_graph_error"] = why
        except (RuntimeError, torch.OutOfMemoryError) as e:  # a backend that does not take the mask, or OOM
            row[f"{name}_ms"] = None
            row[f"{name}_error"] = str(e).splitlines()[0][:160]
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
            q.grad = k.grad = v.grad = None
            torch.cuda.empty_cache()
    if T <= 16384:  # accuracy against float32 through the one-mask path
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        want = local_attention_reference(qf, kf, vf, window)
        want.backward(g.float())
        for name, fn in PATHS[:2]:
            if row.get(f"{name}_ms") is None:
                continue
            q.grad = None
            got = fn(q, k, v, window)
            got.backward(g)
            row[f"{name}_rel_err_y"] = _rel(got, want)
            row[f"{name}_rel_err_dq"] = _rel(q.grad, qf.grad)
        q.grad = k.grad = v.grad = None
    return row


def profile(T, window, steps=5):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    B = max(1, 16384 // T)
    q, k, v = (torch.randn(B, 4, T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    for name, fn in PATHS:
        for _ in range(3):
            _step(fn, q, k, v, window, g)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                _step(fn, q, k, v, window, g)
            torch.cuda.synchronize()
        print(f"== {name}: T={T} window={window} B={B}, {steps} steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


def layer_check(steps=10):
    """The local heads inside layers (q, k, v strided views from the split + RoPE kernel): ``LocalAttention``
    (4 heads, h = 512) and a hybrid of 4 local + 17 MoSA heads (rho = 32, local window 64), bf16, forward +
    backward ms (eager, median; FlexAttention also as one CUDA graph) at B = 16, T = 1024 and B = 1, T = 16384 and 65536, through
    FlexAttention, the chunks and (up to T = 16384) the one mask; the max relative error of the output and of
    every gradient of the first two against the mask."""
    from mosa_attention import LocalAttention, MoSAAttention
    rows = []
    for B, T in ((16, 1024), (1, 16384), (1, 65536)):
        torch.manual_seed(T)
        for name, make in (("local 4 heads", lambda: LocalAttention(512, 4, window=64)),
                           ("hybrid 4 local + 17 MoSA", lambda: MoSAAttention(512, 17, 32, num_dense_heads=4,
                                                                             dense_kind="local", local_window=64))):
            layer = make().cuda().to(torch.bfloat16)
            x = torch.randn(B, T, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn_like(x)
            params = [x] + list(layer.parameters())

            def step():
                y = layer(x)
                return y, torch.autograd.grad(y, params, g)

            row = {"layer": name, "B": B, "T": T}
            outs = {}
            for path, flex, limit in (("flex", True, 0), ("chunks", False, 0), ("mask", False, 10 ** 9)):
                if path == "mask" and T > 16384:
                    continue
                attention_ops.LOCAL_FLEX, attention_ops.LOCAL_MASK_MAX_T = flex, limit
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                row[f"{path}_ms"] = median_ms(step, steps, cuda=True)
                row[f"{path}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
                if path == "flex":  # (a failed capture of the chunks' layer step, seen once, broke the process's RNG)
                    replay, why = capture_graph(step)
                    row[f"{path}_graph_ms"] = median_ms(replay, steps, cuda=True) if replay is not None else why
                if T <= 16384:
                    outs[path] = step()
            if "mask" in outs:
                ym, gm = outs["mask"]
                for path in ("flex", "chunks"):
                    y, gr = outs[path]
                    row[f"{path}_max_rel_err"] = max(_rel(a, b) for a, b in zip((y, *gr), (ym, *gm)))
            attention_ops.LOCAL_FLEX, attention_ops.LOCAL_MASK_MAX_T = False, 0
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--backends", default="default,efficient,cudnn")
    ap.add_argument("--layer", action="store_true", help="only the layer-level check (LocalAttention, a local hybrid)")
    ap.add_argument("--profile", default=None, metavar="T,WINDOW",
                    help="only a torch.profiler table of both versions at this length and window (B = 16384 / T)")
    args = ap.parse_args()
    if args.profile:
        return profile(*(int(v) for v in args.profile.split(",")))
    if args.layer:
        os.makedirs(args.out, exist_ok=True)
        rows = layer_check(args.steps)
        with open(os.path.join(args.out, "local_layers.json"), "w") as f:
            json.dump({"meta": {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                "command": "benchmarks/bench_local.py --layer"}, "rows": rows}, f, indent=1)
        return None
    os.makedirs(args.out, exist_ok=True)
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "benchmarks/bench_local.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items())}
    rows = []
    # 4 local heads of dim 64 with B * T = 16384 tokens (the perplexity-matched hybrid's batch at T = 1024)
    for T, window in ((1024, 32), (4096, 64), (16384, 64), (16384, 256), (65536, 64)):
        B = max(1, 16384 // T)
        for backend in args.backends.split(","):
            row = run_case(B, 4, T, 64, window, backend, args.steps)
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "local.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"{'T':>6} {'win':>4} {'backend':>9} | ms eager / graph: {'flex':>15} {'chunks':>15} {'mask':>15} | "
          f"MiB: {'flex':>7} {'chunks':>7} {'mask':>7} | err y, dq: {'flex':>17} {'chunks':>17}")
    for r in rows:
        ms = " ".join(f"{fmt(r.get(p + '_ms'), '7.3f')}/{fmt(r.get(p + '_graph_ms'), '7.3f')}" for p, _ in PATHS)
        mib = " ".join(fmt(r.get(p + "_peak_mib"), "7.1f") for p, _ in PATHS)
        err = " ".join(f"{fmt(r.get(p + '_rel_err_y'), '8.1e')},{fmt(r.get(p + '_rel_err_dq'), '8.1e')}"
                       for p in ("flex", "chunks"))
        print(f"{r['T']:>6} {r['window']:>4} {r['backend']:>9} | {ms} | {mib} | {err}")


if __name__ == "__main__":
    main()
