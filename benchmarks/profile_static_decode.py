"""Where a fixed-shape decoding step (``inference.static.StaticDecoder``) spends its time on the device.

    python benchmarks/profile_static_decode.py cuda OUT.json       # from the repository root

Tiny preset at rho = 32 (the models of bench_generation.py, thresholds calibrated the same way), float32 unless
DTYPE=bfloat16, batch B (default 1), PL prompt tokens (default 1024); BACKENDS the static decoder's backends to run. For each model: the step's time as a CUDA
graph replay (median over 32 steps), then 8 steps run eagerly (``graphs=False``) under torch.profiler: kernels
per step, their summed duration, and the kernels that take the most time, grouped by name. A graph replays the
same kernels back to back, so (graph step time) - (summed kernel time) is about what the gaps between kernels
cost.
"""
import json
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "src")
sys.path.insert(0, "benchmarks")
from bench_generation import bench_model, sync  # noqa: E402
from mosa_attention.inference import extend, new_cache  # noqa: E402
from mosa_attention.inference.static import StaticDecoder  # noqa: E402

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
out = sys.argv[2] if len(sys.argv) > 2 else "static_probe.json"
L, B = int(os.environ.get("PL", 1024)), int(os.environ.get("B", 1))
dtype = getattr(torch, os.environ.get("DTYPE", "float32"))
backends = os.environ.get("BACKENDS", "triton torch").split()
models = os.environ.get("MODELS", "dense mosa-hybrid pure-mosa").split()
steps, timed = 8, 32
rows = []


def decoder_for(model, ids, backend, graphs):
    cache = new_cache(model, torch.zeros(B, dtype=torch.long, device=dev))
    extend(model, ids[:, :L], cache)
    return StaticDecoder(model, cache, max_len=L + timed + steps + 2, graphs=graphs, backend=backend)


for name in models:
    model = bench_model(name, dev, dtype)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (B, L + timed + steps + 2), generator=torch.Generator().manual_seed(0)).to(dev)
    for backend in (backends if cfg.sparse_heads else backends[:1]):
        # the step as a graph replay
        dec = decoder_for(model, ids, backend, graphs=dev.type == "cuda")
        dec.step(ids[:, L])
        times = []
        for t in range(L + 1, L + 1 + timed):
            sync(dev)
            t0 = time.perf_counter()
            dec.step(ids[:, t])
            sync(dev)
            times.append(time.perf_counter() - t0)
        graph_ms = 1e3 * statistics.median(times)
        del dec
        # the same steps eagerly, profiled
        dec = decoder_for(model, ids, backend, graphs=False)
        for t in range(L, L + 2):
            dec.step(ids[:, t])
        sync(dev)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for t in range(L + 2, L + 2 + steps):
                dec.step(ids[:, t])
            sync(dev)
        kernels = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                n = e.name[:90]
                c, us = kernels.get(n, (0, 0.0))
                kernels[n] = (c + 1, us + e.device_time_total)
        total_us = sum(us for _, us in kernels.values())
        launches = sum(c for c, _ in kernels.values())
        top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]
        r = {"model": name, "backend": backend, "batch": B, "prompt": L, "dtype": str(dtype),
             "graph_ms_per_step": graph_ms, "kernels_per_step": launches / steps,
             "kernel_ms_per_step": total_us / 1e3 / steps,
             "top": [{"kernel": n, "per_step": c / steps, "us_per_step": us / steps} for n, (c, us) in top]}
        rows.append(r)
        print(f"## {name} {backend}: graph {graph_ms:.3f} ms/step, {r['kernels_per_step']:.0f} kernels/step, "
              f"{r['kernel_ms_per_step']:.3f} ms of kernels/step", flush=True)
        for t in r["top"][:15]:
            print(f"   {t['us_per_step']:8.1f} us  {t['per_step']:5.1f}x  {t['kernel']}", flush=True)
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
        del dec
    del model
